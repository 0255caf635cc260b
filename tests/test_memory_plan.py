"""The memory plan: an 8B full fine-tune fits 8 x 80 GB under FSDP, a 70B one on one GPU is
refused with changes that fit, `attune plan` prints the table, `attune train` refuses before
Ray starts, and on CPU the plan is within 15% of the peak measured in the plain loop.

    pytest tests/test_memory_plan.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from attune import capacity
from attune.cli import main
from attune.config import ConfigError
from attune.modeling import model_config
from attune.recipe import Recipe, load_recipe
from attune.train import preflight, trainer
from attune.train.memory_plan import (GiB, model_shape, plan, plan_recipe, rows_per_micro_batch,
                                      with_overrides)

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)


def config_only(tmp_path: Path, name: str, shape: dict) -> str:
    """A model directory with config.json and no weights: all the plan reads."""
    LlamaConfig(**shape).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def gpu_recipe(model: str, workers: int, **sections) -> Recipe:
    raw = {"name": "plan", "model": {"name_or_path": model}, "data": {"max_seq_len": 4096},
           "optim": {"max_steps": 10, "warmup_steps": 1, "micro_batch_size": 2},
           "scaling": {"num_workers": workers, "gpus_per_worker": 1, "strategy": "fsdp",
                       "device_memory_gib": 80}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Recipe.model_validate(raw)


def test_an_8b_full_fine_tune_fits_8_gpus_of_80_gb_under_fsdp(tmp_path):
    recipe = gpu_recipe(config_only(tmp_path, "8b", LLAMA_8B), 8)
    p = plan_recipe(recipe)
    assert p.shape.params == pytest.approx(8.03e9, rel=0.01)
    # fp32 master weights, gradients and AdamW's two states: 16 bytes a parameter, over 8
    state = p.terms["parameters"] + p.terms["gradients"] + p.terms["optimizer states"]
    assert state == pytest.approx(16 * p.shape.params / 8, rel=1e-6)
    assert p.fits and 15 * GiB < p.total_bytes < 40 * GiB, p.terms


def test_grpo_counts_a_groups_sequences_and_the_engines_beside_the_workers(tmp_path):
    grpo = {"objective": "grpo", "rewards": [{"function": "contains_answer"}], "num_generations": 8}
    model = config_only(tmp_path, "8b", LLAMA_8B)
    sft = plan_recipe(gpu_recipe(model, 8))
    recipe = gpu_recipe(model, 8, data={"max_seq_len": 4096, "format": "prompts"},
                        method={**grpo, "engine_gpus": 1})
    apart = plan_recipe(recipe)
    # a micro-batch of 2 prompts puts 2 x 8 completions through the model
    assert rows_per_micro_batch(recipe) == 16
    assert apart.terms["activations"] > 4 * sft.terms["activations"]
    assert not any(k.startswith("engine") for k in apart.terms)  # engines on GPUs of their own
    beside = plan_recipe(gpu_recipe(model, 8, data={"max_seq_len": 4096, "format": "prompts"},
                                    method={**grpo, "engine_gpus": 0.5}))
    assert beside.terms["engine weights (bf16)"] == 2 * beside.shape.params
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers x kv heads x head dim, bf16
    assert beside.terms["engine KV cache"] == kv_per_token * 2 * 8 * 4096


def test_a_70b_full_fine_tune_on_one_gpu_is_refused_with_changes_that_fit(tmp_path):
    model = config_only(tmp_path, "70b", LLAMA_70B)
    recipe = gpu_recipe(model, 1)
    with pytest.raises(ConfigError) as refused:
        preflight.check_memory(recipe, 80, "scaling.device_memory_gib")
    message = str(refused.value)
    assert message.startswith("memory plan: ") and "DOES NOT FIT" in message
    assert "changes that fit" in message
    p = plan_recipe(recipe)
    changes = [" ".join(overrides) for overrides, _, _ in p.suggestions]
    assert any("method.type=lora" in c and "scaling.num_workers=" in c for c in changes), changes
    assert any(c.startswith("scaling.num_workers=") for c in changes), changes
    assert "memory.cpu_offload=true" in changes, changes
    shape = model_shape(model_config(model))
    for overrides, total, _ in p.suggestions:  # each one really fits, planned again
        again = plan(shape, with_overrides(recipe, overrides), 80)
        assert again.fits and again.total_bytes == total


def test_lora_counts_r_times_in_plus_out_per_target(tmp_path):
    recipe = gpu_recipe(config_only(tmp_path, "8b", LLAMA_8B), 8,
                        method={"type": "lora", "rank": 16, "target_modules": ["q_proj", "v_proj"]})
    p = plan_recipe(recipe)
    assert p.shape.lora_params(recipe) == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert p.terms["gradients"] == p.shape.lora_params(recipe) * 2 // 8  # bf16 adapters, sharded


def test_attune_plan_prints_the_table(tmp_path, capsys):
    model = config_only(tmp_path, "8b", LLAMA_8B)
    assert main(["plan", "recipes/llama3-8b-full.yaml", f"model.name_or_path={model}",
                 "scaling.device_memory_gib=80"]) == 0
    out = capsys.readouterr().out
    for line in ("8.03 B parameters, full, fsdp over 8 worker(s)", "parameters", "gradients",
                 "optimizer states", "activations", "logits", "peak", ": fits", "KV cache"):
        assert line in out, out
    assert main(["plan", "recipes/llama3-8b-full.yaml", f"model.name_or_path={model}",
                 "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["fits"] is None and planned["total_bytes"] > 10 * GiB


def test_attune_train_refuses_a_recipe_too_big_before_ray_starts(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the memory plan was checked")
    monkeypatch.setattr(trainer, "ensure_ray", refuse)
    assert main(["train", "recipes/tiny-full.yaml", "scaling.device_memory_gib=0.06"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attune: memory plan: ") and "DOES NOT FIT" in err, err
    assert "changes that fit (each planned again):" in err and "Traceback" not in err


def this_machine() -> list[dict]:
    """This machine as Ray reports it: its CPUs and the memory Ray lets tasks use (about 70% of
    what is available at start)."""
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                     if line.startswith("MemAvailable:"))
    return [{"CPU": float(max(6, 2 * os.cpu_count())), "memory": 0.7 * available}]


@pytest.mark.parametrize("recipe", ["tiny-full", "tiny-lora"])
def test_the_tiny_recipes_are_not_refused_on_this_machine(recipe, tiny_base):
    r = load_recipe(REPO / f"recipes/{recipe}.yaml")
    gib, source = capacity.device_memory(r, this_machine())
    assert gib is not None and source == "a node's memory shared by the workers on it"
    assert preflight.check_memory(r, gib, source).fits


def test_device_memory_from_the_gpus_accelerator_type():
    recipe = gpu_recipe("attune:tiny-llama", 8).model_copy(deep=True)
    recipe.scaling.device_memory_gib = None
    h100 = {"CPU": 64.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
    assert capacity.device_memory(recipe, [h100]) == (80, "accelerator_type:H100")
    gib, source = capacity.device_memory(recipe, [h100, {**h100, "accelerator_type:L4": 1.0}])
    assert gib == 24  # where nodes differ, the smallest
    gib, source = capacity.device_memory(recipe, [{"CPU": 8.0, "GPU": 1.0,
                                                   "accelerator_type:X9": 1.0}])
    assert gib is None and "X9" in source and "scaling.device_memory_gib" in source


def measure(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, str(REPO / "bench/memory_plan.py"), "--out", str(out), *args],
                   cwd=REPO, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.read_text())["rows"]


def test_the_plan_is_within_15_percent_of_the_tiny_models_measured_peak(tmp_path, tiny_base):
    rows = measure(tmp_path, "--shape", "tiny")
    assert {r["setting"] for r in rows} == {"plain", "checkpointing+chunked"}
    for r in rows:
        assert 0.85 <= r["plan_over_measured"] <= 1.15, r


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_a_100m_models_measured_peak(tmp_path):
    rows = measure(tmp_path, "--shape", "100m", "--setting", "plain", "--seq", "256")
    for r in rows:
        assert 0.85 <= r["plan_over_measured"] <= 1.15, r

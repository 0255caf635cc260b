"""The recipe's memory settings on CPU with 2 gloo workers (torchrun, no Ray): each trains, the
exact ones leave the fp32 loss unchanged, a sharded checkpoint of 2 workers resumes on 1, and
activation checkpointing and the chunked loss lower peak memory.

    pytest tests/test_memory_settings.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from attune.recipe import Recipe
from attune.tiny_models import ensure_tiny
from attune.train.memory_profile import measured_peak_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-5  # fp32 on CPU: these settings change the order of operations only
LORA = "scaling.strategy=fsdp,method.type=lora,optim.lr=1e-2"
# Every setting off: the baseline each variant is compared with.
PLAIN = ("scaling.strategy=fsdp,memory.loss_chunk_tokens=null,"
         "memory.activation_checkpointing=false,memory.load_on_rank0=false")


def torchrun(out: Path, base: str, variants: dict[str, str], workers: int = 2,
             steps: int = 4) -> dict[str, list[dict]]:
    """Each variant's reports, from tests/gloo_train.py run by `workers` torchrun processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={workers}", str(REPO / "tests/gloo_train.py"), str(out), base,
               f"--steps={steps}", *[f"--variant={name}={spec}" for name, spec in variants.items()]]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


def losses(reports: list[dict]) -> list[float]:
    return [r["loss"] for r in reports]


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> tuple[dict, Path]:
    """One 2-worker torchrun with every variant (its start-up is most of the time)."""
    root = tmp_path_factory.mktemp("memory-settings")
    return torchrun(root / "runs.json", tiny_base, {
        "plain": PLAIN,
        "checkpointing": f"{PLAIN},memory.activation_checkpointing=true",
        "chunked_loss": f"{PLAIN},memory.loss_chunk_tokens=64",
        "rank0_load": f"{PLAIN},memory.load_on_rank0=true",
        "all_fsdp": "scaling.strategy=fsdp,memory.activation_checkpointing=true",
        "all_ddp": "scaling.strategy=ddp,memory.activation_checkpointing=true",
        "cpu_offload": f"{PLAIN},memory.cpu_offload=true",
        "compiled": "scaling.strategy=fsdp,memory.activation_checkpointing=true,model.compile=true",
        "mixed_fsdp": f"{PLAIN},memory.mixed_precision=true,checkpoints={root / 'mixed'}",
        "mixed_ddp": "scaling.strategy=ddp,memory.mixed_precision=true",
        "lora": "scaling.strategy=fsdp,method.type=lora,optim.lr=1e-2",
        "first_half": f"{PLAIN},checkpoints={root / 'half'},stop_at=2",
        "lora_first_half": f"{LORA},checkpoints={root / 'lora-half'},stop_at=2",
        "lora_plain": LORA,
    }), root


@pytest.mark.parametrize("variant", ["checkpointing", "chunked_loss", "rank0_load", "all_fsdp",
                                     "all_ddp", "cpu_offload", "compiled"])
def test_a_memory_setting_leaves_the_fp32_loss_unchanged(runs, variant):
    reports, _ = runs
    assert losses(reports[variant]) == pytest.approx(losses(reports["plain"]), abs=EXACT)
    assert losses(reports["plain"])[-1] < losses(reports["plain"])[0] - 1  # it trains


def test_mixed_precision_computes_in_bf16_over_fp32_master_weights(runs):
    reports, root = runs
    plain = losses(reports["plain"])
    for variant in ("mixed_fsdp", "mixed_ddp"):
        mixed = losses(reports[variant])
        assert mixed == pytest.approx(plain, abs=2e-2)  # trains the same way ...
        assert mixed != pytest.approx(plain, abs=EXACT)  # ... computing in bf16
    with safe_open(root / "mixed/step-0000004/model/model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}


def test_lora_trains_under_fsdp_with_every_default(runs):
    lora = losses(runs[0]["lora"])
    assert lora[-1] < lora[0] - 1


def test_a_sharded_checkpoint_of_two_workers_resumes_on_one(runs, tiny_base, tmp_path):
    reports, root = runs
    checkpoint = Path(reports["first_half"][-1]["checkpoint"])
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # each worker wrote its own shards
    resumed = torchrun(tmp_path / "resumed.json", tiny_base,
                       {"resumed": f"{PLAIN},resume_from={checkpoint}"}, workers=1)["resumed"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == pytest.approx(losses(reports["plain"])[2:], abs=EXACT)


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_on_one_worker(runs, tiny_base, tmp_path):
    reports, _ = runs
    checkpoint = reports["lora_first_half"][-1]["checkpoint"]
    resumed = torchrun(tmp_path / "resumed.json", tiny_base,
                       {"resumed": f"{LORA},resume_from={checkpoint}"}, workers=1)["resumed"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == pytest.approx(losses(reports["lora_plain"])[2:], abs=EXACT)


def test_tied_embeddings_stay_tied_on_ranks_built_on_meta(tmp_path):
    base = str(ensure_tiny("attune:tiny-qwen2"))  # Qwen2 ties its output layer to its embeddings
    runs = torchrun(tmp_path / "tied.json", base, {
        "every_rank_reads": "scaling.strategy=ddp,memory.load_on_rank0=false",
        "ddp": "scaling.strategy=ddp", "fsdp": "scaling.strategy=fsdp"}, steps=3)
    for variant in ("ddp", "fsdp"):
        assert losses(runs[variant]) == pytest.approx(losses(runs["every_rank_reads"]), abs=EXACT)


# A model whose logits and activations outweigh its weights, as a 128k-vocabulary model's do.
WIDE = dict(vocab_size=16000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)


def peak_bytes_of_a_step(base: str, **memory) -> int:
    """Peak CPU bytes of one training step of the wide model with these memory settings."""
    recipe = Recipe.model_validate({
        "name": "peak", "model": {"name_or_path": base},
        "optim": {"max_steps": 1, "warmup_steps": 0, "micro_batch_size": 4},
        "scaling": {"num_workers": 1}, "data": {"max_seq_len": 256},
        "memory": memory})
    ids = torch.randint(0, WIDE["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "num_tokens": torch.full((4,), 256),
             "position_ids": torch.arange(256).expand(4, 256)}
    return measured_peak_bytes(recipe, base, batch)


def test_activation_checkpointing_and_the_chunked_loss_lower_peak_memory(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**WIDE)).save_pretrained(tmp_path / "wide")
    base = str(tmp_path / "wide")
    plain = peak_bytes_of_a_step(base, activation_checkpointing=False, loss_chunk_tokens=None)
    checkpointing = peak_bytes_of_a_step(base, activation_checkpointing=True,
                                         loss_chunk_tokens=None)
    chunked = peak_bytes_of_a_step(base, activation_checkpointing=False, loss_chunk_tokens=128)
    both = peak_bytes_of_a_step(base, activation_checkpointing=True, loss_chunk_tokens=128)
    figures = {"plain": plain, "activation_checkpointing": checkpointing,
               "chunked_loss": chunked, "both": both}
    (REPO / "tests/artifacts").mkdir(exist_ok=True)
    (REPO / "tests/artifacts/memory-settings-peak.json").write_text(json.dumps(figures, indent=2))
    assert checkpointing < plain and chunked < plain and both < min(checkpointing, chunked), figures

"""Fine-tuning on a real Ray cluster with real Ray Train workers (2 CPU processes, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attune.evaluate.greedy_answers import (
    exact_match,
    greedy_answers,
    load_for_generation,
    qa_pairs,
)
from attune.recipe import load_recipe
from attune.train.trainer import fine_tune

pytestmark = pytest.mark.slow

SHORT = ["optim.max_steps=30", "optim.warmup_steps=3", "eval.every_steps=10",
         "eval.log_every_steps=10", "checkpoint.every_steps=10"]


def run(recipe: str, name: str, *overrides: str) -> dict:
    entry = fine_tune(load_recipe(recipe, [f"name={name}", *SHORT, *overrides]))
    return json.loads((Path(entry) / "attune.json").read_text())


def losses(manifest: dict) -> list[float]:
    return [h["loss"] for h in manifest["history"]]


def test_ddp_full_fine_tune_learns_the_bundled_answers(tiny_full_entry, tiny_base):
    manifest = json.loads((Path(tiny_full_entry) / "attune.json").read_text())
    assert manifest["final_metrics"]["loss"] < losses(manifest)[0] / 5
    pairs = qa_pairs()
    questions, expected = [q for q, _ in pairs], [a for _, a in pairs]
    model, tokenizer = load_for_generation(tiny_full_entry)
    assert exact_match(greedy_answers(model, tokenizer, questions), expected) >= 0.9
    base, tokenizer = load_for_generation(tiny_base)
    assert exact_match(greedy_answers(base, tokenizer, questions), expected) <= 0.02


def test_ddp_lora_lowers_the_loss(tiny_lora_entry):
    manifest = json.loads((Path(tiny_lora_entry) / "attune.json").read_text())
    assert losses(manifest)[-1] < losses(manifest)[0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_lowers_the_loss(ray_cluster, method):
    recipe = "recipes/tiny-full.yaml" if method == "full" else "recipes/tiny-lora.yaml"
    manifest = run(recipe, f"fsdp-{method}", "scaling.strategy=fsdp")
    assert manifest["recipe"]["scaling"]["strategy"] == "fsdp"
    assert losses(manifest)[-1] < losses(manifest)[0]


def test_full_entry_has_everything_serving_needs(tiny_full_entry):
    entry = Path(tiny_full_entry)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "attune.json", "loss_curve.png"):
        assert (entry / name).is_file(), name
    manifest = json.loads((entry / "attune.json").read_text())
    assert manifest["method"] == "full" and manifest["base_model"] == "attune:tiny-llama"
    assert len(manifest["dataset"]["sha256"]) == 64
    assert {"loss", "eval_loss", "tokens_per_s"} <= set(manifest["final_metrics"])
    assert manifest["best_metrics"]["eval_loss"] <= manifest["final_metrics"]["eval_loss"]
    assert manifest["recipe"]["name"] == "tiny-full" and manifest["created_at"]
    assert (entry / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def test_lora_entry_is_a_vllm_loadable_adapter(tiny_lora_entry, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = Path(tiny_lora_entry)
    adapter = json.loads((entry / "adapter_config.json").read_text())
    assert not adapter.get("modules_to_save") and adapter["r"] == 16
    assert not (entry / "model.safetensors").exists()  # the adapter only, not the base
    manifest = json.loads((entry / "attune.json").read_text())
    assert manifest["lora"]["rank"] == 16
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(entry))
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size  # not resized


def test_lost_worker_restarts_the_group_from_the_last_checkpoint(ray_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "fault"
    monkeypatch.setenv("ATTUNE_FAULT_AT_STEP", "15")
    monkeypatch.setenv("ATTUNE_FAULT_MARKER", str(marker))
    manifest = run("recipes/tiny-full.yaml", "fault-tolerance", "checkpoint.max_failures=1")
    assert marker.read_text().startswith("failed at step 15")  # a worker really died
    assert [h["step"] for h in manifest["history"]] == [10, 20, 30]  # 10 kept, 11-15 redone


def test_interrupted_run_started_again_resumes(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTUNE_FAULT_AT_STEP", "15")
    monkeypatch.setenv("ATTUNE_FAULT_MARKER", str(tmp_path / "fault"))
    with pytest.raises(Exception):
        run("recipes/tiny-full.yaml", "resume", "checkpoint.max_failures=0")
    monkeypatch.delenv("ATTUNE_FAULT_AT_STEP")
    manifest = run("recipes/tiny-full.yaml", "resume", "checkpoint.max_failures=0")
    # The second run started at the step-10 checkpoint: no step is reported twice.
    assert [h["step"] for h in manifest["history"]] == [10, 20, 30]


def test_a_workers_state_api_finds_its_own_cluster(ray_cluster, ray_head):
    """Train's PlacementGroupCleaner asks the State API, from inside the cluster, whether the run's
    controller is alive. With a second cluster on the machine (the `ray start` head here) a worker
    of the in-process cluster found none or the wrong one, so the cleaner either died, held each
    run's end 12 s, or removed a live run's placement group (see attune.cluster.ensure_ray)."""
    import ray
    from ray.util.state import get_actor

    @ray.remote(num_cpus=0)
    class Probe:
        def state_of(self, actor_id: str) -> str:
            return get_actor(actor_id, timeout=20).state

    probe = Probe.remote()
    try:
        assert ray.get(probe.state_of.remote(probe._actor_id.hex()), timeout=120) == "ALIVE"
    finally:
        ray.kill(probe)

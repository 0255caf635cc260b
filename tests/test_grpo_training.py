"""GRPO end to end: the tiny model after the bundled supervised fine-tune, trained against rewards
it does not yet meet, with rollouts from real vLLM engines (Ray actors) synced every step.

    pytest tests/test_grpo_training.py
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from attune.config import ConfigError, validate
from attune.recipe import load_recipe
from attune.serve.config import ServeConfig
from attune.serve.llm_config import llm_configs
from attune.train.rewards import RewardError
from attune.train.trainer import fine_tune

pytestmark = pytest.mark.slow

RECIPE = "recipes/tiny-grpo.yaml"
# After a sync the engine samples with the trainer's weights: the per-token gap between the
# engine's and the trainer's log-probabilities is rounding (about 1e-6 in fp32), far below the
# 0.1s a step apart would show.
SYNCED_GAP = 1e-3


def run(start: str, name: str, *overrides: str) -> dict:
    entry = fine_tune(load_recipe(RECIPE, [f"model.name_or_path={start}", f"name={name}", *overrides]))
    return json.loads((Path(entry) / "attune.json").read_text())


def test_grpo_raises_the_held_out_reward(tiny_full_entry, artifacts):
    manifest = run(tiny_full_entry, "grpo-learns")
    history = manifest["history"]
    start, end = history[0], history[-1]
    assert start["step"] == 0 and end["step"] == 40
    # The SFT model answers with the bare fact ("12."): the short-sentence reward is rarely met.
    assert start["eval_reward/matches_format"] < 0.4
    # Held-out prompts (data.eval_fraction): the sentence form is learned, not memorised.
    assert end["eval_reward/matches_format"] >= start["eval_reward/matches_format"] + 0.3
    assert end["eval_reward"] >= start["eval_reward"] + 0.25
    for h in history[1:]:  # what a GRPO step reports (and MLflow records)
        assert h["logp_gap"] < SYNCED_GAP  # synced every step: the engine sampled from this model
        assert h["time/rollout_s"] > 0 and h["time/sync_s"] > 0 and h["time/update_s"] > 0
        assert h["rollout_tokens_per_s"] > 0 and 1 <= h["completion_tokens"] <= 16
        assert {"reward", "reward_std", "reward/contains_answer", "clip_fraction"} <= h.keys()
    assert manifest["best_metrics"]["eval_reward"] == max(h["eval_reward"] for h in history)
    # MLflow has every report at its step, the reward before training (step 0) included
    client = MlflowClient(manifest["mlflow"]["tracking_uri"])
    for metric in ("eval_reward", "reward/matches_format", "time/sync_s", "clip_fraction"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(
            manifest["mlflow"]["run_id"], metric))
        assert logged == [(h["step"], pytest.approx(h[metric])) for h in history if metric in h]
    entry = Path(tiny_full_entry).parent / "grpo-learns"
    curve = entry / "loss_curve.png"  # the reward curve
    assert curve.read_bytes().startswith(b"\x89PNG")
    (artifacts / "grpo_reward_curve.png").write_bytes(curve.read_bytes())
    # a full model like tiny-full's: served as its own vLLM deployment, chatted with like any entry
    config = validate(ServeConfig, {"entries": [str(entry)], "base_models": [
        {"id": "tiny-llama", "name_or_path": "attune:tiny-llama"}]}, "args")
    assert [c.model_loading_config.model_id for c in llm_configs(config)] == ["tiny-llama",
                                                                             "grpo-learns"]


def test_lora_grpo_on_two_workers_pushes_the_adapter_to_two_engines(tiny_full_entry):
    manifest = run(tiny_full_entry, "grpo-lora", "method.type=lora", "optim.max_steps=6",
                   "optim.lr=2e-3", "eval.every_steps=3", "checkpoint.every_steps=6",
                   "scaling.num_workers=2", "method.num_engines=2")
    trained = [h for h in manifest["history"] if h["step"] > 0]
    # Each engine added the adapter to its base weights: it samples what the trainer scores,
    # for both ranks' prompts.
    assert all(h["logp_gap"] < SYNCED_GAP for h in trained)
    assert manifest["lora"]["rank"] == 16


def test_a_killed_engine_comes_back_with_the_current_weights(tiny_full_entry):
    result: dict = {}
    name = "grpo-engine-lost"
    thread = threading.Thread(target=lambda: result.update(manifest=run(
        tiny_full_entry, name, "optim.max_steps=16", "eval.every_steps=8",
        "checkpoint.every_steps=16")))
    thread.start()
    engine = _poll(lambda: _engine_synced_past(name, step=3), what="an engine past step 3")
    ray.kill(engine, no_restart=False)  # its process dies; Ray starts it again (base weights)
    thread.join(timeout=600)
    assert not thread.is_alive()
    final = result["manifest"]["history"][-1]
    assert final["engine_restarts"] == 1  # seen by the run, which carried on
    assert final["logp_gap"] < SYNCED_GAP  # the restarted engine samples with the trained weights


def test_a_lost_worker_resumes_and_its_new_engines_get_the_checkpoints_weights(
        tiny_full_entry, tmp_path, monkeypatch):
    marker = tmp_path / "fault"
    monkeypatch.setenv("ATTUNE_FAULT_AT_STEP", "13")
    monkeypatch.setenv("ATTUNE_FAULT_MARKER", str(marker))
    manifest = run(tiny_full_entry, "grpo-resume", "optim.max_steps=20", "eval.every_steps=10",
                   "checkpoint.every_steps=10", "checkpoint.max_failures=1")
    assert marker.read_text().startswith("failed at step 13")  # a worker really died
    history = manifest["history"]
    assert [h["step"] for h in history] == [0, 10, 20]  # resumed at 10, 11-13 redone
    # The restarted group's engines started from the base model and were synced to step 10's.
    assert history[-1]["logp_gap"] < SYNCED_GAP


def test_a_reward_that_fails_stops_the_run_in_one_line(tiny_full_entry, tmp_path, monkeypatch):
    (tmp_path / "grpo_topic_rewards.py").write_text(
        "def needs_topic(prompt, completion, **fields):\n    return len(fields['topic'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises((ConfigError, RewardError)) as failure:
        run(tiny_full_entry, "grpo-bad-reward", "method.rewards=[{function: 'grpo_topic_rewards:needs_topic'}]")
    message = str(failure.value)
    assert "\n" not in message and "grpo_topic_rewards:needs_topic" in message
    # found on the driver, before any engine started: the first line checked names itself
    assert re.search(r"data/transformer_qa_prompts\.jsonl:\d+: raised KeyError: 'topic'", message)


def test_a_reward_that_fails_on_a_sample_stops_the_run_in_one_line(tiny_full_entry):
    """A tolerance that is not a number passes the check with an empty completion (no number to
    compare), then fails on the first sampled number, in a worker."""
    with pytest.raises(RewardError) as failure:
        run(tiny_full_entry, "grpo-reward-fails-late", "checkpoint.max_failures=0",
            "method.rewards=[{function: numeric_match, args: {field: answer, tolerance: x}}]")
    message = str(failure.value)
    assert "\n" not in message and message.startswith("reward numeric_match on ")
    # which sample meets it first is chance: a number next to a numeric answer (the tolerance) or
    # next to a word one ('Encoder-only' is no number either)
    assert re.search(r"transformer_qa_prompts\.jsonl:\d+: raised (TypeError: '<=' not supported|"
                     r"ValueError: could not convert string to float)", message)


def _engine_synced_past(run_name: str, step: int):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(run_name) and "-rollout-" in actor["name"]:
            engine = ray.get_actor(actor["name"], namespace=actor["namespace"])
            if ray.get(engine.version.remote()) > step:
                return engine
    return None


def _poll(check, what: str, limit_s: float = 600):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {limit_s:.0f} s")


def test_attune_tune_searches_grpo_on_the_held_out_reward(tiny_full_entry):
    from attune.tune.config import load_search
    from attune.tune.search import run_search

    search, recipe_raw = load_search("tuning/tiny-grpo-asha.yaml", [
        "name=grpo-search", f"model.name_or_path={tiny_full_entry}", "optim.max_steps=6",
        "eval.every_steps=3", "checkpoint.every_steps=6", "scheduler.type=fifo",
        'space={"optim.lr": "grid([1e-3, 1e-6])"}', "num_samples=1"])
    result = run_search(search, recipe_raw)
    assert len(result.rows) == 2 and not any(r.error for r in result.rows)
    best = max(result.rows, key=lambda r: r.final)
    manifest = json.loads((Path(result.entry) / "attune.json").read_text())
    assert manifest["tune"]["params"] == best.params  # highest eval_reward (mode: max) won
    assert manifest["final_metrics"]["eval_reward"] == pytest.approx(best.final)

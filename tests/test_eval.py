"""attune eval and the promotion gate: scores computed on the real entry, written to its manifest,
and `attune promote --require` refusing an entry below a bound (with its scores) and touching
nothing, then promoting it when the bound holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from mlflow import MlflowClient
from running import ATTUNE, REPO

from attune.config import ConfigError
from attune.evaluate.greedy_answers import (
    exact_match,
    greedy_answers,
    load_for_generation,
    qa_pairs,
)
from attune.registry import read_manifest
from attune.serve.promotion_gate import check_requirements, parse_requirement


def test_requirements_are_parsed_and_bad_ones_named():
    assert parse_requirement("exact_match>=0.9") == ("exact_match", ">=", 0.9)
    assert parse_requirement(" eval_loss < 1e-1 ") == ("eval_loss", "<", 0.1)
    assert parse_requirement("attune_qa.exact_match>=0.5") == ("attune_qa.exact_match", ">=", 0.5)
    with pytest.raises(ConfigError, match="'exact_match=>0.9': expected SCORE OP NUMBER"):
        parse_requirement("exact_match=>0.9")


def test_the_gate_names_what_failed_and_the_scores():
    manifest = {"name": "m", "eval": {"data": "d.jsonl",
                                      "scores": {"exact_match": 0.5, "eval_loss": 0.25}}}
    check_requirements(manifest, ["exact_match>=0.5", "eval_loss<0.3"])
    with pytest.raises(ConfigError, match=r"not promoting m: exact_match 0.5 \(needs >= 0.6\)\. "
                                          r"Its scores on d.jsonl: eval_loss=0.25, exact_match=0.5"):
        check_requirements(manifest, ["exact_match>=0.6", "eval_loss<0.3"])
    with pytest.raises(ConfigError, match="no such score .*eval_loss, exact_match"):
        check_requirements(manifest, ["bleu>=1"])
    with pytest.raises(ConfigError, match="no evaluation scores; run `attune eval`"):
        check_requirements({"name": "m"}, ["exact_match>=0.5"])


@pytest.mark.slow
def test_eval_scores_an_entry_and_promote_requires_them(tiny_full_entry, tmp_path):
    entry = tmp_path / "tiny-full"
    shutil.copytree(tiny_full_entry, entry)
    scored = subprocess.run([*ATTUNE, "eval", str(entry), "--data", "data/transformer_qa.jsonl"],
                            cwd=REPO, capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr
    manifest = read_manifest(str(entry))
    scores = manifest["eval"]["scores"]
    assert f"exact_match {scores['exact_match']:.4f}" in scored.stdout
    # exact match as the answers module scores it in torch; the loss as training's last
    # evaluation counted it (eval_fraction 0: the same chats, there packed, here one a row)
    pairs = qa_pairs()
    model, tokenizer = load_for_generation(str(entry))
    expected = exact_match(greedy_answers(model, tokenizer, [q for q, _ in pairs]),
                           [a for _, a in pairs])
    assert scores["exact_match"] == expected
    assert scores["eval_loss"] == pytest.approx(manifest["final_metrics"]["eval_loss"], rel=1e-3)
    assert manifest["eval"]["examples"] == len(pairs)
    # and beside the training run's metrics in MLflow
    tracked = MlflowClient(manifest["mlflow"]["tracking_uri"]).get_run(manifest["mlflow"]["run_id"])
    assert tracked.data.metrics["eval/exact_match"] == scores["exact_match"]
    assert tracked.data.metrics["eval/eval_loss"] == pytest.approx(scores["eval_loss"])

    config = tmp_path / "serve.yaml"
    shutil.copy(REPO / "deployments" / "tiny.yaml", config)
    before = config.read_text()
    above = f"exact_match>{scores['exact_match']}"
    refused = subprocess.run([*ATTUNE, "promote", str(entry), "--config", str(config),
                              "--require", above], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2
    assert f"not promoting tiny-full: exact_match" in refused.stderr
    assert f"eval_loss={scores['eval_loss']:.4g}" in refused.stderr
    assert config.read_text() == before  # refused before anything was touched

    promoted = subprocess.run([*ATTUNE, "promote", str(entry), "--config", str(config),
                               "--require", f"exact_match>={scores['exact_match']}",
                               "--require", f"eval_loss<={scores['eval_loss']}"],
                              cwd=REPO, capture_output=True, text=True)
    assert promoted.returncode == 0, promoted.stderr
    assert f"added tiny-full to {config}" in promoted.stdout
    assert str(entry) in json.dumps(config.read_text())
    # again, spelled with ~ as a serving file would keep it: still one entry in the file
    listed = config.read_text()
    home = {**os.environ, "HOME": str(tmp_path)}
    again = subprocess.run([*ATTUNE, "promote", "~/tiny-full", "--config", str(config)], cwd=REPO,
                           capture_output=True, text=True, env=home)
    assert again.returncode == 0, again.stderr
    assert config.read_text() == listed


def test_the_local_harness_task_is_one_lm_evaluation_harness_loads(tmp_path):
    from lm_eval.tasks import TaskManager

    from attune.evaluate.lm_eval_harness import LOCAL_TASK, _scores, local_task

    local_task(tmp_path, [("What is 2+2?", "4"), ("Capital of France?", "Paris")])
    task = TaskManager(include_path=str(tmp_path)).load_task_or_group([LOCAL_TASK])[LOCAL_TASK]
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs] == ["What is 2+2?", "Capital of France?"]
    assert [task.doc_to_target(d) for d in docs] == ["4", "Paris"]
    assert _scores({LOCAL_TASK: {"alias": LOCAL_TASK, "exact_match,strip": 0.5,
                                 "exact_match_stderr,strip": 0.1,
                                 "sample_len": 2}}) == {"attune_qa.exact_match": 0.5}


def test_a_task_the_harness_does_not_know_is_refused_before_any_request():
    from attune.evaluate.lm_eval_harness import harness_scores

    with pytest.raises(ConfigError, match="no such lm-evaluation-harness task: arc_eazy"):
        harness_scores("http://127.0.0.1:9/v1", "key", "m", [("q", "a")], ["attune_qa", "arc_eazy"])

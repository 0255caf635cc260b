"""Experiment tracking: a training run is an MLflow run with its recipe as parameters, every
report's metrics at its step, its loss curve and its registry entry, which records the run; a
search's trials are MLflow runs too (tests/test_tune.py); `attune runs` lists them."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import stop_group
from mlflow import MlflowClient
from running import ATTUNE, REPO

from attune.cluster import free_port
from attune.recipe import Recipe, TrackingConfig
from attune.registry import read_manifest
from attune.tracking import ENTRY_TAG, ReportsToMlflow, recipe_params, tracking_uri, train_run


def test_the_recipe_becomes_dotted_parameters_as_overrides_name_them():
    params = recipe_params(Recipe(name="r", optim={"max_steps": 50, "lr": 3e-4}).model_dump(mode="json"))
    assert params["optim.lr"] == "0.0003" and params["optim.max_steps"] == "50"
    assert params["data.train_files"] == '["data/transformer_qa.jsonl"]'
    assert params["model.name_or_path"] == "attune:tiny-llama"
    assert params["tracking.uri"] == "null"


def test_the_store_is_the_recipes_uri_else_mlflows_variable_else_attunes_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTUNE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_a_tracking_server_that_is_down_warns_once_and_training_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reports = ReportsToMlflow("http://127.0.0.1:9", "0" * 32)  # port 9: nothing listens
    for step in (1, 2):
        reports.after_report(None, [{"step": step, "loss": 1.0}], None)  # raises nothing
    warnings = [line for line in capsys.readouterr().err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and "did not take the metrics of step 1" in warnings[0]


def test_a_resumed_run_holds_the_whole_history_each_step_once(tmp_path):
    """A run resumed from its checkpoint reports only what comes after it (and its last step
    again); the entry's history has every step, and so does the run once it ends."""
    recipe = Recipe(name="resumed", optim={"max_steps": 30},
                    tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "resumed"})
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (10, 20, 30)]
    entry = tmp_path / "resumed"
    entry.mkdir()
    (entry / "attune.json").write_text(json.dumps({"history": history}))
    with train_run(recipe) as run:
        (reports,) = [pickle.loads(pickle.dumps(c)) for c in run.callbacks]  # as the controller gets it
        for report in (history[1], history[1], history[2]):  # the checkpoint's step comes again
            reports.after_report(None, [report], None)
        run.finish(str(entry))
    client = MlflowClient(run.uri)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    # its curve beside the database, not under the working directory
    assert client.get_run(run.run_id).info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
    for metric in ("loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, metric))
        assert logged == [(h["step"], h[metric]) for h in history]


@pytest.mark.slow
def test_a_training_run_is_tracked_with_its_recipe_metrics_curve_and_entry(tiny_full_entry):
    manifest = read_manifest(tiny_full_entry)
    tracked = manifest["mlflow"]
    client = MlflowClient(tracked["tracking_uri"])
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-full"
    recipe = manifest["recipe"]
    assert run.data.params["optim.lr"] == json.dumps(recipe["optim"]["lr"])
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags[ENTRY_TAG] == tiny_full_entry
    # every report of rank 0 at its training step, as the entry's history has them
    history = manifest["history"]
    for metric in ("loss", "eval_loss", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        assert logged == [(h["step"], pytest.approx(h[metric])) for h in history], metric
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]

    listed = subprocess.run([*ATTUNE, "runs"], cwd=REPO, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(run.info.run_id[:8]))
    assert "tiny-full" in line and "FINISHED" in line and line.endswith(tiny_full_entry)
    assert f"{history[-1]['eval_loss']:.4f}" in line


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_with_its_entry(tiny_full_entry, tmp_path):
    tracked = read_manifest(tiny_full_entry)["mlflow"]
    port = free_port()
    with open(tmp_path / "mlflow.log", "w") as log:
        # One worker: uvicorn restarts workers that miss its health check, and on a busy machine
        # four starting at once missed it again and again (the UI never answered).
        ui = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", tracked["tracking_uri"]],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        runs = _searched_runs(f"http://127.0.0.1:{port}", ui, tmp_path / "mlflow.log")
    finally:
        stop_group(ui, signal.SIGTERM, timeout=30)
    run = next(r for r in runs if r["info"]["run_id"] == tracked["run_id"])
    assert {"key": ENTRY_TAG, "value": tiny_full_entry} in run["data"]["tags"]


def _searched_runs(server: str, proc, log: Path, timeout: float = 120) -> list[dict]:
    """Every run of the server's experiments, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = json.dumps({"experiment_ids": ["0", "1"], "max_results": 100}).encode()
            request = urllib.request.Request(f"{server}/api/2.0/mlflow/runs/search", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["runs"]
        # a server still starting under load may accept and then not answer in time: ask again
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not answer:\n{log.read_text()[-2000:]}")
            time.sleep(1)

"""Experiment tracking with MLflow: each training run, and each trial of a search, is an MLflow run.

    with train_run(recipe) as run:
        result = make_trainer(recipe, prepared, callbacks=run.callbacks).fit()
        entry = write_result(recipe, result, ..., extra=run.manifest_fields)
        run.finish(entry)

A training run: the driver opens the MLflow run with the recipe as parameters; Ray Train's
controller, which Ray places on the driver's node, logs rank 0's metrics at every report, so the
default local store works on a cluster too; the driver closes the run with the loss curve and the
registry entry's location, and the entry's manifest records the run id. A search's trials:
`attune.tune.tracking`.

The store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a sqlite database under
$ATTUNE_HOME/mlflow with its artifacts beside it (`mlflow ui --backend-store-uri` shows it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from ray.train import UserCallback

from attune.addresses import check_answers
from attune.config import ConfigError, attune_home
from attune.console import verbose
from attune.plots import plot_losses
from attune.recipe import Recipe, TrackingConfig
from attune.registry import read_manifest

if not verbose():  # MLflow's INFO lines (its database's set-up) are chatter on a console
    logging.getLogger("mlflow").setLevel(logging.WARNING)

ENTRY_TAG = "attune.entry"
SEARCH_TAG = "attune.search"
TRIAL_TAG = "attune.trial_id"
# MLflow keeps a parameter's value up to this many characters.
PARAM_VALUE_CHARS = 6000


def tracking_uri(tracking: TrackingConfig) -> str:
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_local_store()}/mlflow.db"


def _local_store() -> Path:
    store = attune_home().resolve() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    return store


def check_server(uri: str) -> None:
    """A ConfigError in seconds where an http(s) store's server does not answer: MLflow's client
    retries each request for minutes first."""
    url = urlparse(uri)
    if url.scheme in ("http", "https") and url.hostname:
        check_answers(url.hostname, url.port or (443 if url.scheme == "https" else 80),
                      f"MLflow tracking URI {uri}", "no tracking server")


def mlflow_client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created where missing; in a sqlite store its artifacts live beside
    the database (MLflow would put them under the working directory)."""
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def recipe_params(recipe: dict, prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow parameters: dotted keys, as `key=value` overrides name them."""
    params = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            params.update(recipe_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[f"{prefix}{key}"] = text[:PARAM_VALUE_CHARS]
    return params


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
        client.log_batch(run_id, params=items[start:start + 100])


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ReportsToMlflow(UserCallback):
    """Rank 0's metrics of every report, at the loop's step (runs in Ray Train's controller)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._logged: set[int] = set()
        self._failed = False
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def __setstate__(self, state: dict) -> None:
        """Arrived at the controller, before the workers train: the client is made now, as a
        sqlite store's costs about a CPU-second to set up (no request to a server), which at the
        first report would come out of the training steps beside it."""
        self.__dict__.update(state)
        try:
            self._client = mlflow_client(self.uri)
        except Exception:  # noqa: BLE001 - after_report tries again, and says why
            self._client = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        step = int(metrics[0].get("step", 0))
        if step in self._logged:  # a restarted worker group reports its checkpoint's metrics again
            return
        try:
            self._client = self._client or mlflow_client(self.uri)
            log_metrics(self._client, self.run_id, [metrics[0]])
            self._logged.add(step)
        except Exception as e:  # a tracking server's outage must not stop the training
            if not self._failed:
                print(f"[attune] warning: MLflow at {self.uri} did not take the metrics of step "
                      f"{step} ({e}); training goes on", file=sys.stderr, flush=True)
            self._failed = True


def log_metrics(client: MlflowClient, run_id: str, reports: list[dict]) -> None:
    """Each report's numeric metrics at its `step`."""
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(report.get("step", 0)))
             for report in reports for k, v in _numeric(report).items() if k != "step"]
    for start in range(0, len(items), 1000):  # MLflow takes at most 1,000 metrics a call
        client.log_batch(run_id, metrics=items[start:start + 1000])


class TrainRun:
    """An open MLflow run of a training run: its callback for Ray Train, its manifest fields."""

    def __init__(self, recipe: Recipe):
        self.uri = tracking_uri(recipe.tracking)
        self.experiment = recipe.tracking.experiment
        client = mlflow_client(self.uri)
        run = client.create_run(experiment_id(self.uri, self.experiment), run_name=recipe.name,
                                tags={"attune.recipe": recipe.name,
                                      "attune.method": f"{recipe.method.type} {recipe.method.objective}"})
        self.run_id = run.info.run_id
        log_params(client, self.run_id, recipe_params(recipe.model_dump(mode="json")))
        self.callbacks = [ReportsToMlflow(self.uri, self.run_id)]
        self.manifest_fields = {"mlflow": reference(self.uri, self.experiment, self.run_id)}

    def finish(self, entry: str) -> None:
        """Link the run to its registry entry, attach the entry's loss curve, and log the reports
        this run did not see: those before a resume (the checkpoint's history), or ones a tracking
        server's outage lost."""
        client = mlflow_client(self.uri)
        client.set_tag(self.run_id, ENTRY_TAG, entry)
        history = read_manifest(entry)["history"]
        # a report was logged if its first metric was (GRPO's step-0 report has no loss)
        firsts = {next((k for k in _numeric(h) if k != "step"), None) for h in history} - {None}
        seen = {m.step for name in firsts for m in client.get_metric_history(self.run_id, name)}
        log_metrics(client, self.run_id, [h for h in history if h["step"] not in seen])
        with tempfile.TemporaryDirectory(prefix="attune-mlflow-") as tmp:
            curve = Path(tmp, "loss_curve.png")
            plot_losses(history, curve, title=Path(entry).name)
            client.log_artifact(self.run_id, str(curve))

    def end(self, status: str) -> None:
        mlflow_client(self.uri).set_terminated(self.run_id, status)


class _Untracked:
    callbacks: list = []
    manifest_fields: dict = {}

    def finish(self, entry: str) -> None:
        pass


@contextmanager
def train_run(recipe: Recipe):
    """The run's MLflow run (a no-op with `tracking.mlflow: false`), ended FINISHED, FAILED, or
    KILLED on Ctrl-C."""
    if not recipe.tracking.mlflow or not _server_answers(tracking_uri(recipe.tracking)):
        yield _Untracked()
        return
    run = TrainRun(recipe)
    print(f"[attune] MLflow run {run.run_id} in {run.uri}", flush=True)
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def _server_answers(uri: str) -> bool:
    """Whether the store's server answers; a training run goes on untracked where it does not."""
    try:
        check_server(uri)
    except ConfigError as e:
        print(f"[attune] warning: {e}; this run goes on untracked", file=sys.stderr, flush=True)
        return False
    return True


def reference(uri: str, experiment: str, run_id: str) -> dict:
    """What a manifest records of its MLflow run."""
    return {"run_id": run_id, "experiment": experiment, "tracking_uri": uri}


def link_entry(tracking: TrackingConfig, run_id: str, entry: str) -> None:
    mlflow_client(tracking_uri(tracking)).set_tag(run_id, ENTRY_TAG, entry)


def log_scores(manifest: dict, scores: dict[str, float]) -> None:
    """`attune eval`'s scores into the entry's MLflow run, where it has one, as eval/<score>."""
    ref = manifest.get("mlflow")
    if ref:
        client = mlflow_client(ref["tracking_uri"])
        for name, value in scores.items():
            client.log_metric(ref["run_id"], f"eval/{name}", float(value))


def list_runs(uri: str, experiment: str, limit: int = 20) -> list[dict]:
    """The experiment's latest runs, newest first: what `attune runs` prints."""
    check_server(uri)
    client = mlflow_client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attribute.start_time DESC"],
                                  max_results=limit):
        metrics, tags = run.data.metrics, run.data.tags
        rows.append({"run_id": run.info.run_id, "name": run.info.run_name,
                     "status": run.info.status, "started": run.info.start_time,
                     "loss": metrics.get("loss"), "eval_loss": metrics.get("eval_loss"),
                     "search": tags.get(SEARCH_TAG, ""), "entry": tags.get(ENTRY_TAG, "")})
    return rows

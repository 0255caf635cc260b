"""Experiment tracking with MLflow: each training run, and each trial of a search, is an MLflow run.

    with train_run(recipe) as run:
        result = make_trainer(recipe, prepared, callbacks=run.callbacks).fit()
        entry = write_result(recipe, result, ..., extra=run.manifest_fields)
        run.finish(entry)

A training run: the driver opens the MLflow run with the recipe as parameters; Ray Train's
controller, which Ray places on the driver's node, logs rank 0's metrics at every report, so the
default local store works on a cluster too; the driver closes the run with the loss curve and the
registry entry's location, and the entry's manifest records the run id. A search: Ray Tune's
MLflowLoggerCallback logs each trial from the search's driver (the trial's whole recipe as
parameters, its reports at their training steps), and the best trial's run gets the entry.

The store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a sqlite database under
$ATTUNE_HOME/mlflow with its artifacts beside it (`mlflow ui --backend-store-uri` shows it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.train import UserCallback

from attune.config import attune_home
from attune.recipe import Recipe, TrackingConfig

ENTRY_TAG = "attune.entry"
TRIAL_TAG = "attune.trial_id"
SEARCH_TAG = "attune.search"
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


def _client(uri: str):
    from mlflow import MlflowClient  # imported where used: it takes a second to import

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created where missing; in attune's own store its artifacts live
    beside the database (MLflow would put them under the working directory)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = uri == f"sqlite:///{_local_store()}/mlflow.db"
    try:
        return client.create_experiment(
            name, artifact_location=(_local_store() / "artifacts").as_uri() if local else None)
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


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

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
        self._failed = False

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        from mlflow.entities import Metric

        rank0 = metrics[0]
        now = int(time.time() * 1000)
        step = int(rank0.get("step", 0))
        try:
            _client(self.uri).log_batch(self.run_id, metrics=[
                Metric(k, v, now, step) for k, v in _numeric(rank0).items() if k != "step"])
        except Exception as e:  # a tracking server's outage must not stop the training
            if not self._failed:
                print(f"[attune] warning: MLflow at {self.uri} did not take the metrics of step "
                      f"{step} ({e}); training goes on", file=sys.stderr, flush=True)
            self._failed = True


class TrainRun:
    """An open MLflow run of a training run: its callback for Ray Train, its manifest fields."""

    def __init__(self, recipe: Recipe):
        self.uri = tracking_uri(recipe.tracking)
        self.experiment = recipe.tracking.experiment
        client = _client(self.uri)
        run = client.create_run(experiment_id(self.uri, self.experiment), run_name=recipe.name,
                                tags={"attune.recipe": recipe.name,
                                      "attune.method": f"{recipe.method.type} {recipe.method.objective}"})
        self.run_id = run.info.run_id
        _log_params(client, self.run_id, recipe_params(recipe.model_dump(mode="json")))
        self.callbacks = [ReportsToMlflow(self.uri, self.run_id)]
        self.manifest_fields = {"mlflow": reference(self.uri, self.experiment, self.run_id)}

    def finish(self, entry: str) -> None:
        """Link the run to its registry entry and attach the entry's loss curve."""
        from attune.registry import read_manifest
        from attune.plots import plot_losses

        client = _client(self.uri)
        client.set_tag(self.run_id, ENTRY_TAG, entry)
        with tempfile.TemporaryDirectory(prefix="attune-mlflow-") as tmp:
            curve = Path(tmp, "loss_curve.png")
            plot_losses(read_manifest(entry)["history"], curve, title=Path(entry).name)
            client.log_artifact(self.run_id, str(curve))

    def end(self, status: str) -> None:
        _client(self.uri).set_terminated(self.run_id, status)


class _Untracked:
    callbacks: list = []
    manifest_fields: dict = {}

    def finish(self, entry: str) -> None:
        pass


@contextmanager
def train_run(recipe: Recipe):
    """The run's MLflow run (a no-op with `tracking.mlflow: false`), ended FINISHED, FAILED, or
    KILLED on Ctrl-C."""
    if not recipe.tracking.mlflow:
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


def reference(uri: str, experiment: str, run_id: str) -> dict:
    """What a manifest records of its MLflow run."""
    return {"run_id": run_id, "experiment": experiment, "tracking_uri": uri}


class TrialsToMlflow(MLflowLoggerCallback):
    """Ray Tune's MLflow logger, with each trial's whole recipe as parameters (Tune logs only the
    sampled values) and its reports at the loop's training step (Tune's is the report count)."""

    def __init__(self, recipe_raw: dict, search_name: str):
        self.recipe_raw = recipe_raw
        tracking = Recipe.model_validate(recipe_raw).tracking
        super().__init__(tracking_uri=tracking_uri(tracking), experiment_name=tracking.experiment,
                         tags={SEARCH_TAG: search_name}, save_artifact=False)

    def setup(self, *args, **kwargs):
        experiment_id(self.tracking_uri, self.experiment_name)  # its artifacts where attune keeps them
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        from attune.tune.config import trial_recipe

        new = trial not in self._trial_runs
        super().log_trial_start(trial)
        if not new:  # a trial that PBT or a restore continued has its parameters already
            return
        run_id = self._trial_runs[trial]
        client = _client(self.tracking_uri)
        client.set_tag(run_id, TRIAL_TAG, trial.trial_id)
        recipe = trial_recipe(self.recipe_raw, trial.config, name=trial.trial_id)
        params = recipe_params(recipe.model_dump(mode="json"))
        _log_params(client, run_id, {k: v for k, v in params.items() if k not in trial.config})

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("step", iteration))
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=step)


def trial_run_id(tracking: TrackingConfig, trial_id: str) -> str | None:
    """The MLflow run of a search's trial (TrialsToMlflow tagged it)."""
    uri = tracking_uri(tracking)
    runs = _client(uri).search_runs([experiment_id(uri, tracking.experiment)],
                                    filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                    max_results=1)
    return runs[0].info.run_id if runs else None


def link_entry(tracking: TrackingConfig, run_id: str, entry: str) -> None:
    _client(tracking_uri(tracking)).set_tag(run_id, ENTRY_TAG, entry)


def log_scores(manifest: dict, scores: dict[str, float]) -> None:
    """`attune eval`'s scores into the entry's MLflow run, where it has one, as eval/<score>."""
    ref = manifest.get("mlflow")
    if ref:
        client = _client(ref["tracking_uri"])
        for name, value in scores.items():
            client.log_metric(ref["run_id"], f"eval/{name}", float(value))


def list_runs(uri: str, experiment: str, limit: int = 20) -> list[dict]:
    """The experiment's latest runs, newest first: what `attune runs` prints."""
    client = _client(uri)
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

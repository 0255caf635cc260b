"""A search's trials in MLflow: Ray Tune's MLflowLoggerCallback, run by the search's driver,
makes each trial an MLflow run; the best trial's run is linked to the search's entry.

Tracking settings, tags and the store are attune.tracking's, as for a training run.
"""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from attune.recipe import Recipe, TrackingConfig
from attune.tracking import (SEARCH_TAG, TRIAL_TAG, experiment_id, log_params, mlflow_client,
                             recipe_params, tracking_uri)
from attune.tune.config import trial_recipe


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
        if trial in self._trial_runs:
            # PBT started it again with perturbed values; MLflow refuses to change a parameter
            return
        super().log_trial_start(trial)
        run_id = self._trial_runs[trial]
        client = mlflow_client(self.tracking_uri)
        client.set_tag(run_id, TRIAL_TAG, trial.trial_id)
        recipe = trial_recipe(self.recipe_raw, trial.config, name=trial.trial_id)
        params = recipe_params(recipe.model_dump(mode="json"))
        log_params(client, run_id, {k: v for k, v in params.items() if k not in trial.config})

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("step", iteration))
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=step)


def trial_run_id(tracking: TrackingConfig, trial_id: str) -> str | None:
    """The MLflow run of a search's trial (TrialsToMlflow tagged it)."""
    uri = tracking_uri(tracking)
    runs = mlflow_client(uri).search_runs([experiment_id(uri, tracking.experiment)],
                                          filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
                                          max_results=1)
    return runs[0].info.run_id if runs else None

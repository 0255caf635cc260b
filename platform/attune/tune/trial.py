"""One trial: Ray Train runs of the recipe with the trial's sampled values.

Tune runs `run_trial` in a trial actor; it launches the recipe's TorchTrainer, whose controller
forwards every `ray.train.report` of the loop to Tune (TuneReportCallback), so the scheduler
sees eval loss at each eval step and can stop the trial there (which ends its Train run too).
The Train run is named after the trial and kept under the experiment, so a trial that was
interrupted resumes from its latest checkpoint when the experiment is restored.

Population Based Training needs more: a checkpoint in Tune's hands at each decision, to clone
into weaker trials. `run_trial_in_stretches` trains the recipe one perturbation interval at a
time, each stretch its own Train run starting from the previous stretch's checkpoint, and hands
that checkpoint to Tune with the stretch's last metrics. A trial PBT clones starts again from
the other trial's checkpoint (`ray.tune.get_checkpoint()`) with its perturbed values.
"""

from __future__ import annotations

import json
import uuid

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from attune.train.checkpoints import HISTORY_FILE
from attune.train.datasets import prepare_data
from attune.train.trainer import make_trainer
from attune.tune.config import trial_recipe
from attune.tune.results import CHECKPOINT_PATH


def run_trial(config: dict, *, recipe_raw: dict, prepared, train_storage: str) -> None:
    """`config` maps dotted recipe keys to this trial's values."""
    recipe = trial_recipe(recipe_raw, config, name=ray.tune.get_context().get_trial_id())
    if prepared is None:  # the space changes the data itself, so each trial tokenizes its own
        prepared = prepare_data(recipe)
    trainer = make_trainer(recipe, prepared, storage_path=train_storage,
                           callbacks=[TuneReportCallback()])
    trainer.fit()


def run_trial_in_stretches(config: dict, *, recipe_raw: dict, prepared,
                           train_storage: str, interval: int) -> None:
    """PBT's trial: a Train run per `interval` steps, each ending in a checkpoint for Tune."""
    trial = ray.tune.get_context().get_trial_id()
    recipe = trial_recipe(recipe_raw, config, name=trial)
    if prepared is None:
        prepared = prepare_data(recipe)
    start = ray.tune.get_checkpoint()  # this trial's last stretch, or the trial PBT cloned
    step = _step_of(start)
    while step < recipe.optim.max_steps:
        stop_at = min(recipe.optim.max_steps, (step // interval + 1) * interval)
        # A fresh run name: a run of an earlier name would resume from its own checkpoints.
        recipe.name = f"{trial}-{stop_at:06d}-{uuid.uuid4().hex[:6]}"
        result = make_trainer(recipe, prepared, storage_path=train_storage,
                              start_from=start, stop_at=stop_at).fit()
        step = stop_at
        # The next stretch starts from it; reported, Tune copies it into the trial for PBT to clone.
        start = ray.tune.Checkpoint(result.checkpoint.path, filesystem=result.checkpoint.filesystem)
        ray.tune.report({**result.metrics, CHECKPOINT_PATH: start.path}, checkpoint=start)


def _step_of(checkpoint: ray.tune.Checkpoint | None) -> int:
    """The step a checkpoint of attune.train.loop was taken at (its history's last entry)."""
    if checkpoint is None:
        return 0
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as f:
        return int(json.loads(f.read())[-1]["step"])

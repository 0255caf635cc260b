"""One trial: a Ray Train run of the recipe with the trial's sampled values.

Tune runs `run_trial` in a trial actor; it launches the recipe's TorchTrainer, whose controller
forwards every `ray.train.report` of the loop to Tune (TuneReportCallback), so the scheduler
sees eval loss at each eval step and can stop the trial there (which ends its Train run too).
The Train run is named after the trial and kept under the experiment, so a trial that was
interrupted resumes from its latest checkpoint when the experiment is restored.
"""

from __future__ import annotations

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from attune.tune_config import trial_recipe

# The key TuneReportCallback puts a reported checkpoint's path under.
CHECKPOINT_PATH = "checkpoint_path"


def run_trial(config: dict, *, recipe_raw: dict, base_path: str, prepared, train_storage: str) -> None:
    """`config` maps dotted recipe keys to this trial's values."""
    from attune.trainer import make_trainer, prepare_data

    recipe = trial_recipe(recipe_raw, config, name=ray.tune.get_context().get_trial_id())
    if prepared is None:  # the space changes the data itself, so each trial tokenizes its own
        prepared = prepare_data(recipe, base_path)
    trainer = make_trainer(recipe, base_path, prepared, storage_path=train_storage,
                           callbacks=[TuneReportCallback()])
    trainer.fit()

"""The search config: one YAML file in tuning/ that names a recipe and the space to search.

    search, recipe_raw = load_search("tuning/tiny-full-asha.yaml", ["num_samples=4"])

Overrides on the command line go to the search when their first key is a search key
(`num_samples=4`, `scheduler.type=median`) and to the recipe otherwise (`optim.max_steps=60`).
Everything the search can get wrong without a cluster fails here, naming the key: unknown keys,
search paths that are not recipe keys, empty or invalid ranges, metrics the trainer never reports.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from attune.config import ConfigError, StrictConfig, apply_override, read_mapping, validate
from attune.recipe import Recipe, load_recipe
from attune.train import methods
from attune.tune.space import Dimension, check_dimension, parse_dimension, set_path

# What attune.train.loop.train_loop reports at every eval step (mfu only on known GPUs; the
# rewards only for a method that samples, GRPO, which reports them instead of eval_loss).
REPORTED_METRICS = ("eval_loss", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_reward")
REWARD_METRICS = ("eval_reward",)


# What a Population Based Training perturbation may change in a running trial: values the loop
# reads from the recipe when it resumes (attune.train.loop), not ones baked into the model or the data.
PERTURBABLE = ("optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.max_grad_norm")


class SchedulerConfig(StrictConfig):
    type: Literal["asha", "median", "pbt", "fifo"] = Field(
        "asha", description="ASHA stops trials that fall behind at rungs; 'median' stops a trial "
        "whose best is worse than the median of the others at the same step; 'pbt' (Population "
        "Based Training) has weak trials continue from a strong trial's checkpoint with perturbed "
        "values of the space; 'fifo' runs every trial to the end (plain random or Optuna search).")
    grace_period: int | None = Field(
        None, ge=1, description="Steps every trial runs before it may be stopped; default: two "
        "eval intervals of the recipe.")
    reduction_factor: float = Field(3, gt=1, description="ASHA: keep the top 1/factor at each rung.")
    min_samples_required: int = Field(3, ge=1, description="Median: trials that must have reached a "
                                      "step before the median there is trusted.")
    perturbation_interval: int | None = Field(
        None, ge=1, description="PBT: steps between a trial's exploit/explore decisions; each "
        "stretch is one Train run that ends with a checkpoint. Default: two eval intervals. Pick "
        "one that does not divide optim.max_steps, or PBT also decides at the last step, where a "
        "clone restarts a finished trial from another's final checkpoint.")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT: the bottom fraction "
                                     "of trials that clone one of the top fraction.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: chance that a cloned "
                                        "value is drawn afresh from the space instead of scaled "
                                        "by 0.8 or 1.2 (or moved to a neighbouring choice).")
    synch: bool = Field(False, description="PBT: decide only when every trial has reached the "
                        "interval (steadier, slower) rather than as each trial reaches it.")


class SearcherConfig(StrictConfig):
    type: Literal["random", "optuna"] = Field(
        "random", description="'random' samples the space independently; 'optuna' uses Optuna's "
        "TPE through Ray Tune's OptunaSearch.")


class BudgetConfig(StrictConfig):
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once; default: as many as the cluster's CPUs "
        "and GPUs hold given the recipe's scaling. Asking for more than that is an error.")
    time_limit_s: float | None = Field(
        None, gt=0, description="Wall-clock limit for the whole experiment; running trials are "
        "stopped when it passes.")


class SearchConfig(StrictConfig):
    name: str = Field(description="Experiment name: the Tune run's directory under the recipe's "
                      "output.runs and the registry entry of the best trial.",
                      pattern=r"^[A-Za-z0-9._-]+$")
    recipe: str = Field(description="The recipe YAML every trial trains (path relative to the "
                        "working directory).")
    overrides: list[str] = Field(default_factory=list, description="Recipe overrides (key=value) "
                                 "applied to every trial, e.g. shorter runs than the recipe's own.")
    space: dict[str, str] = Field(description="Recipe key (dotted) -> range, e.g. "
                                  "'optim.lr: loguniform(1e-5, 1e-2)'.", min_length=1)
    metric: str = Field("eval_loss", description=f"Reported metric to optimise, one of "
                        f"{', '.join(REPORTED_METRICS)}.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    num_samples: int = Field(8, ge=1, description="Trials to run (each grid([...]) dimension "
                             "multiplies them by its number of values).")
    seed: int | None = Field(None, description="Seed for sampling the space (None: random).")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig,
                                       description="Early stopping of weak trials.")
    searcher: SearcherConfig = Field(default_factory=SearcherConfig,
                                     description="How the next trial's values are chosen.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Concurrency and time.")

    @model_validator(mode="after")
    def _check_metric(self) -> "SearchConfig":
        if self.metric not in REPORTED_METRICS:
            raise ValueError(f"metric: the trainer does not report {self.metric!r}; it reports "
                             f"{', '.join(REPORTED_METRICS)}")
        return self

    def dimensions(self) -> list[Dimension]:
        return [parse_dimension(key, text) for key, text in self.space.items()]

    def num_trials(self) -> int:
        """num_samples, times every value of each grid([...]) dimension."""
        return self.num_samples * math.prod(len(d.args[0]) for d in self.dimensions() if d.kind == "grid")


def load_search(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchConfig, dict]:
    """Read and check a search config; returns it with the recipe's raw mapping (overrides applied)."""
    path = Path(path)
    raw = read_mapping(path, "search config")
    for item in overrides:
        if item.partition("=")[0].split(".")[0] in SearchConfig.model_fields:
            apply_override(raw, item, SearchConfig)
        else:
            raw.setdefault("overrides", []).append(item)
    search = validate(SearchConfig, raw, source=str(path))
    recipe = load_recipe(search.recipe, search.overrides)  # validates the trials' common recipe
    recipe_raw = recipe.model_dump(mode="json")
    for dim in search.dimensions():
        check_dimension(dim, recipe_raw)
    check_reports(search, recipe)
    return search, recipe_raw


def check_reports(search: SearchConfig, recipe: Recipe) -> None:
    """Every report the loop sends must carry the metric, or Tune rejects the trial mid-run."""
    if search.metric == "mfu" and recipe.scaling.gpus_per_worker == 0:
        raise ConfigError("metric: mfu is only reported on GPUs (scaling.gpus_per_worker is 0)")
    evals, checkpoints = recipe.eval.every_steps, recipe.checkpoint.every_steps
    samples = methods.get(recipe.method.objective).engines(recipe) is not None
    if samples and search.metric == "eval_loss":
        raise ConfigError(f"metric: {recipe.method.objective} reports eval_reward, not eval_loss "
                          "(with mode: max)")
    if not samples and search.metric in REWARD_METRICS:
        raise ConfigError(f"metric: {search.metric} is reported by methods that learn from "
                          f"rewards (grpo), not {recipe.method.objective}")
    if search.metric.startswith("eval_") and checkpoints % evals:
        raise ConfigError(f"metric: {search.metric} is missing from the reports at checkpoint steps: "
                          f"checkpoint.every_steps ({checkpoints}) must be a multiple of "
                          f"eval.every_steps ({evals})")
    if search.metric == "grad_norm" and recipe.optim.max_grad_norm is None:
        raise ConfigError("metric: grad_norm is only reported when optim.max_grad_norm is set")
    if recipe.optim.max_steps is None:
        raise ConfigError("optim.max_steps: a search compares trials by step; set a step count "
                          "instead of optim.epochs")
    if search.scheduler.type == "pbt":
        check_pbt(search, recipe)
    timing = [key for key in search.space
              if key.startswith(("eval.", "checkpoint.", "optim.max_steps", "optim.epochs"))]
    if timing:
        raise ConfigError(f"space.{timing[0]}: decides when trials report, which the scheduler "
                          "compares across trials; fix it with overrides instead")


def check_pbt(search: SearchConfig, recipe: Recipe) -> None:
    fixed = [key for key in search.space if key not in PERTURBABLE]
    if fixed:
        raise ConfigError(f"space.{fixed[0]}: PBT changes values in the middle of a trial and this "
                          f"one cannot change mid-run; PBT can search {', '.join(PERTURBABLE)}")
    if search.searcher.type != "random":
        raise ConfigError(f"searcher.type: PBT chooses values itself; {search.searcher.type!r} "
                          "cannot be combined with it (use random)")
    interval = pbt_interval(search, recipe)
    if interval >= recipe.optim.max_steps:
        raise ConfigError(f"scheduler.perturbation_interval: {interval} steps leaves no room for a "
                          f"perturbation in a run of optim.max_steps={recipe.optim.max_steps}")


def pbt_interval(search: SearchConfig, recipe: Recipe) -> int:
    return search.scheduler.perturbation_interval or 2 * recipe.eval.every_steps


def trial_recipe(recipe_raw: dict, params: dict, name: str) -> Recipe:
    """The recipe of one trial: the common recipe with the trial's sampled values."""
    raw = copy.deepcopy(recipe_raw)
    for key, value in params.items():
        set_path(raw, key, value)
    raw["name"] = name
    return validate(Recipe, raw, source=f"trial {name}")

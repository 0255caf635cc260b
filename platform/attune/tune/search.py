"""Ray Tune over Ray Train: search a recipe's hyperparameters, write the best trial as an entry.

    search, recipe_raw = load_search("tuning/tiny-full-asha.yaml")
    outcome = run_search(search, recipe_raw)   # outcome.entry: the registry entry of the best trial

Each trial is a Ray Train run of the recipe (attune.tune.trial); the scheduler sees eval loss
at every eval step. The experiment lives in the recipe's output.runs under the search's name;
running the same search again restores it (`Tuner.restore`): finished trials keep their
results and only unfinished ones run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.util import placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup

from attune.capacity import working_nodes
from attune.cluster import ensure_ray
from attune.config import ConfigError
from attune.recipe import Recipe
from attune.store import say_if_maybe_node_local
from attune.tracking import link_entry, reference, tracking_uri
from attune.train.datasets import prepare_data
from attune.train.preflight import check_recipe
from attune.train import methods
from attune.train.trainer import check_workers_fit, storage_uri, write_result
from attune.tune.config import SearchConfig, pbt_interval, trial_recipe
from attune.tune.results import TrialRow, best_row, format_table, trial_rows, write_results
from attune.tune.tracking import TrialsToMlflow, trial_run_id
from attune.tune.trial import run_trial, run_trial_in_stretches

# The trial actor only drives its Train run (whose workers reserve their own resources); Ray's
# guide keeps Tune's default of one CPU for it, so the budget counts it too.
TRIAL_DRIVER = {"CPU": 1}
SEARCH_FILE = "attune_search.json"  # the search and recipe an experiment was started with
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class SearchOutcome:
    experiment_path: str
    rows: list[TrialRow]
    best: TrialRow | None
    entry: str | None  # the registry entry of the best trial
    interrupted: bool  # stopped before every trial ended; run the search again to resume
    table: str = ""


def run_search(search: SearchConfig, recipe_raw: dict, callbacks: list | None = None) -> SearchOutcome:
    """Run (or resume) the experiment; `callbacks` are Ray Tune callbacks, kept on restore."""
    recipe = Recipe.model_validate(recipe_raw)
    checked = check_recipe(recipe)  # before Ray starts: bad input fails in seconds
    ensure_ray()
    say_if_maybe_node_local({"output.runs": recipe.output.runs,
                             "output.registry": recipe.output.registry}, working_nodes())
    concurrency = trial_slots(search, recipe)  # the budget against the cluster's totals
    check_workers_fit(recipe, also=[TRIAL_DRIVER], what=f"one trial: its driver and "
                      f"{recipe.scaling.num_workers} Train workers")  # and against its nodes
    storage = storage_uri(recipe.output.runs)
    experiment_path = f"{storage.rstrip('/')}/{search.name}"
    resuming = _can_resume(search, recipe_raw, experiment_path)
    # One tokenized copy for every trial, unless the space changes the data itself.
    prepared = None if any(k.startswith("data.") for k in search.space) else prepare_data(recipe, checked)
    trainable = _trainable(search, recipe, recipe_raw, prepared,
                           f"{experiment_path}/train-runs")
    if resuming:
        print(f"[attune] resuming experiment {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if recipe.tracking.mlflow:  # each trial an MLflow run, logged from this driver
            callbacks = [*(callbacks or []), TrialsToMlflow(recipe_raw, search.name)]
        tuner = _new_tuner(search, recipe, trainable, concurrency, storage, callbacks)
        _write_text(f"{experiment_path}/{SEARCH_FILE}", _search_record(search, recipe_raw))
    before, started = _placement_groups(), time.monotonic()
    try:
        with _ctrl_c_noted() as ctrl_c:
            grid = tuner.fit()
    finally:
        _release_leaked_placement_groups(before)

    max_steps = recipe.optim.max_steps  # load_search made sure it is set
    rows = trial_rows(grid, search.metric, search.mode, max_steps)
    if ctrl_c.is_set() or _interrupted(grid, search, time.monotonic() - started):
        return SearchOutcome(experiment_path, rows, None, None, interrupted=True)
    best = best_row(rows, search.mode, max_steps)
    if "://" not in experiment_path:
        write_results(rows, grid, Path(experiment_path), search.metric)
    entry = None
    if best is not None:
        result = next(r for r in grid if r.metrics.get("trial_id") == best.trial)
        entry = _write_best(search, recipe_raw, best, result, checked.base_path, prepared, storage,
                            len(rows))
    return SearchOutcome(experiment_path, rows, best, entry, interrupted=False,
                         table=format_table(rows, search.metric, best))


@contextmanager
def _ctrl_c_noted():
    """Ctrl-C ends the experiment as Tune's own handler does (its state saved, to be resumed), and
    is noted: Tune stops its trials, which then look finished. Tune's SIGUSR1 does the stopping."""
    noted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield noted  # no signals here: Tune handles none either
        return

    def on_ctrl_c(signum, frame):
        noted.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C is the process's own again
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    tune_handler = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"  # Tune's own SIGINT handler would hide the Ctrl-C
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)
        if tune_handler is None:
            del os.environ[TUNE_SIGINT_ENV]
        else:
            os.environ[TUNE_SIGINT_ENV] = tune_handler


def _interrupted(grid, search: SearchConfig, elapsed_s: float) -> bool:
    """Trials still open, or never created (the searcher makes them as slots free up)."""
    limit = search.budget.time_limit_s
    if limit is not None and elapsed_s >= limit:
        return False  # the time limit ended it: that is the experiment's end, not an interruption
    ended = grid.num_terminated + grid.num_errors
    return ended < len(grid) or len(grid) < search.num_trials()


def _trainable(search: SearchConfig, recipe: Recipe, recipe_raw: dict, prepared,
               train_storage: str):
    common = dict(recipe_raw=recipe_raw, prepared=prepared, train_storage=train_storage)
    if search.scheduler.type == "pbt":
        trainable = tune.with_parameters(run_trial_in_stretches, **common,
                                         interval=pbt_interval(search, recipe))
    else:
        trainable = tune.with_parameters(run_trial, **common)
    return tune.with_resources(trainable, TRIAL_DRIVER)


def _new_tuner(search: SearchConfig, recipe: Recipe, trainable, concurrency: int, storage: str,
               callbacks: list | None):
    return tune.Tuner(
        trainable,
        param_space={dim.key: dim.domain() for dim in search.dimensions()},
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, num_samples=search.num_samples,
            scheduler=_scheduler(search, recipe), search_alg=_searcher(search, concurrency),
            time_budget_s=search.budget.time_limit_s),
        run_config=tune.RunConfig(name=search.name, storage_path=storage, callbacks=callbacks,
                                  verbose=1))


def trial_slots(search: SearchConfig, recipe: Recipe) -> int:
    """Trials the cluster can run at once given the recipe's scaling, checked against the budget."""
    sc = recipe.scaling
    engines = methods.get(recipe.method.objective).engines(recipe)  # GRPO's, started by each trial
    need = {"CPU": TRIAL_DRIVER["CPU"] + sc.num_workers * sc.cpus_per_worker
            + (engines.count * engines.cpus if engines else 0),
            "GPU": sc.num_workers * sc.gpus_per_worker + (engines.count * engines.gpus if engines else 0)}
    have = ray.cluster_resources()
    fits = min(int(have.get(res, 0) // amount) for res, amount in need.items() if amount > 0)
    if fits == 0:
        short = next(r for r, a in need.items() if a > 0 and have.get(r, 0) < a)
        raise ConfigError(f"budget: one trial needs {need[short]:g} {short} (scaling.num_workers="
                          f"{sc.num_workers}) but the cluster has {have.get(short, 0):g}")
    wanted = search.budget.max_concurrent_trials
    if wanted is not None and wanted > fits:
        raise ConfigError(f"budget.max_concurrent_trials: {wanted} trials at once do not fit; "
                          f"each needs {_show(need)} and the cluster has {_show(have)}, enough "
                          f"for {fits}")
    return min(wanted or fits, search.num_trials())


def _placement_groups() -> set[str]:
    return set(placement_group_table())


def _release_leaked_placement_groups(before: set[str]) -> None:
    """Remove the workers' placement groups of Train runs whose trial was stopped.

    A stopped trial takes its Train controller down with it; Ray Train's PlacementGroupCleaner
    then removes the workers' group, but it finds the cluster through the State API's address
    lookup, which fails where several Ray clusters share a machine, so the group (and its CPUs)
    stays reserved. Once the experiment is over no group it made is in use; only groups of this
    job (the job id ends a group's id) are touched.
    """
    job = ray.get_runtime_context().get_job_id()
    for pg_id, info in placement_group_table().items():
        if pg_id not in before and pg_id.endswith(job) and info["state"] == "CREATED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def _search_record(search: SearchConfig, recipe_raw: dict) -> str:
    return json.dumps({"search": search.model_dump(mode="json"), "recipe": recipe_raw}, indent=2,
                      sort_keys=True)


def _can_resume(search: SearchConfig, recipe_raw: dict, experiment_path: str) -> bool:
    """Whether the experiment exists; restoring runs the stored search, so it must be this one."""
    if not tune.Tuner.can_restore(experiment_path):
        return False
    fs, path = pafs.FileSystem.from_uri(experiment_path)
    try:
        with fs.open_input_stream(f"{path}/{SEARCH_FILE}") as f:
            stored = f.read().decode()
    except FileNotFoundError:
        stored = None
    if stored != _search_record(search, recipe_raw):
        raise ConfigError(f"name: an experiment named {search.name!r} with a different search or "
                          f"recipe exists at {experiment_path}; give this search another name "
                          "(name=...) or remove that directory")
    return True


def _write_text(location: str, text: str) -> None:
    fs, path = pafs.FileSystem.from_uri(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _show(resources: dict) -> str:
    return ", ".join(f"{resources.get(r, 0):g} {r}" for r in ("CPU", "GPU"))


def _scheduler(search: SearchConfig, recipe: Recipe):
    s, max_steps = search.scheduler, recipe.optim.max_steps
    grace = min(s.grace_period or 2 * recipe.eval.every_steps, max_steps)
    if s.type == "asha":
        # time_attr "step": rungs are training steps, the same for every trial.
        return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace,
                             reduction_factor=s.reduction_factor)
    if s.type == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace,
                                  min_samples_required=s.min_samples_required)
    if s.type == "pbt":
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=pbt_interval(search, recipe),
            hyperparam_mutations={dim.key: _mutation(dim) for dim in search.dimensions()},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            synch=s.synch)
    return FIFOScheduler()


def _mutation(dim):
    """What PBT may move a value to: the range itself; for grid([...]), any of its values."""
    return tune.choice(list(dim.args[0])) if dim.kind == "grid" else dim.domain()


def _searcher(search: SearchConfig, concurrency: int):
    """The searcher, limited to `concurrency` trials in flight (so no Train run waits for workers)."""
    if search.searcher.type == "optuna":
        return ConcurrencyLimiter(OptunaSearch(seed=search.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrency)


def _write_best(search, recipe_raw, best: TrialRow, result, base_path, prepared, storage: str,
                num_trials: int) -> str:
    """The best trial's final checkpoint as a registry entry named after the search."""
    recipe = trial_recipe(recipe_raw, best.params, name=search.name)
    recipe.output.name = search.name  # never overwrite the recipe's own entry
    if prepared is None:
        prepared = prepare_data(recipe)
    # Train reports checkpoint paths inside its storage's filesystem (no scheme for s3:// etc.).
    filesystem = pafs.FileSystem.from_uri(storage)[0] if "://" in storage else None
    checkpoint = ray.train.Checkpoint(best.checkpoint, filesystem=filesystem)
    extra = {"tune": {"best": True, "experiment": search.name,
                      "experiment_path": f"{storage.rstrip('/')}/{search.name}",
                      "trial": best.trial, "params": best.params, "metric": search.metric,
                      "mode": search.mode, "value": best.final, "trials": num_trials,
                      "search": search.model_dump(mode="json")}}
    run_id = trial_run_id(recipe.tracking, best.trial) if recipe.tracking.mlflow else None
    if run_id:
        extra["mlflow"] = reference(tracking_uri(recipe.tracking), recipe.tracking.experiment, run_id)
    entry = write_result(recipe, dataclasses.replace(result, checkpoint=checkpoint), base_path,
                         prepared, extra=extra)
    if run_id:
        link_entry(recipe.tracking, run_id, entry)
    return entry

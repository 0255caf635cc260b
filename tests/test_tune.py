"""Hyperparameter search: search configs, bad input, and real Ray Tune over real Ray Train runs.

    .venv/bin/pytest tests/test_tune.py            # the slow ones run two small experiments on CPU
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray import tune

from attune.config import ConfigError
from attune.registry import read_manifest
from attune.tracking import ENTRY_TAG, SEARCH_TAG, TRIAL_TAG
from attune.tune.config import load_search

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "tuning" / "tiny-full-asha.yaml"
# Short 1-worker trials with a report every 5 steps: ASHA rungs at steps 5 and 15 of 30.
# The time limit turns a stuck experiment into a failure instead of a hang.
SHORT = ["optim.max_steps=30", "eval.every_steps=5", "checkpoint.every_steps=30",
         "optim.warmup_steps=0", "scheduler.grace_period=5", "budget.time_limit_s=900"]


@pytest.mark.parametrize("path", sorted((REPO / "tuning").glob("*.yaml")), ids=lambda p: p.name)
def test_every_search_config_loads_and_validates_against_its_recipe(path):
    search, recipe_raw = load_search(path)
    assert search.dimensions() and recipe_raw["name"]
    first_line = path.read_text().splitlines()[1]
    assert f"attune tune tuning/{path.name}" in first_line  # the file says how to run it


@pytest.mark.parametrize("overrides, message", [
    (['space={"optim.lrr": "loguniform(1e-4, 1e-2)"}'], "optim.lrr: unknown key (did you mean 'lr'?)"),
    (['space={"optim.lr": "loguniform(1e-2, 1e-4)"}'], "is an empty range"),
    (['space={"method.rank": "choice([])"}'], "offers fewer than two values"),
    (['space={"optim.lr": "loguniform(0, 1e-2)"}'], "loguniform needs a positive lower bound"),
    (['space={"optim.warmup_steps": "randint(0, 100)"}'],
     "optim.warmup_steps (99) must be below optim.max_steps (60)"),
    (['space={"optim.lr": "between(1, 2)"}'], "unknown range 'between'"),
    (["metric=accuracy"], "the trainer does not report 'accuracy'"),
    (["metric=eval_reward"], "eval_reward is reported by methods that learn from rewards (grpo), not sft"),
    (["eval.every_steps=7"], "checkpoint.every_steps (60) must be a multiple of eval.every_steps (7)"),
    (["scheduler.type=pbt", 'space={"optim.micro_batch_size": "choice([1, 2])"}'],
     "space.optim.micro_batch_size: PBT changes values in the middle of a trial"),
    (["scheduler.type=pbt", "searcher.type=optuna"], "'optuna' cannot be combined with it"),
    (["scheduler.type=pbt", "scheduler.perturbation_interval=60"],
     "60 steps leaves no room for a perturbation in a run of optim.max_steps=60"),
])
def test_bad_search_fails_naming_the_problem(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_search(SEARCH, overrides)
    assert message in str(e.value)


def test_a_grpo_search_is_judged_by_its_reward_not_a_loss():
    with pytest.raises(ConfigError, match="metric: grpo reports eval_reward, not eval_loss"):
        load_search(REPO / "tuning" / "tiny-grpo-asha.yaml", ["metric=eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["one trial too big", "too many trials at once"])
def test_budget_the_cluster_cannot_meet_fails_before_any_trial(ray_cluster, case):
    from attune.tune.search import run_search

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    if case == "one trial too big":
        overrides = [f"scaling.num_workers={cpus + 1}"]
        message = f"one trial needs {cpus + 2} CPU (scaling.num_workers={cpus + 1}) but the cluster has {cpus}"
    else:  # each trial holds 2 CPUs: Tune's driver and one Train worker
        overrides = [f"budget.max_concurrent_trials={cpus // 2 + 1}"]
        message = f"{cpus // 2 + 1} trials at once do not fit"

    search, recipe_raw = load_search(SEARCH, ["name=too-big", *overrides])
    with pytest.raises(ConfigError) as e:
        run_search(search, recipe_raw)
    assert message in str(e.value)
    assert not Path(recipe_raw["output"]["runs"], "too-big").exists()  # no trial was started


@pytest.fixture(scope="module")
def asha_search(ray_cluster, tiny_base):
    """Six trials over the learning rate, ASHA, 3 at a time; 1e-6 (learns nothing) comes last."""
    from attune.tune.search import run_search

    search, recipe_raw = load_search(SEARCH, [
        "name=test-asha", "num_samples=1", "budget.max_concurrent_trials=3", *SHORT,
        'space={"optim.lr": "grid([3e-3, 1e-2, 1e-3, 3e-4, 1e-4, 1e-6])"}'])
    return run_search(search, recipe_raw)


@pytest.mark.slow
def test_asha_stops_trials_early_and_the_best_trial_becomes_the_entry(asha_search):
    rows = asha_search.rows
    assert len(rows) == 6 and not any(r.error for r in rows)
    stopped = [r for r in rows if r.stopped_early]
    assert stopped and all(r.steps < 30 for r in stopped)
    finished = [r for r in rows if not r.stopped_early]
    assert finished and all(r.steps == 30 for r in finished)

    manifest = read_manifest(asha_search.entry)
    best = min(finished, key=lambda r: r.final)
    assert min(r.final for r in rows) == best.final  # no stopped trial reported better
    assert manifest["tune"]["best"] is True
    assert manifest["tune"]["trial"] == best.trial
    assert manifest["tune"]["params"] == best.params
    assert manifest["name"] == "test-asha"
    assert manifest["final_metrics"]["eval_loss"] == pytest.approx(best.final)

    out = Path(asha_search.experiment_path)
    assert (out / "trials.csv").read_text().count("\n") == 7
    assert (out / "curves.png").stat().st_size > 0
    assert len(list((out / "curves").glob("*.png"))) == 6
    assert "stopped early" in asha_search.table


@pytest.mark.slow
def test_each_trial_is_an_mlflow_run_and_the_best_ones_links_the_entry(asha_search):
    manifest = read_manifest(asha_search.entry)
    client = MlflowClient(manifest["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name(manifest["mlflow"]["experiment"])
    runs = {r.data.tags[TRIAL_TAG]: r for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = 'test-asha'")}
    assert sorted(runs) == sorted(r.trial for r in asha_search.rows)
    for row in asha_search.rows:
        run = runs[row.trial]
        # the trial's whole recipe, its sampled value included, and its reports at their steps
        assert json.loads(run.data.params["optim.lr"]) == row.params["optim.lr"]
        assert run.data.params["optim.max_steps"] == "30"
        evals = client.get_metric_history(run.info.run_id, "eval_loss")
        assert max(m.step for m in evals) == row.steps
        assert run.info.status == "FINISHED"
    best = runs[asha_search.best.trial]
    assert manifest["mlflow"]["run_id"] == best.info.run_id
    assert best.data.tags[ENTRY_TAG] == asha_search.entry


@pytest.mark.slow
def test_a_bad_learning_rate_is_stopped_early_and_never_best(asha_search):
    bad = next(r for r in asha_search.rows if r.params["optim.lr"] == 1e-6)
    assert bad.stopped_early
    assert asha_search.best.trial != bad.trial


@pytest.mark.slow
def test_pbt_has_a_weak_trial_continue_from_the_strong_trials_checkpoint(ray_cluster, tiny_base):
    """Two trials, lr 1e-6 (learns nothing) and 3e-3; at step 20 the weak one takes the strong
    one's checkpoint, so its loss drops to where the strong trial was, which 1e-6 cannot do.
    The interval does not divide the 30 steps, so PBT makes no decision at the very end (one
    there could restart a finished trial from the other's final checkpoint)."""
    from attune.tune.search import run_search

    search, recipe_raw = load_search(SEARCH, [
        "name=test-pbt", "num_samples=1", *SHORT, "checkpoint.every_steps=10",
        "scheduler.type=pbt", "scheduler.perturbation_interval=20", "scheduler.synch=true",
        "scheduler.quantile_fraction=0.5", 'space={"optim.lr": "grid([1e-6, 3e-3])"}'])
    outcome = run_search(search, recipe_raw)

    assert len(outcome.rows) == 2 and not any(r.error for r in outcome.rows)
    assert all(r.steps == 30 and not r.stopped_early for r in outcome.rows)
    # Alone, 1e-6 ends 30 steps where it began (about 7.0, see the ASHA test's table); cloned from
    # the 3e-3 trial at step 20, it ends beside that trial.
    finals = sorted(r.final for r in outcome.rows)
    assert finals[-1] < 6.0 and finals[-1] - finals[0] < 1.0
    assert read_manifest(outcome.entry)["tune"]["trial"] == outcome.best.trial


class InterruptAfterFirstTrial(tune.Callback):
    """Logs trial starts and ends; at the first end, interrupts the experiment once, as Ctrl+C
    would (SIGUSR1 is Tune's stop signal too). Tune keeps its callbacks on restore, so it logs
    the resumed run as well."""

    def __init__(self, log: Path):
        self.log = log

    def _events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def _write(self, event: str) -> None:
        with open(self.log, "a") as f:
            f.write(event + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write(f"start {trial.trial_id}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(f"complete {trial.trial_id}")
        if "interrupt" not in self._events():
            self._write("interrupt")
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, tiny_base,
                                                                        tmp_path):
    from attune.tune.search import run_search

    search, recipe_raw = load_search(SEARCH, [
        "name=test-resume", "num_samples=1", "scheduler.type=fifo", "budget.max_concurrent_trials=2",
        *SHORT, "optim.max_steps=10", "checkpoint.every_steps=10",
        'space={"optim.lr": "grid([3e-3, 1e-3, 3e-4])"}'])
    log = tmp_path / "events.log"
    first = run_search(search, recipe_raw, callbacks=[InterruptAfterFirstTrial(log)])
    assert first.interrupted and first.entry is None

    events = log.read_text().splitlines()
    cut = events.index("interrupt")
    finished_before = {e.split()[1] for e in events[:cut] if e.startswith("complete")}
    second = run_search(search, recipe_raw)
    started_after = {e.split()[1] for e in log.read_text().splitlines()[cut + 1:]
                     if e.startswith("start")}

    assert finished_before and started_after  # the resumed run did start the unfinished ones
    assert not finished_before & started_after
    assert not second.interrupted and second.entry
    assert len(second.rows) == 3
    # trials finished before the interruption keep their full runs (they were not rerun)
    assert all(r.steps == 10 for r in second.rows if r.trial in finished_before)

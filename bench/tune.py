"""Ray Tune benchmark: ASHA vs random search on real tiny-model trials, and Tune's own overhead.

    .venv/bin/python bench/tune.py [--seeds 2] [--samples 32] [--overhead-trials 16] [--overhead-only]

1. Search efficiency. Each trial fine-tunes the tiny model for 300 steps with attune.train.loop in
   the trial's own process (no Train worker group, to keep trials cheap) and reports eval loss
   every 10 steps, over lr log-uniform in 1e-5..1e-1 and warmup 0..20 steps. ASHA (grace period
   20 steps, so a long warmup is not cut early; reduction factor 3) and random search (FIFO)
   get the same sampled trials, seed by seed; counted: trial-steps and the best eval loss.
   Goal: ASHA reaches random search's best (within the noise across seeds) for at most a third
   of its trial-steps.
2. Overhead. N trivial trials that only sleep (their "work"), 4 at a time; Tune's overhead is
   the wall time over the ideal (total work / concurrency), with a fresh trial actor per trial
   (Tune's default) and with actors reused (`reuse_actors=True`). Goal: at most 20%.
Writes bench/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

RECIPE, MAX_STEPS, EVAL_EVERY = "recipes/tiny-full.yaml", 300, 10
GRACE, REDUCTION = 20, 3  # rungs at 20, 60 and 180 steps: a third of the trials go on at each
SPACE = {"lr": tune.loguniform(1e-5, 1e-1), "warmup": tune.randint(0, 20)}
RESULTS = Path(__file__).parent / "results" / "tune.json"


def real_trial(config: dict, recipe_raw: dict, rows: list, eval_rows: list, base: str) -> None:
    """The tiny model's fine-tune with this trial's lr and warmup, eval loss every EVAL_EVERY steps."""
    import torch

    from attune.train.datasets import batches
    from attune.train.loop import Loop, train_loop
    from attune.tune.config import trial_recipe

    torch.set_num_threads(1)  # one core per trial, two trials at a time
    recipe = trial_recipe(recipe_raw, {"optim.lr": config["lr"],
                                       "optim.warmup_steps": config["warmup"]}, name="bench")
    micro = recipe.optim.micro_batch_size

    def report(metrics: dict, checkpoint) -> None:
        tune.report({"step": metrics["step"], "eval_loss": metrics["eval_loss"]})

    train_loop(recipe, base, Loop(
        train_batches=lambda epoch: batches(rows, micro, seed=epoch),
        eval_batches=lambda: batches(eval_rows, micro, seed=0),
        steps_per_epoch=math.ceil(len(rows) / micro), report=report, checkpoint_root=None))


def tiny_recipe_and_rows() -> tuple[dict, list, list, str]:
    from attune import modeling
    from attune.recipe import load_recipe
    from attune.train.datasets import local_rows
    from attune.train.records import read_records, split_eval

    recipe = load_recipe(RECIPE, [f"optim.max_steps={MAX_STEPS}", f"eval.every_steps={EVAL_EVERY}",
                                  f"checkpoint.every_steps={MAX_STEPS}"])
    base = modeling.resolve(recipe.model.name_or_path)
    d = recipe.data
    train, held_out = split_eval(read_records(d.train_files, d.format), d.eval_fraction,
                                      recipe.optim.seed)
    rows = [local_rows(r, recipe.method.objective, base, d.chat_template, d.max_seq_len, d.packing) for r in (train, held_out)]
    return recipe.model_dump(mode="json"), rows[0], rows[1], base


def search(trainable, scheduler, seed: int, samples: int) -> dict:
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 1}), param_space=SPACE,
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", num_samples=samples,
                                    scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=2)),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/attune-bench-tune"))
    grid = tuner.fit()
    steps = [int(r.metrics["step"]) for r in grid]
    best = min(float(r.metrics_dataframe["eval_loss"].min()) for r in grid)
    best_lr = min(grid, key=lambda r: r.metrics_dataframe["eval_loss"].min()).config["lr"]
    return {"trial_steps": sum(steps), "best": best, "best_lr": best_lr,
            "full_runs": steps.count(MAX_STEPS)}


def compare(seeds: int, samples: int, write) -> dict:
    """ASHA vs random, seed by seed; `write` gets the figures so far after each seed."""
    recipe_raw, rows, eval_rows, base = tiny_recipe_and_rows()
    trainable = tune.with_parameters(real_trial, recipe_raw=recipe_raw, rows=rows,
                                     eval_rows=eval_rows, base=base)
    runs = []
    for seed in range(seeds):
        asha = search(trainable, ASHAScheduler(time_attr="step", max_t=MAX_STEPS, grace_period=GRACE,
                                               reduction_factor=REDUCTION), seed, samples)
        random = search(trainable, FIFOScheduler(), seed, samples)
        runs.append({"seed": seed, "asha": asha, "random": random})
        print(f"seed {seed}: ASHA best {asha['best']:.4f} in {asha['trial_steps']} trial-steps, "
              f"random best {random['best']:.4f} in {random['trial_steps']}", flush=True)
        write(summary(runs, samples))
    return summary(runs, samples)


def summary(runs: list[dict], samples: int) -> dict:
    asha_best = [r["asha"]["best"] for r in runs]
    random_best = [r["random"]["best"] for r in runs]
    noise = statistics.pstdev(random_best)  # how much random search's best moves between seeds
    step_ratio = sum(r["asha"]["trial_steps"] for r in runs) / sum(r["random"]["trial_steps"] for r in runs)
    gap = statistics.mean(asha_best) - statistics.mean(random_best)
    return {"samples": samples, "seeds": len(runs), "max_steps": MAX_STEPS,
            "grace_period": GRACE, "reduction_factor": REDUCTION, "runs": runs,
            "asha_best_mean": statistics.mean(asha_best), "random_best_mean": statistics.mean(random_best),
            "noise": noise, "trial_step_ratio": step_ratio,
            "goal_met": step_ratio <= 1 / 3 and gap <= noise}


def sleeping_trial(config: dict) -> None:
    for _ in range(config["reports"]):
        time.sleep(config["work_s"] / config["reports"])
        tune.report({"done_work": 1})


def overhead(trials: int, reuse_actors: bool, work_s: float = 5.0, concurrency: int = 4) -> dict:
    tuner = tune.Tuner(
        sleeping_trial, param_space={"work_s": work_s, "reports": 10},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/attune-bench-tune"))
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    ideal = trials * work_s / concurrency
    return {"trials": trials, "reuse_actors": reuse_actors, "work_s_per_trial": work_s,
            "concurrency": concurrency,
            "wall_s": wall, "ideal_s": ideal, "overhead": wall / ideal - 1,
            "goal_met": wall / ideal - 1 <= 0.20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--overhead-trials", type=int, default=16)
    parser.add_argument("--overhead-only", action="store_true",
                        help="measure the overhead again, keeping the search figures in the file")
    parser.add_argument("--search-only", action="store_true",
                        help="run the search comparison again, keeping the overhead figures in the file")
    args = parser.parse_args()

    from attune.cluster import ensure_ray

    ensure_ray(num_cpus=6)
    if args.search_only:
        figures = {k: v for k, v in json.loads(RESULTS.read_text()).items() if k != "search"}
    else:
        figures = {"overhead": overhead(args.overhead_trials, reuse_actors=False),
                   "overhead_reusing_actors": overhead(args.overhead_trials, reuse_actors=True)}

    def write(search_figures: dict) -> None:
        figures["search"] = search_figures
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")

    if args.overhead_only:
        write(json.loads(RESULTS.read_text())["search"])
    else:
        compare(args.seeds, args.samples, write)
    s = figures["search"]
    print(f"ASHA: {s['trial_step_ratio']:.0%} of random search's trial-steps; best "
          f"{s['asha_best_mean']:.4f} vs {s['random_best_mean']:.4f} (noise {s['noise']:.4f}); "
          f"goal met: {s['goal_met']}")
    for key in ("overhead", "overhead_reusing_actors"):
        o = figures[key]
        print(f"Tune overhead (reuse_actors={o['reuse_actors']}): {o['wall_s']:.1f} s wall for "
              f"{o['ideal_s']:.1f} s of work per slot ({o['overhead']:+.0%}); goal met: {o['goal_met']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

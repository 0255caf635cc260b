"""Ray Tune benchmark: ASHA vs random search on a fixed space, and Tune's own overhead.

    .venv/bin/python bench/tune.py [--seeds 3] [--samples 27] [--overhead-trials 16]

1. Search efficiency. A synthetic learning curve over (lr, warmup) with a known good region
   (lr near 3e-3): a higher lr learns faster early but settles higher away from it, so early
   rankings are informative but not exact, as with real runs. ASHA and plain random search
   (FIFO) get the same trials, seeds and searcher; we count trial-steps (the steps every trial
   ran, summed) and the best loss reached. Goal: ASHA reaches random search's best (within the
   noise across seeds) for at most a third of its trial-steps.
2. Overhead. N trivial trials that only sleep (their "work") run 4 at a time; Tune's overhead is
   the wall time over the ideal (total work / concurrency). Goal: at most 20%.

The curve is synthetic so that the benchmark measures the scheduler, not the model, in minutes
on 2 cores (a real tiny-model trial spends most of its time starting its Train run).
Writes bench/results/tune.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

MAX_STEPS, REPORT_EVERY, BEST_LR = 100, 5, 3e-3
SPACE = {"lr": tune.loguniform(1e-5, 1e-1), "warmup": tune.randint(0, 20)}
RESULTS = Path(__file__).parent / "results" / "tune.json"


def curve(lr: float, warmup: int, step: int, rng: np.random.Generator) -> float:
    """Eval loss at `step`: starts at 6, falls faster for higher lr, floors lowest at lr = 3e-3."""
    distance = math.log10(lr) - math.log10(BEST_LR)
    rate = 0.03 * 10 ** (0.5 * distance)
    floor = 1.0 + 0.6 * distance ** 2
    progress = max(0.0, step - warmup / 2)  # warmup delays learning a little, nothing else
    return floor + (6.0 - floor) * math.exp(-rate * progress) + rng.normal(0, 0.01)


def synthetic_trial(config: dict) -> None:
    rng = np.random.default_rng(abs(hash((config["lr"], config["warmup"]))) % 2**32)
    for step in range(REPORT_EVERY, MAX_STEPS + 1, REPORT_EVERY):
        tune.report({"step": step, "eval_loss": curve(config["lr"], config["warmup"], step, rng)})


def search(scheduler, seed: int, samples: int) -> dict:
    tuner = tune.Tuner(
        synthetic_trial, param_space=SPACE,
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", num_samples=samples,
                                    scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=4)),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/attune-bench-tune"))
    grid = tuner.fit()
    steps = [int(r.metrics["step"]) for r in grid]
    best = min(float(r.metrics_dataframe["eval_loss"].min()) for r in grid)
    return {"trial_steps": sum(steps), "best": best, "full_runs": steps.count(MAX_STEPS)}


def compare(seeds: int, samples: int) -> dict:
    runs = []
    for seed in range(seeds):
        asha = search(ASHAScheduler(time_attr="step", max_t=MAX_STEPS, grace_period=REPORT_EVERY,
                                    reduction_factor=3), seed, samples)
        random = search(FIFOScheduler(), seed, samples)
        runs.append({"seed": seed, "asha": asha, "random": random})
        print(f"seed {seed}: ASHA best {asha['best']:.4f} in {asha['trial_steps']} trial-steps, "
              f"random best {random['best']:.4f} in {random['trial_steps']}", flush=True)
    asha_best = [r["asha"]["best"] for r in runs]
    random_best = [r["random"]["best"] for r in runs]
    noise = statistics.pstdev(random_best) + 0.01  # spread across seeds plus the curve's own noise
    step_ratio = sum(r["asha"]["trial_steps"] for r in runs) / sum(r["random"]["trial_steps"] for r in runs)
    gap = statistics.mean(asha_best) - statistics.mean(random_best)
    return {"samples": samples, "seeds": seeds, "max_steps": MAX_STEPS, "runs": runs,
            "asha_best_mean": statistics.mean(asha_best), "random_best_mean": statistics.mean(random_best),
            "noise": noise, "trial_step_ratio": step_ratio,
            "goal_met": step_ratio <= 1 / 3 and gap <= noise}


def sleeping_trial(config: dict) -> None:
    for _ in range(config["reports"]):
        time.sleep(config["work_s"] / config["reports"])
        tune.report({"done_work": 1})


def overhead(trials: int, work_s: float = 2.0, concurrency: int = 4) -> dict:
    tuner = tune.Tuner(
        sleeping_trial, param_space={"work_s": work_s, "reports": 10},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/attune-bench-tune"))
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    ideal = trials * work_s / concurrency
    return {"trials": trials, "work_s_per_trial": work_s, "concurrency": concurrency,
            "wall_s": wall, "ideal_s": ideal, "overhead": wall / ideal - 1,
            "goal_met": wall / ideal - 1 <= 0.20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=27)
    parser.add_argument("--overhead-trials", type=int, default=16)
    args = parser.parse_args()

    from attune.trainer import ensure_ray

    ensure_ray(num_cpus=6)
    figures = {"search": compare(args.seeds, args.samples),
               "overhead": overhead(args.overhead_trials)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    s, o = figures["search"], figures["overhead"]
    print(f"ASHA: {s['trial_step_ratio']:.0%} of random search's trial-steps; best "
          f"{s['asha_best_mean']:.4f} vs {s['random_best_mean']:.4f} (noise {s['noise']:.4f}); "
          f"goal met: {s['goal_met']}")
    print(f"Tune overhead: {o['wall_s']:.1f} s wall for {o['ideal_s']:.1f} s of work per slot "
          f"({o['overhead']:+.0%}); goal met: {o['goal_met']}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

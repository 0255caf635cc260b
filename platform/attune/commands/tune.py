"""attune tune SEARCH [key=value ...]: search a recipe's hyperparameters with Ray Tune.

    attune tune tuning/tiny-full-asha.yaml num_samples=4 optim.max_steps=60

Overrides whose first key is a search key (num_samples, scheduler.type, budget.time_limit_s ...)
change the search; any other key changes the recipe of every trial. Running the same search
again resumes it: finished trials are kept, unfinished ones run.
"""

HELP = "search a recipe's hyperparameters with Ray Tune; the best trial becomes a registry entry"


def add_arguments(parser) -> None:
    parser.add_argument("search", help="search config YAML, e.g. tuning/tiny-full-asha.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value for the search or the recipe")


def run(args) -> int:
    from attune.tune.config import load_search

    search, recipe_raw = load_search(args.search, args.overrides)  # fails before any cluster work
    from attune.cluster import exit_now
    from attune.tune.search import run_search

    outcome = run_search(search, recipe_raw)
    if outcome.interrupted:
        print(f"[attune] interrupted; run the same command again to resume {outcome.experiment_path}",
              flush=True)
        exit_now(130)  # the experiment's state is saved: nothing left to wait for
    print(outcome.table)
    print(f"[attune] trials: {outcome.experiment_path}/trials.csv, curves: "
          f"{outcome.experiment_path}/curves.png", flush=True)
    if outcome.entry is None:
        print("[attune] no trial ran to its last step; no registry entry written", flush=True)
        return 1
    print(f"[attune] best trial {outcome.best.trial}: {search.metric} {outcome.best.final:.4f} "
          f"with {outcome.best.params}", flush=True)
    print(f"[attune] registry entry: {outcome.entry}  (put it live: attune promote {outcome.entry})",
          flush=True)
    return 0

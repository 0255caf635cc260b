"""Ray Tune over Ray Train: search a recipe's hyperparameters; the best trial becomes an entry.

    search, recipe_raw = load_search("tuning/tiny-full-asha.yaml")     # attune.tune.config
    outcome = run_search(search, recipe_raw)                           # attune.tune.search

config.py   the search config (tuning/*.yaml), checked before any trial starts
space.py    ranges such as loguniform(1e-5, 1e-2), checked against the recipe
trial.py    one trial: Train runs of the recipe with the trial's values
search.py   the Tuner, its scheduler and searcher, resuming, the best trial's entry
results.py  the table of trials, trials.csv and the eval-loss curves
tracking.py each trial an MLflow run (Ray Tune's MLflowLoggerCallback)
"""

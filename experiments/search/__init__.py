"""`celestial-experiment --search FILE`: a hyperparameter search with Optuna over config keys,
each trial an ordinary training run, and a final test comparison of the best configuration
against the start, retrained with several seeds (docs/experiments.md, "Search")."""

"""workers: a search's trials run as Ray tasks against the shared Optuna storage."""

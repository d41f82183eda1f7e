"""Training entry points over the library (`python -m train.train`, `python -m train.prune_rl`)."""

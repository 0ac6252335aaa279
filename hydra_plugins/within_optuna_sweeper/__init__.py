"""within's Hydra sweeper plugin: Hydra's Optuna sweeper, plus pruning (docs/sweeps.md)."""

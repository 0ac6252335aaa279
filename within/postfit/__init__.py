"""Post-fit steps, run in the order `postfit: [...]` lists them after Trainer.fit."""
from within.postfit.steps import STEPS, PostfitContext, run_steps

__all__ = ["STEPS", "PostfitContext", "run_steps"]

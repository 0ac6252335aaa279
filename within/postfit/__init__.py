"""Post-fit steps, run in the order `postfit: [...]` lists them after Trainer.fit:
calibrate -> intervals -> ensemble -> quantize -> export."""
from within.postfit.context import PostfitContext
from within.postfit.scoring import postfit_test_metrics, report_sections
from within.postfit.steps import STEPS, run_steps

__all__ = ["STEPS", "PostfitContext", "postfit_test_metrics", "report_sections", "run_steps"]

"""Post-fit steps, run in the order `postfit: [...]` lists them after the fit:
calibrate -> intervals -> ensemble -> quantize -> export."""
from within.postfit.context import PostfitContext
from within.postfit.scoring import postfit_test_metrics, report_sections
from within.postfit.steps import STEPS, check_steps, run_steps, status_section

__all__ = ["STEPS", "PostfitContext", "check_steps", "postfit_test_metrics", "report_sections", "run_steps",
           "status_section"]

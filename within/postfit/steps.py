"""The post-fit step registry. Each step is a small class: `run(ctx)` reads the fitted objects from
the context, writes its artifacts under the run directory and adds its metrics to `ctx.metrics`.

Calibrators and intervals are fitted on the `calib` split, which is disjoint from the early-stopping
(`val`) and `test` splits; with no `calib` split they fall back to `val` and say so. Steps that
report on `test` (ensemble, quantize, export's ONNX check) only measure there; nothing is fitted on it.
"""
from __future__ import annotations

import json
import time
from typing import Any

from within.postfit.calibrate import Calibrate
from within.postfit.context import PostfitContext, labels_of
from within.postfit.ensemble import EnsembleReport
from within.postfit.export import Export
from within.postfit.intervals import Intervals
from within.postfit.quantize import Quantize

STEPS: dict[str, type] = {cls.name: cls for cls in (Calibrate, Intervals, EnsembleReport, Quantize, Export)}


def run_steps(names: list[str], ctx: PostfitContext, score_test: Any) -> None:
    """Run the named steps in order; `score_test(ctx)` runs just before `export` (or last)."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"postfit: unknown step(s) {unknown}; available: {sorted(STEPS)}")
    scored = False
    seconds: dict[str, float] = {}
    for name in names:
        if name == "export" and not scored:
            score_test(ctx)
            scored = True
        start = time.perf_counter()
        STEPS[name]().run(ctx)
        seconds[name] = round(time.perf_counter() - start, 3)
    if not scored:
        score_test(ctx)
    ctx.metadata["step_seconds"] = seconds
    (ctx.report_dir / "postfit.json").write_text(json.dumps({"steps": names, **ctx.metadata}, indent=2, default=str))


__all__ = ["STEPS", "PostfitContext", "labels_of", "run_steps"]

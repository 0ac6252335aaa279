"""The post-fit step registry, and the loop that runs the steps without ever losing the model.

Each step is a small class: `run(ctx)` reads the fitted model from the context, writes its artifacts
under the run directory and adds its metrics to `ctx.metrics`; `skip_reason(model)` says why it does
not apply to a model (a linear model has no network to quantize), or None.

Calibrators and intervals are fitted on the `calib` split, which is disjoint from the early-stopping
(`val`) and `test` splits; with no `calib` split they fall back to `val` and say so. Steps that
report on `test` (ensemble, quantize, export's ONNX check) only measure there; nothing is fitted on it.

A step that raises is recorded as failed (with its error) and the next steps still run, unless
`strict`; `after_step(ctx)` runs after every step either way (the pipeline rewrites the bundle there).
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from within.postfit.attribution import Attribution
from within.postfit.calibrate import Calibrate
from within.postfit.context import PostfitContext, labels_of
from within.postfit.ensemble import EnsembleReport
from within.postfit.export import Export
from within.postfit.fairness import Fairness
from within.postfit.intervals import Intervals
from within.postfit.quantize import Quantize

log = logging.getLogger(__name__)
MODEL_STATE = ("calibrator", "intervals")
STEPS: dict[str, type] = {cls.name: cls for cls in (Calibrate, Intervals, EnsembleReport, Quantize, Export, Fairness,
                                                      Attribution)}


def check_steps(names: list[str]) -> None:
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"postfit: unknown step(s) {unknown}; available: {sorted(STEPS)}")


def run_steps(names: list[str], ctx: PostfitContext, score_test: Callable[[PostfitContext], None],
              after_step: Callable[[PostfitContext], None] | None = None, strict: bool = False) -> list[dict[str, Any]]:
    """Run the named steps in order; `score_test(ctx)` runs just before `export` (or last).
    Returns one status row per step: {step, status: ok | failed | skipped, seconds, error}."""
    check_steps(names)
    status: list[dict[str, Any]] = []
    ctx.metadata["postfit"] = status
    scored = False
    for name in names:
        if name == "export" and not scored:
            score_test(ctx)
            scored = True
        step = STEPS[name]()
        row: dict[str, Any] = {"step": name, "status": "ok"}
        reason = step.skip_reason(ctx.model) if hasattr(step, "skip_reason") else None
        start = time.perf_counter()
        if reason:
            row.update(status="skipped", reason=reason)
            log.info("postfit %s: skipped (%s)", name, reason)
        else:
            # what steps set on the model: put back on failure, so a half-done step leaves nothing behind
            saved = {attr: getattr(ctx.model, attr, None) for attr in MODEL_STATE}
            try:
                step.run(ctx)
            except Exception as err:
                if strict:
                    raise
                for attr, value in saved.items():
                    setattr(ctx.model, attr, value)
                row.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
                log.error("postfit %s failed (%s: %s); the run goes on and the bundle keeps the model as it was "
                          "before this step (postfit_strict=true makes this fatal)", name, type(err).__name__, err)
        row["seconds"] = round(time.perf_counter() - start, 3)
        status.append(row)
        if after_step is not None:
            after_step(ctx)
    if not scored:
        score_test(ctx)
    (ctx.report_dir / "postfit.json").write_text(json.dumps({"steps": names, **ctx.metadata}, indent=2, default=str))
    return status


def status_section(status: list[dict[str, Any]]) -> str:
    """report.md's table of the post-fit steps: what ran, what was skipped and why, what failed."""
    rows = ["| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for r in status:
        note = r.get("error") or r.get("reason") or ""
        rows.append(f"| `{r['step']}` | {r['status']} | {r['seconds']:.1f} | {note.replace('|', '/')} |")
    return "\n".join(rows)


__all__ = ["STEPS", "PostfitContext", "check_steps", "labels_of", "run_steps", "status_section"]

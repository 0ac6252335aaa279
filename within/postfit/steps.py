"""Each post-fit step is a small class: `run(ctx)` reads the fitted objects from the context,
writes its artifacts under the run directory and adds its metrics to `ctx.metrics`.

Calibrators are fitted on the `calib` split, which is disjoint from the early-stopping (`val`)
and `test` splits; with no `calib` split they fall back to `val` and say so.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PostfitContext:
    predictor: Any                      # AdScorePredictor
    frames: dict[str, pd.DataFrame]     # train / val / calib / test
    out_dir: Path
    config: dict[str, Any]              # the resolved run config (for metadata)
    calibrator_factory: Any = None      # () -> calibrator, or None for raw sigmoid
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def calibration_frame(self) -> tuple[str, pd.DataFrame]:
        for name in ("calib", "val"):
            frame = self.frames.get(name)
            if frame is not None and len(frame):
                if name == "val":
                    log.warning("no calib split (data.split.calib_frac=0): calibrating on the val split")
                return name, frame
        raise ValueError("post-fit calibration needs a calib or val split; set data.split.calib_frac > 0")

    @property
    def report_dir(self) -> Path:
        path = self.out_dir / "report"
        path.mkdir(parents=True, exist_ok=True)
        return path


def labels_of(predictor: Any, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    spec = predictor.processor.spec
    y = frame[spec.label].to_numpy(dtype=np.float64)
    w = frame[spec.weight].to_numpy(dtype=np.float64) if spec.weight else None
    return y, w


class Calibrate:
    """Fit the configured calibrator on held-out logits; report calibration before and after."""

    name = "calibrate"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import ece

        if ctx.calibrator_factory is None:
            ctx.predictor.calibrator = None
            return
        split, frame = ctx.calibration_frame()
        logits = ctx.predictor.predict_logits(frame)
        y, w = labels_of(ctx.predictor, frame)
        calibrator = ctx.calibrator_factory()
        ctx.predictor.calibrator = None
        groups = None
        if getattr(calibrator, "required_columns", None) or ctx.predictor.processor.spec.groups:
            ctx.predictor.calibrator = calibrator  # so group_columns knows what it needs
            groups = ctx.predictor.group_columns(frame)
        calibrator.fit(logits, y, groups=groups, weight=w)
        ctx.predictor.calibrator = calibrator
        before = 1.0 / (1.0 + np.exp(-logits))
        after = calibrator.transform(logits, groups=groups)
        ctx.metrics[f"{split}/ece_uncalibrated"] = float(ece(before, y, weight=w))
        ctx.metrics[f"{split}/ece_calibrated"] = float(ece(after, y, weight=w))
        ctx.metadata["calibration"] = {"split": split, "type": calibrator.to_dict().get("type")}


class Export:
    """Write the bundle: weights (safetensors), spec.json, calibration.json, metadata.json."""

    name = "export"

    def run(self, ctx: PostfitContext) -> None:
        from within.models.predictor import library_versions

        predictor = ctx.predictor
        predictor.metadata.update(
            {
                "config": ctx.config,
                "metrics": ctx.metrics,
                "library_versions": library_versions(),
                **ctx.metadata,
            }
        )
        bundle = predictor.save(ctx.out_dir / "bundle")
        ctx.metadata["bundle"] = str(bundle)
        log.info("bundle written to %s", bundle)


STEPS: dict[str, type] = {cls.name: cls for cls in (Calibrate, Export)}


def run_steps(names: list[str], ctx: PostfitContext, score_test: Any) -> None:
    """Run the named steps in order; `score_test(ctx)` runs just before `export` (or last)."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"postfit: unknown step(s) {unknown}; available: {sorted(STEPS)}")
    scored = False
    for name in names:
        if name == "export" and not scored:
            score_test(ctx)
            scored = True
        STEPS[name]().run(ctx)
    if not scored:
        score_test(ctx)
    (ctx.report_dir / "postfit.json").write_text(json.dumps({"steps": names, **ctx.metadata}, indent=2, default=str))

"""What every post-fit step reads and writes: the fitted model, the data splits, the run directory."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PostfitContext:
    model: Any                          # the fitted model (NetworkModel, CalibratedEnsemble, DynamicLinear)
    frames: dict[str, pd.DataFrame]     # train / val / calib / test
    out_dir: Path
    config: dict[str, Any]              # the resolved run config (for metadata and step settings)
    calibrator_factory: Any = None      # () -> calibrator, or None for raw sigmoid
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    bundle_files: dict[str, Path] = dataclasses.field(default_factory=dict)  # extra files copied into bundle/

    def calibration_frame(self) -> tuple[str, pd.DataFrame]:
        for name in ("calib", "val"):
            frame = self.frames.get(name)
            if frame is not None and len(frame):
                if name == "val":
                    log.warning("no calib split (data.split.calib_frac=0): calibrating on the val split")
                return name, frame
        raise ValueError("post-fit calibration needs a calib or val split; set data.split.calib_frac > 0")

    def scoring_frame(self) -> pd.DataFrame:
        """The test split, or the calibration split when there is no test split (measurement only)."""
        frame = self.frames.get("test")
        if frame is None or not len(frame):
            _, frame = self.calibration_frame()
        return frame

    def settings(self, step: str) -> dict[str, Any]:
        """The run config's top-level node for a step (`intervals:`, `quantize:`, `export:`), or {}."""
        node = (self.config or {}).get(step)
        return dict(node) if isinstance(node, dict) else {}

    def subdir(self, name: str) -> Path:
        path = self.out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def report_dir(self) -> Path:
        return self.subdir("report")


def labels_of(model: Any, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    spec = model.spec
    y = frame[spec.label].to_numpy(dtype=np.float64)
    w = frame[spec.weight].to_numpy(dtype=np.float64) if spec.weight else None
    return y, w


def members_of(model: Any) -> list[Any]:
    """The single models inside: the members of an ensemble, else the model itself."""
    members = getattr(model, "base_models", None)
    return list(members) if members is not None else [model]


def networks_of(model: Any) -> list[Any] | None:
    """The members when every one of them is a network model (has `.net` and `.processor`), else None."""
    members = members_of(model)
    ok = all(getattr(m, "net", None) is not None and getattr(m, "processor", None) is not None for m in members)
    return members if ok else None

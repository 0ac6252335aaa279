"""NetworkModel: a trained network + its feature processor + calibrator, saved as one bundle.

This is an inference object: it scores rows and saves/loads itself; the pipeline trains it.

Bundle layout (no pickle anywhere):
  model.safetensors   network weights
  spec.json           FeatureSpec + fitted FeatureProcessor state
  calibration.json    calibrator (and interval) parameters, or null
  metadata.json       class, network class + kwargs, versions, config, metrics, privacy report
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from within.features.processor import FeatureProcessor
from within.models.base import (
    BaseMLModel,
    BundleError,
    library_versions,
    read_arrays,
    read_json,
    register_model,
)
from within.models.scoring import CalibratedScoring, read_calibration, write_calibration

SPEC_FILE = "spec.json"


def _net_classes() -> dict[str, type[nn.Module]]:
    """Networks a bundle may name. A name outside this table is refused, never imported."""
    from within.nn.predictor import AdPredictorNN

    return {"AdPredictorNN": AdPredictorNN}


def build_net(net_class: str, net_kwargs: dict[str, Any]) -> nn.Module:
    classes = _net_classes()
    if net_class not in classes:
        raise BundleError(f"unknown network class {net_class!r}; known: {sorted(classes)}")
    cls = classes[net_class]
    # a kwarg the saved network predates takes the value that rebuilds it
    return cls(**{**getattr(cls, "LEGACY_KWARGS", {}), **net_kwargs})


@register_model(aliases=("AdScorePredictor",))
class NetworkModel(CalibratedScoring, BaseMLModel):
    """Calibrated network scorer. `predict` takes a DataFrame, one record dict, or a list of dicts.

    Args:
        processor: the fitted FeatureProcessor (raw rows -> AdBatch arrays).
        net: the trained network (AdBatch -> logits).
        net_class, net_kwargs: how to rebuild `net` from the bundle (a name from a fixed table).
        calibrator, intervals: fitted by the post-fit steps `calibrate` and `intervals`.
        batch_size: rows per forward pass.
    """

    def __init__(
        self,
        processor: FeatureProcessor,
        net: nn.Module,
        net_class: str = "AdPredictorNN",
        net_kwargs: dict[str, Any] | None = None,
        calibrator: Any = None,
        intervals: Any = None,
        model_name: str = "ad_score",
        model_version: str = "0.1.0",
        metadata: dict[str, Any] | None = None,
        batch_size: int = 8192,
    ) -> None:
        super().__init__(model_name=model_name, feature_names=processor.spec.names, model_version=model_version,
                         metadata=metadata)
        self.processor = processor
        self.net = net.eval()
        self.net_class = net_class
        self.net_kwargs = dict(net_kwargs if net_kwargs is not None else getattr(net, "init_kwargs", {}))
        self.calibrator = calibrator
        self.intervals = intervals
        self.batch_size = int(batch_size)

    @property
    def spec(self) -> Any:
        return self.processor.spec

    @torch.no_grad()
    def predict_logits(self, X: Any) -> np.ndarray:
        arrays = self.processor.transform(X)
        n = len(arrays["mask_tabular"])
        self.net.eval()
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            batch = {k: torch.as_tensor(v[sl]) for k, v in arrays.items()}
            out[sl] = self.net(batch).float().numpy()
        return out

    # ---- persistence --------------------------------------------------------------------
    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.net.state_dict().items()}
        return arrays, {"net_class": self.net_class, "net_kwargs": self.net_kwargs, "library_versions": library_versions()}

    def _save_files(self, path: Path) -> None:
        (path / SPEC_FILE).write_text(json.dumps(self.processor.to_dict()))
        write_calibration(self, path)

    @classmethod
    def _from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any],
                    processor: FeatureProcessor | None = None) -> NetworkModel:
        if processor is None:
            raise BundleError("NetworkModel: a network needs its feature processor (spec.json); load the bundle folder")
        net = build_net(config["net_class"], config["net_kwargs"])
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        # keep integer buffers (e.g. BatchNorm counters) in their own dtype
        ref = net.state_dict()
        state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BundleError(f"model.safetensors does not match {config['net_class']}: {err}") from err
        return cls(processor=processor, net=net, net_class=config["net_class"], net_kwargs=config["net_kwargs"])

    @classmethod
    def _from_bundle(cls, path: Path, meta: dict[str, Any]) -> NetworkModel:
        processor = FeatureProcessor.from_dict(read_json(path / SPEC_FILE))
        model = cls._from_state(read_arrays(path), meta.get("config", {}), processor=processor)
        model.calibrator, model.intervals = read_calibration(path)
        return model


__all__ = ["SPEC_FILE", "NetworkModel", "build_net"]

"""Post-fit step `export`: the bundle, and `export/model.onnx` checked against torch with ONNX Runtime.

The ONNX graph takes the AdBatch tensors as named inputs (num, cat, text, image, mask_*; only those
the feature spec produces) with a dynamic batch axis. Temperature and Platt calibration are an
affine map of the logit, so they are folded in and the graph outputs the calibrated probability;
other calibrators (spline, isotonic, hierarchical, geospatial) stay outside: the graph outputs the
logit and calibration.json is applied after it. An ensemble whose members share one feature
processor is exported as one graph with the aggregation inside.

Exporter: torch.onnx.export(dynamo=True). The legacy TorchScript exporter has no symbolic for
EmbeddingBag with padding_idx (the text encoder), so it cannot export AdPredictorNN.
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from within.postfit.context import PostfitContext, members_of

log = logging.getLogger(__name__)
INPUT_KEYS = ("num", "cat", "text", "image", "mask_tabular", "mask_text", "mask_image", "text_emb")


def _batch_size(batch: dict[str, torch.Tensor]) -> Any:
    return next(iter(batch.values())).shape[0]


class OnnxScorer(nn.Module):
    """Explicit tensor inputs -> (aggregated) logit -> optional affine calibration and sigmoid."""

    def __init__(self, nets: list[nn.Module], aggregation: str = "mean", weights: Any = None,
                 trim_fraction: float = 0.0, affine: tuple[float, float] | None = None) -> None:
        super().__init__()
        export_nets = []
        for net in nets:
            net = copy.deepcopy(net).eval()
            # Input checks are eager-only (value-range branches depend on data); the serving side
            # validates through the FeatureProcessor before tensors reach the graph.
            net._check_batch = _batch_size
            export_nets.append(net)
        self.nets = nn.ModuleList(export_nets)
        self.aggregation = aggregation
        w = torch.full((len(nets),), 1.0 / len(nets)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w)
        m = len(nets)
        k = int(np.ceil(trim_fraction * m)) if trim_fraction > 0 else 0
        self.trim = min(k, (m - 1) // 2)
        self.affine = affine

    def forward(self, num=None, cat=None, text=None, image=None, mask_tabular=None, mask_text=None, mask_image=None,
                text_emb=None):
        given = dict(zip(INPUT_KEYS, (num, cat, text, image, mask_tabular, mask_text, mask_image, text_emb)))
        batch = {k: v for k, v in given.items() if v is not None}
        logits = torch.stack([net(batch) for net in self.nets], dim=1)
        if logits.shape[1] == 1:
            out = logits[:, 0]
        elif self.aggregation == "weighted":
            out = logits @ self.weights
        elif self.aggregation == "median":
            out = logits.sort(dim=1).values[:, (logits.shape[1] - 1) // 2 : logits.shape[1] // 2 + 1].mean(dim=1)
        elif self.aggregation == "trimmed_mean":
            out = logits.sort(dim=1).values[:, self.trim : logits.shape[1] - self.trim].mean(dim=1)
        else:
            out = logits.mean(dim=1)
        if self.affine is not None:
            return torch.sigmoid(out * self.affine[0] + self.affine[1])
        return out


def affine_calibration(calibrator: Any) -> tuple[float, float] | None:
    """(slope, bias) when the calibrator is sigmoid(slope * logit + bias), else None."""
    from within.calibration import PlattScaling, TemperatureScaling

    if isinstance(calibrator, TemperatureScaling):
        return 1.0 / calibrator.temperature_, calibrator.bias_
    if isinstance(calibrator, PlattScaling):
        return calibrator.slope_, calibrator.bias_
    return None


def build_scorer(predictor: Any) -> tuple[OnnxScorer, str]:
    """The export module for a predictor and what it outputs ('probability' or 'logit')."""
    members = members_of(predictor)
    if len(members) > 1:
        first = members[0].processor.to_dict()
        if any(m.processor.to_dict() != first for m in members[1:]):
            raise ValueError("ensemble members use different feature processors; one ONNX graph needs one input schema")
    affine = affine_calibration(predictor.calibrator)
    scorer = OnnxScorer(
        [m.net for m in members],
        aggregation=getattr(predictor, "aggregation_method", "mean"),
        weights=predictor.get_model_weights() if hasattr(predictor, "get_model_weights") else None,
        trim_fraction=getattr(predictor, "trim_fraction", 0.0),
        affine=affine,
    ).eval()
    return scorer, ("probability" if affine is not None else "logit")


def export_onnx(predictor: Any, frame: Any, path: Any, sample_rows: int = 64, check_rows: int = 256,
                opset: int = 18) -> dict[str, Any]:
    """Write `path` (ONNX) and compare ONNX Runtime with torch on `check_rows` rows of `frame`."""
    import onnxruntime as ort

    scorer, output = build_scorer(predictor)
    arrays = predictor.processor.transform(frame.iloc[: max(sample_rows, check_rows)])
    keys = [k for k in INPUT_KEYS if k in arrays]
    sample = {k: torch.as_tensor(arrays[k][:sample_rows]) for k in keys}
    if len(next(iter(sample.values()))) < 2:
        raise ValueError("export: need at least 2 sample rows to trace a dynamic batch axis")
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(scorer, (), kwargs=sample, dynamic_shapes={k: {0: batch} for k in keys},
                                    dynamo=True, opset_version=opset, output_names=[output], verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: arrays[i.name][:check_rows] for i in session.get_inputs()}
    onnx_out = session.run(None, feed)[0]
    with torch.no_grad():
        torch_out = scorer(**{k: torch.as_tensor(arrays[k][:check_rows]) for k in keys}).numpy()
    diff = float(np.max(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))))
    return {"path": str(path), "inputs": keys, "output": output, "opset": opset, "exporter": "torch.onnx dynamo",
            "check_rows": len(onnx_out), "max_abs_diff": diff,
            "calibration": "folded into the graph" if output == "probability"
            else "not folded: apply calibration.json to the logit output"}


class Export:
    """Write the bundle (weights, spec.json, calibration.json, metadata.json) and export/model.onnx."""

    name = "export"

    def run(self, ctx: PostfitContext) -> None:
        from within.models.predictor import library_versions

        settings = ctx.settings("export")
        predictor = ctx.predictor
        if settings.get("onnx", True):
            self._onnx(ctx, settings)
        predictor.metadata.update(
            {"config": ctx.config, "metrics": ctx.metrics, "library_versions": library_versions(), **ctx.metadata}
        )
        bundle = predictor.save(ctx.out_dir / "bundle")
        ctx.metadata["bundle"] = str(bundle)
        log.info("bundle written to %s", bundle)

    @staticmethod
    def _onnx(ctx: PostfitContext, settings: dict[str, Any]) -> None:
        frame = ctx.frames.get("test")
        if frame is None or not len(frame):
            _, frame = ctx.calibration_frame()
        atol = float(settings.get("atol", 1e-4))
        try:
            info = export_onnx(ctx.predictor, frame, ctx.subdir("export") / "model.onnx",
                               check_rows=int(settings.get("check_rows", 256)), opset=int(settings.get("opset", 18)))
        except Exception as err:  # noqa: BLE001 - exporter failure: recorded, the bundle still goes out
            log.warning("postfit export: no ONNX graph (%s: %s); the bundle is written", type(err).__name__, err)
            ctx.metadata["onnx"] = {"skipped": f"{type(err).__name__}: {err}"}
            return
        info["atol"] = atol
        (ctx.subdir("export") / "onnx.json").write_text(json.dumps(info, indent=2))
        ctx.metrics["export/onnx_max_abs_diff"] = info["max_abs_diff"]
        _merge_into_report(ctx, {"export/onnx_max_abs_diff": info["max_abs_diff"]})
        ctx.metadata["onnx"] = info
        if info["max_abs_diff"] > atol:
            raise RuntimeError(
                f"export: ONNX Runtime differs from torch by {info['max_abs_diff']:.2e} > export.atol={atol}; "
                "inspect export/model.onnx, or set export.onnx=false to write only the bundle"
            )


def _merge_into_report(ctx: PostfitContext, metrics: dict[str, float]) -> None:
    """Add metrics to report/metrics.json, which the test scoring wrote just before this step."""
    path = ctx.report_dir / "metrics.json"
    if path.is_file():
        merged = {**json.loads(path.read_text()), **metrics}
        path.write_text(json.dumps(dict(sorted(merged.items())), indent=2))

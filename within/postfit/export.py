"""Post-fit step `export`: the bundle, and `export/model.onnx` checked against torch with ONNX Runtime.

The ONNX graph takes the AdBatch tensors as named inputs (num, cat, text, image, mask_*; only those
the feature spec produces; `groups` only for a network with a hierarchy of random effects) with a
dynamic batch axis. Temperature and Platt calibration are an
affine map of the logit, so they are folded in and the graph outputs the calibrated probability;
other calibrators (spline, isotonic, hierarchical, geospatial) stay outside: the graph outputs the
logit and calibration.json is applied after it. An ensemble whose members share one feature
processor is exported as one graph with the aggregation inside.

Exporter: torch.onnx.export(dynamo=True). The legacy TorchScript exporter has no symbolic for
EmbeddingBag with padding_idx (the text encoder), so it cannot export AdPredictorNN.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from within.postfit.context import PostfitContext, members_of, networks_of

log = logging.getLogger(__name__)
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch._export")
INPUT_KEYS = ("num", "cat", "text", "image", "mask_tabular", "mask_text", "mask_image", "text_emb", "ngram_ids",
              "ngram_values", "groups", "image_vec")


def _batch_size(batch: dict[str, torch.Tensor]) -> Any:
    return next(iter(batch.values())).shape[0]


class ScoringGraph(nn.Module):
    """What is exported: explicit tensor inputs -> (aggregated) logit -> optional affine calibration and sigmoid."""

    def __init__(self, nets: list[nn.Module], aggregation: str = "mean", weights: Any = None,
                 trim_fraction: float = 0.0, affine: tuple[float, float] | None = None) -> None:
        super().__init__()
        export_nets = []
        for net in nets:
            net = copy.deepcopy(net).eval()
            # Input checks are eager-only (value-range branches depend on data); the serving side
            # validates through the FeatureProcessor before tensors reach the graph.
            net._check_batch = _batch_size
            for module in net.modules():
                # onnxscript lowers EmbeddingBag to a Loop over rows (1,024 simulator rows: 283 ms against
                # 17 ms); the text encoder's Embedding + masked-mean form is the same bag mean as gathers
                if isinstance(getattr(module, "table", None), nn.EmbeddingBag) and hasattr(module, "dp_compatible"):
                    bag = module.table
                    module.table = nn.Embedding(bag.num_embeddings, bag.embedding_dim, padding_idx=bag.padding_idx,
                                                _weight=bag.weight.detach().clone())
                    module.dp_compatible = True
            export_nets.append(net)
        self.nets = nn.ModuleList(export_nets)
        self.aggregation = aggregation
        w = torch.full((len(nets),), 1.0 / len(nets)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w)
        m = len(nets)
        k = int(np.ceil(trim_fraction * m)) if trim_fraction > 0 else 0
        self.trim = min(k, (m - 1) // 2)
        self.affine = affine
        # group codes are an input only where a network reads them (its hierarchy of random effects)
        self.uses_groups = any(getattr(net, "hierarchy", None) is not None for net in export_nets)

    def input_keys(self, arrays: Any) -> list[str]:
        """The AdBatch keys of `arrays` this graph takes, in INPUT_KEYS order."""
        return [k for k in INPUT_KEYS if k in arrays and (k != "groups" or self.uses_groups)]

    def forward(self, num=None, cat=None, text=None, image=None, mask_tabular=None, mask_text=None, mask_image=None,
                text_emb=None, ngram_ids=None, ngram_values=None, groups=None, image_vec=None):
        given = dict(zip(INPUT_KEYS, (num, cat, text, image, mask_tabular, mask_text, mask_image, text_emb, ngram_ids,
                                      ngram_values, groups, image_vec)))
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


def build_scorer(predictor: Any, fold_calibration: bool = True) -> tuple[ScoringGraph, str]:
    """The export module for a predictor and what it outputs ('probability' or 'logit')."""
    members = members_of(predictor)
    if len(members) > 1:
        first = members[0].processor.to_dict()
        if any(m.processor.to_dict() != first for m in members[1:]):
            raise ValueError("ensemble members use different feature processors; one ONNX graph needs one input schema")
    affine = affine_calibration(predictor.calibrator) if fold_calibration else None
    scorer = ScoringGraph(
        [m.net for m in members],
        aggregation=getattr(predictor, "aggregation_method", "mean"),
        weights=predictor.get_model_weights() if hasattr(predictor, "get_model_weights") else None,
        trim_fraction=getattr(predictor, "trim_fraction", 0.0),
        affine=affine,
    ).eval()
    return scorer, ("probability" if affine is not None else "logit")


@contextlib.contextmanager
def quiet_exporter(verbose: bool = False) -> Iterator[None]:
    """The dynamo exporter and onnxscript log every pass at INFO ("Skipping constant folding ...");
    keep them to errors unless asked (export.verbose=true)."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace_and_check(scorer: ScoringGraph, output: str, arrays: dict[str, np.ndarray], sample_rows: int,
                    check_rows: int, opset: int = 18, verbose: bool = False) -> tuple[Any, dict[str, Any]]:
    """Export `scorer` (dynamic batch axis, traced on `sample_rows` rows) and compare ONNX Runtime with
    torch on `check_rows` rows. Returns (the ONNX program, info with max_abs_diff)."""
    import onnxruntime as ort

    keys = scorer.input_keys(arrays)
    sample = {k: torch.as_tensor(arrays[k][:sample_rows]) for k in keys}
    if len(next(iter(sample.values()))) < 2:
        raise ValueError("export: need at least 2 sample rows to trace a dynamic batch axis")
    batch = torch.export.Dim("batch")
    with quiet_exporter(verbose):
        program = torch.onnx.export(scorer, (), kwargs=sample, dynamic_shapes={k: {0: batch} for k in keys},
                                    dynamo=True, opset_version=opset, output_names=[output], verbose=verbose)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {i.name: arrays[i.name][:check_rows] for i in session.get_inputs()})[0]
    with torch.no_grad():
        torch_out = scorer(**{k: torch.as_tensor(arrays[k][:check_rows]) for k in keys}).numpy()
    diff = float(np.max(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))))
    return program, {"inputs": keys, "output": output, "opset": opset, "exporter": "torch.onnx dynamo",
                     "check_rows": len(onnx_out), "max_abs_diff": diff}


def export_onnx(predictor: Any, frame: Any, path: Any, sample_rows: int = 64, check_rows: int = 256,
                opset: int = 18, verbose: bool = False) -> dict[str, Any]:
    """Write `path` (ONNX) and compare ONNX Runtime with torch on `check_rows` rows of `frame`."""
    scorer, output = build_scorer(predictor)
    arrays = predictor.processor.transform(frame.iloc[: max(sample_rows, check_rows)])
    program, info = trace_and_check(scorer, output, arrays, sample_rows, check_rows, opset, verbose)
    program.save(str(path))
    return {"path": str(path), **info,
            "calibration": "folded into the graph" if output == "probability"
            else "not folded: apply calibration.json to the logit output"}


def export_onnx_bytes(predictor: Any, arrays: dict[str, np.ndarray], opset: int = 18) -> tuple[bytes, dict[str, Any]]:
    """The predictor's network(s) as an in-memory ONNX graph that outputs the LOGIT (calibration
    is never folded in: the caller applies calibration.json), traced and checked against torch on
    `arrays` (AdBatch arrays of at least 2 rows, e.g. from a RecordEncoder). Writes no file.
    Returns (model bytes, info with inputs, output, opset and max_abs_diff)."""
    scorer, output = build_scorer(predictor, fold_calibration=False)
    n = len(next(iter(arrays.values())))
    program, info = trace_and_check(scorer, output, arrays, n, n, opset)
    return program.model_proto.SerializeToString(), {**info, "members": len(members_of(predictor))}


def image_split_bytes(predictor: Any, arrays: dict[str, np.ndarray], opset: int = 18) -> tuple[bytes, bytes, dict[str, Any]]:
    """A single network's graph in two parts, for scoring many rows that share few images (batch
    inference: 1M simulator rows hold ~4k ads): `image` [U, fields, C, S, S] uint8 -> `image_vec`
    [U, D] (the image encoder, run once per distinct image), and the rest of the network with
    `image_vec` [B, D] per row in place of the pixels (outputs the LOGIT, like export_onnx_bytes).
    Both are checked together against torch on `arrays`. Returns (image graph, rest graph, info)."""
    import onnxruntime as ort

    members = members_of(predictor)
    net = members[0].net if len(members) == 1 else None
    if net is None or "image" not in getattr(net, "modalities", ()) or "image" not in arrays:
        raise ValueError("image_split_bytes: needs one network with an image modality and `image` in the arrays")
    rest, output = build_scorer(predictor, fold_calibration=False)
    encoder = copy.deepcopy(rest.nets[0].image).eval()
    images = torch.as_tensor(arrays["image"])
    if len(images) < 2:
        raise ValueError("image_split_bytes: need at least 2 rows to trace a dynamic batch axis")
    with quiet_exporter():
        image_program = torch.onnx.export(encoder, (images,), dynamic_shapes=({0: torch.export.Dim("images")},),
                                          dynamo=True, opset_version=opset, input_names=["image"],
                                          output_names=["image_vec"])
    with torch.no_grad():
        vectors = encoder(images).numpy()
    rest_arrays = {k: v for k, v in arrays.items() if k != "image"} | {"image_vec": vectors}
    rest_program, info = trace_and_check(rest, output, rest_arrays, len(images), len(images), opset)
    image_graph = image_program.model_proto.SerializeToString()
    session = ort.InferenceSession(image_graph, providers=["CPUExecutionProvider"])
    image_diff = float(np.max(np.abs(session.run(None, {"image": arrays["image"]})[0] - vectors)))
    return image_graph, rest_program.model_proto.SerializeToString(), {**info, "image_max_abs_diff": image_diff}


class Export:
    """export/model.onnx, checked against torch with ONNX Runtime; a copy goes into the bundle.

    (The bundle itself is written by the pipeline as soon as the fit ends and after every step.)"""

    name = "export"

    @staticmethod
    def skip_reason(model) -> str | None:
        if networks_of(model) is None:
            return f"{type(model).__name__} has no network to export to ONNX (its bundle is the artifact)"
        return None

    def run(self, ctx: PostfitContext) -> None:
        settings = ctx.settings("export")
        if not settings.get("onnx", True):
            ctx.metadata["onnx"] = {"skipped": "export.onnx=false"}
            return
        atol = float(settings.get("atol", 1e-4))
        path = ctx.subdir("export") / "model.onnx"
        info = export_onnx(ctx.model, ctx.scoring_frame(), path, check_rows=int(settings.get("check_rows", 256)),
                           opset=int(settings.get("opset", 18)), verbose=bool(settings.get("verbose", False)))
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
        ctx.bundle_files["model.onnx"] = path


def _merge_into_report(ctx: PostfitContext, metrics: dict[str, float]) -> None:
    """Add metrics to report/metrics.json, which the test scoring wrote just before this step."""
    path = ctx.report_dir / "metrics.json"
    if path.is_file():
        merged = {**json.loads(path.read_text()), **metrics}
        path.write_text(json.dumps(dict(sorted(merged.items())), indent=2))

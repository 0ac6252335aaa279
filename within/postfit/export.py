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
    keys = scorer.input_keys(arrays)
    sample = {k: torch.as_tensor(arrays[k][:sample_rows]) for k in keys}
    if len(next(iter(sample.values()))) < 2:
        raise ValueError("export: need at least 2 sample rows to trace a dynamic batch axis")
    batch = torch.export.Dim("batch")
    with quiet_exporter(verbose):
        program = torch.onnx.export(scorer, (), kwargs=sample, dynamic_shapes={k: {0: batch} for k in keys},
                                    dynamo=True, opset_version=opset, output_names=[output], verbose=verbose)
    diff = _graph_diff(program.model_proto.SerializeToString(), scorer, arrays, check_rows)
    return program, {"inputs": keys, "output": output, "opset": opset, "exporter": "torch.onnx dynamo",
                     "check_rows": min(check_rows, len(arrays[keys[0]])), "max_abs_diff": diff}


IMAGE_SPLIT_KEY = "within.image_split"  # metadata of a graph composed as image encoder -> `image_vec` -> rest


def export_onnx(predictor: Any, frame: Any, path: Any, sample_rows: int = 64, check_rows: int = 256,
                opset: int = 18, verbose: bool = False) -> dict[str, Any]:
    """Write `path` (ONNX) and compare ONNX Runtime with torch on `check_rows` rows of `frame`.

    A single network with an image modality is exported as two graphs composed into one
    (`image` -> image encoder -> `image_vec` -> rest, marked with IMAGE_SPLIT_KEY), so batch
    inference can cut it back into the pair in milliseconds (`split_image_graph`) and encode each
    distinct image once, instead of exporting the pair again at load."""
    scorer, output = build_scorer(predictor)
    arrays = predictor.processor.transform(frame.iloc[: max(sample_rows, check_rows)])
    if _has_image_net(predictor, arrays):
        image, rest, info = image_pair(predictor, arrays, sample_rows, fold_calibration=True, opset=opset,
                                       verbose=verbose)
        graph = compose_image_split(image, rest)
        diff = _graph_diff(graph.SerializeToString(), scorer, arrays, check_rows)
        import onnx

        onnx.save(graph, str(path))
        info.update({"inputs": [i.name for i in graph.graph.input], "max_abs_diff": diff,
                     "check_rows": min(check_rows, len(arrays["image"])),
                     "image_split": "image -> image_vec -> rest (split_image_graph cuts it at load)"})
    else:
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


def _has_image_net(predictor: Any, arrays: dict[str, np.ndarray]) -> bool:
    members = members_of(predictor)
    return len(members) == 1 and "image" in getattr(members[0].net, "modalities", ()) and "image" in arrays


def _graph_diff(graph: bytes, scorer: ScoringGraph, arrays: dict[str, np.ndarray], rows: int) -> float:
    """max |ONNX Runtime - torch| of `scorer` on the first `rows` rows of `arrays`."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {i.name: arrays[i.name][:rows] for i in session.get_inputs()})[0]
    with torch.no_grad():
        want = scorer(**{k: torch.as_tensor(arrays[k][:rows]) for k in scorer.input_keys(arrays)}).numpy()
    return float(np.max(np.abs(onnx_out.astype(np.float64) - want.astype(np.float64))))


def image_pair(predictor: Any, arrays: dict[str, np.ndarray], sample_rows: int | None = None,
               fold_calibration: bool = False, opset: int = 18, verbose: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """A single network's graph in two parts (ONNX ModelProtos): `image` [U, fields, C, S, S] uint8 ->
    `image_vec` [U, D] (the image encoder), and the rest of the network with `image_vec` [B, D] per
    row in place of the pixels. Traced on the first `sample_rows` rows (all by default); each part
    is checked against torch on them. Returns (image graph, rest graph, info)."""
    import onnxruntime as ort

    if not _has_image_net(predictor, arrays):
        raise ValueError("image_split: needs one network with an image modality and `image` in the arrays")
    rows = len(arrays["image"]) if sample_rows is None else min(int(sample_rows), len(arrays["image"]))
    if rows < 2:
        raise ValueError("image_split: need at least 2 rows to trace a dynamic batch axis")
    rest, output = build_scorer(predictor, fold_calibration=fold_calibration)
    encoder = copy.deepcopy(rest.nets[0].image).eval()
    images = torch.as_tensor(arrays["image"][:rows])
    with quiet_exporter(verbose):
        image_program = torch.onnx.export(encoder, (images,), dynamic_shapes=({0: torch.export.Dim("images")},),
                                          dynamo=True, opset_version=opset, input_names=["image"],
                                          output_names=["image_vec"])
    with torch.no_grad():
        vectors = encoder(images).numpy()
    rest_arrays = {k: v[:rows] for k, v in arrays.items() if k != "image"} | {"image_vec": vectors}
    rest_program, info = trace_and_check(rest, output, rest_arrays, rows, rows, opset, verbose)
    image_graph = image_program.model_proto
    session = ort.InferenceSession(image_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image_diff = float(np.max(np.abs(session.run(None, {"image": arrays["image"][:rows]})[0] - vectors)))
    return image_graph, rest_program.model_proto, {**info, "image_max_abs_diff": image_diff}


def image_split_bytes(predictor: Any, arrays: dict[str, np.ndarray], opset: int = 18) -> tuple[bytes, bytes, dict[str, Any]]:
    """`image_pair` as bytes, the rest graph outputting the LOGIT (like export_onnx_bytes), for batch
    inference (1M simulator rows hold ~4k ads). Returns (image graph, rest graph, info)."""
    image, rest, info = image_pair(predictor, arrays, opset=opset)
    return image.SerializeToString(), rest.SerializeToString(), info


def compose_image_split(image: Any, rest: Any) -> Any:
    """One graph from the pair: the image encoder's names get a prefix (both graphs come from the
    same exporter, so their internal names collide), its `image_vec` feeds the rest's."""
    from onnx import compose, helper

    image = compose.add_prefix(image, "image_encoder/", rename_inputs=False, rename_outputs=False)
    graph = compose.merge_models(image, rest, io_map=[("image_vec", "image_vec")])
    helper.set_model_props(graph, {IMAGE_SPLIT_KEY: "image_vec"})
    return graph


def _load_graph(graph: bytes | str | Any) -> Any:
    import onnx

    if isinstance(graph, onnx.ModelProto):
        return graph
    return onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))


def has_image_seam(graph: bytes | str | Any) -> bool:
    """Whether `compose_image_split` made this graph (so `split_image_graph` can cut it)."""
    return {p.key: p.value for p in _load_graph(graph).metadata_props}.get(IMAGE_SPLIT_KEY) == "image_vec"


def split_image_graph(graph: bytes | str | Any) -> tuple[bytes, bytes] | None:
    """(image graph, rest graph) cut from a graph `compose_image_split` made, else None."""
    import onnx

    model = _load_graph(graph)
    if not has_image_seam(model):
        return None
    extractor = onnx.utils.Extractor(model)
    outputs = [o.name for o in model.graph.output]
    rest_inputs = [i.name for i in model.graph.input if i.name != "image"] + ["image_vec"]
    image = extractor.extract_model(["image"], ["image_vec"])
    rest = extractor.extract_model(rest_inputs, outputs)
    return image.SerializeToString(), rest.SerializeToString()


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

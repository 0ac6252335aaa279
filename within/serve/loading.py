"""Load a bundle for serving: the model, and an OnnxScorer checked against it before any request.

Which ONNX graph: the bundle's own (`bundle/model.onnx`, else `export/model.onnx` beside it)
when it has no per-row Loop (onnxscript's EmbeddingBag lowering, ~17x slower on 1024 rows) and
agrees with the torch model on example records; otherwise a graph exported in memory
(`within.postfit.export.export_onnx_bytes`), one per member when an ensemble's intervals read
the members' spread. Nothing here unpickles: the bundle is safetensors + JSON, the graph protobuf.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from within.models.onnx_scorer import CHECK_ATOL, OnnxScorer, find_graph, max_abs_diff

log = logging.getLogger(__name__)


def load_model(path: str | Path) -> Any:
    """The bundle's model (a network model or an ensemble), without pickle."""
    from within.models.base import BaseMLModel  # dispatches on metadata.json's class name

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"bundle: {path} is not a folder; pass bundle=outputs/train/runs/<ts>/bundle")
    return BaseMLModel.load(path)


def graph_has_loop(graph: str | Path | bytes) -> bool:
    import onnx

    model = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    return any(node.op_type == "Loop" for node in model.graph.node)


@dataclasses.dataclass
class Served:
    """What the service holds: the model (metadata, explanations), its scorer, and where the graph came from."""

    model: Any
    scorer: OnnxScorer
    bundle: Path
    graph: str
    check_max_abs_diff: float

    @property
    def model_version(self) -> str:
        return str(getattr(self.model, "model_version", "unknown"))


def load_served(bundle: str | Path, threads: int = 1, atol: float = CHECK_ATOL, check_rows: int = 16,
                distinct_images: bool = False) -> Served:
    """The bundle's model and a checked OnnxScorer for it (see the module docstring). With
    `distinct_images` (batch inference), a single network with images gets its graph exported in
    memory in two parts, so that each call runs the image encoder once per distinct image."""
    bundle = Path(bundle)
    model = load_model(bundle)
    if getattr(model, "processor", None) is None:
        raise TypeError(f"bundle {bundle}: a {type(model).__name__} has no feature processor; "
                        "the service serves network models and their ensembles")
    from within.features.records import RecordEncoder

    records = RecordEncoder(model.processor).example_records(max(check_rows, 2))
    if distinct_images and _has_images(model):
        served = _image_split(model, bundle, records, threads, atol)
        if served is not None:
            return served
    members = list(getattr(model, "base_models", None) or [])
    needs_members = bool(getattr(model.intervals, "uses_members_", False)) and len(members) > 1
    found = None if needs_members else find_graph(bundle)
    if found is not None and not graph_has_loop(found):
        scorer = OnnxScorer.from_model(model, graph=found, threads=threads)
        diff = max_abs_diff(scorer, model, records)
        if diff <= atol:
            return Served(model, scorer, bundle, str(found), diff)
        log.warning("serve: %s differs from the bundle's weights by %.2e > %.0e; exporting a fresh graph", found, diff, atol)
    elif found is not None:
        log.info("serve: %s has a per-row Loop (EmbeddingBag); exporting a loop-free graph in memory", found)
    scorer, source = _exported(model, records, members if needs_members else None, threads)
    diff = max_abs_diff(scorer, model, records)
    if diff > atol:
        raise RuntimeError(f"serve: the exported ONNX graph differs from the torch model by {diff:.2e} > {atol:.0e}")
    return Served(model, scorer, bundle, source, diff)


def _has_images(model: Any) -> bool:
    return not getattr(model, "base_models", None) and "image" in getattr(getattr(model, "net", None), "modalities", ())


def _image_split(model: Any, bundle: Path, records: list[dict[str, Any]], threads: int, atol: float) -> Served | None:
    """A scorer over the image encoder + rest-of-network pair, checked against torch; None (and a
    warning) when the pair does not agree, so the caller serves the one-graph path instead.

    The pair is cut from the bundle's graph when the export step composed it (milliseconds), else
    exported in memory (seconds: a bundle from before the composed export, or a stale graph)."""
    from within.features.records import RecordEncoder
    from within.postfit.export import image_split_bytes, split_image_graph

    found = find_graph(bundle)
    pair = split_image_graph(found) if found is not None else None
    if pair is not None:
        scorer = OnnxScorer.from_model(model, graph=pair[1], threads=threads, image_graph=pair[0])
        diff = max_abs_diff(scorer, model, records)
        if diff <= atol:
            return Served(model, scorer, bundle, f"{found}, cut at image_vec: image encoder once per distinct image "
                          "+ rest", diff)
        log.warning("predict: %s differs from the bundle's weights by %.2e > %.0e; exporting the pair again",
                    found, diff, atol)
    image_graph, rest_graph, _ = image_split_bytes(model, RecordEncoder(model.processor).encode(records))
    scorer = OnnxScorer.from_model(model, graph=rest_graph, threads=threads, image_graph=image_graph)
    diff = max_abs_diff(scorer, model, records)
    if diff > atol:
        log.warning("predict: the image-split graphs differ from the torch model by %.2e > %.0e; "
                    "scoring with the one-graph path", diff, atol)
        return None
    return Served(model, scorer, bundle, "exported in memory: image encoder once per distinct image + rest", diff)


def _exported(model: Any, records: list[dict[str, Any]], members: list[Any] | None, threads: int):
    from within.features.records import RecordEncoder
    from within.postfit.export import export_onnx_bytes

    arrays = RecordEncoder(model.processor).encode(records)
    if members is None:
        graph, _ = export_onnx_bytes(model, arrays)
        return OnnxScorer.from_model(model, graph=graph, threads=threads), "exported in memory"
    graphs = [export_onnx_bytes(m, arrays)[0] for m in members]
    return (OnnxScorer.from_model(model, member_graphs=graphs, threads=threads),
            f"exported in memory, one graph per member ({len(graphs)})")


__all__ = ["CHECK_ATOL", "Served", "graph_has_loop", "load_model", "load_served", "max_abs_diff"]

"""OnnxScorer: records -> RecordEncoder arrays -> ONNX Runtime -> calibrated probabilities (and intervals).

The serving path of a network bundle: no DataFrame and no torch per call. The graph is the
bundle's exported network (`bundle/model.onnx`, or `export/model.onnx` beside the bundle), or
one exported in memory (`within.postfit.export.export_onnx_bytes`, which the service calls when
the bundle has none). Calibration is applied to the graph's logits with the bundle's own
calibrator, exactly as `model.predict(frame)` does; a graph that folded temperature/Platt
scaling in (output `probability`) is used as is, and its logit is recovered for the intervals.
An ensemble whose intervals read the members' spread needs one logit graph per member.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from within.features.records import RecordEncoder

GRAPH_FILE = "model.onnx"
OUTPUTS = ("logit", "probability")


def find_graph(bundle: str | Path) -> Path | None:
    """The bundle's ONNX graph: `bundle/model.onnx`, else `bundle/../export/model.onnx`, else None."""
    bundle = Path(bundle)
    for path in (bundle / GRAPH_FILE, bundle.parent / "export" / GRAPH_FILE):
        if path.is_file():
            return path
    return None


CHECK_ATOL = 1e-5  # max |ONNX - torch| probability on example records before a graph is trusted


def max_abs_diff(scorer: OnnxScorer, model: Any, records: list[dict[str, Any]]) -> float:
    """max |scorer - model's torch path| over the records' calibrated probabilities (the torch path:
    the records as a DataFrame, which never takes the fast record path)."""
    want = np.asarray(model.predict(model.spec.records_to_frame(records)), dtype=np.float64)
    got = np.asarray(scorer.predict(records), dtype=np.float64)
    return float(np.max(np.abs(want - got)))


def affine_of(calibrator: Any) -> tuple[float, float] | None:
    """(slope, bias) when the calibrator maps a logit s to sigmoid(slope * s + bias), read off its
    own transform_logit at three points (temperature and Platt scaling are; the others are not)."""
    if calibrator is None or not callable(getattr(calibrator, "transform_logit", None)):
        return None
    try:
        at = np.asarray(calibrator.transform_logit(np.array([0.0, 1.0, -3.0])), dtype=np.float64)
    except (ValueError, TypeError):  # it needs groups: not a plain map of the logit
        return None
    bias, slope = float(at[0]), float(at[1] - at[0])
    if not np.isclose(at[2], bias - 3.0 * slope, rtol=1e-9, atol=1e-9):
        return None
    return slope, bias


def make_session(graph: bytes | str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session; one intra-op thread by default (a single ad is latency-bound,
    and a thread pool that spins steals the cores the HTTP server needs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def distinct_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows [U, ...], index [N] with block[i] == distinct[index[i]]) of an array, by hashing
    each row's bytes (pyarrow's dictionary encoding: one C++ pass, no sort)."""
    import pyarrow as pa

    block = np.ascontiguousarray(block)
    n, width = len(block), block[0].nbytes if len(block) else 0
    if n == 0 or width == 0:
        return block, np.zeros(n, dtype=np.int64)
    rows = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(block)])
    encoded = rows.dictionary_encode()
    values = encoded.dictionary
    data = np.frombuffer(values.buffers()[1], dtype=block.dtype)
    per_row = width // block.itemsize
    distinct = data[values.offset * per_row:(values.offset + len(values)) * per_row].reshape(len(values), *block.shape[1:])
    return distinct, encoded.indices.to_numpy().astype(np.int64)


class OnnxScorer:
    """Calibrated scores for records through ONNX Runtime.

    Args:
        graphs: one graph of the whole model (output `logit`, or `probability` with an affine
            calibration folded in), or one `logit` graph per ensemble member (then `aggregate`
            combines their [N, M] logits into one logit per row).
        encoder: the bundle's RecordEncoder.
        calibrator: the bundle's calibrator (logits -> probabilities), or None for a plain sigmoid.
        intervals: the bundle's ProbabilityIntervals, or None.
        aggregate: member logits [N, M] -> logits [N]; needed with several graphs.
        group_names: raw columns the calibrator keys on (group fields and its required columns).
        threads: ONNX Runtime intra-op threads.
        run_rows: most rows per ONNX Runtime call; a larger batch runs in slices of this many rows
            (the activations of a slice stay in cache: 2,048 rows run ~2x faster per row than 65,536).
        image_graph: the image encoder alone (`image` -> `image_vec`, from
            within.postfit.export.image_split_bytes); then `graphs` is the one rest-of-network graph
            that takes `image_vec`, and each call encodes every distinct image once.

    Inputs everywhere: one record dict (-> float), a list of record dicts or a DataFrame
    (-> arrays); `*_columns` methods take a columnar batch {field: values}.
    """

    def __init__(
        self,
        graphs: Sequence[bytes | str | Path],
        encoder: RecordEncoder,
        calibrator: Any = None,
        intervals: Any = None,
        aggregate: Callable[[np.ndarray], np.ndarray] | None = None,
        group_names: Sequence[str] = (),
        threads: int = 1,
        run_rows: int = 2048,
        image_graph: bytes | str | Path | None = None,
    ) -> None:
        if not graphs:
            raise ValueError("OnnxScorer.graphs: empty; pass the model's ONNX graph (or one per ensemble member)")
        if len(graphs) > 1 and aggregate is None:
            raise ValueError("OnnxScorer.aggregate: several member graphs need aggregate(member_logits) -> logits")
        self.encoder = encoder
        self.calibrator = calibrator
        self.intervals = intervals
        self.aggregate = aggregate
        self.group_names = list(group_names)
        if int(run_rows) < 1:
            raise ValueError(f"OnnxScorer.run_rows: must be >= 1, got {run_rows}")
        self.run_rows = int(run_rows)
        self.sessions = [make_session(g, threads) for g in graphs]
        self.output = self.sessions[0].get_outputs()[0].name
        if self.output not in OUTPUTS:
            raise ValueError(f"OnnxScorer: graph output {self.output!r} is not one of {OUTPUTS}; "
                             "export it with within.postfit.export (export_onnx or export_onnx_bytes)")
        if len(graphs) > 1 and any(s.get_outputs()[0].name != "logit" for s in self.sessions):
            raise ValueError("OnnxScorer: member graphs must output the member's logit (export_onnx_bytes(member))")
        self.affine = None
        if self.output == "probability":
            self.affine = affine_of(calibrator)
            if self.affine is None:
                raise ValueError(
                    "OnnxScorer: the graph outputs a probability (calibration folded in), but the calibrator "
                    f"{type(calibrator).__name__} is not temperature or Platt scaling; export a logit graph"
                )
        self._inputs = [[i.name for i in s.get_inputs()] for s in self.sessions]
        self.image_session = None
        if image_graph is not None:
            if len(self.sessions) > 1 or "image_vec" not in self._inputs[0]:
                raise ValueError("OnnxScorer.image_graph: pass it with the one graph that takes `image_vec` "
                                 "(within.postfit.export.image_split_bytes makes the pair)")
            self.image_session = make_session(image_graph, threads)
        if intervals is not None and getattr(intervals, "uses_members_", False) and len(self.sessions) < 2:
            raise ValueError(
                "OnnxScorer: the intervals were fitted on the ensemble members' spread, but the graph gives one "
                "aggregated logit; pass one logit graph per member (export_onnx_bytes(member) for each)"
            )

    @classmethod
    def from_model(
        cls,
        model: Any,
        graph: bytes | str | Path | None = None,
        member_graphs: Sequence[bytes | str | Path] | None = None,
        bundle: str | Path | None = None,
        threads: int = 1,
        image_graph: bytes | str | Path | None = None,
    ) -> OnnxScorer:
        """A scorer for a loaded network model or ensemble (duck-typed: `.processor`, `.calibrator`,
        `.intervals`, and `.base_models` / `.aggregate` for an ensemble). The graph: `member_graphs`,
        else `graph`, else the one `find_graph(bundle)` finds."""
        processor = getattr(model, "processor", None)
        if processor is None:
            raise TypeError(f"OnnxScorer.from_model: {type(model).__name__} has no feature processor; "
                            "only network models and their ensembles run in ONNX Runtime")
        if member_graphs is not None:
            graphs, aggregate = list(member_graphs), model.aggregate
            n_members = len(getattr(model, "base_models", ()) or ())
            if len(graphs) != n_members:
                raise ValueError(f"OnnxScorer.from_model: {len(graphs)} member graphs for {n_members} members")
        else:
            if graph is None and bundle is not None:
                graph = find_graph(bundle)
            if graph is None:
                raise FileNotFoundError(
                    f"OnnxScorer.from_model: no ONNX graph (looked for {GRAPH_FILE} in {bundle} and in ../export); "
                    "train with the post-fit step `export`, or pass graph=export_onnx_bytes(model, arrays)[0]"
                )
            graphs, aggregate = [graph], None
        spec = processor.spec
        names = [f.name for f in spec.groups]
        names += [c for c in getattr(model.calibrator, "required_columns", ()) if c not in names]
        return cls(graphs, RecordEncoder(processor), calibrator=model.calibrator, intervals=model.intervals,
                   aggregate=aggregate, group_names=names, threads=threads, image_graph=image_graph)

    # ---- scoring ------------------------------------------------------------------------
    def _columns(self, X: Any) -> tuple[dict[str, list], int]:
        return self.encoder.columns_of(X, extra=self.group_names)

    def _scores(self, columns: Mapping[str, list], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(logits [N], probabilities [N], member logits [N, M] or None) for checked columns."""
        arrays = self.encoder.encode_checked(columns, n)
        if self.image_session is not None:
            distinct, index = distinct_rows(arrays.pop("image"))
            vectors = self._run(self.image_session, ["image"], {"image": distinct}, len(distinct))
            arrays["image_vec"] = vectors[index]
        outs = [self._run(s, keys, arrays, n) for s, keys in zip(self.sessions, self._inputs)]
        members = None
        if len(outs) > 1:
            members = np.stack([o.astype(np.float64).reshape(-1) for o in outs], axis=1)
            logits = np.asarray(self.aggregate(members), dtype=np.float64)
        else:
            logits = outs[0].astype(np.float64).reshape(-1)
        if self.affine is not None:  # the graph returned calibrated probabilities
            p = logits
            q = np.clip(p, 1e-12, 1 - 1e-12)
            logits = ((np.log(q) - np.log1p(-q)) - self.affine[1]) / self.affine[0]
            return logits, p, members
        if self.calibrator is None:
            return logits, expit(logits), members
        groups = self.encoder.raw_columns(columns, self.group_names) or None
        p = np.asarray(self.calibrator.transform(logits, groups=groups), dtype=np.float64)
        return logits, p, members

    def _run(self, session: Any, keys: Sequence[str], arrays: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        step = self.run_rows
        if n <= step:
            return session.run(None, {k: arrays[k] for k in keys})[0]
        return np.concatenate([session.run(None, {k: arrays[k][i:i + step] for k in keys})[0]
                               for i in range(0, n, step)])

    def predict_logits(self, X: Any) -> np.ndarray:
        """Uncalibrated (aggregated) logits [N]."""
        return self._scores(*self._columns(X))[0]

    def predict(self, X: Any) -> np.ndarray | float:
        """Calibrated probabilities; a float for one record dict."""
        p = self._scores(*self._columns(X))[1]
        return float(p[0]) if isinstance(X, Mapping) else p

    def predict_columns(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        return self._scores(*self.encoder.check_columns(columns, extra=self.group_names))[1]

    def predict_with_intervals(self, X: Any, alpha: float = 0.1) -> tuple[Any, Any, Any]:
        """(score, lower, upper) as `model.predict_with_intervals`: a central 1 - alpha interval for
        the true click probability, widened to contain the score."""
        p, lo, hi = self._intervals(*self._columns(X), alpha)
        if isinstance(X, Mapping):
            return float(p[0]), float(lo[0]), float(hi[0])
        return p, lo, hi

    def predict_with_intervals_columns(self, columns: Mapping[str, Sequence], alpha: float = 0.1):
        return self._intervals(*self.encoder.check_columns(columns, extra=self.group_names), alpha)

    def _intervals(self, columns: Mapping[str, list], n: int, alpha: float):
        if self.intervals is None:
            raise RuntimeError(
                "predict_with_intervals: this model has no intervals; train with the post-fit step "
                "`intervals` (postfit: [calibrate, intervals, ..., export])"
            )
        if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be in (0, 1) (e.g. 0.1 for 90% intervals), got {alpha}")
        logits, p, members = self._scores(columns, n)
        uses = getattr(self.intervals, "uses_members_", False)
        _, lo, hi = self.intervals.interval(logits, float(alpha), member_logits=members if uses else None)
        return p, np.minimum(lo, p), np.maximum(hi, p)


__all__ = ["GRAPH_FILE", "OnnxScorer", "affine_of", "distinct_rows", "find_graph", "make_session"]

"""Batch inference: score a parquet or CSV file with a bundle, chunk by chunk (`python predict.py`).

The file is read in chunks of `batch_rows` rows (pyarrow's `ParquetFile.iter_batches`, or its
streaming CSV reader), and only the columns the bundle needs are read: the FeatureSpec's fields,
the raw columns its calibrator keys on, and the optional id column passed through. Each chunk goes
through the service's record path (`load_served`: RecordEncoder -> the checked ONNX graph ->
the bundle's calibrator), so a file and an HTTP request get the same score for the same row.
`engine="torch"` scores each chunk as a DataFrame through `model.predict` instead (the eager path;
also what a model without a feature processor, e.g. DynamicLinear, always takes).

Column conventions: numeric fields are numbers (ints or floats; null is missing); categorical and
group fields are strings or ints; text fields are strings; an image field is its raw uint8 pixels
(C*S*S bytes, channels first, as `bundle/reference.parquet` stores them) or an image file path.
In a CSV, every non-numeric field is read as a string and an image field is a file path.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from within.features.spec import FeatureError

log = logging.getLogger(__name__)
ENGINES = ("onnx", "torch")
FORMATS = (".parquet", ".pq", ".csv")
SCORE, LOWER, UPPER = "score", "lower", "upper"
# break-even of distinct_images=auto for a bundle whose graph must be split by exporting it again:
# the ~9 s export against ~1.7 us saved per simulator row (benchmarks/batch_predict.py, 1M rows:
# 130k rows/s split against 107k rows/s with the one graph). A graph the export step composed at
# `image_vec` is cut in milliseconds, so auto always splits it.
DISTINCT_IMAGES_MIN_ROWS = 5_000_000


@dataclasses.dataclass
class BatchResult:
    """What a batch run did: rows scored, seconds, the columns it read, where it wrote."""

    rows: int
    seconds: float
    output: Path
    columns_read: list[str]
    engine: str
    graph: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second, 1),
                "output": str(self.output), "columns_read": self.columns_read, "engine": self.engine,
                "graph": self.graph}


def _format(path: Path, key: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise FeatureError(f"{key}: {path} is not a .parquet or .csv file; pass {key}=file.parquet or {key}=file.csv")
    return "csv" if suffix == ".csv" else "parquet"


def file_columns(path: Path) -> list[str]:
    """The column names of a parquet file (from its footer) or a CSV file (its header line)."""
    if _format(path, "input") == "csv":
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise FeatureError(f"input: {path} is empty; a CSV needs a header line naming its columns")
        return header
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def needed_columns(spec: Any, extra: Sequence[str] = ()) -> list[str]:
    """The spec's fields, then `extra` (calibrator group columns, the id column), without repeats."""
    return list(dict.fromkeys([*spec.names, *extra]))


def check_columns(path: Path, spec: Any, present: Sequence[str], required_extra: Sequence[str] = (),
                  id_column: str | None = None) -> list[str]:
    """The columns of `path` to read; a FeatureError naming the first missing one and the fix.
    A field with `required: false` may be absent (it scores as missing)."""
    have = set(present)
    if id_column is not None and id_column not in have:
        raise FeatureError(f"id_column: column '{id_column}' is not in {path} (its columns: {sorted(have)[:20]}); "
                           "pass id_column=<a column of the file>, or id_column=null to write scores only")
    for f in spec.fields:
        if f.required and f.name not in have:
            raise FeatureError(
                f"input: column '{f.name}' ({f.type} field of the bundle's feature spec) is missing from {path}; "
                "add it to the file (the bundle needs: " + ", ".join(spec.names) + ")")
    for name in required_extra:
        if name not in have:
            raise FeatureError(f"input: column '{name}' (the bundle's calibrator groups by it) is missing from {path}; "
                               "add it to the file")
    wanted = needed_columns(spec, [*required_extra, *([id_column] if id_column else [])])
    return [c for c in wanted if c in have]


def read_chunks(path: Path, columns: Sequence[str], spec: Any, batch_rows: int) -> tuple[Iterator[Any], int | None]:
    """(pyarrow RecordBatches of `columns`, total rows or None when unknown, as for a CSV)."""
    import pyarrow as pa

    if _format(path, "input") == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return pf.iter_batches(batch_size=batch_rows, columns=list(columns)), pf.metadata.num_rows
    import pyarrow.csv as pacsv

    kinds = {f.name: f.type for f in spec.fields}
    types = {c: (pa.float64() if kinds.get(c) == "numeric" else pa.string()) for c in columns}
    # block_size sets the chunk: about batch_rows rows of a few hundred bytes each
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=max(1 << 20, 256 * batch_rows)),
                            convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=types,
                                                                 strings_can_be_null=True))
    return iter(reader), None


def image_block(column: Any, shape: tuple[int, int, int]) -> np.ndarray | None:
    """A binary column of equal-length images without nulls as one read-only uint8 array [n, C, S, S]
    over pyarrow's own buffer (no per-row bytes objects); None when some row is null or of another length."""
    import pyarrow as pa

    kind = column.type
    if column.null_count or not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        return None
    size = int(np.prod(shape))
    width = np.int64 if pa.types.is_large_binary(kind) else np.int32
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=width)[column.offset: column.offset + len(column) + 1]
    if not len(column) or np.any(np.diff(offsets) != size):
        return None
    data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]): int(offsets[-1])]
    return data.reshape(len(column), *shape)


def decode_images(column: Any, f: Any) -> Any:
    """An image column as the encoder's values: raw uint8 bytes -> one [n, C, S, S] block (or, with nulls,
    a list of (C, S, S) arrays and None); a path stays a str."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column.to_pylist()
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)):
        raise FeatureError(f"field '{f.name}': an image column holds {kind}; store each image as its raw uint8 bytes "
                           f"({f.channels}x{f.size}x{f.size}, channels first) or as an image file path")
    shape, size = (f.channels, f.size, f.size), f.channels * f.size * f.size
    block = image_block(column, shape)
    if block is not None:
        return block
    values = column.to_pylist()
    out: list[Any] = []
    for i, b in enumerate(values):
        if b is None:
            out.append(None)
        elif len(b) != size:
            raise FeatureError(f"field '{f.name}': row {i} of the chunk holds {len(b)} bytes, expected {size} "
                               f"({f.channels}x{f.size}x{f.size} uint8, channels first)")
        else:
            out.append(np.frombuffer(b, dtype=np.uint8).reshape(shape))
    return out


def chunk_columns(batch: Any, spec: Any) -> dict[str, Any]:
    """A RecordBatch as {column: list of Python values} (images: one array block where they allow it):
    the columnar batch the encoder reads."""
    images = {f.name: f for f in spec.image}
    out: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns):
        out[name] = decode_images(column, images[name]) if name in images else column.to_pylist()
    return out


class ChunkScorer:
    """Scores one chunk's columns: the service's OnnxScorer (engine onnx) or model.predict (torch)."""

    def __init__(self, bundle: Path, engine: str = "onnx", threads: int = 1, distinct_images: bool = True) -> None:
        if engine not in ENGINES:
            raise FeatureError(f"engine: {engine!r} is not one of {ENGINES}")
        from within.serve.loading import load_model, load_served

        self.graph: str | None = None
        self.scorer = None
        if engine == "onnx":
            try:
                served = load_served(bundle, threads=threads, distinct_images=distinct_images)
            except TypeError as err:  # no feature processor (DynamicLinear): the torch path serves it
                log.info("predict: %s; scoring with model.predict", err)
                self.model = load_model(bundle)
                engine = "torch"
            else:
                self.model, self.scorer, self.graph = served.model, served.scorer, served.graph
        else:
            self.model = load_model(bundle)
        self.engine = engine
        self.spec = self.model.spec
        calibrator = getattr(self.model, "calibrator", None)
        extra = [c for c in getattr(calibrator, "required_columns", ()) or () if c not in self.spec.names]
        self.extra_columns = extra

    @property
    def has_intervals(self) -> bool:
        return getattr(self.model, "intervals", None) is not None

    def __call__(self, columns: dict[str, list], intervals: bool, alpha: float) -> dict[str, np.ndarray]:
        if self.scorer is not None:
            if intervals:
                p, lo, hi = self.scorer.predict_with_intervals_columns(columns, alpha=alpha)
                return {SCORE: p, LOWER: lo, UPPER: hi}
            return {SCORE: self.scorer.predict_columns(columns)}
        import pandas as pd

        frame = pd.DataFrame({k: (list(v) if isinstance(v, np.ndarray) and v.ndim > 1 else v)  # images: one per row
                              for k, v in columns.items()})
        if intervals:
            p, lo, hi = self.model.predict_with_intervals(frame, alpha=alpha)
            return {SCORE: np.asarray(p), LOWER: np.asarray(lo), UPPER: np.asarray(hi)}
        return {SCORE: np.asarray(self.model.predict(frame), dtype=np.float64)}


class _Writer:
    """Appends scored chunks to a parquet or CSV file (one pyarrow writer, opened on the first chunk)."""

    def __init__(self, path: Path) -> None:
        self.path, self.kind, self.writer = path, _format(path, "output"), None

    def write(self, table: Any) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                self.writer = pq.ParquetWriter(self.path, table.schema)
            else:
                import pyarrow.csv as pacsv

                self.writer = pacsv.CSVWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _graph_has_image_seam(bundle: Path) -> bool:
    from within.models.onnx_scorer import find_graph
    from within.postfit.export import has_image_seam

    found = find_graph(bundle)
    return found is not None and has_image_seam(found)


def predict_file(bundle: str | Path, input: str | Path, output: str | Path, id_column: str | None = None,
                 intervals: bool = False, alpha: float = 0.1, batch_rows: int = 65536, engine: str = "onnx",
                 threads: int = 1, workers: int = 2, progress: bool = True,
                 scorer: ChunkScorer | None = None, distinct_images: bool | str = "auto") -> BatchResult:
    """Score every row of `input` (parquet or CSV) with `bundle`; write `output` (parquet or CSV)
    with the id column (when given), `score`, and `lower` / `upper` with `intervals`.
    `scorer`: a ChunkScorer already loaded (a benchmark reuses one across runs).
    `distinct_images`: run a network's image encoder once per distinct image of a chunk (its graph is
    cut at `image_vec` at load: milliseconds for a graph the export step composed, ~9 s of export for
    an older one); "auto": always for a composed graph, else for parquet files of at least
    DISTINCT_IMAGES_MIN_ROWS rows, where the saving outweighs the export (docs/batch-inference.md)."""
    import pyarrow as pa

    input, output = Path(input), Path(output)
    if not input.is_file():
        raise FileNotFoundError(f"input: {input} does not exist; pass input=PATH to a .parquet or .csv file")
    _format(output, "output")
    if output.resolve() == input.resolve():
        raise FeatureError(f"output: {output} is the input file; pass another output=PATH")
    if int(batch_rows) < 1:
        raise FeatureError(f"batch_rows: must be >= 1, got {batch_rows}")
    if not 0.0 < float(alpha) < 1.0:
        raise FeatureError(f"alpha: must be in (0, 1) (0.1 for 90% intervals), got {alpha}")
    if scorer is None:
        if not Path(bundle).is_dir():
            raise FileNotFoundError(f"bundle: {bundle} is not a folder; pass bundle=outputs/train/runs/<ts>/bundle")
        if distinct_images == "auto":
            distinct_images = _graph_has_image_seam(Path(bundle)) or (
                _format(input, "input") == "parquet" and _parquet_rows(input) >= DISTINCT_IMAGES_MIN_ROWS)
        elif not isinstance(distinct_images, bool):
            raise FeatureError(f"distinct_images: {distinct_images!r} is not true, false or auto")
        scorer = ChunkScorer(Path(bundle), engine=engine, threads=threads, distinct_images=distinct_images)
    if intervals and not scorer.has_intervals:
        raise FeatureError("intervals=true: this bundle has no intervals; train it with the post-fit step `intervals` "
                           "(postfit: [calibrate, intervals, ..., export]), or pass intervals=false")
    spec = scorer.spec
    columns = check_columns(input, spec, file_columns(input), scorer.extra_columns, id_column)
    if int(workers) < 1:
        raise FeatureError(f"workers: must be >= 1, got {workers}")
    start = time.perf_counter()
    chunks, total = read_chunks(input, columns, spec, int(batch_rows))

    def score(batch: Any, first: int) -> Any:
        try:
            scores = scorer(chunk_columns(batch, spec), intervals, float(alpha))
        except FeatureError as err:
            raise FeatureError(f"{err} (in rows {first}-{first + batch.num_rows - 1} of {input})") from None
        out = {id_column: batch.column(id_column)} if id_column else {}
        out.update({k: pa.array(v, type=pa.float64()) for k, v in scores.items()})
        return pa.table(out)

    writer, rows, read = _Writer(output), 0, 0
    bar = _progress(progress, total, input.name)
    pending: deque[Any] = deque()

    def write_next() -> None:
        nonlocal rows
        table = pending.popleft().result()
        writer.write(table)
        rows += table.num_rows
        if bar is not None:
            bar[0].update(bar[1], advance=table.num_rows)

    # chunks are scored by `workers` threads in file order: one thread's Python encoding overlaps another's
    # ONNX Runtime call (which releases the GIL), so two cores stay busy with one intra-op thread each
    try:
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:
            try:
                for batch in chunks:
                    if batch.num_rows == 0:
                        continue
                    pending.append(pool.submit(score, batch, read))
                    read += batch.num_rows
                    if len(pending) > int(workers):
                        write_next()
                while pending:
                    write_next()
            finally:
                for job in pending:
                    job.cancel()
    finally:
        writer.close()
        if bar is not None:
            bar[0].stop()
    if rows == 0:
        output.unlink(missing_ok=True)
        raise FeatureError(f"input: {input} has no rows; nothing to score")
    return BatchResult(rows=rows, seconds=time.perf_counter() - start, output=output, columns_read=columns,
                       engine=scorer.engine, graph=scorer.graph)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _progress(enabled: bool, total: int | None, name: str) -> tuple[Any, Any] | None:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("scoring {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    task = bar.add_task(name, total=total)
    bar.start()
    return bar, task


def run_predict(cfg: Any) -> dict[str, Any]:
    """predict.py's entry (conf/predict.yaml): score cfg.input into cfg.output; prints a JSON summary."""
    import json

    if hasattr(cfg, "_metadata"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    for key in ("bundle", "input", "output"):
        if not cfg.get(key):
            raise FileNotFoundError(f"{key}: not set; run python predict.py bundle=PATH input=file.parquet "
                                    "output=scores.parquet")
    result = predict_file(cfg["bundle"], cfg["input"], cfg["output"], id_column=cfg.get("id_column"),
                          intervals=bool(cfg.get("intervals", False)), alpha=float(cfg.get("alpha", 0.1)),
                          batch_rows=int(cfg.get("batch_rows", 65536)), engine=str(cfg.get("engine", "onnx")),
                          threads=int(cfg.get("threads", 1)), workers=int(cfg.get("workers", 2)),
                          progress=bool(cfg.get("progress", True)),
                          distinct_images=cfg.get("distinct_images", "auto"))
    summary = result.summary()
    print(json.dumps(summary), flush=True)
    return summary


__all__ = ["BatchResult", "ChunkScorer", "check_columns", "chunk_columns", "file_columns", "predict_file",
           "read_chunks", "run_predict"]

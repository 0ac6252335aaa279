"""Batch inference throughput: `predict.py` on 1M simulator rows, the service's ONNX record path
against the torch-eager path (`model.predict` on each chunk as a DataFrame), in one process.

The bundle is the serving benchmarks' simulator bundle (20k rows, 1 epoch, postfit
calibrate/intervals/export; trained here into a temporary folder unless --bundle is given). The
rows are fresh impressions of the same world (sample_seed 99), written once to a temporary parquet
file with images as their raw uint8 bytes, as predict.py reads them. Measured:
- the fast path (`engine=onnx`): the whole file, `--repeats` times, rows/s median and sd;
- the eager path (`engine=torch`): the first `--eager-rows` rows (it is ~10x slower), rows/s;
  `speedup` is fast / eager rows/s, and the two paths' scores agree to `max_abs_diff`;
- where a fast run's time goes, on one 65,536-row chunk: arrow -> Python columns, RecordEncoder,
  ONNX Runtime (the network, one intra-op thread) and calibration, each in microseconds per row.
Target (issue 17): >= 100k rows/s on 2 cores. Writes benchmarks/results/batch_predict.{json,md}.

    python -m benchmarks.batch_predict [--rows 1000000] [--repeats 3] [--eager-rows 100000] [--bundle PATH]
    python -m benchmarks.batch_predict --rows 50000 --repeats 1 --eager-rows 5000 --results-dir /tmp/bp   # a trial run
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    load_average,
    machine,
    parser,
    repo_path,
    train_bundle,
    write_json,
    write_markdown,
)

NAME = "batch_predict"
TARGET_ROWS_PER_S = 100_000


def write_rows(path: Path, rows: int, chunk: int = 100_000) -> Path:
    """`rows` fresh simulator impressions (sample_seed 99) as parquet, images as raw bytes, without labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.progress import track

    from within.data.simulator import AdMarketSimulator

    sim = AdMarketSimulator(seed=7, sample_seed=99)
    writer = None
    for frame in track(sim.iter_chunks(rows, chunk_size=chunk), total=-(-rows // chunk), description="simulating"):
        frame = frame.drop(columns=["clicked", "true_ctr"])
        frame["main_image"] = [np.ascontiguousarray(v, dtype=np.uint8).tobytes() for v in frame["main_image"]]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def stage_costs(scorer: Any, path: Path, rows: int = 65536) -> dict[str, float]:
    """Microseconds per row of each stage of the fast path, on the file's first chunk."""
    import pyarrow.parquet as pq

    from within.models.onnx_scorer import distinct_rows
    from within.serve.batch import chunk_columns

    onnx = scorer.scorer
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows, columns=scorer.spec.names))
    n = batch.num_rows
    t0 = time.perf_counter()
    cols = chunk_columns(batch, scorer.spec)
    t1 = time.perf_counter()
    checked, n = onnx.encoder.check_columns(cols, extra=onnx.group_names)
    arrays = onnx.encoder.encode_checked(checked, n)
    t2 = time.perf_counter()
    images = {}
    if onnx.image_session is not None:  # the image encoder once per distinct image, then the rest per row
        distinct, index = distinct_rows(arrays.pop("image"))
        t_dedupe = time.perf_counter()
        arrays["image_vec"] = onnx._run(onnx.image_session, ["image"], {"image": distinct}, len(distinct))[index]
        t_image = time.perf_counter()
        images = {"distinct_images": len(distinct), "dedupe": (t_dedupe - t2) / n * 1e6,
                  "image_encoder": (t_image - t_dedupe) / n * 1e6}
        t2 = t_image
    logits = onnx._run(onnx.sessions[0], onnx._inputs[0], arrays, n).astype(np.float64).reshape(-1)
    t3 = time.perf_counter()
    groups = onnx.encoder.raw_columns(checked, onnx.group_names) or None
    if onnx.calibrator is not None:
        onnx.calibrator.transform(logits, groups=groups)
    t4 = time.perf_counter()
    encode = (t2 - t1) / n * 1e6 - images.get("dedupe", 0.0) - images.get("image_encoder", 0.0)
    return {"arrow_to_columns": (t1 - t0) / n * 1e6, "encode": encode, **images,
            "onnx_runtime": (t3 - t2) / n * 1e6, "calibrate": (t4 - t3) / n * 1e6}


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": float(statistics.median(values)),
            "sd": float(statistics.stdev(values)) if len(values) > 1 else 0.0, "values": [round(v, 1) for v in values]}


def measure(bundle: Path, data: Path, rows: int, repeats: int, eager_rows: int, tmp: Path) -> dict[str, Any]:
    import pandas as pd
    import pyarrow.parquet as pq

    from within.serve.batch import ChunkScorer, predict_file

    start = time.perf_counter()
    fast = ChunkScorer(bundle, engine="onnx", threads=1)
    load_seconds = time.perf_counter() - start
    one_graph = ChunkScorer(bundle, engine="onnx", threads=1, distinct_images=False)
    eager = ChunkScorer(bundle, engine="torch")
    head = tmp / "eager_rows.parquet"
    pq.write_table(pq.ParquetFile(data).read().slice(0, eager_rows), head)
    predict_file(None, head, tmp / "warm.parquet", scorer=fast, progress=False)  # ORT arenas, caches
    speeds, eager_speeds = [], []
    for r in range(repeats):
        res = predict_file(None, data, tmp / "fast.parquet", scorer=fast, workers=2)
        speeds.append(res.rows_per_second)
        print(f"repeat {r}: fast path {res.rows_per_second:,.0f} rows/s over {res.rows:,} rows", flush=True)
        out = predict_file(None, head, tmp / "eager.parquet", scorer=eager, workers=1, progress=False)
        eager_speeds.append(out.rows_per_second)
        print(f"repeat {r}: eager path {out.rows_per_second:,.0f} rows/s over {out.rows:,} rows", flush=True)
    got = pd.read_parquet(tmp / "fast.parquet")["score"].to_numpy()[:eager_rows]
    want = pd.read_parquet(tmp / "eager.parquet")["score"].to_numpy()
    one_worker = predict_file(None, data, tmp / "fast1.parquet", scorer=fast, workers=1, progress=False)
    whole = predict_file(None, data, tmp / "one_graph.parquet", scorer=one_graph, workers=2, progress=False)
    whole_diff = float(np.max(np.abs(pd.read_parquet(tmp / "one_graph.parquet")["score"].to_numpy()
                                     - pd.read_parquet(tmp / "fast1.parquet")["score"].to_numpy())))
    fast_s, eager_s = summary(speeds), summary(eager_speeds)
    return {
        "bundle": repo_path(bundle), "graph": fast.graph, "rows": rows, "eager_rows": eager_rows,
        "fields": len(fast.spec.fields), "field_types": sorted({f.type for f in fast.spec.fields}),
        "fast_rows_per_s": fast_s, "fast_one_worker_rows_per_s": one_worker.rows_per_second,
        "load_seconds": load_seconds, "one_graph_rows_per_s": whole.rows_per_second,
        "one_graph_max_abs_diff": whole_diff,
        "eager_rows_per_s": eager_s, "speedup": fast_s["median"] / eager_s["median"],
        "speedup_per_repeat": [f / e for f, e in zip(speeds, eager_speeds)],
        "max_abs_diff": float(np.max(np.abs(got - want))),
        "stage_us_per_row": stage_costs(fast, data),
        "target_rows_per_s": TARGET_ROWS_PER_S, "meets_target": fast_s["median"] >= TARGET_ROWS_PER_S,
    }


def markdown(result: dict[str, Any]) -> str:
    r = result["result"]
    stages = r["stage_us_per_row"]
    lines = [
        (f"{r['rows']:,} simulator rows ({r['fields']} fields: {', '.join(r['field_types'])}) through predict.py, "
        f"{result['machine']['cpus']} cores; load average before {result['load_before']}, after {result['load_after']}."),
        "",
        "| path | rows/s (median ± sd) | rows |",
        "|---|---|---|",
        (f"| ONNX record path, 2 workers x 1 thread | {r['fast_rows_per_s']['median']:,.0f} ± "
        f"{r['fast_rows_per_s']['sd']:,.0f} | {r['rows']:,} |"),
        f"| ONNX record path, 1 worker | {r['fast_one_worker_rows_per_s']:,.0f} | {r['rows']:,} |",
        (f"| the bundle's one graph (`distinct_images=false`), 2 workers | {r['one_graph_rows_per_s']:,.0f} | "
         f"{r['rows']:,} |"),
        (f"| torch eager (`model.predict` per chunk) | {r['eager_rows_per_s']['median']:,.0f} ± "
        f"{r['eager_rows_per_s']['sd']:,.0f} | {r['eager_rows']:,} |"),
        "",
        (f"Speed-up of the record path over torch eager: **{r['speedup']:.2f}x** (same run); scores agree to "
        f"{r['max_abs_diff']:.1e}. Target {r['target_rows_per_s']:,} rows/s: "
        f"{'met' if r['meets_target'] else 'not met'}."),
        "",
        (f"Loading the scorer ({r['graph'].split('/')[-1]}; checked against torch) took "
         f"{r['load_seconds']:.1f} s; the two paths' scores agree to {r['one_graph_max_abs_diff']:.1e}."),
        "",
        "Where a row's time goes (one 65,536-row chunk, one thread, microseconds per row): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v:,}"
                   for k, v in stages.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager-rows", type=int, default=100_000)
    ap.add_argument("--bundle", type=Path, default=None, help="a trained bundle (default: train the simulator one)")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"machine": machine(), "load_before": load_average(),
                              "command": "python -m benchmarks.batch_predict " + " ".join(argv or [])}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bundle = args.bundle or train_bundle("synthetic", tmp / "run")
        data = write_rows(tmp / "rows.parquet", args.rows)
        result["result"] = measure(bundle, data, args.rows, args.repeats, min(args.eager_rows, args.rows), tmp)
    result["load_after"] = load_average()
    path = write_json(NAME, result, args.results_dir)
    write_markdown(NAME, markdown(result), args.results_dir)
    print(markdown(result))
    print(path)
    return result


if __name__ == "__main__":
    main()

"""In-process prediction latency: the record path (RecordEncoder + ONNX Runtime + calibration)
beside the torch-eager path (`model.predict` on a DataFrame built from the records per call; on a
dict or a list, `model.predict` takes the record path itself), on the iPinYou
bundle and a simulator bundle, each trained here once (1 epoch) into a temporary folder.

    python -m benchmarks.predict_latency [--repeats 5] [--calls 1000] [--bundle PATH ...]

Measured per bundle, each as the median (and sd) over `repeats` blocks of one run:
- one ad as a dict: p50 / p99 over `calls` calls (the eager path: `calls // 10`);
- 1,024 candidates in one call (a list of dicts, and a columnar batch): time per call.
Targets (issue 15): iPinYou p50 <= 0.5 ms, p99 <= 2 ms; simulator p50 <= 1 ms; 1,024 candidates <= 10 ms.
Writes benchmarks/results/predict_latency.{json,md}. The machine load (uptime) is recorded before
and after: on a shared machine the ratios to the eager path are the comparable figures.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DATA_DIR,
    RESULTS,
    SERVING_TRAIN,
    load_average,
    machine,
    sample_records,
    train_bundle,
    write_json,
)

TARGETS_MS = {"ipinyou": {"single_p50": 0.5, "single_p99": 2.0, "batch_1024": 10.0},
              "synthetic": {"single_p50": 1.0, "batch_1024": 10.0}}
def per_call_ms(fn: Any, items: list[Any]) -> np.ndarray:
    out = np.empty(len(items))
    for i, item in enumerate(items):
        start = time.perf_counter()
        fn(item)
        out[i] = time.perf_counter() - start
    return out * 1e3


def summary(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)),
            "sd": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
            "values": [round(v, 5) for v in values]}


def measure(name: str, data: str, bundle: Path, repeats: int, calls: int) -> dict[str, Any]:
    from within.serve.loading import load_served

    served = load_served(bundle)
    model, scorer = served.model, served.scorer
    records = sample_records(model, data, max(calls, 1024) + 1024)
    singles, batch = records[:calls], records[calls:calls + 1024]
    columns = {k: [r[k] for r in batch] for k in batch[0]}
    # model.predict on a dict or a list takes the same ONNX record path as the scorer; the eager
    # path is model.predict on a DataFrame built from the records each call, as a caller without it would
    def eager(recs: dict[str, Any] | list[dict[str, Any]]) -> Any:
        return model.predict(model.spec.records_to_frame(recs if isinstance(recs, list) else [recs]))

    for r in singles[:50]:  # warm both paths (ORT arenas, caches, lazy imports)
        scorer.predict(r)
        eager(r)
    block: dict[str, list[float]] = {k: [] for k in (
        "onnx_single_p50", "onnx_single_p99", "eager_single_p50", "eager_single_p99",
        "onnx_batch_1024", "onnx_columns_1024", "eager_batch_1024")}
    for _ in range(repeats):
        t = per_call_ms(scorer.predict, singles)
        block["onnx_single_p50"].append(float(np.percentile(t, 50)))
        block["onnx_single_p99"].append(float(np.percentile(t, 99)))
        t = per_call_ms(eager, singles[: max(calls // 10, 20)])
        block["eager_single_p50"].append(float(np.percentile(t, 50)))
        block["eager_single_p99"].append(float(np.percentile(t, 99)))
        block["onnx_batch_1024"].append(float(np.median(per_call_ms(scorer.predict, [batch] * 15))))
        block["onnx_columns_1024"].append(float(np.median(per_call_ms(scorer.predict_columns, [columns] * 15))))
        block["eager_batch_1024"].append(float(np.median(per_call_ms(eager, [batch] * 3))))
    got = {k: summary(v) for k, v in block.items()}
    p_onnx = np.asarray(scorer.predict(batch))
    p_eager = np.asarray(eager(batch))
    res: dict[str, Any] = {
        "bundle": str(bundle), "graph": served.graph, "fields": len(model.processor.spec.fields),
        "field_types": sorted({f.type for f in model.processor.spec.fields}),
        "max_abs_diff_1024": float(np.max(np.abs(p_onnx - p_eager))), "ms": got,
        "speedup_single_p50": got["eager_single_p50"]["median"] / got["onnx_single_p50"]["median"],
        "speedup_batch_1024": got["eager_batch_1024"]["median"] / got["onnx_batch_1024"]["median"],
    }
    targets = TARGETS_MS[data]
    res["targets_ms"] = targets
    res["meets"] = {
        "single_p50": got["onnx_single_p50"]["median"] <= targets["single_p50"],
        **({"single_p99": got["onnx_single_p99"]["median"] <= targets["single_p99"]} if "single_p99" in targets else {}),
        "batch_1024": got["onnx_batch_1024"]["median"] <= targets["batch_1024"],
    }
    print(f"{name}: onnx single p50 {got['onnx_single_p50']['median']:.3f} ms p99 {got['onnx_single_p99']['median']:.3f}"
          f" | eager p50 {got['eager_single_p50']['median']:.2f} ms | 1024: onnx {got['onnx_batch_1024']['median']:.2f}"
          f" ms, columns {got['onnx_columns_1024']['median']:.2f} ms, eager {got['eager_batch_1024']['median']:.1f} ms",
          flush=True)
    return res


def markdown(result: dict[str, Any]) -> str:
    rows = ["| bundle | path | one ad p50 (ms) | one ad p99 (ms) | 1,024 ads (ms) |", "|---|---|---|---|---|"]
    for name, r in result["bundles"].items():
        def cell(key: str, ms: dict[str, Any] = r["ms"]) -> str:
            return f"{ms[key]['median']:.3f} ± {ms[key]['sd']:.3f}"

        rows.append(f"| {name} | ONNX record path | {cell('onnx_single_p50')} | {cell('onnx_single_p99')} | "
                    f"{cell('onnx_batch_1024')} (columnar {cell('onnx_columns_1024')}) |")
        rows.append(f"| {name} | torch eager (DataFrame) | {cell('eager_single_p50')} | {cell('eager_single_p99')} | "
                    f"{cell('eager_batch_1024')} |")
    return (f"Median ± sd over {result['repeats']} repeats in one run; load average before {result['load_before']}, "
            f"after {result['load_after']} ({result['machine']['cpus']} cores, shared).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--bundle", action="append", default=[], metavar="DATA=PATH",
                    help="use a trained bundle instead of training one, e.g. ipinyou=outputs/.../bundle")
    ap.add_argument("--data", nargs="+", default=["ipinyou", "synthetic"], choices=sorted(SERVING_TRAIN))
    args = ap.parse_args(argv)
    given = dict(b.split("=", 1) for b in args.bundle)
    result: dict[str, Any] = {"machine": machine(), "repeats": args.repeats, "calls": args.calls,
                              "load_before": load_average(), "bundles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            if data == "ipinyou" and "ipinyou" not in given and not (DATA_DIR / "ipinyou_deepctr_sample").is_dir():
                print("ipinyou: data not present; skipped", flush=True)
                continue
            bundle = Path(given[data]) if data in given else train_bundle(data, Path(tmp) / data)
            result["bundles"][data] = measure(data, data, bundle, args.repeats, args.calls)
    result["load_after"] = load_average()
    path = write_json("predict_latency", result)
    (RESULTS / "predict_latency.md").write_text(markdown(result))
    print(path)
    return result


if __name__ == "__main__":
    main()

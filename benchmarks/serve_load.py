"""HTTP load on loopback: `python serve.py bundle=...` in a subprocess, driven by an asyncio keep-alive
client at stepped, open-loop request rates (each request starts at its scheduled time, so a slow
answer cannot hold back the next one, and latency counts from the scheduled start).

    python -m benchmarks.serve_load [--bundle PATH] [--data ipinyou|synthetic] [--seconds 8]

Steps: single-ad requests at --single-rates req/s, then 256-ad batches at --batch-rates req/s;
every step is bounded (rate x seconds requests, and a wall-clock limit). Targets (issue 15, 2
cores): 500 req/s single ads with p99 <= 15 ms and 0 errors; 256-ad batches at 20 req/s with p99
<= 50 ms. Also sends the malformed requests of `malformed_requests` and records each answer.
Writes benchmarks/results/serve_load.{json,md} and serve_load.png (latency vs offered load).
The client shares the machine with the server: on 2 cores its CPU counts against the server's.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    DATA_DIR,
    RESULTS,
    ROOT,
    load_average,
    machine,
    sample_records,
    train_bundle,
    write_json,
)

TARGETS = {"single": {"rate": 500, "p99_ms": 15.0}, "batch": {"rate": 20, "size": 256, "p99_ms": 50.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, extra: list[str] = (), timeout_s: float = 300.0,
                 litserve: tuple[int, float] | None = None) -> subprocess.Popen:
    """`python serve.py bundle=... port=...` on 127.0.0.1 (or, with `litserve` = (max_batch_size,
    batch_timeout), the LitServe reference); returns once /health answers."""
    import httpx

    if litserve is None:
        cmd = [sys.executable, str(ROOT / "serve.py"), f"bundle={bundle}", f"port={port}", "host=127.0.0.1",
               "hydra.run.dir=" + tempfile.mkdtemp(prefix="serve_load_"), *extra]
    else:
        cmd = [sys.executable, "-m", "benchmarks.serve_load", "--litserve-server", str(bundle), str(port),
               str(litserve[0]), str(litserve[1])]
    # its own process group, so stop_server also ends the workers it spawns (LitServe has several)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"serve.py did not answer /health within {timeout_s:.0f} s")


try:  # optional: the LitServe reference (pip install "within[litserve]")
    import litserve as ls
except ImportError:  # benchmarks run without it; --litserve then says what to install
    ls = None

if ls is not None:
    class OneAdAPI(ls.LitAPI):
        """The same ScoringService behind a LitAPI: one ad per request, requests batched dynamically.
        At module level because LitServe pickles the API object into its worker process."""

        def __init__(self, bundle: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.bundle = bundle

        def setup(self, device: str) -> None:
            from within.serve import build_service

            self.service = build_service({"bundle": self.bundle})

        def decode_request(self, request: dict) -> dict:
            records, _ = self.service.parse(json.dumps(request).encode())
            return records[0]

        def predict(self, records: Any) -> Any:
            batch = records if isinstance(records, list) else [records]
            scores = self.service.scorer.predict(batch).tolist()
            return scores if isinstance(records, list) else scores[0]

        def encode_response(self, score: float) -> dict:
            return {"score": score}


def litserve_server(bundle: Path, port: int, max_batch_size: int, batch_timeout: float) -> None:
    """The LitServe reference for the comparison. LitServe moves every request and answer between
    its uvicorn process and its inference worker through multiprocessing queues (pickle), and
    unpickles errors: measured here, not shipped (the project allows no pickle on the request path)."""
    if ls is None:
        raise SystemExit('--litserve needs litserve: pip install "within[litserve]"')
    api = OneAdAPI(str(bundle), max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, track_requests=False)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning", num_api_servers=1)


def stop_server(proc: subprocess.Popen) -> None:
    """End the server and every process of its group."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:  # workers that outlive the parent's exit
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def jsonable_record(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


class KeepAliveClient:
    """Keep-alive HTTP/1.1 POSTs over asyncio streams, a fixed pool of connections. Written here
    because httpx measured ~3 ms of client CPU per request on this machine, more than the server
    spends: on 2 shared cores the load generator would take the CPU the server is measured on."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.connections = host, port, connections
        self.pool: asyncio.Queue = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.connections):
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def post(self, path: str, body: bytes) -> int:
        reader, writer = await self.pool.get()
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (path.encode(), self.host.encode(), len(body)) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            return int(head[9:12])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, AttributeError):
            writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            return -1
        finally:
            self.pool.put_nowait((reader, writer))

    async def close(self) -> None:
        while not self.pool.empty():
            _, writer = self.pool.get_nowait()
            writer.close()


async def run_step(url: str, bodies: list[bytes], rate: float, seconds: float, limit_s: float,
                   connections: int = 32) -> dict[str, Any]:
    """Open-loop: request i starts at i / rate; latency counts from that scheduled time (a request
    waiting for a free connection is late, and that counts)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    n = max(1, int(rate * seconds))
    lat = np.full(n, np.nan)
    status = np.zeros(n, dtype=int)
    client = KeepAliveClient(parts.hostname, parts.port, connections)
    await client.open()
    await client.post(path, bodies[0])  # warm the server before the clock starts
    t0 = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        status[i] = await client.post(path, bodies[i % len(bodies)])
        lat[i] = time.perf_counter() - due

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    _, late = await asyncio.wait(tasks, timeout=seconds + limit_s)
    for task in late:  # past the step's wall-clock bound: counted as errors, not awaited
        task.cancel()
    wall = time.perf_counter() - t0
    await client.close()
    status[np.isnan(lat)] = -2
    ok = status == 200
    ms = lat * 1e3
    return {"offered_rps": rate, "requests": n, "achieved_rps": int(ok.sum()) / wall, "errors": int((~ok).sum()),
            "unfinished": len(late),
            "p50_ms": float(np.nanpercentile(ms, 50)), "p90_ms": float(np.nanpercentile(ms, 90)),
            "p99_ms": float(np.nanpercentile(ms, 99)), "max_ms": float(np.nanmax(ms))}


def server_time(base: str) -> tuple[float, float]:
    """(seconds, requests) the server has counted on /predict: its in-process time per request."""
    import httpx

    total = count = 0.0
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith('within_request_seconds_sum{endpoint="predict"}'):
            total = float(line.split()[-1])
        elif line.startswith('within_request_seconds_count{endpoint="predict"}'):
            count = float(line.split()[-1])
    return total, count


def measured_step(base: str, bodies: list[bytes], rate: float, seconds: float, server_pid: int) -> dict[str, Any]:
    """One load step, with the server's own view beside the client's: its mean time per request
    (wall, inside the handler) and the CPU time per request of the server and client processes
    (what the step would cost on an idle machine, whatever else shares this one)."""
    import psutil

    server = psutil.Process(server_pid)
    before, cpu0, own0 = server_time(base), sum(server.cpu_times()[:2]), time.process_time()
    step = asyncio.run(run_step(base + "/predict", bodies, rate, seconds, limit_s=30))
    after, cpu1, own1 = server_time(base), sum(server.cpu_times()[:2]), time.process_time()
    done = max(after[1] - before[1], 1.0)
    step["server_mean_ms"] = 1e3 * (after[0] - before[0]) / done
    step["server_cpu_ms_per_request"] = 1e3 * (cpu1 - cpu0) / done
    step["client_cpu_ms_per_request"] = 1e3 * (own1 - own0) / done
    return step


def malformed_requests(good: dict[str, Any], spec_fields: dict[str, str]) -> list[tuple[str, str, bytes, str]]:
    """(what, path, body, field the answer must name) for requests a client may get wrong, for
    the fields the spec has. `good` is one valid ad (JSON-able); `spec_fields` maps field -> type."""
    def first(*types: str) -> str | None:
        return next((n for n, t in spec_fields.items() if t in types), None)

    num, cat, grp = first("numeric"), first("categorical", "group"), first("group")
    text, image = first("text"), first("image")

    def body(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def with_(name: str, value: Any) -> dict[str, Any]:
        return {**good, name: value}

    def without(name: str) -> dict[str, Any]:
        return {k: v for k, v in good.items() if k != name}

    any_field = next(iter(spec_fields))
    cases = [
        ("not JSON", "/predict", b"{budget: 1", "body"),
        ("a JSON string, not an ad", "/predict", body("an ad"), "body"),
        ("empty batch", "/predict", body([]), "body"),
        ("a misspelt field", "/predict", body(with_(any_field + "x", 1)), any_field + "x"),
        ("batch: ad 1 is a number", "/predict", body([good, 5]), "[1]"),
        ("alpha = 2", "/predict_with_intervals?alpha=2", body(good), "alpha"),
        ("alpha = abc", "/predict_with_intervals?alpha=abc", body(good), "alpha"),
    ]
    if cat:
        cases += [(f"{cat} missing", "/predict", body(without(cat)), cat),
                  (f"{cat} as a list", "/predict", body(with_(cat, ["a", "b"])), cat),
                  (f"{cat} as true", "/predict", body(with_(cat, True)), cat),
                  (f"{cat} as an object", "/predict", body(with_(cat, {"id": 1})), cat),
                  (f"{cat} of 600 characters", "/predict", body(with_(cat, "x" * 600)), cat),
                  (f"{cat} null (required)", "/predict", body(with_(cat, None)), cat),
                  (f"batch: {cat} of ad 1 as a list", "/predict", body([good, with_(cat, [1])]), f"[1].{cat}"),
                  (f"{cat} as a list on /explain", "/explain", body(with_(cat, [1])), cat)]
    if grp and grp != cat:
        cases.append((f"{grp} null (required)", "/predict", body(with_(grp, None)), grp))
    if num:
        cases += [(f"{num} missing", "/predict", body(without(num)), num),
                  (f"{num} as text", "/predict", body(with_(num, "cheap")), num),
                  (f"{num} as true", "/predict", body(with_(num, True)), num),
                  (f"{num} null (required)", "/predict", body(with_(num, None)), num),
                  (f"{num} NaN", "/predict", json.dumps(with_(num, float("nan"))).encode(), num),
                  (f"{num} as an object", "/predict", body(with_(num, {"value": 1})), num)]
    if text:
        cases += [(f"{text} as a number", "/predict", body(with_(text, 7)), text),
                  (f"{text} of 20,000 characters", "/predict", body(with_(text, "w " * 10_000)), text)]
    if image:
        cases += [(f"{image} of the wrong shape", "/predict", body(with_(image, [[[0, 1]]])), image),
                  (f"{image} pixel 300", "/predict", body(with_(image, np.full(np.shape(good[image]), 300).tolist())),
                   image),
                  (f"{image} not base64", "/predict", body(with_(image, "!!notbase64!!")), image),
                  (f"{image} base64 of 5 bytes", "/predict", body(with_(image, base64.b64encode(b"12345").decode())),
                   image)]
    return cases


def check_malformed(base: str, good: dict[str, Any], spec_fields: dict[str, str]) -> list[dict[str, Any]]:
    import httpx

    rows = []
    for what, path, body, field in malformed_requests(good, spec_fields):
        r = httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        rows.append({"request": what, "path": path, "status": r.status_code, "field": field,
                     "names_field": f"'{field}'" in detail, "detail": detail[:160],
                     "traceback": "Traceback" in r.text})
    return rows


def litserve_steps(bundle: Path, singles: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    size, timeout = int(args.litserve[0]), float(args.litserve[1])
    proc = start_server(bundle, port, litserve=(size, timeout))
    steps = []
    try:
        for rate in args.single_rates:
            step = asyncio.run(run_step(f"http://127.0.0.1:{port}/predict", singles, rate, args.seconds, limit_s=30))
            print("litserve single", step, flush=True)
            steps.append(step)
    finally:
        stop_server(proc)
    return {"max_batch_size": size, "batch_timeout_s": timeout, "single": steps}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "single", "one ad per request"), (axes[1], "batch", "256 ads per request")):
        steps = result["steps"][key]
        x = [s["offered_rps"] for s in steps]
        for q in ("p50_ms", "p99_ms"):
            ax.plot(x, [s[q] for s in steps], marker="o", label=q.replace("_ms", ""))
        if key == "single" and "litserve" in result:
            lit = result["litserve"]["single"]
            ax.plot([s["offered_rps"] for s in lit], [s["p99_ms"] for s in lit], marker="x", ls="--",
                    label="p99, LitServe reference")
        ax.axhline(TARGETS[key]["p99_ms"], color="grey", ls="--", lw=1, label="p99 target")
        ax.axvline(TARGETS[key]["rate"], color="grey", ls=":", lw=1)
        ax.set(xlabel="offered load (req/s)", ylabel="latency (ms)", title=title, yscale="log")
        ax.legend()
    fig.suptitle(f"serve.py on loopback ({result['machine']['cpus']} cores, load {result['load_before']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    lines = [(f"Loopback, {result['machine']['cpus']} cores shared with the client; load average before "
              f"{result['load_before']}, after {result['load_after']}. Bundle: {result['data']}."), "",
             ("| requests | offered req/s | achieved req/s | p50 ms | p99 ms | errors | server mean ms | "
              "server CPU ms/req | client CPU ms/req |"), "|---|---|---|---|---|---|---|---|---|"]
    for key in ("single", "batch"):
        for s in result["steps"][key]:
            lines.append(f"| {key} | {s['offered_rps']:g} | {s['achieved_rps']:.1f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {s['errors']} | {s['server_mean_ms']:.2f} | "
                         f"{s['server_cpu_ms_per_request']:.2f} | {s['client_cpu_ms_per_request']:.2f} |")
    if "litserve" in result:
        lit = result["litserve"]
        for s in lit["single"]:
            lines.append(f"| single, LitServe (batch {lit['max_batch_size']}, {lit['batch_timeout_s'] * 1e3:g} ms) | "
                         f"{s['offered_rps']:g} | {s['achieved_rps']:.1f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                         f"{s['errors']} | - | - | - |")
    lines += ["", "| malformed request | endpoint | status | names the field |", "|---|---|---|---|"]
    for m in result["malformed"]:
        lines.append(f"| {m['request']} | {m['path']} | {m['status']} | {'yes' if m['names_field'] else 'NO'} "
                     f"(`{m['field']}`) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="a trained bundle (default: train one for --data)")
    ap.add_argument("--data", default="ipinyou", choices=["ipinyou", "synthetic"])
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    ap.add_argument("--single-rates", type=float, nargs="+", default=[100, 250, 500, 750])
    ap.add_argument("--batch-rates", type=float, nargs="+", default=[5, 10, 20, 30])
    ap.add_argument("--server-args", nargs="*", default=[], help="extra serve.py overrides, e.g. threads=2")
    ap.add_argument("--litserve", type=float, nargs=2, default=None, metavar=("MAX_BATCH", "TIMEOUT_S"),
                    help="also measure single ads on the LitServe reference with this dynamic batching")
    ap.add_argument("--litserve-server", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.litserve_server:  # the subprocess of the LitServe reference
        bundle, port, size, timeout = args.litserve_server
        litserve_server(Path(bundle), int(port), int(size), float(timeout))
        return {}
    if args.bundle is None and args.data == "ipinyou" and not (DATA_DIR / "ipinyou_deepctr_sample").is_dir():
        print("ipinyou data not present: using the simulator", flush=True)
        args.data = "synthetic"
    result: dict[str, Any] = {"machine": machine(), "data": args.data, "seconds_per_step": args.seconds,
                              "targets": TARGETS, "server_args": args.server_args, "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or train_bundle(args.data, Path(tmp) / args.data)
        from within.serve.loading import load_model

        model = load_model(bundle)
        records = [jsonable_record(r) for r in sample_records(model, args.data, 2048, seed=7)]
        spec_fields = {f.name: f.type for f in model.processor.spec.fields}
        port = free_port()
        proc = start_server(bundle, port, args.server_args)
        base = f"http://127.0.0.1:{port}"
        try:
            singles = [json.dumps(r).encode() for r in records[:1024]]
            batches = [json.dumps(records[i:i + 256]).encode() for i in range(0, 1024, 256)]
            result["steps"] = {"single": [], "batch": []}
            for key, bodies, rates in (("single", singles, args.single_rates), ("batch", batches, args.batch_rates)):
                for rate in rates:
                    step = measured_step(base, bodies, rate, args.seconds, proc.pid)
                    print(key, step, flush=True)
                    result["steps"][key].append(step)
            result["malformed"] = check_malformed(base, records[0], spec_fields)
            import httpx

            result["server_metrics_sample"] = httpx.get(base + "/metrics").text.splitlines()[:12]
        finally:
            stop_server(proc)
        if args.litserve:
            result["litserve"] = litserve_steps(bundle, singles, args)
    result["load_after"] = load_average()
    at = {k: next((s for s in result["steps"][k] if s["offered_rps"] == TARGETS[k]["rate"]), None) for k in TARGETS}
    result["meets"] = {k: (s is not None and s["errors"] == 0 and s["p99_ms"] <= TARGETS[k]["p99_ms"])
                       for k, s in at.items()}
    result["meets"]["malformed_all_422_naming_field"] = all(
        m["status"] == 422 and m["names_field"] for m in result["malformed"])
    result["meets"]["no_500"] = all(m["status"] != 500 and not m["traceback"] for m in result["malformed"])
    path = write_json("serve_load", result)
    (RESULTS / "serve_load.md").write_text(markdown(result))
    plot(result, RESULTS / "serve_load.png")
    print(path, result["meets"])
    return result


if __name__ == "__main__":
    main()

"""A monitor process killed mid-stream (SIGKILL) reopens with the counts of every call that returned."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from within.monitoring.monitor import PerformanceMonitor

ROOT = Path(__file__).resolve().parents[1]
BATCH = 50
# The child logs batches of BATCH predictions (half of them labelled, with features and segments)
# and prints its own counts after each call returns. With "step" it then waits for a line on stdin.
CHILD = """
import sys
import numpy as np
from within.monitoring.monitor import PerformanceMonitor

db, mode = sys.argv[1], sys.argv[2]
mon = PerformanceMonitor(window_size=200, storage=db)
rng = np.random.default_rng(0)
for b in range(10_000):
    p = rng.uniform(0.01, 0.2, __BATCH__)
    y = [float(v) if i % 2 else None for i, v in enumerate(rng.random(__BATCH__) < p)]
    mon.log_prediction(p, y, features={"x": rng.normal(size=__BATCH__), "device": ["mobile"] * __BATCH__},
                       segment={"account_id": rng.integers(0, 5, __BATCH__).tolist()},
                       request_id=[f"b{b}-{i}" for i in range(__BATCH__)])
    if b % 4 == 3:
        mon.detect_drift()
    c = mon.store.counts()
    print(c["predictions"], c["labeled"], c["checks"], flush=True)
    if mode == "step":
        sys.stdin.readline()
""".replace("__BATCH__", str(BATCH))


def _spawn(db: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(db), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _counts(db: Path) -> tuple[int, int, int]:
    mon = PerformanceMonitor(window_size=200, storage=db)
    c = mon.store.counts()
    mon.close()
    return c["predictions"], c["labeled"], c["checks"]


@pytest.mark.timeout(120)
def test_killed_between_calls_resumes_with_identical_counts(tmp_path):
    db = tmp_path / "monitor.sqlite"
    child = _spawn(db, "step")
    last = None
    for _ in range(9):
        last = tuple(int(v) for v in child.stdout.readline().split())
        child.stdin.write("\n")
        child.stdin.flush()
    last = tuple(int(v) for v in child.stdout.readline().split())  # the 10th call returned; child waits
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert last == (10 * BATCH, 10 * BATCH // 2, 1)  # one check: after 200 rows there is only the reference
    assert _counts(db) == last
    # the reopened monitor goes on from there: numbering continues and its windows are whole
    mon = PerformanceMonitor(window_size=200, storage=db)
    assert mon.log_prediction(0.1) == (10 * BATCH + 1,) * 2
    assert mon.complete_windows == 2 and mon.detect_drift().window == 1


@pytest.mark.timeout(120)
def test_killed_while_writing_loses_at_most_the_call_in_flight(tmp_path):
    db = tmp_path / "monitor.sqlite"
    child = _spawn(db, "run")
    seen = []
    while len(seen) < 25:
        seen.append(tuple(int(v) for v in child.stdout.readline().split()))
    time.sleep(0.05)  # let it get into later writes
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    rest = child.stdout.read().split("\n")
    printed = seen + [tuple(int(v) for v in line.split()) for line in rest if line.strip()]
    got = _counts(db)
    # every returned call is there, plus at most the one that had committed but not printed
    assert got[0] in (printed[-1][0], printed[-1][0] + BATCH)
    assert got[0] % BATCH == 0 and got[1] == got[0] // 2  # no half-written batch
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

"""benchmarks/ as a package of entry points: the import rules every module keeps, and benchmarks/common.py."""
from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common

MODULES = sorted(p for p in (common.ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, lazy ones inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_a_benchmark_imports_no_test_helper_no_private_name_and_no_other_benchmark(path):
    source = path.read_text()
    assert "sys.path" not in source, f"{path.name}: edits sys.path; run it as python -m benchmarks.{path.stem}"
    for module, names in imports(path):
        assert not module.startswith((".", "tests")), f"{path.name}: imports {module}"
        if module.startswith("benchmarks"):
            assert module == "benchmarks.common", f"{path.name}: imports {module}; shared helpers live in common"
        if module != "__future__":
            private = [part for part in module.split(".") + names if part.startswith("_")]
            assert not private, f"{path.name}: imports the private {private} from {module}"
    assert 'if __name__ == "__main__":' in source and "def main(" in source, f"{path.name}: not an entry point"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_every_benchmark_imports_as_a_module_of_the_package(path):
    module = importlib.import_module(f"benchmarks.{path.stem}")
    assert callable(module.main)


def test_the_checker_catches_a_private_import_and_a_test_helper(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from within.calibration.intervals import _codes\n    from tests.conftest import ROOT\n")
    found = imports(bad)
    assert ("within.calibration.intervals", ["_codes"]) in found and ("tests.conftest", ["ROOT"]) in found


def test_json_round_trip_writes_nan_as_null_and_numpy_as_numbers(tmp_path):
    result = {"auc": np.float64(0.75), "n": np.int64(3), "sd": float("nan"), "run": common.ROOT / "outputs",
              "seen": np.array([0.5, 1.5]), 7: [np.bool_(True)]}
    path = common.write_json("x", result, tmp_path)
    assert path == tmp_path / "x.json"
    back = json.loads(path.read_text())  # strict JSON: no NaN literal
    assert back == {"auc": 0.75, "n": 3, "sd": None, "run": str(common.ROOT / "outputs"), "seen": [0.5, 1.5],
                    "7": [True]}
    assert common.read_json("x", tmp_path) == back and common.read_json("missing", tmp_path) is None


def test_repo_path_is_relative_inside_the_checkout_and_absolute_outside(tmp_path):
    assert common.repo_path(common.ROOT / "outputs" / "run") == "outputs/run"
    assert common.repo_path(tmp_path) == str(tmp_path.resolve())


def test_image_summaries_match_per_row_statistics_and_mark_a_missing_image():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (3, 4, 4), dtype=np.uint8) for _ in range(2))
    column = [a, b, None, a, float("nan")]  # rows of one ad share the image object
    got = common.image_summaries(column)
    assert got.shape == (5, len(common.IMAGE_SUMMARIES))
    for row, img in ((0, a), (1, b), (3, a)):
        x = img.astype(np.float64) / 255.0
        want = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), [x.mean(axis=0).std()]])
        np.testing.assert_allclose(got[row], want)
    assert np.isnan(got[2]).all() and np.isnan(got[4]).all()
    np.testing.assert_allclose(common.image_summaries([a, b]), got[:2])  # no missing image: still one row each


def test_simulator_run_reuses_a_finished_run_and_trains_a_missing_one_resumably(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUNS", tmp_path)
    done = tmp_path / "simulator_seed7_sample1007"
    (done / "report").mkdir(parents=True)
    (done / "report" / "metrics.json").write_text("{}")
    calls = []
    monkeypatch.setattr(common, "train", lambda overrides, out: calls.append((overrides, out)))
    assert common.simulator_run(7, sample_seed=1007) == done and calls == []
    assert common.simulator_run(11) == tmp_path / "simulator_seed11"
    assert calls == [(["seed=11", "ckpt_path=auto"], tmp_path / "simulator_seed11")]


def test_load_run_names_the_flag_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"--partner: .*bundle has no metadata.json; pass a run directory written by train.py"):
        common.load_run(tmp_path, "--partner")


def test_fresh_sample_refuses_a_run_that_is_not_on_the_simulator():
    meta = {"config": {"data": {"source": {"_target_": "within.data.loaders.criteo.load"}}}}
    with pytest.raises(SystemExit, match="needs a simulator run"):
        common.fresh_sample(meta, 10, 1)


def test_fresh_sample_draws_other_rows_of_the_same_world():
    source = {"_target_": "within.data.simulator.simulate", "_partial_": True, "seed": 7, "n": 5}
    meta = {"config": {"data": {"source": source}}}
    a, b = common.fresh_sample(meta, 2000, 1), common.fresh_sample(meta, 2000, 2)
    assert len(a) == len(b) == 2000
    assert not a["true_ctr"].equals(b["true_ctr"])  # other impressions ...
    both = a.drop_duplicates("ad_id").merge(b.drop_duplicates("ad_id"), on="ad_id")
    assert len(both) > 50 and (both["headline_x"] == both["headline_y"]).all()  # ... of the same ads

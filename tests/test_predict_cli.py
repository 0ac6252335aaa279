"""predict.py: a file scored in chunks equals model.predict on the same rows; only the bundle's columns
are read; a missing column ends with one `error:` line and exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.test_serve_bundle import tiny_bundle
from within.data.simulator import simulate
from within.features.spec import FeatureError
from within.models.base import BaseMLModel
from within.serve.batch import ChunkScorer, predict_file

ROWS = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A bundle with every modality (text, image), a spline calibrator, intervals and export/model.onnx."""
    out = tmp_path_factory.mktemp("predict_run")
    tiny_bundle(out, calibrator="spline", onnx=True)
    return out


@pytest.fixture(scope="module")
def model(run):
    return BaseMLModel.load(run / "bundle")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """Fresh rows as the simulator gives them (images as (3, 16, 16) uint8 arrays), plus a column no model reads."""
    df = simulate(n=ROWS, seed=123).drop(columns=["clicked", "true_ctr"])
    df["unused_notes"] = [f"note {i}" for i in range(len(df))]
    return df


def as_file_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Images as their raw bytes: how parquet holds them (bundle/reference.parquet does the same)."""
    out = df.copy()
    out["main_image"] = [np.ascontiguousarray(v, dtype=np.uint8).tobytes() for v in out["main_image"]]
    return out


@pytest.fixture(scope="module")
def parquet_file(rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("predict_in") / "rows.parquet"
    as_file_frame(rows).to_parquet(path, index=False, row_group_size=100)
    return path


@pytest.fixture(scope="module")
def csv_file(rows, tmp_path_factory) -> Path:
    """The rows as CSV, each distinct image saved as a PNG and named by its path."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("predict_csv")
    paths, seen = [], {}
    for img in rows["main_image"]:
        if id(img) not in seen:
            seen[id(img)] = str(folder / f"img_{len(seen)}.png")
            Image.fromarray(np.asarray(img).transpose(1, 2, 0)).save(seen[id(img)])
        paths.append(seen[id(img)])
    df = rows.copy()
    df["main_image"] = paths
    path = folder / "rows.csv"
    df.to_csv(path, index=False)
    return path


def predict_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "predict.py"), f"hydra.run.dir={tmp / 'hydra'}", *args],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_parquet_scores_and_intervals_equal_model_predict(run, model, rows, parquet_file, tmp_path):
    out = tmp_path / "scores.parquet"
    res = predict_cli(tmp_path, f"bundle={run / 'bundle'}", f"input={parquet_file}", f"output={out}",
                      "id_column=ad_id", "intervals=true", "batch_rows=128", "progress=false",
                      "distinct_images=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "image encoder once per distinct image" in res.stdout
    got = pd.read_parquet(out)
    assert list(got.columns) == ["ad_id", "score", "lower", "upper"]
    assert got["ad_id"].tolist() == rows["ad_id"].tolist()
    p, lo, hi = model.predict_with_intervals(rows.drop(columns=["ad_id", "unused_notes"]), alpha=0.1)
    np.testing.assert_allclose(got["score"], model.predict(rows), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["score"], p, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["lower"], lo, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["upper"], hi, atol=1e-6, rtol=0)
    assert (got["lower"] <= got["score"]).all() and (got["score"] <= got["upper"]).all()
    assert np.ptp(got["score"]) > 1e-3  # the rows get different scores: the comparison means something


def test_csv_input_with_image_paths_equals_model_predict(run, model, rows, csv_file, tmp_path):
    out = tmp_path / "scores.csv"
    res = predict_cli(tmp_path, f"bundle={run / 'bundle'}", f"input={csv_file}", f"output={out}", "progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    got = pd.read_csv(out)
    assert list(got.columns) == ["score"] and len(got) == ROWS
    np.testing.assert_allclose(got["score"], model.predict(rows), atol=1e-6, rtol=0)


def test_missing_column_is_one_error_line_and_exit_2(run, rows, tmp_path):
    path = tmp_path / "no_budget.parquet"
    as_file_frame(rows).drop(columns=["budget"]).to_parquet(path, index=False)
    res = predict_cli(tmp_path, f"bundle={run / 'bundle'}", f"input={path}", f"output={tmp_path / 's.parquet'}")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "column 'budget'" in errors[0] and "add it to the file" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "s.parquet").exists()


def test_only_the_needed_columns_are_read(run, model, parquet_file, csv_file, tmp_path, monkeypatch):
    scorer = ChunkScorer(run / "bundle")
    asked: dict[str, list[str]] = {}
    iter_batches, open_csv = pq.ParquetFile.iter_batches, pacsv.open_csv

    def spy_batches(self, *args, columns=None, **kwargs):
        asked["parquet"] = list(columns)
        return iter_batches(self, *args, columns=columns, **kwargs)

    def spy_csv(*args, convert_options=None, **kwargs):
        asked["csv"] = list(convert_options.include_columns)
        return open_csv(*args, convert_options=convert_options, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
    monkeypatch.setattr(pacsv, "open_csv", spy_csv)
    want = set(model.spec.names) | {"ad_id"}
    res = predict_file(None, parquet_file, tmp_path / "a.parquet", id_column="ad_id", scorer=scorer, progress=False)
    assert set(asked["parquet"]) == want and set(res.columns_read) == want
    assert "unused_notes" not in asked["parquet"] and "timestamp" not in asked["parquet"]
    predict_file(None, csv_file, tmp_path / "b.parquet", scorer=scorer, progress=False)
    assert set(asked["csv"]) == set(model.spec.names)


def test_torch_engine_agrees_with_the_onnx_path(run, parquet_file, tmp_path):
    fast = predict_file(run / "bundle", parquet_file, tmp_path / "fast.parquet", batch_rows=64, progress=False)
    eager = predict_file(run / "bundle", parquet_file, tmp_path / "eager.parquet", engine="torch", progress=False)
    assert fast.engine == "onnx" and eager.engine == "torch" and fast.rows == eager.rows == ROWS
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "fast.parquet")["score"],
                               pd.read_parquet(tmp_path / "eager.parquet")["score"], atol=1e-6, rtol=0)


def test_user_errors_name_the_field_and_the_fix(run, tmp_path):
    scorer = ChunkScorer(run / "bundle")
    frame = as_file_frame(simulate(n=20, seed=3))
    path = tmp_path / "rows.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(FeatureError, match=r"id_column: column 'row_key' is not in .*id_column=null"):
        predict_file(None, path, tmp_path / "s.parquet", id_column="row_key", scorer=scorer, progress=False)
    with pytest.raises(FeatureError, match=r"output: .*\.json is not a \.parquet or \.csv file"):
        predict_file(None, path, tmp_path / "s.json", scorer=scorer, progress=False)
    bad = frame.copy()
    bad["main_image"] = [b[:10] for b in bad["main_image"]]
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(FeatureError, match=r"field 'main_image': row 0 of the chunk holds 10 bytes, expected 768"):
        predict_file(None, tmp_path / "bad.parquet", tmp_path / "s.parquet", scorer=scorer, progress=False)
    with pytest.raises(FileNotFoundError, match="input: .* does not exist"):
        predict_file(None, tmp_path / "nope.parquet", tmp_path / "s.parquet", scorer=scorer, progress=False)


def test_intervals_on_a_bundle_without_them_is_refused(tmp_path):
    bundle = tiny_bundle(tmp_path, n=600, text=False, image=False, intervals=False, onnx=True)
    frame = simulate(n=30, seed=4).drop(columns=["main_image"])
    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    with pytest.raises(FeatureError, match=r"intervals=true: this bundle has no intervals.*postfit"):
        predict_file(bundle, tmp_path / "rows.parquet", tmp_path / "s.parquet", intervals=True, progress=False)
    res = predict_file(bundle, tmp_path / "rows.parquet", tmp_path / "s.parquet", progress=False)
    assert res.rows == 30


def test_distinct_images_auto_cuts_a_composed_graph_and_exports_only_for_a_large_file(run, parquet_file, tmp_path,
                                                                                       monkeypatch):
    import within.serve.batch as batch

    # the export step composed the graph at image_vec: cutting it costs milliseconds, so auto always does
    cut = predict_file(run / "bundle", parquet_file, tmp_path / "cut.parquet", progress=False)
    assert "cut at image_vec" in cut.graph and "distinct image" in cut.graph
    # an older graph must be exported again to split: only worth it for a large file
    monkeypatch.setattr(batch, "_graph_has_image_seam", lambda bundle: False)
    small = predict_file(run / "bundle", parquet_file, tmp_path / "a.parquet", progress=False)
    assert "distinct image" not in small.graph  # 300 rows: the export would cost more than it saves
    monkeypatch.setattr(batch, "DISTINCT_IMAGES_MIN_ROWS", ROWS)
    large = predict_file(run / "bundle", parquet_file, tmp_path / "b.parquet", progress=False)
    assert "distinct image" in large.graph
    for other in ("a", "b"):
        np.testing.assert_allclose(pd.read_parquet(tmp_path / "cut.parquet")["score"],
                                   pd.read_parquet(tmp_path / f"{other}.parquet")["score"], atol=1e-6, rtol=0)
    with pytest.raises(FeatureError, match="distinct_images: 'yes' is not true, false or auto"):
        predict_file(run / "bundle", parquet_file, tmp_path / "c.parquet", progress=False, distinct_images="yes")

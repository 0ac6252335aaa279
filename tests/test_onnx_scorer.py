"""OnnxScorer: ONNX Runtime + the bundle's calibration gives model.predict(frame) to 1e-6, from records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_serve_bundle import frame, tiny_bundle
from within.calibration import PlattScaling, SplineCalibrator, TemperatureScaling
from within.data.simulator import simulate
from within.features.records import RecordEncoder
from within.features.spec import FeatureError
from within.models.onnx_scorer import OnnxScorer, affine_of, distinct_rows, find_graph
from within.postfit.export import export_onnx_bytes, image_split_bytes
from within.serve.loading import load_model

ATOL = 1e-6


def _graph(model) -> bytes:
    arrays = RecordEncoder(model.processor).encode(RecordEncoder(model.processor).example_records(16))
    data, info = export_onnx_bytes(model, arrays)
    assert info["output"] == "logit" and info["max_abs_diff"] < 1e-5
    return data


def assert_agrees(scorer: OnnxScorer, model, df) -> None:
    """Scores and intervals of the scorer on df's records equal the model's on df."""
    records = df.to_dict("records")
    np.testing.assert_allclose(scorer.predict(records), model.predict(df), atol=ATOL, rtol=0)
    for want, got in zip(model.predict_with_intervals(df), scorer.predict_with_intervals(records)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """Text + image + tabular network, spline calibration (not foldable: the graph gives logits)."""
    out = tmp_path_factory.mktemp("multimodal")
    model = load_model(tiny_bundle(out, calibrator="spline"))
    graph = _graph(model)
    return model, OnnxScorer.from_model(model, graph=graph), graph


def test_matches_model_predict_on_the_same_rows(multimodal):
    model, scorer, _ = multimodal
    df = frame(300)
    records = df.to_dict("records")
    want = model.predict(df)
    assert scorer.output == "logit"
    np.testing.assert_allclose(scorer.predict(records), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scorer.predict(df), want, atol=ATOL, rtol=0)
    columns = {name: df[name].tolist() for name in df.columns}
    np.testing.assert_allclose(scorer.predict_columns(columns), want, atol=ATOL, rtol=0)
    one = scorer.predict(records[0])
    assert isinstance(one, float) and abs(one - want[0]) < ATOL


def test_intervals_match_model(multimodal):
    model, scorer, _ = multimodal
    df = frame(120, seed=5)
    for alpha in (0.05, 0.3):
        p, lo, hi = model.predict_with_intervals(df, alpha=alpha)
        q, qlo, qhi = scorer.predict_with_intervals(df.to_dict("records"), alpha=alpha)
        for a, b in ((p, q), (lo, qlo), (hi, qhi)):
            np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)
        assert np.all(qlo <= q) and np.all(q <= qhi)
    single = scorer.predict_with_intervals(df.iloc[0].to_dict())
    assert all(isinstance(v, float) for v in single)


def test_errors_name_the_field_or_the_fix(multimodal):
    model, scorer, graph = multimodal
    record = frame(1).iloc[0].to_dict()
    with pytest.raises(FeatureError, match="field 'budget': expected a number, got str"):
        scorer.predict(dict(record, budget="lots"))
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\)"):
        scorer.predict_with_intervals(record, alpha=1.5)
    bare = OnnxScorer([graph], scorer.encoder, calibrator=model.calibrator)
    with pytest.raises(RuntimeError, match="no intervals; train with the post-fit step `intervals`"):
        bare.predict_with_intervals(record)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tabular_scorer")
    tiny_bundle(out, text=False, image=False, calibrator="temperature", onnx=True)
    return out / "bundle"


def test_bundle_graph_with_folded_temperature(tabular):
    model = load_model(tabular)
    assert find_graph(tabular) == tabular.parent / "export" / "model.onnx"
    scorer = OnnxScorer.from_model(model, bundle=tabular)
    assert scorer.output == "probability"
    assert_agrees(scorer, model, frame(200, seed=4))


def test_no_graph_says_how_to_get_one(tmp_path):
    model = load_model(tiny_bundle(tmp_path, n=600, text=False, image=False))
    with pytest.raises(FileNotFoundError, match="train with the post-fit step `export`, or pass graph="):
        OnnxScorer.from_model(model, bundle=tmp_path / "bundle")


@pytest.mark.slow
def test_ensemble_with_member_spread_needs_member_graphs(tmp_path):
    model = load_model(tiny_bundle(tmp_path, n=800, text=False, image=False, members=2))
    assert model.intervals.uses_members_
    graphs = [_graph(m) for m in model.base_models]
    with pytest.raises(ValueError, match="one logit graph per member"):
        OnnxScorer.from_model(model, graph=graphs[0])
    assert_agrees(OnnxScorer.from_model(model, member_graphs=graphs), model, frame(150, seed=8))


def test_affine_of_reads_the_calibrators_own_map():
    rng = np.random.default_rng(0)
    s = rng.normal(size=500)
    y = (rng.random(500) < 1 / (1 + np.exp(-s))).astype(float)
    t = TemperatureScaling().fit(s, y)
    assert affine_of(t) == pytest.approx((1 / t.temperature_, t.bias_))
    p = PlattScaling().fit(s, y)
    assert affine_of(p) == pytest.approx((p.slope_, p.bias_))
    assert affine_of(SplineCalibrator().fit(s, y)) is None
    assert affine_of(None) is None


def test_slices_and_an_image_block_give_the_same_scores(multimodal):
    """A batch over run_rows runs in slices; images as one [n, C, S, S] block (how predict.py reads a
    parquet file) encode as the per-row arrays do."""
    model, scorer, graph = multimodal
    df = frame(50, seed=8)
    want = model.predict(df)
    sliced = OnnxScorer([graph], scorer.encoder, calibrator=model.calibrator,
                        intervals=model.intervals, group_names=scorer.group_names, run_rows=7)
    columns = {name: df[name].tolist() for name in df.columns}
    np.testing.assert_allclose(sliced.predict_columns(columns), want, atol=ATOL, rtol=0)
    block = {**columns, "main_image": np.stack([np.asarray(v, dtype=np.uint8) for v in df["main_image"]])}
    arrays = scorer.encoder.encode_columns(block)
    np.testing.assert_array_equal(arrays["image"], scorer.encoder.encode_columns(columns)["image"])
    np.testing.assert_allclose(sliced.predict_columns(block), want, atol=ATOL, rtol=0)
    with pytest.raises(FeatureError, match="field 'main_image': an image block of shape"):
        scorer.encoder.encode_columns({**columns, "main_image": block["main_image"][:, :, :8]})
    with pytest.raises(ValueError, match="run_rows: must be >= 1"):
        OnnxScorer([graph], scorer.encoder, run_rows=0)


def test_distinct_rows_rebuilds_every_row():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (5, 1, 3, 4, 4), dtype=np.uint8)
    which = rng.integers(0, 5, 40)
    block = pool[which]
    distinct, index = distinct_rows(block)
    assert len(distinct) == len(np.unique(which))
    np.testing.assert_array_equal(distinct[index], block)


def test_image_split_encodes_each_distinct_image_once_and_agrees(multimodal):
    """The image encoder + rest-of-network pair (batch inference) scores as the one graph does, and the
    image graph sees only the distinct images of the call."""
    model, scorer, _ = multimodal
    df = frame(40, seed=9)
    df = pd.concat([df, df.iloc[:20]], ignore_index=True)  # repeated ads, as in a batch file
    records = df.to_dict("records")
    arrays = RecordEncoder(model.processor).encode(records[:16])
    image_graph, rest_graph, info = image_split_bytes(model, arrays)
    assert info["max_abs_diff"] < 1e-5 and info["image_max_abs_diff"] < 1e-5
    split = OnnxScorer.from_model(model, graph=rest_graph, image_graph=image_graph)
    assert_agrees(split, model, df)
    seen = []
    run = split._run
    split._run = lambda session, keys, arrays, n: (seen.append((keys, n)) or run(session, keys, arrays, n))
    split.predict(records)
    n_distinct = len({np.asarray(r["main_image"], dtype=np.uint8).tobytes() for r in records})
    assert seen[0] == (["image"], n_distinct) and n_distinct < len(records)
    with pytest.raises(ValueError, match="image_graph: pass it with the one graph that takes `image_vec`"):
        OnnxScorer.from_model(model, graph=_graph(model), image_graph=image_graph)


def test_the_exported_graph_is_the_image_pair_composed_and_cuts_back_into_it(tmp_path):
    """export_onnx writes one graph (image encoder -> image_vec -> rest, calibration folded in) that
    scores as the torch model, and split_image_graph cuts the pair out of it without exporting again."""
    from within.postfit.export import IMAGE_SPLIT_KEY, export_onnx, split_image_graph

    bundle = tiny_bundle(tmp_path, n=600, calibrator="temperature", onnx=True)
    model = load_model(bundle)
    found = find_graph(bundle)
    info = export_onnx(model, simulate(n=300, seed=4), tmp_path / "again.onnx")
    assert info["output"] == "probability" and info["max_abs_diff"] < 1e-5 and "image_split" in info
    assert "image" in info["inputs"] and "image_vec" not in info["inputs"]   # the composed graph's own inputs
    df = frame(40, seed=9)
    df = pd.concat([df, df.iloc[:20]], ignore_index=True)
    whole = OnnxScorer.from_model(model, graph=found)
    assert whole.output == "probability" and "image" in whole._inputs[0]
    assert_agrees(whole, model, df)
    image_graph, rest_graph = split_image_graph(found)
    split = OnnxScorer.from_model(model, graph=rest_graph, image_graph=image_graph)
    assert "image_vec" in split._inputs[0] and "image" not in split._inputs[0]
    assert_agrees(split, model, df)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(found)).metadata_props}
    assert meta[IMAGE_SPLIT_KEY] == "image_vec"
    assert split_image_graph(_graph(model)) is None          # a graph exported in one piece is not cut


def test_a_bundle_without_images_exports_one_graph(tmp_path):
    from within.postfit.export import split_image_graph

    bundle = tiny_bundle(tmp_path, n=600, image=False, onnx=True)
    assert split_image_graph(find_graph(bundle)) is None

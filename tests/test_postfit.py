"""Post-fit steps end to end: calibrate -> intervals -> ensemble -> quantize -> export through run_train,
the ONNX graph against torch, the int8 file, and the bundle round trip of intervals and members."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import FAST, FAST_ENSEMBLE, compose_cfg
from within import AdScorePredictor
from within.data.simulator import simulate
from within.models.ensemble import CalibratedEnsemble
from within.pipeline.train import run_train

ALL_STEPS = "postfit=[calibrate,intervals,ensemble,quantize,export]"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("postfit")
    run_train(compose_cfg("train", FAST_ENSEMBLE + [ALL_STEPS, "model.size=2",
                                             "quantize.repeats=2", "export.check_rows=64"], out_dir=out))
    return out


@pytest.fixture(scope="module")
def fresh() -> object:
    return simulate(n=300, seed=123)


def test_full_postfit_run_writes_every_artifact(run):
    for rel in ("bundle/model.safetensors", "bundle/calibration.json", "bundle/members/0/model.safetensors",
                "bundle/members/1/spec.json", "export/model.onnx", "export/onnx.json", "export/quantize.json",
                "export/model_int8.safetensors", "report/ensemble.json", "report/reliability.png",
                "report/postfit.json", "members/1/checkpoints/last.ckpt", "bundle/model.onnx"):
        assert (run / rel).is_file(), rel
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for key in ("test/interval_coverage_true", "test/interval_width", "quantize/auc_delta", "quantize/logloss_delta",
                "quantize/speedup_b1024", "export/onnx_max_abs_diff", "ensemble/auc", "ensemble/best_member_auc",
                "test/field_rce_uncalibrated/state"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test/interval_coverage_true"] <= 1.0 and metrics["test/interval_width"] > 0
    assert metrics["export/onnx_max_abs_diff"] < 1e-4
    report = (run / "report" / "report.md").read_text()
    assert "Field-level relative calibration error" in report and "Prediction intervals" in report
    intervals = json.loads((run / "report" / "postfit.json").read_text())["intervals"]
    assert intervals["uses_members"] is True and intervals["split"] == "val+calib"  # never test
    assert "calib/interval_coverage_true" in metrics
    # the spread's moment noise and the coverage band it implies, in the metrics and the report
    se, low, high = (metrics[f"intervals/{k}"] for k in ("tau2_se", "coverage_band_low", "coverage_band_high"))
    assert se > 0 and 0.0 <= low <= 0.9 <= high <= 1.0
    assert intervals["params"]["tau2_se"] == pytest.approx(se)
    assert "one standard error either way would give coverage" in report


def test_interval_rows_never_include_test():
    from within.postfit.context import PostfitContext
    from within.postfit.intervals import Intervals

    frames = {name: pd.DataFrame({"x": range(k)}) for name, k in (("train", 5), ("val", 2), ("calib", 3), ("test", 4))}
    ctx = PostfitContext(model=None, frames=frames, out_dir=Path("."), config={})
    split, frame = Intervals.fit_frame(ctx, ["val", "calib"])
    assert split == "val+calib" and len(frame) == 5
    assert Intervals.fit_frame(ctx, "calib")[0] == "calib"
    for bad, match in ((["calib", "test"], "'test' is not allowed"), (["train"], "choose from val, calib")):
        with pytest.raises(ValueError, match=match):
            Intervals.fit_frame(ctx, bad)


@pytest.mark.parametrize("override, match", [
    ("intervals.splits=[calib,test]", "intervals.splits: 'test' is not allowed"),
    ("intervals.weight_power=2", r"intervals.weight_power: must be in \[0, 1\]"),
    ("quantize.smooth_alpha=1.5", r"quantize.smooth_alpha: must be in \[0, 1\]"),
    ("quantize.calibration_rows=0", "quantize.calibration_rows: must be an integer >= 1"),
])
def test_bad_interval_settings_fail_before_training(tmp_path, override, match):
    from within.pipeline.config import ConfigError, validate_config

    cfg = compose_cfg("train", FAST + [override], out_dir=tmp_path)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_onnx_graph_matches_the_bundle_predictions(run, fresh):
    import onnxruntime as ort

    predictor = AdScorePredictor.load(run / "bundle")
    info = json.loads((run / "export" / "onnx.json").read_text())
    assert info["output"] == "probability"  # temperature scaling is folded into the graph
    session = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    arrays = predictor.processor.transform(fresh.iloc[:7])  # a batch size the export never saw
    out = session.run(None, {i.name: arrays[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(out, predictor.predict(fresh.iloc[:7]), atol=1e-4)


def test_bundle_round_trip_keeps_members_and_intervals(run, fresh):
    predictor = AdScorePredictor.load(run / "bundle")
    assert isinstance(predictor.model, CalibratedEnsemble) and len(predictor.model.base_models) == 2
    assert predictor.intervals is not None and predictor.intervals.uses_members_
    p, lo, hi = predictor.predict_with_intervals(fresh)
    np.testing.assert_array_equal(p, predictor.predict(fresh))
    again = AdScorePredictor.load(run / "bundle").predict_with_intervals(fresh)
    for a, b in zip((p, lo, hi), again):
        np.testing.assert_array_equal(a, b)
    assert np.all((lo <= p) & (p <= hi)) and np.all(hi - lo > 0)
    one = predictor.predict_with_intervals(fresh.drop(columns=["clicked", "true_ctr"]).iloc[0].to_dict())
    assert all(isinstance(v, float) for v in one) and one[0] == pytest.approx(p[0], abs=1e-6)  # records: ONNX path


def test_int8_file_rebuilds_the_quantized_model(run, fresh):
    from within.postfit.quantize import load_int8

    fp32 = AdScorePredictor.load(run / "bundle").model
    int8 = load_int8(run / "bundle")
    assert int8.base_models[0].net is not fp32.base_models[0].net
    p32, p8 = fp32.predict(fresh), int8.predict(fresh)
    assert np.all(np.isfinite(p8)) and np.max(np.abs(p8 - p32)) < 0.05
    first = int8.base_models[0].net.tower[0]  # SmoothQuant wrapper around the int8 Linear
    assert "quantized" in type(first.linear).__module__
    assert not torch.allclose(first.input_scale, torch.ones_like(first.input_scale))  # the scales were saved


@settings(max_examples=12, deadline=None)
@given(a=st.floats(0.01, 0.98), b=st.floats(0.01, 0.98))
def test_intervals_widen_as_alpha_falls(run, fresh, a, b):
    predictor = _loaded(run)
    small, large = sorted((a, b))
    _, lo_s, hi_s = predictor.predict_with_intervals(fresh.iloc[:50], alpha=small)
    _, lo_l, hi_l = predictor.predict_with_intervals(fresh.iloc[:50], alpha=large)
    assert np.all(lo_s <= lo_l + 1e-12) and np.all(hi_s >= hi_l - 1e-12)


_CACHE: dict[Path, AdScorePredictor] = {}


def _loaded(run: Path) -> AdScorePredictor:
    if run not in _CACHE:
        _CACHE[run] = AdScorePredictor.load(run / "bundle")
    return _CACHE[run]


def test_model_without_intervals_says_which_step_fits_them(run, fresh):
    member = AdScorePredictor.load(run / "bundle" / "members" / "0")
    with pytest.raises(RuntimeError, match="post-fit step `intervals`"):
        member.predict_with_intervals(fresh)


def test_unknown_postfit_step_names_the_choices(tmp_path):
    from within.postfit import PostfitContext, run_steps

    ctx = PostfitContext(model=None, frames={}, out_dir=tmp_path, config={})
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['calibrat'\]; available: .*'intervals'"):
        run_steps(["calibrat"], ctx, lambda c: None)


class _Busy(torch.nn.Module):
    """A network whose forward costs `work` matrix products: a stand-in for fp32 vs a faster copy."""

    def __init__(self, work: int) -> None:
        super().__init__()
        self.work = work
        self.inner = torch.nn.Linear(64, 64)

    def forward(self, batch):
        x = batch["x"]
        for _ in range(self.work):
            x = self.inner(x)
        return x.sum(dim=1)


def test_paired_timing_measures_a_real_speedup_and_its_noise_floor():
    from within.postfit.quantize import compare_forward, time_breakdown

    batch = [{"x": torch.randn(1024, 64)}]
    slow, fast = _Busy(40).eval(), _Busy(4).eval()
    # one thread: with two on a 2-core machine whose other core is busy, alternate calls of the SAME
    # network were measured 3x apart (the pool's threads wait for a core), which no pairing cancels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            t = compare_forward([slow], [fast], batch, repeats=15)
            null = compare_forward([slow], [slow], batch, repeats=15)
    finally:
        torch.set_num_threads(threads)
    assert t["speedup"] > 2.5, t  # 10x the work; generous for a loaded CPU
    assert 0.4 < null["speedup"] < 2.5, null
    assert t["threads"] == 1 and t["repeats"] == 15
    with torch.no_grad():
        parts = time_breakdown(slow, batch[0], repeats=3)
    assert set(parts) == {"inner", "total", "other"}
    # inner and total are separate timings: on a loaded CPU inner can exceed total by noise alone
    assert 0 < parts["inner"] <= parts["total"] * 2, parts


def test_a_noisy_spread_warns_with_the_fix(caplog):
    from within.calibration.intervals import ProbabilityIntervals
    from within.postfit.intervals import warn_if_uncertain

    rng = np.random.default_rng(0)
    n = 6000
    item = rng.integers(0, 300, n)
    s = rng.normal(-3.0, 0.7, n)
    y = rng.binomial(1, 1 / (1 + np.exp(-(s + rng.normal(0, 0.4, 300)[item]))))
    few = ProbabilityIntervals().fit(s, y, keys={"item": item})
    with caplog.at_level("WARNING", logger="within.postfit.intervals"):
        warn_if_uncertain(few, 0.1, n, "calib")
    assert "fit on more held-out rows (data.split.calib_frac, intervals.splits)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="within.postfit.intervals"):
        warn_if_uncertain(ProbabilityIntervals(residual_var=0.1).fit(s, y), 0.1, n, "calib")
    assert caplog.text == ""  # a spread given from outside has no moment noise


def test_a_timing_whose_noise_floor_is_far_from_one_warns(caplog):
    from within.postfit.quantize import warn_if_timing_is_noise

    with caplog.at_level("WARNING", logger="within.postfit.quantize"):
        assert not warn_if_timing_is_noise({"null_speedup_fp32_vs_fp32": 1.03, "speedup": 1.2})
        assert caplog.text == ""
        assert warn_if_timing_is_noise({"null_speedup_fp32_vs_fp32": 3.06, "speedup": 2.9})
    assert "gave a speedup of 3.06" in caplog.text and "OMP_NUM_THREADS" in caplog.text

"""The module specification's components, as it names them (../shared/spec/000_6796e3163a6070f5.txt).

The spec is parsed here: its "**Parameters:**" and "**Methods:**" lists per component. For each
component every listed parameter is a constructor argument and every method exists and takes the
spec's arguments (inspect.signature); each parameter does what the spec says (one behavioural check
per parameter, in MEANINGS); each method is really called once on small inputs (EXERCISES, with a
recorder that fails when a spec method was never called). A component the spec lists that this
file does not cover fails `test_every_spec_component_is_covered`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from torch import nn

from tests.conftest import ROOT
from within import AdScorePredictor
from within.calibration import (
    GeospatialCalibrator,
    HierarchicalCalibrator,
    PlattScaling,
    SplineCalibrator,
    TemperatureScaling,
)
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.models.account_health import AccountHealthPredictor
from within.models.anomaly import AnomalyDetector
from within.models.base import BaseMLModel
from within.models.ensemble import CalibratedEnsemble
from within.models.linear import DynamicLinear
from within.models.network import NetworkModel
from within.monitoring.monitor import PerformanceMonitor
from within.nn.attention import CrossModalAttention
from within.nn.dropout import AdaptiveDropout
from within.nn.extractor import MultiModalFeatureExtractor
from within.nn.noise import QuantumNoiseLayer
from within.nn.predictor import AdPredictorNN
from within.privacy.engine import PrivacyConfigError
from within.privacy.validator import DPTrainingValidator

SPEC_FILE = Path(os.environ.get("WITHIN_SPEC", ROOT.parent / "shared" / "spec" / "000_6796e3163a6070f5.txt"))
# components the spec lists that this file does not check yet (none: all sixteen are covered)
LATER: dict[str, str] = {}
CLASSES: dict[str, type] = {
    "BaseMLModel": BaseMLModel, "AdPredictorNN": AdPredictorNN, "DynamicLinear": DynamicLinear,
    "AdaptiveDropout": AdaptiveDropout, "HierarchicalCalibrator": HierarchicalCalibrator,
    "GeospatialCalibrator": GeospatialCalibrator, "SplineCalibrator": SplineCalibrator,
    "CrossModalAttention": CrossModalAttention, "MultiModalFeatureExtractor": MultiModalFeatureExtractor,
    "QuantumNoiseLayer": QuantumNoiseLayer, "DPTrainingValidator": DPTrainingValidator,
    "CalibratedEnsemble": CalibratedEnsemble, "AdScorePredictor": AdScorePredictor,
    "AnomalyDetector": AnomalyDetector, "AccountHealthPredictor": AccountHealthPredictor,
    "PerformanceMonitor": PerformanceMonitor,
}


# ---- the spec ---------------------------------------------------------------------------------
def _bullets(block: str, heading: str) -> list[str]:
    """The `- ...` lines right after `**heading:**` in a component's block."""
    lines = block.split(f"**{heading}:**", 1)[1].lstrip("\n").splitlines() if f"**{heading}:**" in block else []
    out = []
    for line in lines:
        if not line.startswith("- "):
            break
        out.append(line[2:])
    return out


def parse_spec(text: str) -> dict[str, dict[str, Any]]:
    """{component: {"params": [names], "methods": {name: [argument names]}}} from the spec's markdown."""
    components = {}
    for block in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        name = block.split("\n", 1)[0].strip()
        params = [m.group(1) for b in _bullets(block, "Parameters") if (m := re.match(r"`(\w+)`", b))]
        methods = {}
        for b in _bullets(block, "Methods"):
            m = re.match(r"`(\w+)\(([^)]*)\)`", b)
            if m:
                methods[m.group(1)] = [a.strip() for a in m.group(2).split(",") if a.strip()]
        if params or methods:
            components[name] = {"params": params, "methods": methods}
    return components


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These tensors are tiny: on a shared machine intra-op threads only wait on each other (30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec() -> dict[str, dict[str, Any]]:
    if not SPEC_FILE.is_file():
        pytest.skip(f"module specification not present at {SPEC_FILE} (set WITHIN_SPEC)")
    return parse_spec(SPEC_FILE.read_text())


def _covered(spec: dict, name: str) -> dict:
    if name not in spec:
        pytest.fail(f"{name} is no longer in the spec; drop it from this file")
    return spec[name]


def test_the_parser_reads_the_spec(spec):
    assert len(spec) == 16
    assert spec["DynamicLinear"]["params"] == ["n_features", "regularization", "alpha", "time_decay"]
    assert spec["GeospatialCalibrator"]["methods"]["transform"] == ["X", "regions"]
    assert spec["SplineCalibrator"]["methods"]["plot_calibration_curve"] == []


def test_every_spec_component_is_covered(spec):
    uncovered = sorted(set(spec) - set(CLASSES) - set(LATER))
    assert not uncovered, f"the spec lists {uncovered}, which this file does not check"
    assert set(MEANINGS) == set(EXERCISES) == set(CLASSES)


@pytest.mark.parametrize("name", sorted(LATER) or ["-"])
def test_later_components(name, spec):
    if name == "-":
        return
    assert name in spec
    pytest.skip(f"{name}: {LATER[name]}")


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_spec_parameter_is_a_constructor_argument(name, spec):
    params = inspect.signature(CLASSES[name].__init__).parameters
    missing = [p for p in _covered(spec, name)["params"] if p not in params]
    assert not missing, f"{name}({', '.join(params)}) lacks the spec's {missing}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_spec_method_exists_and_takes_the_spec_arguments(name, spec):
    cls = CLASSES[name]
    for method, args in _covered(spec, name)["methods"].items():
        assert callable(getattr(cls, method, None)), f"{name}.{method} does not exist"
        params = [p for p in inspect.signature(getattr(cls, method)).parameters.values() if p.name != "self"]
        names = [p.name for p in params]
        assert not [a for a in args if a not in names], f"{name}.{method}({', '.join(names)}) lacks {args}"
        required = [p.name for p in params if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        assert set(required) <= set(args), f"{name}.{method} also requires {sorted(set(required) - set(args))}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_spec_parameter_has_a_meaning_check(name, spec):
    assert sorted(MEANINGS[name]) == sorted(_covered(spec, name)["params"])


# ---- recording that a spec method was called --------------------------------------------------
@contextlib.contextmanager
def recording(monkeypatch: pytest.MonkeyPatch, cls: type, names: list[str]):
    """Wrap cls's methods `names` (on the class, so copies and subclass calls count) and yield the set
    of those called."""
    called: set[str] = set()
    for name in names:
        static = inspect.getattr_static(cls, name)
        if isinstance(static, classmethod):
            func = static.__func__

            def wrapped(klass, *a, _n=name, _f=func, **kw):
                called.add(_n)
                return _f(klass, *a, **kw)

            monkeypatch.setattr(cls, name, classmethod(wrapped))
        else:
            func = getattr(cls, name)

            def wrapped(self, *a, _n=name, _f=func, **kw):
                called.add(_n)
                return _f(self, *a, **kw)

            monkeypatch.setattr(cls, name, wrapped)
    yield called


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_spec_method_runs(name, spec, monkeypatch, tmp_path):
    target, exercise = EXERCISES[name]
    methods = list(_covered(spec, name)["methods"])
    with recording(monkeypatch, target, methods) as called:
        exercise(tmp_path)
    assert not set(methods) - called, f"{name}: spec methods never called: {sorted(set(methods) - called)}"


# ---- shared small data ------------------------------------------------------------------------
D = 2**10


def sparse_stream(n: int, seed: int = 0, flip_at: int | None = None, card: int = 20):
    """Hashed one-hot rows (6 fields) with a logistic truth that flips sign at `flip_at`."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, card, (n, 6))
    logit = np.random.default_rng(9).normal(0, 1.0, (6, card))[np.arange(6), codes].sum(1) - 1.0
    if flip_at is not None:
        logit[flip_at:] = -logit[flip_at:] - 2.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    cols = np.sort((np.arange(6) * card + codes) * 7 % D, axis=1)
    X = sp.csr_matrix((np.ones(n * 6), cols.ravel(), np.arange(0, n * 6 + 1, 6)), shape=(n, D))
    X.sum_duplicates()
    return X, y


@functools.lru_cache(maxsize=1)
def hierarchy_data(n: int = 6000):
    """Logits, labels and account/campaign groups whose offsets the global map cannot see."""
    rng = np.random.default_rng(1)
    acc = rng.integers(0, 6, n)
    camp = rng.integers(0, 3, n)
    off = rng.normal(0, 0.8, 6)[acc] + rng.normal(0, 0.5, (6, 3))[acc, camp]
    s = rng.normal(-2.0, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(s + off)))).astype(float)
    return s, y, {"account": acc, "campaign": camp}


@functools.lru_cache(maxsize=1)
def geo_data(n: int = 6000):
    """Cities in two states; city 'c5' is tiny and sits next to 'c4'; each city has its own offset."""
    rng = np.random.default_rng(2)
    cities = np.array(["c0", "c1", "c2", "c3", "c4", "c5"])
    state = np.array(["s0", "s0", "s0", "s1", "s1", "s1"])
    lat = np.array([40.0, 41.0, 42.0, 30.0, 31.0, 31.05])
    lon = np.array([-70.0, -71.0, -72.0, -90.0, -91.0, -91.05])
    share = np.array([0.2, 0.2, 0.2, 0.2, 0.19, 0.01])
    idx = rng.choice(6, n, p=share)
    offset = np.array([0.6, 0.0, -0.6, 0.9, 0.9, -0.9])[idx]
    s = rng.normal(-2.0, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(s + offset)))).astype(float)
    regions = {"country": np.full(n, "US"), "state": state[idx], "city": cities[idx],
               "latitude": lat[idx], "longitude": lon[idx]}
    return s, y, regions


def tabular_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "c": rng.choice(list("abcd"), n),
                       "headline": rng.choice(["free shipping today", "cheap flights", "new shoes sale"], n)})
    logit = 1.5 * df.x1 - df.x2 + (df.c == "a") * 1.0 - 1.0
    df["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return df


TAB_SPEC = {"label": "clicked", "fields": [{"name": "x1", "type": "numeric"}, {"name": "x2", "type": "numeric"},
                                          {"name": "c", "type": "categorical"}]}


@functools.lru_cache(maxsize=1)
def members() -> tuple[pd.DataFrame, tuple[NetworkModel, ...]]:
    """Three fitted network predictors (FeatureProcessor + AdPredictorNN, 60 full-batch Adam steps each)."""
    df = tabular_frame(3000)
    proc = FeatureProcessor(FeatureSpec.from_config(TAB_SPEC)).fit(df.iloc[:2000])
    arrays = proc.transform(df.iloc[:2000])
    batch = {k: torch.as_tensor(v) for k, v in arrays.items()}
    y = torch.tensor(df.clicked.to_numpy()[:2000], dtype=torch.float32)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = AdPredictorNN(proc.input_dim, hidden_dims=[8], dropout_rate=0.0, use_cross_modal=False)
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(net(batch), y).backward()
            opt.step()
        out.append(NetworkModel(processor=proc, net=net))
    return df, tuple(out)


NET_DIM = {"n_num": 3, "cat_cardinalities": [6, 5], "text_fields": 1, "text_buckets": 64}


def net(**kw) -> AdPredictorNN:
    torch.manual_seed(0)
    return AdPredictorNN(NET_DIM, **{"hidden_dims": [16], "attention_heads": 2, "attention_dim": 8,
                                     "text_dim": 8, "tabular_dim": 8, **kw})


def batch(b: int = 64) -> dict[str, torch.Tensor]:
    return AdPredictorNN.example_batch(NET_DIM, b)


def zero_share(x: torch.Tensor) -> float:
    return float((x == 0).float().mean())


# ---- BaseMLModel ------------------------------------------------------------------------------
def _base_round_trip(tmp_path, **kw) -> BaseMLModel:
    X, y = sparse_stream(500)
    model = DynamicLinear(n_features=D, **kw).fit(X, y)
    return BaseMLModel.load(model.save(tmp_path / "m"))


def base_model_name(tmp_path):
    assert _base_round_trip(tmp_path, model_name="ctr_v2").model_name == "ctr_v2"  # the identifier is kept


def base_feature_names(tmp_path):
    names = [f"hash_{i}" for i in range(3)]
    assert _base_round_trip(tmp_path, feature_names=names).feature_names == names


def base_model_version(tmp_path):
    assert _base_round_trip(tmp_path, model_version="2.1.0").model_version == "2.1.0"


def base_metadata(tmp_path):
    assert _base_round_trip(tmp_path, metadata={"owner": "ads"}).metadata == {"owner": "ads"}


def exercise_base(tmp_path):
    X, y = sparse_stream(1200)
    model: BaseMLModel = DynamicLinear(n_features=D, alpha=1e-5)
    assert model.fit(X[:1000], y[:1000]) is model
    p = model.predict(X[1000:])
    assert isinstance(p, np.ndarray) and p.shape == (200,) and np.all((p > 0) & (p < 1))
    metrics = model.validate(X[1000:], y[1000:])
    assert metrics["auc"] > 0.7 and {"logloss", "ece"} <= set(metrics)
    path = model.save(tmp_path / "bundle")
    again = model.load(path)
    np.testing.assert_array_equal(again.predict(X[1000:]), p)


# ---- AdPredictorNN ----------------------------------------------------------------------------
def nn_input_dim(tmp_path):
    model = net()
    assert model(batch(4)).shape == (4,)
    bad = batch(4)
    bad["num"] = torch.randn(4, 5)  # 5 numeric columns where input_dim says 3
    with pytest.raises(ValueError, match=r"batch\['num'\] must have shape \[B, 3\]"):
        model(bad)


def nn_hidden_dims(tmp_path):
    widths = [m.out_features for m in net(hidden_dims=[16, 8]).tower if isinstance(m, nn.Linear)]
    assert widths == [16, 8]


def nn_dropout_rate(tmp_path):
    shares = {}
    for rate in (0.1, 0.6):
        model = net(dropout_rate=rate).train()
        drop = next(m for m in model.tower if isinstance(m, nn.Dropout))
        out = {}
        drop.register_forward_hook(lambda _m, _i, o, out=out: out.update(x=o))
        model(batch(256))
        shares[rate] = zero_share(out["x"])
    assert shares[0.6] > shares[0.1] + 0.15  # more zeros in train mode (ReLU zeros are in both)


def nn_enable_quantum_noise(tmp_path):
    x = batch(32)
    for enabled, differs in ((True, True), (False, False)):
        model = net(enable_quantum_noise=enabled, dropout_rate=0.0, noise={"noise_intensity": 0.5}).train()
        assert any(isinstance(m, QuantumNoiseLayer) for m in model.modules()) == enabled
        assert (not torch.equal(model(x), model(x))) == differs  # noise: two passes differ


def nn_use_cross_modal(tmp_path):
    with_attn, without = net(use_cross_modal=True), net(use_cross_modal=False)
    assert with_attn.fused_dim == without.fused_dim + 8  # the attention's output joins the tower input
    assert with_attn.attention_weights(batch(4)).shape == (4, 2, 2)
    with pytest.raises(RuntimeError, match="use_cross_modal=True"):
        without.attention_weights(batch(4))


@torch.no_grad()
def exercise_nn(tmp_path):
    model = net().eval()
    x = batch(16)
    logits = model.forward(x)
    assert logits.shape == (16,) and logits.dtype == torch.float32
    assert model.feature_extraction(x).shape == (16, model.fused_dim)
    w = model.attention_weights(x)
    assert w.shape == (16, 2, 2) and torch.all(w.sum(-1) <= 1 + 1e-5)  # tabular and text
    torch.testing.assert_close(model.fuse_bn()(x), logits, rtol=1e-4, atol=1e-5)
    q = model.quantize()(x)
    assert q.shape == (16,) and np.corrcoef(q.numpy(), logits.numpy())[0, 1] > 0.95


# ---- DynamicLinear ----------------------------------------------------------------------------
def dl_n_features(tmp_path):
    model = DynamicLinear(n_features=D)
    assert model.get_coefficients().shape == (D,)
    with pytest.raises(ValueError, match=f"n_features={D}"):
        model.fit_incremental(sp.csr_matrix((2, D + 1)), [0, 1])


def dl_regularization(tmp_path):
    X, y = sparse_stream(4000)
    nonzero = {r: np.count_nonzero(DynamicLinear(n_features=D, regularization=r, alpha=1e-3).fit(X, y)
                                   .get_coefficients()) for r in ("l1", "elastic", "l2")}
    assert nonzero["l1"] < nonzero["elastic"] < nonzero["l2"]  # the L1 share zeroes weights


def dl_alpha(tmp_path):
    X, y = sparse_stream(4000)
    nonzero = [np.count_nonzero(DynamicLinear(n_features=D, alpha=a).fit(X, y).get_coefficients())
               for a in (1e-5, 1e-3, 1e-2)]
    assert nonzero[0] > nonzero[1] > nonzero[2]  # higher alpha -> fewer nonzero weights


def dl_time_decay(tmp_path):
    X, y = sparse_stream(9000, flip_at=5000)
    auc = {}
    for decay in (1.0, 0.998):
        model = DynamicLinear(n_features=D, alpha=1e-5, time_decay=decay, batch_size=100)
        model.fit_incremental(X[:7000], y[:7000])
        auc[decay] = roc_auc_score(y[7000:], model.predict(X[7000:]))
    assert auc[0.998] > auc[1.0] + 0.05, auc  # forgetting the old regime tracks the new one


def exercise_dl(tmp_path):
    X, y = sparse_stream(3000)
    model = DynamicLinear(n_features=D, regularization="elastic", alpha=1e-5)
    model.fit_incremental(X[:1500], y[:1500])
    model.fit_incremental(X[1500:2500], y[1500:2500])
    assert model.rows_seen == 2500
    p = model.predict(X[2500:])
    assert roc_auc_score(y[2500:], p) > 0.8
    w = model.get_coefficients()
    assert isinstance(w, np.ndarray) and np.count_nonzero(w) > 10
    removed = model.sparsify()
    assert 0 < removed < np.count_nonzero(w)
    idx = np.flatnonzero(model.get_coefficients())[:3]
    model.reset_features(idx)
    assert np.all(model.get_coefficients()[idx] == 0)
    np.testing.assert_array_equal(model.predict_logits(X[:5]), model.decision_function(X[:5]))


# ---- AdaptiveDropout --------------------------------------------------------------------------
def ad_p(tmp_path):
    drop = AdaptiveDropout(p=0.3).train()
    assert drop.get_current_rate("text") == pytest.approx(0.3)
    assert zero_share(drop(torch.ones(40_000))) == pytest.approx(0.3, abs=0.015)


def ad_momentum(tmp_path):
    gaps = {}
    for m in (0.0, 0.9):
        drop = AdaptiveDropout(momentum=m)
        drop.update_rate(train_loss=0.5, val_loss=0.5)
        drop.update_rate(train_loss=0.5, val_loss=1.5)  # the gap jumps from 0 to 1
        gaps[m] = float(drop.smoothed_gap)
    assert gaps[0.0] == pytest.approx(1.0) and gaps[0.9] == pytest.approx(0.1)  # high momentum: slow


def ad_window_size(tmp_path):
    rates = {}
    for w in (2, 3):
        drop = AdaptiveDropout(p=0.2, step_size=0.05, window_size=w)
        drop.update_rate([0.01, 10.0, 0.01])  # a noisy stretch of gradients: up
        drop.update_rate([1.0, 1.0])  # calm, but the noisy call is in both windows: up
        rates[w] = drop.update_rate([1.0, 1.0])["text"]
    # by the third call a 2-call window has forgotten the noisy call (rate falls), a 3-call one has not
    assert rates[2] == pytest.approx(0.25) and rates[3] == pytest.approx(0.35)


def ad_adaptive_range(tmp_path):
    drop = AdaptiveDropout(p=0.1, adaptive_range=(0.05, 0.2), step_size=0.05)
    for epoch in range(10):
        drop.update_rate(train_loss=0.5, val_loss=0.5 + 0.1 * epoch)  # a widening gap pushes rates up
    assert all(r == pytest.approx(0.2) for r in drop.get_current_rate().values())


def exercise_ad(tmp_path):
    drop = AdaptiveDropout(p=0.2, step_size=0.05).train()
    x = torch.ones(5000)
    assert zero_share(drop.forward(x)) == pytest.approx(0.2, abs=0.03)
    rates = drop.update_rate({"text": [0.01, 10.0, 0.01]})
    assert rates["text"] == pytest.approx(0.25) and rates["image"] == pytest.approx(0.2)
    assert drop.get_current_rate() == rates
    drop.reset()
    assert drop.get_current_rate("text") == pytest.approx(0.2)


# ---- HierarchicalCalibrator -------------------------------------------------------------------
def hc_hierarchy_levels(tmp_path):
    s, y, g = hierarchy_data()
    h = HierarchicalCalibrator(hierarchy_levels=["account", "campaign"]).fit(s, y, g)
    assert list(h.get_calibration_mapping()["levels"]) == ["account", "campaign"]
    with pytest.raises(ValueError, match="no level 'campaign'"):
        h.transform(s[:3], {"account": g["account"][:3]})


def hc_calibration_method(tmp_path):
    s, y, g = hierarchy_data()
    for method, cls in (("platt", PlattScaling), ("temperature", TemperatureScaling)):
        h = HierarchicalCalibrator(hierarchy_levels=list(g), calibration_method=method).fit(s, y, g)
        assert isinstance(h.base_, cls)


def hc_smoothing(tmp_path):
    s, y, g = hierarchy_data()
    size = {}
    for lam in (1.0, 1000.0):
        h = HierarchicalCalibrator(hierarchy_levels=["account", "campaign"], smoothing=lam).fit(s, y, g)
        size[lam] = np.abs(h.offsets_[1]).mean()  # campaign increments over their account
    assert size[1000.0] < 0.5 * size[1.0]  # stronger smoothing -> closer to the parent


def hc_max_iter(tmp_path):
    s, y, g = hierarchy_data()
    assert HierarchicalCalibrator(hierarchy_levels=list(g), max_iter=1).fit(s, y, g).n_iter_ == 1
    assert HierarchicalCalibrator(hierarchy_levels=list(g), max_iter=4, tol=0.0).fit(s, y, g).n_iter_ == 4


def exercise_hc(tmp_path):
    s, y, g = hierarchy_data()
    h = HierarchicalCalibrator(hierarchy_levels=["account", "campaign"])
    assert h.fit(s, y, g) is h
    p = h.transform(s, g)
    np.testing.assert_array_equal(HierarchicalCalibrator(hierarchy_levels=["account", "campaign"])
                                  .fit_transform(s, y, g), p)
    mapping = h.get_calibration_mapping()
    assert set(mapping) == {"global", "levels"} and len(mapping["levels"]["account"]["groups"]) == 6
    assert (p.mean() - y.mean()) ** 2 < 1e-4


# ---- GeospatialCalibrator ---------------------------------------------------------------------
def gc_geo_level(tmp_path):
    s, y, r = geo_data()
    depth = {lv: {k.count("/") + 1 for k in GeospatialCalibrator(geo_level=lv, seasonal=False)
                  .fit(s, y, regions=r).get_region_factors()} for lv in ("state", "city")}
    assert depth == {"state": {2}, "city": {3}}  # factors per country/state or per country/state/city


def gc_smoothing_neighbors(tmp_path):
    s, y, r = geo_data()

    def tiny(**kw):
        f = GeospatialCalibrator(seasonal=False, **kw).fit(s, y, regions=r).get_region_factors()
        return f["US/s1/c5"]["offset"], f["US/s1/c4"]["offset"]

    own, _ = tiny(min_samples_per_region=0)
    one, neighbour = tiny(min_samples_per_region=2000, smoothing_neighbors=1)
    five, _ = tiny(min_samples_per_region=2000, smoothing_neighbors=5)
    assert abs(one - neighbour) < abs(own - neighbour)  # the sparse city borrows from its neighbour
    assert one != pytest.approx(five)  # and from more of them with more neighbours


def gc_min_samples_per_region(tmp_path):
    s, y, r = geo_data()
    smoothed = {m: {k for k, v in GeospatialCalibrator(min_samples_per_region=m, seasonal=False)
                    .fit(s, y, regions=r).get_region_factors().items() if v["smoothed"]} for m in (0, 500)}
    assert smoothed == {0: set(), 500: {"US/s1/c5"}}  # only the city below 500 impressions


def gc_fallback_strategy(tmp_path):
    s, y, r = geo_data()
    new = {"country": np.array(["US"]), "state": np.array(["s1"]), "city": np.array(["unseen"]),
           "latitude": np.array([31.0]), "longitude": np.array([-91.0])}
    x = np.array([-2.0])
    out = {}
    for fb in ("global", "parent"):
        geo = GeospatialCalibrator(fallback_strategy=fb, seasonal=False).fit(s, y, regions=r)
        out[fb] = float(geo.transform_logit(x, regions=new)[0] - geo.base_.transform_logit(x)[0])
    state_offset = geo.totals_[1][geo.paths_[1].get_indexer([("US", "s1")])[0]]
    assert out["global"] == 0.0 and out["parent"] == pytest.approx(state_offset)


def exercise_gc(tmp_path):
    s, y, r = geo_data()
    geo = GeospatialCalibrator(min_samples_per_region=500)
    assert geo.fit(s, y, regions=r) is geo
    p = geo.transform(s, regions=r)
    assert p.shape == s.shape and abs(p.mean() - y.mean()) < 0.01
    factors = geo.get_region_factors()
    assert len(factors) == 6 and all(v["factor"] == pytest.approx(np.exp(v["offset"])) for v in factors.values())
    assert isinstance(geo.plot_region_map(), Figure)
    assert geo.plot_region_map(tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


# ---- CrossModalAttention ----------------------------------------------------------------------
def ca_modality_dims(tmp_path):
    att = CrossModalAttention({"text": 5, "image": 7}, attention_heads=2, attention_dim=8)
    assert att.encode_modality("image", torch.randn(3, 7)).shape == (3, 8)
    with pytest.raises(RuntimeError):
        att.encode_modality("image", torch.randn(3, 5))  # the text width is not the image's


def ca_attention_heads(tmp_path):
    assert CrossModalAttention({"a": 3, "b": 3}, attention_heads=4, attention_dim=8).attn.num_heads == 4
    with pytest.raises(ValueError, match="attention_dim=10 must be divisible by attention_heads=4"):
        CrossModalAttention({"a": 3}, attention_heads=4, attention_dim=10)


def ca_attention_dim(tmp_path):
    att = CrossModalAttention({"a": 3, "b": 4}, attention_heads=2, attention_dim=12)
    assert att({"a": torch.randn(5, 3), "b": torch.randn(5, 4)}).shape == (5, 12)


def ca_dropout(tmp_path):
    x = {"a": torch.randn(16, 3), "b": torch.randn(16, 4)}
    for rate, differs in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        att = CrossModalAttention({"a": 3, "b": 4}, attention_heads=1, attention_dim=4, dropout=rate).train()
        assert (not torch.equal(att(x), att(x))) == differs  # dropout on the attention weights in training


def exercise_ca(tmp_path):
    att = CrossModalAttention({"text": 4, "image": 6, "tabular": 3}, attention_heads=2, attention_dim=8).eval()
    data = {"text": torch.randn(5, 4), "image": torch.randn(5, 6), "tabular": torch.randn(5, 3)}
    out = att.forward(data)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    w = att.get_attention_weights()
    assert w.shape == (5, 3, 3) and torch.all(w >= 0)
    assert att.encode_modality("text", data["text"]).shape == (5, 8)
    masked = att(data, masks={"image": torch.tensor([True, False, True, True, True])})
    assert torch.isfinite(masked).all() and float(att.get_attention_weights()[1, :, 1].abs().sum()) == 0.0


# ---- MultiModalFeatureExtractor ---------------------------------------------------------------
TEXTS = ["free shipping today", None, "cheap flights to lisbon"]


def mm_text_model(tmp_path):
    assert MultiModalFeatureExtractor(text_model="hashing", image_model=None).process_text(TEXTS).shape == (3, 64)
    with pytest.raises(RuntimeError, match="text_model=None"):
        MultiModalFeatureExtractor(text_model=None, image_model=None).process_text(TEXTS)


def mm_image_model(tmp_path):
    ext = MultiModalFeatureExtractor(text_model=None, image_model="simple_cnn", image_size=16)
    assert ext.process_image(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)).shape == (2, 64)
    with pytest.raises(RuntimeError, match="image_model=None"):
        MultiModalFeatureExtractor(text_model=None, image_model=None).process_image(torch.zeros(1, 3, 16, 16))


def mm_tabular_preprocessor(tmp_path):
    df = tabular_frame(200)
    proc = FeatureProcessor(FeatureSpec.from_config(TAB_SPEC))
    with_proc = MultiModalFeatureExtractor(text_model=None, image_model=None, tabular_preprocessor=proc)
    with_proc.process_tabular(df)
    assert with_proc.selected_cat == [0] and proc.fitted  # the processor's categorical field is encoded
    plain = MultiModalFeatureExtractor(text_model=None, image_model=None)
    plain.process_tabular(df)
    assert plain.selected_cat == [] and plain.tabular_columns == ["x1", "x2", "clicked"]  # numeric columns only


def mm_output_dim(tmp_path):
    ext = MultiModalFeatureExtractor(output_dim=12, image_size=16)
    out = ext.extract_features({"text": TEXTS, "image": torch.zeros(3, 3, 16, 16, dtype=torch.uint8),
                                "tabular": tabular_frame(3)[["x1", "x2"]]})
    assert {out[m].shape for m in ("text", "image", "tabular")} == {(3, 12)}


def exercise_mm(tmp_path):
    ext = MultiModalFeatureExtractor(output_dim=16, image_size=16)
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8), None, np.zeros((3, 20, 20), np.uint8)]
    tab = tabular_frame(3)[["x1", "x2"]]
    out = ext.extract_features({"text": TEXTS, "image": images, "tabular": tab})
    assert out["mask_text"].tolist() == [True, False, True] and out["mask_image"].tolist() == [True, False, True]
    assert torch.all(ext.process_text(TEXTS)[1] == 0)
    assert ext.process_image(images).shape == (3, 16)
    assert ext.process_tabular(tab).shape == (3, 16)


# ---- QuantumNoiseLayer ------------------------------------------------------------------------
def qn_channels(tmp_path):
    layer = QuantumNoiseLayer(channels=6)
    assert layer(torch.randn(2, 6)).shape == (2, 6)
    with pytest.raises(ValueError, match=r"QuantumNoiseLayer\(channels=6\) got input with last dimension 4"):
        layer(torch.randn(2, 4))


def qn_noise_type(tmp_path):
    x = torch.randn(64, 8)

    def pair_norm(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(64, 4, 2).norm(dim=-1)

    phase = QuantumNoiseLayer(8, noise_type="phase", noise_intensity=0.5).train()(x)
    gauss = QuantumNoiseLayer(8, noise_type="gaussian", noise_intensity=0.5).train()(x)
    torch.testing.assert_close(pair_norm(phase), pair_norm(x))  # a phase rotation keeps each pair's norm
    assert not torch.allclose(pair_norm(gauss), pair_norm(x), atol=1e-3)
    assert not torch.allclose(phase, x)


def qn_noise_intensity(tmp_path):
    x = torch.randn(256, 8)
    spread = {s: float((QuantumNoiseLayer(8, noise_type="gaussian", noise_intensity=s).train()(x) - x).std())
              for s in (0.1, 1.0)}
    assert spread[0.1] == pytest.approx(0.1, rel=0.1) and spread[1.0] == pytest.approx(1.0, rel=0.1)


def qn_annealing_schedule(tmp_path):
    levels = {}
    for sched in ("constant", "linear", "cosine"):
        layer = QuantumNoiseLayer(4, noise_intensity=0.4, annealing_schedule=sched, total_steps=100)
        levels[sched] = [layer.update_schedule(t) for t in (0, 50, 100)]
    assert levels["constant"] == pytest.approx([0.4, 0.4, 0.4])
    assert levels["linear"] == pytest.approx([0.4, 0.2, 0.0])
    assert levels["cosine"] == pytest.approx([0.4, 0.2, 0.0], abs=1e-9)


def exercise_qn(tmp_path):
    layer = QuantumNoiseLayer(6, noise_type="multiplicative", noise_intensity=0.3, annealing_schedule="linear",
                              total_steps=10)
    x = torch.randn(4, 6)
    assert not torch.equal(layer.train().forward(x), x) and torch.equal(layer.eval().forward(x), x)
    assert layer.update_schedule(5) == pytest.approx(0.15)
    assert layer.get_current_noise_level() == pytest.approx(0.15)


# ---- SplineCalibrator -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def miscalibrated(n: int = 2000):
    rng = np.random.default_rng(3)
    true = rng.normal(-1.5, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(float)
    return 2.0 * true + 0.5 + 0.3 * np.sin(2 * true), y  # over-confident and bent


def sc_n_knots(tmp_path):
    s, y = miscalibrated()
    knots = SplineCalibrator(n_knots=7, knot_spacing="uniform").fit(s, y).get_spline_parameters()["splines"][0]["knots"]
    assert len(knots) == 7


def sc_knot_spacing(tmp_path):
    s, y = miscalibrated()
    uni = SplineCalibrator(n_knots=6, knot_spacing="uniform").fit(s, y).get_spline_parameters()["splines"][0]["knots"]
    qua = SplineCalibrator(n_knots=6, knot_spacing="quantile").fit(s, y).get_spline_parameters()["splines"][0]["knots"]
    np.testing.assert_allclose(np.diff(uni), np.diff(uni)[0])  # equal steps in the logit
    np.testing.assert_allclose(qua[1:-1], np.quantile(s, np.linspace(0, 1, 6)[1:-1]))  # equal mass


def sc_spline_order(tmp_path):
    s, y = miscalibrated()
    cal = SplineCalibrator(n_knots=5, knot_spacing="uniform", spline_order=1, regularization=0.0).fit(s, y)
    knots = np.asarray(cal.get_spline_parameters()["splines"][0]["knots"])
    grid = np.linspace(knots[1] + 1e-3, knots[2] - 1e-3, 9)
    assert np.abs(np.diff(cal.transform_logit(grid), 2)).max() < 1e-9  # order 1: straight between knots
    cubic = SplineCalibrator(n_knots=5, knot_spacing="uniform", spline_order=3, regularization=0.0).fit(s, y)
    assert cubic.get_spline_parameters()["splines"][0]["order"] == 3
    assert np.abs(np.diff(cubic.transform_logit(grid), 2)).max() > 1e-9


def sc_regularization(tmp_path):
    s, y = miscalibrated()
    bend = {lam: np.linalg.norm(SplineCalibrator(regularization=lam).fit(s, y).get_spline_parameters()
                                ["splines"][0]["ispline_coef"]) for lam in (1e-4, 10.0)}
    assert bend[10.0] < 0.2 * bend[1e-4]  # stronger -> closer to the affine (Platt) map


def exercise_sc(tmp_path):
    s, y = miscalibrated()
    cal = SplineCalibrator()
    assert cal.fit(s, y) is cal
    p = cal.transform(s)
    assert np.all(np.diff(p[np.argsort(s)]) >= 0)  # order kept
    params = cal.get_spline_parameters()
    assert params["ks_error"] < params["ks_error_before"]
    assert isinstance(cal.plot_calibration_curve(), Figure)


# ---- DPTrainingValidator ----------------------------------------------------------------------
PARAMS = {"n_train": 10_000, "sample_rate": 0.01, "planned_steps": 500, "poisson_sampling": True}


def validator(**kw) -> DPTrainingValidator:
    # the RDP accountant: the same meanings as PRV, a fraction of its time
    return DPTrainingValidator(**{"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.0,
                                  "accountant": "rdp", **kw})


def dp_epsilon(tmp_path):
    assert validator(epsilon=3.0).validate_training_params(PARAMS)["projected_epsilon"] <= 3.0
    with pytest.raises(PrivacyConfigError, match="privacy.target_epsilon=0.5"):
        validator(epsilon=0.5).validate_training_params(PARAMS)  # the budget caps the planned steps


def dp_delta(tmp_path):
    eps = {}
    for d in (1e-5, 1e-7):
        v = validator(delta=d)
        v.validate_training_params(PARAMS)
        eps[d] = v.track_privacy_budget(500)["projected_epsilon"]
    assert eps[1e-7] > eps[1e-5]  # a smaller failure probability costs epsilon
    with pytest.raises(PrivacyConfigError, match="target_delta=0.001 must be in"):
        validator(delta=1e-3).validate_training_params(PARAMS)


def dp_max_grad_norm(tmp_path):
    v = validator(max_grad_norm=0.5)
    v.validate_training_params(PARAMS)
    assert v.generate_privacy_report()["max_grad_norm"] == 0.5
    with pytest.raises(PrivacyConfigError, match="privacy.max_grad_norm=inf: per-sample clipping"):
        validator(max_grad_norm=float("inf")).validate_training_params(PARAMS)


def dp_noise_multiplier(tmp_path):
    eps = {}
    for sigma in (0.8, 2.0):
        v = validator(noise_multiplier=sigma, epsilon=None)
        v.validate_training_params(PARAMS)
        eps[sigma] = v.track_privacy_budget(500)["projected_epsilon"]
    assert eps[2.0] < 0.5 * eps[0.8]  # more noise, less epsilon


def exercise_dp(tmp_path):
    from within.privacy.engine import make_private

    v = validator(epsilon=None)
    checked = v.validate_training_params(PARAMS)
    assert checked["n_train"] == 10_000
    budget = v.track_privacy_budget(100)
    assert budget["epsilon"] == 0.0 and budget["projected_epsilon"] > 0
    model = nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3)), batch_size=2)
    pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0,
                      max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=2, delta=1e-5,
                      grad_sample_mode="hooks")
    audit = v.audit_model(model, pt.optimizer, pt.hooks)
    assert "per-sample gradient hooks" in audit["structure_checks"] and audit["leakage_audit"] == "not run"
    report = v.generate_privacy_report(tmp_path)
    assert report["status"] == "planned" and (tmp_path / "privacy.json").is_file()


# ---- CalibratedEnsemble -----------------------------------------------------------------------
def ce_base_models(tmp_path):
    df, ms = members()
    ens = CalibratedEnsemble(list(ms), aggregation_method="mean")
    np.testing.assert_allclose(ens.predict_logits(df[:50]), np.mean([m.predict_logits(df[:50]) for m in ms], axis=0))


def ce_weights(tmp_path):
    df, ms = members()
    ens = CalibratedEnsemble(list(ms[:2]), weights=[3.0, 1.0], aggregation_method="weighted")
    a, b = (m.predict_logits(df[:50]) for m in ms[:2])
    np.testing.assert_allclose(ens.predict_logits(df[:50]), 0.75 * a + 0.25 * b)


def ce_calibration_method(tmp_path):
    df, ms = members()
    assert isinstance(CalibratedEnsemble(list(ms), calibration_method="platt").calibrate(df[2000:]).calibrator,
                      PlattScaling)
    raw = CalibratedEnsemble(list(ms), calibration_method="none").calibrate(df[2000:])
    np.testing.assert_allclose(raw.predict(df[:20]), 1 / (1 + np.exp(-raw.predict_logits(df[:20]))))


def ce_aggregation_method(tmp_path):
    df, ms = members()
    logits = np.stack([m.predict_logits(df[:50]) for m in ms], axis=1)
    med = CalibratedEnsemble(list(ms), aggregation_method="median").predict_logits(df[:50])
    np.testing.assert_allclose(med, np.median(logits, axis=1))  # robust: the middle member per row


def exercise_ce(tmp_path):
    df, ms = members()
    ens = CalibratedEnsemble(list(ms[:2]))
    assert ens.add_model(ms[2], 2.0) is ens and len(ens.base_models) == 3
    np.testing.assert_allclose(ens.get_model_weights(), [0.25, 0.25, 0.5])
    assert ens.remove_model(2) is ms[2]
    val, test = df.iloc[2000:2600], df.iloc[2600:]
    assert ens.calibrate(val, val["clicked"]) is ens and isinstance(ens.calibrator, TemperatureScaling)
    p = ens.predict(test)
    assert p.shape == (len(test),) and roc_auc_score(test["clicked"], p) > 0.75


# ---- registries -------------------------------------------------------------------------------
# ---- AdScorePredictor (the facade: fits through the pipeline; model_type="linear" keeps it fast) --------
FACADE_FEATURES = {"text_features": ["headline"], "numerical_features": ["budget", "bid"],
                   "categorical_features": ["placement", "device"]}
FACADE_QUICK = ["logger=none", "trainer.max_epochs=1", "data.batch_size=512", "quantize.repeats=1",
                "export.check_rows=32", "explain.reference_rows=64"]


@functools.lru_cache(maxsize=None)
def facade_rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    from within.data.simulator import simulate

    return simulate(n=3000, seed=31), simulate(n=1500, seed=31, sample_seed=7)


@functools.lru_cache(maxsize=None)
def fitted_facade(model_type: str = "linear", calibration: bool = True, explainable: bool = True,
                  uncertainty: bool = True, features: str = "default") -> AdScorePredictor:
    config = FACADE_FEATURES if features == "default" else {"numerical_features": ["bid"],
                                                            "categorical_features": ["placement"]}
    extra = ["model.net.hidden_dims=[8]"] if model_type == "nn" else []
    out = Path(tempfile.mkdtemp(prefix="seed_api_facade_"))
    return AdScorePredictor(feature_config=config, model_type=model_type, calibration=calibration,
                            explainable=explainable, uncertainty=uncertainty,
                            train_overrides=FACADE_QUICK + extra).fit(facade_rows()[0], output_dir=out)


def asp_feature_config(tmp_path):
    small = fitted_facade(features="small")
    assert {f.name: f.type for f in small.spec.fields} == {"bid": "numeric", "placement": "categorical"}


def asp_model_type(tmp_path):
    assert isinstance(fitted_facade().model, DynamicLinear)
    nn_model = fitted_facade(model_type="nn").model
    assert type(nn_model).__name__ == "NetworkModel" and nn_model.net is not None


def asp_calibration(tmp_path):
    rows = facade_rows()[1].iloc[:200]
    raw = {c: 1 / (1 + np.exp(-fitted_facade(calibration=c).predict_logits(rows))) for c in (True, False)}
    assert not np.allclose(fitted_facade().predict(rows), raw[True])  # calibrated: not the raw sigmoid
    np.testing.assert_allclose(fitted_facade(calibration=False).predict(rows), raw[False], atol=1e-12)


def asp_explainable(tmp_path):
    ad = facade_rows()[0].iloc[0][list(sum(FACADE_FEATURES.values(), []))].to_dict()
    assert set(fitted_facade().explain(ad)["attributions"]) == {"headline", "budget", "bid", "placement", "device"}
    with pytest.raises(RuntimeError, match="explainable=True"):
        fitted_facade(explainable=False).explain(ad)


def asp_uncertainty(tmp_path):
    ad = facade_rows()[0].iloc[0].to_dict()
    score, lo, hi = fitted_facade().predict_with_intervals(ad)
    assert lo <= score <= hi
    with pytest.raises(RuntimeError, match="uncertainty=True"):
        fitted_facade(uncertainty=False).predict_with_intervals(ad)


def exercise_asp(tmp_path):
    base = fitted_facade()
    predictor = AdScorePredictor.load(base.run_dir / "bundle")  # its own copy: update replaces the model
    rows, new = facade_rows()
    ad = rows.iloc[0].to_dict()
    assert isinstance(predictor.predict(ad), float)
    score, lo, hi = predictor.predict_with_intervals(ad)
    assert lo <= score <= hi
    assert predictor.explain(ad)["modalities"].keys() == {"text", "tabular"}
    importance = predictor.get_feature_importance()
    assert set(importance["fields"]) == {"headline", "budget", "bid", "placement", "device"}
    seen = predictor.model.rows_seen
    predictor.update(new, output_dir=tmp_path / "update")
    assert predictor.model.rows_seen > seen and predictor.versions[-1]["kind"] == "update"


# ---- AnomalyDetector --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def perf_world() -> tuple[pd.DataFrame, pd.DataFrame]:
    from within.data.performance import generate_performance
    from within.data.simulator import AdMarketSimulator

    return generate_performance(AdMarketSimulator(seed=3, n_accounts=6), days=90, n_anomalies=3, pilot_rows=30_000)


def _detected(**kw) -> list[dict]:
    series, _ = perf_world()
    return AnomalyDetector(**{"dimensions": ["clicks", "ctr"], "baseline_window": 28, **kw}).detect_anomalies(series)


def anomaly_detection_method(tmp_path):
    z = [(a["start"], round(a["score"], 6)) for a in _detected(sensitivity=0.99)]
    f = [(a["start"], round(a["score"], 6)) for a in _detected(detection_method="isolation_forest", sensitivity=0.99)]
    assert z != f  # another detector scores the same series differently
    with pytest.raises(ValueError, match="detection_method"):
        AnomalyDetector(detection_method="crystal_ball")


def anomaly_sensitivity(tmp_path):
    assert len(_detected(sensitivity=0.999)) >= len(_detected(sensitivity=0.9))  # higher flags more


def anomaly_dimensions(tmp_path):
    found = _detected(dimensions=["ctr"], sensitivity=0.99)
    assert found and {a["dimension"] for a in found} == {"ctr"}


def anomaly_baseline_window(tmp_path):
    rng = np.random.default_rng(0)
    days = pd.date_range("2024-01-01", periods=150, freq="D")
    clicks = rng.poisson(np.where(np.arange(150) >= 100, 900, 600))  # a lasting +50% level shift on day 100
    frame = pd.DataFrame({"timestamp": days, "account_id": "acc_1", "clicks": clicks})

    def flagged_days(window: int) -> float:
        found = AnomalyDetector(dimensions=["clicks"], baseline_window=window, season="none",
                                sensitivity=0.9).detect_anomalies(frame)
        return sum((pd.to_datetime(a["end"]) - pd.to_datetime(a["start"])).days + 1 for a in found
                   if pd.to_datetime(a["start"]) >= days[100])

    # the baseline is the last `baseline_window` periods: a short one absorbs the new level sooner
    assert flagged_days(60) > flagged_days(10)


def exercise_anomaly(tmp_path):
    series, _ = perf_world()
    cut = pd.to_datetime(series["timestamp"]).min() + pd.Timedelta(days=60)
    early, late = series[pd.to_datetime(series["timestamp"]) < cut], series[pd.to_datetime(series["timestamp"]) >= cut]
    det = AnomalyDetector(dimensions=["clicks", "ctr"], baseline_window=28, sensitivity=0.99).fit(early)
    det.update_baseline(late)
    found = det.detect_anomalies(series)
    assert found and {"id", "dimension", "direction", "score", "severity"} <= set(found[0])
    why = det.explain_anomaly(found[0]["id"])
    assert why["segments"] or why["dimensions"]
    row = series.iloc[-1].to_dict()
    assert 0.0 <= det.get_anomaly_score(row) <= 1.0


# ---- AccountHealthPredictor -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def churn_panel() -> pd.DataFrame:
    from within.data.accounts import AccountChurnSimulator
    from within.data.simulator import AdMarketSimulator

    return AccountChurnSimulator(AdMarketSimulator(seed=5, n_accounts=200), months=12).panel()


HEALTH = ["spend_trend", "ctr_trend", "support_tickets", "days_since_last_launch", "budget_utilization"]


@functools.lru_cache(maxsize=None)
def fitted_health(model_type: str = "logistic", time_window: int = 3) -> AccountHealthPredictor:
    panel = churn_panel()
    return AccountHealthPredictor(HEALTH, model_type=model_type, time_window=time_window,
                                  period_column="month").fit(panel, panel["churned"].to_numpy())


def health_indicators(tmp_path):
    factors = fitted_health().get_contributing_factors(churn_panel()["account_id"].iloc[0])
    assert {f["indicator"] for f in factors} <= set(HEALTH)


def health_risk_thresholds(tmp_path):
    panel = churn_panel()
    strict = AccountHealthPredictor(HEALTH, risk_thresholds={"critical": 99.9, "high": 99.95, "medium": 99.99},
                                    model_type="logistic").fit(panel, panel["churned"].to_numpy())
    assert (strict.predict_health(panel.iloc[:50])["risk_level"] != "low").all()  # the thresholds set the levels


def health_time_window(tmp_path):
    panel = churn_panel()
    warn = {w: fitted_health(time_window=w).early_warning(panel) for w in (2, 6)}
    assert not warn[2]["drop"].equals(warn[6]["drop"])  # the trend is measured over time_window periods


def health_model_type(tmp_path):
    panel = churn_panel().iloc[:400]
    p = {t: fitted_health(model_type=t).predict_churn_risk(panel) for t in ("logistic", "gbm")}
    assert not np.allclose(p["logistic"], p["gbm"])


def exercise_health(tmp_path):
    model, panel = fitted_health(), churn_panel()
    health = model.predict_health(panel.iloc[:20])
    assert health["health"].between(0, 100).all() and set(health["risk_level"]) <= {"critical", "high", "medium", "low"}
    p = model.predict_churn_risk(panel.iloc[:20])
    assert np.all((p > 0) & (p < 1))
    account = panel["account_id"].iloc[0]
    assert model.get_contributing_factors(account)
    actions = model.recommend_actions(account)
    assert all({"expected_effect", "evidence"} <= set(a) for a in actions)


# ---- PerformanceMonitor -----------------------------------------------------------------------
def _stream(n: int, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.2, n)
    y = (rng.random(n) < np.clip(p * (1 + shift), 0, 1)).astype(float)
    return p, y


def pm_metrics(tmp_path):
    mon = PerformanceMonitor(metrics=["auc"], window_size=500)
    mon.log_prediction(*_stream(500))
    now = mon.get_current_metrics()
    assert "auc" in now and "logloss" not in now


def pm_window_size(tmp_path):
    mon = PerformanceMonitor(window_size=300)
    mon.log_prediction(*_stream(1000))
    assert mon.get_current_metrics()["rows"] == 300 and mon.complete_windows == 3


def pm_alert_threshold(tmp_path):
    fired = {}
    for threshold in (1e-6, 0.2):
        mon = PerformanceMonitor(window_size=2000, alert_threshold=threshold)
        mon.log_prediction(*_stream(2000))
        mon.log_prediction(*_stream(2000, shift=0.25, seed=1))
        fired[threshold] = len(mon.detect_drift(emit=False).fired)
    assert fired[0.2] >= fired[1e-6]  # a looser false-alarm level fires at least as often


def pm_baseline_model(tmp_path):
    class Half:
        def predict(self, X):
            return np.full(len(X), 0.5)

    mon = PerformanceMonitor(window_size=400, baseline_model=Half())
    p, y = _stream(400)
    mon.log_prediction(p, y, features=pd.DataFrame({"x": np.arange(400.0)}))
    now = mon.get_current_metrics()
    assert now["baseline/logloss"] > now["logloss"]  # compared against the baseline on the same rows


def exercise_pm(tmp_path):
    mon = PerformanceMonitor(window_size=3000, storage=tmp_path / "monitor.db")
    p, y = _stream(3000)
    for i in range(5):
        mon.log_prediction(float(p[i]), float(y[i]))
    mon.log_prediction(p[5:], y[5:])
    mon.log_prediction(*_stream(3000, shift=1.0, seed=2))  # the click rate doubles
    assert mon.get_current_metrics()["rows"] == 3000
    assert mon.detect_drift().drifted
    report = mon.generate_report(tmp_path / "report")
    assert (tmp_path / "report" / "report.md").is_file() and report
    mon.reset()
    assert mon.get_current_metrics()["rows"] == 0


MEANINGS: dict[str, dict[str, Callable[[Path], None]]] = {
    "BaseMLModel": {"model_name": base_model_name, "feature_names": base_feature_names,
                    "model_version": base_model_version, "metadata": base_metadata},
    "AdPredictorNN": {"input_dim": nn_input_dim, "hidden_dims": nn_hidden_dims, "dropout_rate": nn_dropout_rate,
                      "enable_quantum_noise": nn_enable_quantum_noise, "use_cross_modal": nn_use_cross_modal},
    "DynamicLinear": {"n_features": dl_n_features, "regularization": dl_regularization, "alpha": dl_alpha,
                      "time_decay": dl_time_decay},
    "AdaptiveDropout": {"p": ad_p, "momentum": ad_momentum, "window_size": ad_window_size,
                        "adaptive_range": ad_adaptive_range},
    "HierarchicalCalibrator": {"hierarchy_levels": hc_hierarchy_levels, "calibration_method": hc_calibration_method,
                               "smoothing": hc_smoothing, "max_iter": hc_max_iter},
    "GeospatialCalibrator": {"geo_level": gc_geo_level, "smoothing_neighbors": gc_smoothing_neighbors,
                             "min_samples_per_region": gc_min_samples_per_region,
                             "fallback_strategy": gc_fallback_strategy},
    "CrossModalAttention": {"modality_dims": ca_modality_dims, "attention_heads": ca_attention_heads,
                            "attention_dim": ca_attention_dim, "dropout": ca_dropout},
    "MultiModalFeatureExtractor": {"text_model": mm_text_model, "image_model": mm_image_model,
                                   "tabular_preprocessor": mm_tabular_preprocessor, "output_dim": mm_output_dim},
    "QuantumNoiseLayer": {"channels": qn_channels, "noise_type": qn_noise_type, "noise_intensity": qn_noise_intensity,
                          "annealing_schedule": qn_annealing_schedule},
    "SplineCalibrator": {"n_knots": sc_n_knots, "knot_spacing": sc_knot_spacing, "spline_order": sc_spline_order,
                         "regularization": sc_regularization},
    "DPTrainingValidator": {"epsilon": dp_epsilon, "delta": dp_delta, "max_grad_norm": dp_max_grad_norm,
                            "noise_multiplier": dp_noise_multiplier},
    "CalibratedEnsemble": {"base_models": ce_base_models, "weights": ce_weights,
                           "calibration_method": ce_calibration_method, "aggregation_method": ce_aggregation_method},
    "AdScorePredictor": {"feature_config": asp_feature_config, "model_type": asp_model_type,
                         "calibration": asp_calibration, "explainable": asp_explainable,
                         "uncertainty": asp_uncertainty},
    "AnomalyDetector": {"detection_method": anomaly_detection_method, "sensitivity": anomaly_sensitivity,
                        "dimensions": anomaly_dimensions, "baseline_window": anomaly_baseline_window},
    "AccountHealthPredictor": {"indicators": health_indicators, "risk_thresholds": health_risk_thresholds,
                               "time_window": health_time_window, "model_type": health_model_type},
    "PerformanceMonitor": {"metrics": pm_metrics, "window_size": pm_window_size,
                           "alert_threshold": pm_alert_threshold, "baseline_model": pm_baseline_model},
}
# (the class whose methods are recorded, the exercise); BaseMLModel's are DynamicLinear's implementations
EXERCISES: dict[str, tuple[type, Callable[[Path], None]]] = {
    "BaseMLModel": (DynamicLinear, exercise_base), "AdPredictorNN": (AdPredictorNN, exercise_nn),
    "DynamicLinear": (DynamicLinear, exercise_dl), "AdaptiveDropout": (AdaptiveDropout, exercise_ad),
    "HierarchicalCalibrator": (HierarchicalCalibrator, exercise_hc),
    "GeospatialCalibrator": (GeospatialCalibrator, exercise_gc),
    "CrossModalAttention": (CrossModalAttention, exercise_ca),
    "MultiModalFeatureExtractor": (MultiModalFeatureExtractor, exercise_mm),
    "QuantumNoiseLayer": (QuantumNoiseLayer, exercise_qn), "SplineCalibrator": (SplineCalibrator, exercise_sc),
    "DPTrainingValidator": (DPTrainingValidator, exercise_dp), "CalibratedEnsemble": (CalibratedEnsemble, exercise_ce),
    "AdScorePredictor": (AdScorePredictor, exercise_asp), "AnomalyDetector": (AnomalyDetector, exercise_anomaly),
    "AccountHealthPredictor": (AccountHealthPredictor, exercise_health),
    "PerformanceMonitor": (PerformanceMonitor, exercise_pm),
}


@pytest.mark.parametrize("name,param", [(n, p) for n, checks in MEANINGS.items() for p in checks])
def test_parameter_has_the_spec_meaning(name, param, tmp_path):
    MEANINGS[name][param](tmp_path)

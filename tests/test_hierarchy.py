"""HierarchicalEffects: shrinkage toward the parent, recovery of simulated effects, empirical Bayes,
ONNX export, and a tiny end-to-end train with model.net.hierarchy on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FAST, compose_cfg
from within.data.simulator import simulate
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.models.base import BaseMLModel
from within.models.network import NetworkModel
from within.nn.hierarchy import HierarchicalEffects
from within.nn.predictor import AdPredictorNN
from within.pipeline.train import run_train
from within.postfit.export import export_onnx_bytes

HIER = ["account_id", "campaign_id"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only contends for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nested_counts(rng, n_acc, n_cmp, acc_sd, cmp_sd, rows_per_cmp, base=-1.0):
    """Binomial counts per campaign of a nested world: logit = base + u_acc + u_cmp."""
    u_acc = acc_sd * rng.standard_normal(n_acc)
    u_cmp = cmp_sd * rng.standard_normal(n_acc * n_cmp)
    acc = np.repeat(np.arange(n_acc), n_cmp)
    n = np.asarray(rows_per_cmp, dtype=np.float64) * np.ones(n_acc * n_cmp)
    clicks = rng.binomial(n.astype(np.int64), 1 / (1 + np.exp(-(base + u_acc[acc] + u_cmp))))
    return acc, u_acc, u_cmp, n, clicks.astype(np.float64)


def fit_effects(acc, cmp, n, clicks, n_acc, n_cmp, tau=None, epochs=6, steps=300):
    """Intercept + HierarchicalEffects on aggregated rows, full batch; the EM step between 'epochs'."""
    layer = HierarchicalEffects(HIER, [0, 1], [n_acc + 2, n_cmp + 2], tau=tau)
    groups = torch.as_tensor(np.stack([acc + 2, cmp + 2], axis=1), dtype=torch.long)
    y, w = torch.as_tensor(clicks), torch.as_tensor(n)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    layer.set_rows(float(w.sum()))
    opt = torch.optim.Adam([*layer.parameters(), bias], lr=0.05)
    for _ in range(epochs):
        for _ in range(steps):
            opt.zero_grad()
            logits = layer(groups).double() + bias
            loss = (F.binary_cross_entropy_with_logits(logits, y / w, reduction="none") * w).sum() / w.sum()
            (loss + layer.penalty()).backward()
            opt.step()
        layer.observe(groups, (layer(groups).double() + bias).detach(), w)
        layer.update_prior()
    acc_fx, cmp_fx = (t[2:].double().numpy() for t in layer.effect_table())
    return layer, acc_fx, cmp_fx


def test_a_campaign_with_few_rows_is_pulled_to_its_account():
    rng = np.random.default_rng(0)
    # 4 accounts x 4 campaigns with 4000 rows each; campaign 0 has only 6 rows, all of them clicks
    acc, _, _, n, clicks = nested_counts(rng, 4, 4, acc_sd=0.8, cmp_sd=0.1, rows_per_cmp=4000)
    n[0], clicks[0] = 6.0, 6.0
    cmp = np.arange(16)
    _, acc_fx, cmp_fx = fit_effects(acc, cmp, n, clicks, 4, 16, tau=[1.0, 0.1], epochs=1, steps=600)
    _, _, cmp_free = fit_effects(acc, cmp, n, clicks, 4, 16, tau=[1.0, 10.0], epochs=1, steps=600)
    # its own deviation: shrunk to ~0 under the prior; free, six clicks out of six push it far up
    assert abs(cmp_fx[0]) < 0.15, cmp_fx[0]
    assert cmp_free[0] > 1.5, cmp_free[0]
    # so under the prior its total effect (account + delta) is its account's, its siblings' centre
    a = acc[0]
    assert abs((acc_fx[a] + cmp_fx[0]) - acc_fx[a]) < 0.15
    assert abs(cmp_fx[1:4].mean()) < 0.15
    # well-measured siblings keep deviations the prior does not erase (same spread with or without it)
    assert np.std(cmp_fx[1:4]) == pytest.approx(np.std(cmp_free[1:4]), abs=0.05)


def test_empirical_bayes_recovers_simulated_effects_and_their_spread():
    rng = np.random.default_rng(1)
    n_acc, per = 30, 6
    acc, u_acc, u_cmp, n, clicks = nested_counts(rng, n_acc, per, acc_sd=0.5, cmp_sd=0.25,
                                                 rows_per_cmp=rng.integers(50, 3000, n_acc * per))
    cmp = np.arange(n_acc * per)
    layer, acc_fx, cmp_fx = fit_effects(acc, cmp, n, clicks, n_acc, n_acc * per, tau=None)
    centred = acc_fx - acc_fx.mean()  # the intercept absorbs the accounts' mean
    assert np.corrcoef(centred, u_acc)[0, 1] > 0.95
    assert np.corrcoef(cmp_fx, u_cmp)[0, 1] > 0.75
    tau_acc, tau_cmp = layer.tau
    assert 0.3 < tau_acc < 0.75, layer.tau
    assert 0.15 < tau_cmp < 0.4, layer.tau
    # the EM step moved tau off its start (0.3) toward each level's own spread
    assert tau_acc > tau_cmp


def test_empirical_bayes_tau_falls_toward_zero_without_campaign_effects():
    rng = np.random.default_rng(2)
    acc, _, _, n, clicks = nested_counts(rng, 20, 5, acc_sd=0.5, cmp_sd=0.0, rows_per_cmp=2000)
    layer, _, cmp_fx = fit_effects(acc, np.arange(100), n, clicks, 20, 100, tau=None, epochs=8)
    assert layer.tau[1] < 0.12, layer.tau
    assert np.abs(cmp_fx).max() < 0.2


def test_oov_and_padding_codes_add_nothing():
    layer = HierarchicalEffects(HIER, [1, 0], [5, 7])
    with torch.no_grad():
        layer.effects.weight.fill_(1.0)
    groups = torch.tensor([[0, 1], [1, 0], [3, 4], [6, 1]])  # columns: campaign (7 codes), account (5 codes)
    np.testing.assert_allclose(layer(groups).detach().numpy(), [0.0, 0.0, 2.0, 1.0])


def test_fixed_tau_does_not_move_and_bad_tau_is_refused():
    layer = HierarchicalEffects(HIER, [0, 1], [4, 6], tau=[0.5, 0.2])
    layer.observe(torch.tensor([[2, 3]]), torch.zeros(1))
    assert layer.update_prior() == pytest.approx({"account_id": 0.5, "campaign_id": 0.2})
    with pytest.raises(ValueError, match="one per level"):
        HierarchicalEffects(HIER, [0, 1], [4, 6], tau=[0.5, 0.2, 0.1])
    with pytest.raises(ValueError, match="> 0"):
        HierarchicalEffects(HIER, [0, 1], [4, 6], tau=0.0)


# ---- inside AdPredictorNN ---------------------------------------------------------------------
TABULAR_SPEC = {
    "label": "clicked", "fields": [
        {"name": "bid", "type": "numeric", "transform": "log1p"},
        {"name": "placement", "type": "categorical"},
        {"name": "device", "type": "categorical"},
        {"name": "state", "type": "group"},
        {"name": "account_id", "type": "group"},
        {"name": "campaign_id", "type": "group", "embed": False},
    ]}
NET = {"hidden_dims": [8], "dropout_rate": 0.0, "use_cross_modal": False}


@pytest.fixture(scope="module")
def tabular():
    df = simulate(n=1500, seed=5)
    proc = FeatureProcessor(FeatureSpec.from_config(TABULAR_SPEC)).fit(df)
    return df, proc


def test_processor_reports_group_columns(tabular):
    _, proc = tabular
    d = proc.input_dim
    assert d["group_fields"] == ["state", "account_id", "campaign_id"]
    assert d["group_cardinalities"] == [len(proc.vocabs[f]) + 2 for f in d["group_fields"]]


def test_network_adds_the_offsets_and_embedded_forward_agrees(tabular):
    df, proc = tabular
    torch.manual_seed(0)
    arrays = proc.transform(df.iloc[:64], with_label=True)
    X = {k: torch.as_tensor(v) for k, v in arrays.items()}
    net = AdPredictorNN(proc.input_dim, hierarchy=HIER, **NET).eval()
    base = net(X)
    with torch.no_grad():
        net.hierarchy.effects.weight.normal_()
    expected = net.hierarchy(X["groups"])
    np.testing.assert_allclose((net(X) - base).detach().numpy(), expected.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(net.forward_embedded(net.embed_inputs(X)).detach().numpy(), net(X).detach().numpy(),
                               atol=1e-5)
    assert net.regularization().item() > 0
    assert AdPredictorNN(proc.input_dim, **NET).regularization() is None


def test_network_refuses_dp_unknown_fields_and_a_batch_without_groups(tabular):
    df, proc = tabular
    with pytest.raises(ValueError, match="privacy=none"):
        AdPredictorNN(proc.input_dim, hierarchy=HIER, dp_compatible=True, **NET)
    with pytest.raises(ValueError, match=r"\['ad_group_id'\] are not group fields.*type: group"):
        AdPredictorNN(proc.input_dim, hierarchy=["account_id", "ad_group_id"], **NET)
    net = AdPredictorNN(proc.input_dim, hierarchy=HIER, **NET)
    X = {k: torch.as_tensor(v) for k, v in proc.transform(df.iloc[:8]).items() if k != "groups"}
    with pytest.raises(KeyError, match="batch\\['groups'\\] is missing"):
        net(X)
    X = {k: torch.as_tensor(v) for k, v in proc.transform(df.iloc[:8]).items()}
    X["groups"][2, 1] = 10_000
    with pytest.raises(ValueError, match=r"batch\['groups'\]\[2, 1\] = 10000 is outside .* group field 'account_id'"):
        net(X)


def test_onnx_export_matches_torch(tabular):
    df, proc = tabular
    torch.manual_seed(1)
    kwargs = {"input_dim": proc.input_dim, "hierarchy": HIER, **NET}
    net = AdPredictorNN(**kwargs).eval()
    with torch.no_grad():
        net.hierarchy.effects.weight.normal_(std=0.5)
    model = NetworkModel(processor=proc, net=net, net_kwargs=kwargs)
    arrays = proc.transform(df.iloc[:200])
    data, info = export_onnx_bytes(model, arrays)
    assert "groups" in info["inputs"] and info["max_abs_diff"] < 1e-5

    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: arrays[i.name] for i in session.get_inputs()}
    onnx_logits = session.run(None, feeds)[0]
    np.testing.assert_allclose(onnx_logits, model.predict_logits(df.iloc[:200]), atol=1e-5)
    # and a network without a hierarchy exports without the groups input, as before
    plain = NetworkModel(processor=proc, net=AdPredictorNN(proc.input_dim, **NET).eval())
    assert "groups" not in export_onnx_bytes(plain, arrays)[1]["inputs"]


def test_tiny_end_to_end_train_with_the_hierarchy(tmp_path):
    overrides = [*FAST, "data.source.n=4000", "trainer.max_epochs=2", f"model.net.hierarchy=[{','.join(HIER)}]",
                 "postfit=[calibrate,export]"]
    run_train(compose_cfg("train", overrides, out_dir=tmp_path))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert np.isfinite(metrics["test/auc"]) and metrics["export/onnx_max_abs_diff"] < 1e-4
    model = BaseMLModel.load(tmp_path / "bundle")
    layer = model.net.hierarchy
    assert layer is not None and layer.fields == HIER
    assert layer.tau != pytest.approx([0.3, 0.3])  # empirical Bayes moved the prior sd
    campaigns = layer.effect_table()[1][2:]
    assert float(campaigns.abs().max()) > 0  # the campaign offsets trained
    df = simulate(n=50, seed=99)
    p = model.predict(df)
    assert p.shape == (50,) and np.all((p > 0) & (p < 1))
    with pytest.raises(ValueError, match="privacy=none"):
        run_train(compose_cfg("train", [*overrides, "privacy=dp"], out_dir=tmp_path / "dp"))


def test_explanations_attribute_the_offsets_exactly_to_their_fields(tabular):
    from within.explain.gradient import explain_network

    df, proc = tabular
    torch.manual_seed(2)
    net = AdPredictorNN(proc.input_dim, hierarchy=HIER, **NET).eval()
    with torch.no_grad():
        net.hierarchy.effects.weight.normal_(std=0.5)
    model = NetworkModel(processor=proc, net=net)
    rows, ref = df.iloc[:20], df.iloc[100:150]  # background_size covers all of ref: the baseline is its mean
    exp = explain_network(model, rows, ref, nsamples=20, background_size=50)
    # campaign_id is not embedded: its only path into the logit is the hierarchy, attributed exactly
    col = exp.feature_names.index("campaign_id")
    groups = lambda frame: torch.as_tensor(proc.transform(frame)["groups"])
    with torch.no_grad():
        own = net.hierarchy.level_offsets(groups(rows))[:, 1].double().numpy()
        base = net.hierarchy.level_offsets(groups(ref))[:, 1].double().numpy()
    assert np.abs(own).max() > 0.05
    np.testing.assert_allclose(np.asarray(exp.values)[:, col], own - base.mean(), atol=1e-5)

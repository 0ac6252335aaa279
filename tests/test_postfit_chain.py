"""The default post-fit chain runs to the end for every text encoder and image encoder option, and
the int8 copy it writes loads back (the MiniLM encoder once crashed the quantize step)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, compose_cfg
from within.pipeline.train import run_train

CHAIN = "postfit=[calibrate,intervals,ensemble,quantize,export]"
CASES = [("hashing", "simple_cnn"), ("minilm", "simple_cnn"), ("hashing", "test_resnet"), ("minilm", "test_resnet")]


@pytest.mark.parametrize("text_model, image_encoder", CASES, ids=[f"{t}-{i}" for t, i in CASES])
def test_default_chain_for_each_encoder(text_model, image_encoder, tmp_path):
    pytest.importorskip("timm") if image_encoder != "simple_cnn" else None
    overrides = [*FAST, CHAIN, "data.source.n=2500", f"text_model={text_model}", f"model.net.image_encoder={image_encoder}",
                 "quantize.repeats=1", "quantize.max_rows=500", "quantize.calibration_rows=256",
                 "export.check_rows=32"]
    if text_model != "hashing":
        overrides.append(f"text_model.cache_dir={tmp_path / 'text_cache'}")
    run_train(compose_cfg("train", overrides, out_dir=tmp_path))
    status = {r["step"]: r for r in json.loads((tmp_path / "report" / "postfit.json").read_text())["postfit"]}
    assert {s: r["status"] for s, r in status.items()} == {
        "calibrate": "ok", "intervals": "ok", "ensemble": "skipped", "quantize": "ok", "export": "ok"}, status
    quantize = json.loads((tmp_path / "export" / "quantize.json").read_text())
    assert quantize["int8_saved"], quantize
    from within.data.simulator import simulate
    from within.postfit.quantize import load_int8

    int8 = load_int8(tmp_path / "bundle")
    p = int8.predict(simulate(n=50, seed=3))
    assert p.shape == (50,) and ((p > 0) & (p < 1)).all()
    assert (tmp_path / "bundle" / "model.onnx").is_file()

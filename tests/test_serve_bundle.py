"""Small bundles for the serving tests (built in seconds, no training loop), and load_served's choice of graph."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF
from within.calibration import PlattScaling, SplineCalibrator, TemperatureScaling
from within.calibration.intervals import ProbabilityIntervals
from within.data.simulator import simulate
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.models.ensemble import CalibratedEnsemble
from within.models.network import NetworkModel, build_net
from within.serve.loading import graph_has_loop, load_model, load_served

CALIBRATORS = {"temperature": TemperatureScaling, "platt": PlattScaling, "spline": SplineCalibrator}


def simulator_spec(text: bool = True, image: bool = True) -> FeatureSpec:
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "features" / "synthetic.yaml"))
    raw["fields"] = [f for f in raw["fields"] if (text or f["type"] != "text") and (image or f["type"] != "image")]
    return FeatureSpec.from_config(raw)


def network(processor: FeatureProcessor, seed: int) -> NetworkModel:
    import torch

    torch.manual_seed(seed)
    kwargs = {"input_dim": processor.input_dim, "hidden_dims": [16], "attention_dim": 8, "attention_heads": 2,
              "text_dim": 8, "image_dim": 8, "tabular_dim": 16}
    net = build_net("AdPredictorNN", kwargs)
    with torch.no_grad():  # random, non-zero wide weights: every category moves the score
        net.wide.weight.normal_(0, 0.5)
    return NetworkModel(processor=processor, net=net.eval(), net_kwargs=kwargs)


def tiny_bundle(out: Path, n: int = 1500, seed: int = 0, text: bool = True, image: bool = True,
                calibrator: str = "temperature", members: int = 1, intervals: bool = True,
                onnx: bool = False) -> Path:
    """A bundle of an untrained network (or ensemble) with a fitted processor, calibrator and
    intervals; with `onnx`, also export/model.onnx beside it as the export step writes it."""
    df = simulate(n=n, seed=seed)
    processor = FeatureProcessor(simulator_spec(text, image)).fit(df)
    nets = [network(processor, seed + k) for k in range(members)]
    model = nets[0] if members == 1 else CalibratedEnsemble(nets, calibration_method="none")
    if members == 1:
        logits, member_logits = model.predict_logits(df), None
    else:
        logits, member_logits = model.logits_with_members(df)
    # labels that follow the network's own score, so the calibrator is a real map (not a constant)
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 1 / (1 + np.exp(-1.5 * logits))).astype(np.float64)
    model.calibrator = CALIBRATORS[calibrator]().fit(logits, y)
    if intervals:
        model.intervals = ProbabilityIntervals(residual_var=0.3).fit(logits, y, member_logits=member_logits)
    model.metadata = {"metrics": {"test/auc": 0.5}, "calibration": {"type": calibrator}}
    bundle = model.save(out / "bundle")
    if onnx:
        from within.postfit.export import export_onnx

        (out / "export").mkdir(parents=True, exist_ok=True)
        export_onnx(model, df, out / "export" / "model.onnx")
    return bundle


def frame(n: int = 200, seed: int = 99):
    return simulate(n=n, seed=seed).drop(columns=["true_ctr", "clicked"])


# ---- load_served: which graph, and the check before serving -------------------------------------
@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tabular")
    tiny_bundle(out, text=False, image=False, onnx=True)
    return out


def test_load_served_uses_the_bundles_graph_when_it_agrees(tabular_run):
    served = load_served(tabular_run / "bundle")
    assert served.graph == str(tabular_run / "export" / "model.onnx")
    assert served.scorer.output == "probability"  # temperature folded into the exported graph
    assert served.check_max_abs_diff < 1e-6
    assert not graph_has_loop(tabular_run / "export" / "model.onnx")


def test_load_served_replaces_a_stale_graph(tabular_run, tmp_path):
    import shutil

    shutil.copytree(tabular_run, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "bundle" / "calibration.json").read_text())
    meta["calibrator"]["state"]["temperature"] *= 3.0  # the graph's folded temperature no longer matches
    (tmp_path / "run" / "bundle" / "calibration.json").write_text(json.dumps(meta))
    served = load_served(tmp_path / "run" / "bundle")
    assert served.graph == "exported in memory"
    assert served.check_max_abs_diff < 1e-6


def test_in_process_fast_path_refuses_a_stale_graph(tabular_run, tmp_path):
    """predict(dict) takes the ONNX graph only when it agrees with the loaded weights and calibrator."""
    import shutil

    from within.features.records import RecordEncoder

    shutil.copytree(tabular_run, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "bundle" / "calibration.json").read_text())
    meta["calibrator"]["state"]["temperature"] *= 3.0
    (tmp_path / "run" / "bundle" / "calibration.json").write_text(json.dumps(meta))
    model = load_model(tmp_path / "run" / "bundle")
    assert model.record_scorer() is None  # stale: scoring falls back to torch
    record = RecordEncoder(model.processor).example_records(1)[0]
    assert model.predict(record) == pytest.approx(float(model.predict(model.spec.records_to_frame([record]))[0]))
    assert load_model(tabular_run / "bundle").record_scorer() is not None  # the untouched bundle's graph agrees


def test_load_served_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle: .* is not a folder"):
        load_served(tmp_path / "nope")

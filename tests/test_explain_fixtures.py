"""Small fitted network models for the explain and fairness tests, built without the pipeline.

The inference class is named here and nowhere else in these tests, so its rename
(AdScorePredictor -> NetworkModel) is a one-line change.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF
from within.features.processor import FeatureProcessor
from within.features.spec import FeatureSpec
from within.models.network import NetworkModel
from within.nn.predictor import AdPredictorNN

SMALL_NET = {"hidden_dims": [32], "attention_dim": 16, "attention_heads": 2, "text_dim": 8, "image_dim": 8,
             "dropout_rate": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread while a module's tests run: on the shared 2-core machine two threads
    contending with other jobs made the explainer's backward passes ~10x slower (measured 11.7 s vs 1.2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_spec() -> FeatureSpec:
    return FeatureSpec.from_config(OmegaConf.load(CONF / "features" / "synthetic.yaml"))


def network_model(df: pd.DataFrame, spec: FeatureSpec, seed: int = 0, train_steps: int = 0,
                  **net_kwargs) -> NetworkModel:
    """A NetworkModel over `spec` fitted on df: random weights (train_steps=0) or a few Adam steps."""
    processor = FeatureProcessor(spec).fit(df)
    torch.manual_seed(seed)
    net = AdPredictorNN(processor.input_dim, **{**SMALL_NET, **net_kwargs})
    if train_steps:
        _train(net, processor, df, train_steps, seed)
    return NetworkModel(processor=processor, net=net.eval())


def _train(net: AdPredictorNN, processor: FeatureProcessor, df: pd.DataFrame, steps: int, seed: int) -> None:
    arrays = processor.transform(df, with_label=True)
    batch = {k: torch.as_tensor(v) for k, v in arrays.items()}
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(steps):
        idx = torch.as_tensor(rng.choice(len(df), 256, replace=False))
        sub = {k: v[idx] for k, v in batch.items()}
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(sub), sub["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def known_effects_frame(n: int = 4000, seed: int = 0) -> tuple[pd.DataFrame, FeatureSpec]:
    """Clicks from logit = -1 + 1.5 x_strong + effect(colour), with x_noise and shape having no effect."""
    rng = np.random.default_rng(seed)
    colour = rng.choice(["red", "green", "blue"], n)
    df = pd.DataFrame({
        "x_strong": rng.normal(size=n),
        "x_noise": rng.normal(size=n),
        "colour": colour,
        "shape": rng.choice(["square", "circle"], n),
    })
    logit = -1.0 + 1.5 * df.x_strong + pd.Series(colour).map({"red": 0.6, "green": 0.0, "blue": -0.6}).to_numpy()
    df["clicked"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    spec = FeatureSpec.from_config({"label": "clicked", "fields": [
        {"name": "x_strong", "type": "numeric"}, {"name": "x_noise", "type": "numeric"},
        {"name": "colour", "type": "categorical"}, {"name": "shape", "type": "categorical"}]})
    return df, spec

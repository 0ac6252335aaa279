"""AdPredictorNN.embed_inputs / forward_embedded: the additive API the gradient explainer runs on."""
from __future__ import annotations

import pytest
import torch

from within.nn.predictor import AdPredictorNN

TAB = {"n_num": 5, "cat_cardinalities": [7, 5, 9]}
TEXT = {"text_fields": 2, "text_buckets": 256}
IMAGE = {"image_fields": 2, "image_channels": 3, "image_size": 8}
ALL = {**TAB, **TEXT, **IMAGE}
SMALL = {"hidden_dims": (16,), "attention_dim": 8, "attention_heads": 2, "text_dim": 8, "image_dim": 8}


def make(input_dim=ALL, **kw) -> AdPredictorNN:
    torch.manual_seed(0)
    net = AdPredictorNN(input_dim, **{**SMALL, **kw}).eval()
    if net.wide is not None:
        torch.nn.init.normal_(net.wide.weight, std=0.3)  # the wide term starts at zero; make it count
    return net


CASES = [
    (ALL, {}), (ALL, {"cross_layers": 2}), (ALL, {"dp_compatible": True}), (ALL, {"use_cross_modal": False}),
    (ALL, {"use_wide": False}), (TAB, {}), ({**TEXT}, {}), ({**IMAGE, "n_num": 2}, {}),
    ({**TAB, "text_fields": 2, "text_embedding_dim": 12}, {}),
]


@pytest.mark.parametrize("input_dim,kw", CASES)
@pytest.mark.parametrize("missing", [(), ("text",), ("text", "image")])
def test_forward_embedded_reproduces_forward_exactly(input_dim, kw, missing):
    net = make(input_dim, **kw)
    missing = tuple(m for m in missing if m in net.modalities)
    batch = AdPredictorNN.example_batch(input_dim, 12, missing=missing, seed=3)
    with torch.no_grad():
        assert torch.equal(net.forward_embedded(net.embed_inputs(batch)), net(batch))


def test_a_modality_left_out_of_the_batch_and_absent_masks_match_forward():
    net = make()
    batch = AdPredictorNN.example_batch(ALL, 10, seed=1)
    no_image = {k: v for k, v in batch.items() if k not in ("image", "mask_image")}
    no_masks = {k: v for k, v in batch.items() if not k.startswith("mask_")}
    with torch.no_grad():
        for b in (no_image, no_masks):
            emb = net.embed_inputs(b)
            assert torch.equal(net.forward_embedded(emb), net(b))
        assert torch.equal(net.embed_inputs(no_image)["mask_image"], torch.zeros(10))
        assert torch.equal(net.embed_inputs(no_masks)["mask_text"], torch.ones(10))


def test_embedded_inputs_shapes_and_gradients_reach_every_one():
    net = make()
    batch = AdPredictorNN.example_batch(ALL, 6, seed=2)
    emb = net.embed_inputs(batch)
    assert emb["tabular"].shape == (6, net.tabular.raw_dim)
    assert emb["wide"].shape == (6, 3)
    assert emb["text"].shape[:2] == (6, 2) and emb["image"].shape == (6, 2, 3, 8, 8)
    assert all(v.dtype == torch.float32 for v in emb.values())
    leaves = {k: v.detach().requires_grad_() for k, v in emb.items()}
    net.forward_embedded(leaves).sum().backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), key
        if not key.startswith("mask_"):
            assert leaf.grad.abs().sum() > 0, key
    # without `wide`, the first-order term is left out and nothing else changes
    deep = net.forward_embedded({k: v for k, v in emb.items() if k != "wide"})
    torch.testing.assert_close(deep + emb["wide"].sum(1), net.forward_embedded(emb))


def test_the_new_methods_add_no_state():
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.forward_embedded(net.embed_inputs(AdPredictorNN.example_batch(ALL, 4)))
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)

"""within.privacy.norm_samplers: per-row gradient norms equal brute-force per-row gradients, and a
ghost-clipped DP step of AdPredictorNN equals the hooks-mode step (which forms every row's gradient)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from within.privacy.norm_samplers import conv2d_norm_sample, embedding_norm_sample


def _per_row_norms(layer: nn.Module, x: torch.Tensor, out_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row i's gradient of sum(layer(x) * out_grad) w.r.t. each parameter, by one backward per row."""
    norms: dict[str, list[torch.Tensor]] = {name: [] for name, p in layer.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[i:i + 1]) * out_grad[i:i + 1]).sum().backward()
        for name, p in layer.named_parameters():
            if p.requires_grad:
                norms[name].append(p.grad.norm())
    return {name: torch.stack(v) for name, v in norms.items()}


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_norms_match_per_row_gradients(padding_idx):
    torch.manual_seed(0)
    layer = nn.Embedding(7, 5, padding_idx=padding_idx)
    ids = torch.tensor([[1, 1, 3, 0], [2, 0, 0, 0], [6, 5, 6, 6], [3, 3, 3, 3]])  # repeats and padding
    out_grad = torch.randn(4, 4, 5)
    got = embedding_norm_sample(layer, [ids], out_grad)[layer.weight]
    torch.testing.assert_close(got, _per_row_norms(layer, ids, out_grad)["weight"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, conv", [
    ((3, 3, 16, 16), {"in_channels": 3, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1}),   # forms G^T A
    ((3, 16, 4, 4), {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "stride": 2, "padding": 1}),   # ghost norm
    ((2, 4, 9, 7), {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 2), "dilation": 2, "bias": False}),
    ((2, 4, 6, 6), {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2}),                 # general path
])
def test_conv2d_norms_match_per_row_gradients(shape, conv):
    torch.manual_seed(1)
    layer = nn.Conv2d(**conv)
    x = torch.randn(*shape)
    out_grad = torch.randn_like(layer(x))
    got = conv2d_norm_sample(layer, [x], out_grad)
    want = _per_row_norms(layer, x, out_grad)
    torch.testing.assert_close(got[layer.weight], want["weight"], atol=1e-4, rtol=1e-4)
    if layer.bias is not None:
        torch.testing.assert_close(got[layer.bias], want["bias"], atol=1e-4, rtol=1e-4)
    positions, k, c = out_grad[0, 0].numel(), conv["in_channels"] // conv.get("groups", 1) * 9, conv["out_channels"]
    if shape[1:] == (16, 4, 4):
        assert positions * (k + c) < k * c  # this case really takes the ghost branch


def test_ghost_step_of_adpredictor_equals_the_hooks_step():
    """Without noise, ghost clipping (these norm samplers) and hooks (explicit per-row gradients) must
    produce the same clipped, summed gradient: the clip factors depend only on the per-row norms."""
    from within.lit.losses import RowLoss, row_losses
    from within.nn.predictor import AdPredictorNN
    from within.privacy.engine import make_private

    input_dim = {"n_num": 4, "cat_cardinalities": [9, 5], "text_fields": 2, "text_buckets": 64,
                 "image_fields": 1, "image_channels": 3, "image_size": 16}
    torch.manual_seed(2)
    base = AdPredictorNN(input_dim, hidden_dims=[16], dropout_rate=0.0, dp_compatible=True)
    batch = AdPredictorNN.example_batch(input_dim, 32, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(320)), batch_size=32)
    grads, norms = {}, {}
    for mode in ("hooks", "ghost"):
        net = copy.deepcopy(base).train()  # no dropout: both modes see the same function
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        pt = make_private(net, opt, loader, noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=0.1,
                          expected_batch_size=32, delta=1e-5, grad_sample_mode=mode,
                          criterion=RowLoss() if mode == "ghost" else None)
        torch.manual_seed(4)
        logits = net(batch).float()
        if mode == "ghost":
            pt.criterion(logits, batch["label"], batch["weight"]).backward()
        else:
            row_losses(logits, batch["label"], batch["weight"]).mean().backward()
        norms[mode] = {n: (p._norm_sample if mode == "ghost" else p.grad_sample.reshape(32, -1).norm(dim=1)).clone()
                       for n, p in net.named_parameters() if p.requires_grad}
        pt.optimizer.step()
        grads[mode] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        pt.close()
    # every parameter's per-row norm, conv and embedding included (atol: the attention key bias has a zero
    # gradient, which both modes compute as ~1e-6 of rounding)
    for name, want in norms["hooks"].items():
        torch.testing.assert_close(norms["ghost"][name], want, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert grads["hooks"].keys() == grads["ghost"].keys()
    assert any("image" in n for n in grads["ghost"]) and any("text" in n for n in grads["ghost"])
    for name in grads["hooks"]:
        torch.testing.assert_close(grads["ghost"][name], grads["hooks"][name], atol=1e-6, rtol=1e-4, msg=name)

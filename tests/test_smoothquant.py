"""SmoothQuant before dynamic int8: the float function is unchanged, wide input channels stop
costing the other channels their precision, and AdPredictorNN.quantize uses it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from within.nn.smoothquant import InputScaledLinear, smooth_linears


class DictMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, batch):
        return self.body(batch["x"]).squeeze(-1)


def _int8(net):
    return torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)


def test_smoothing_keeps_the_float_output_and_shrinks_the_int8_error():
    torch.manual_seed(0)
    net = DictMLP().eval()
    x = torch.randn(2048, 16)
    x[:, 3] *= 200.0  # one wide channel, like a raw numeric field ...
    batch = {"x": x}
    with torch.no_grad():
        net.body[0].weight[:, 3] /= 200.0  # ... that a trained net weighs down to the others' scale
        ref = net(batch)
        smoothed = smooth_linears(copy.deepcopy(net), batch, alpha=0.5)
        torch.testing.assert_close(smoothed(batch), ref, rtol=1e-4, atol=1e-3)
        assert all(isinstance(m, InputScaledLinear) for m in smoothed.body if not isinstance(m, nn.ReLU))
        assert smoothed.body[0].input_scale[3] < 0.2 * smoothed.body[0].input_scale.median()
        plain_err = (_int8(copy.deepcopy(net))(batch) - ref).abs().mean()
        smooth_err = (_int8(smoothed)(batch) - ref).abs().mean()
    assert smooth_err < 0.5 * plain_err, (float(smooth_err), float(plain_err))


def test_without_calibration_the_scales_are_one_and_bad_alpha_is_refused():
    net = smooth_linears(DictMLP())
    assert all(torch.equal(m.input_scale, torch.ones_like(m.input_scale))
               for m in net.modules() if isinstance(m, InputScaledLinear))
    with pytest.raises(ValueError, match="smooth_alpha must be in"):
        smooth_linears(DictMLP(), {"x": torch.randn(4, 16)}, alpha=1.5)


def test_multihead_attention_projection_is_left_alone():
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0]).squeeze(-1)

    net = smooth_linears(WithAttention().eval(), torch.randn(4, 3, 8))
    assert type(net.attn.out_proj) is not InputScaledLinear and isinstance(net.head, InputScaledLinear)

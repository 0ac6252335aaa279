"""SmoothQuant for dynamic int8 Linear layers (Xiao et al., "SmoothQuant", ICML 2023).

Dynamic int8 quantization gives each activation tensor one scale, so a single input channel with a
wide range (a raw numeric field, a pooled image feature) costs every other channel its precision.
On the default simulator model, quantizing only the tabular projection, the image projection or the
tower's first layer moved logits by up to 0.25-0.33. SmoothQuant divides input channel j by
s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha), measured on calibration rows, and multiplies weight
column j by s_j: the float output is unchanged and the range moves into the weights, where
it is quantized once, offline. Written here because it is a dozen lines over torch's own dynamic
quantization, and the libraries that ship it target transformer LLMs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InputScaledLinear(nn.Module):
    """x -> linear(x * input_scale). With input_scale = 1 it is the plain layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("input_scale", torch.ones(linear.in_features, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_scale)


def wrap_linears(net: nn.Module) -> dict[str, InputScaledLinear]:
    """Replace every plain nn.Linear of `net` (in place) by an InputScaledLinear around it.

    Subclasses such as MultiheadAttention's out_proj are left alone, as torch's dynamic
    quantization leaves them."""
    targets = [(name, mod) for name, mod in net.named_modules() if type(mod) is nn.Linear]
    wrapped: dict[str, InputScaledLinear] = {}
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        wrapped[name] = InputScaledLinear(lin)
        setattr(parent, attr, wrapped[name])
    return wrapped


@torch.no_grad()
def smooth_linears(net: nn.Module, calibration: Any = None, alpha: float = 0.5) -> nn.Module:
    """Wrap `net`'s Linear layers (in place) and, given a calibration batch (what `net` takes, e.g.
    an AdBatch), set their SmoothQuant scales. Without calibration the scales stay 1: the same structure with nothing migrated (what a
    saved int8 state is loaded into)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"smooth_alpha must be in [0, 1] (0.5 is the paper's default), got {alpha}")
    wrapped = wrap_linears(net)
    if calibration is None:
        return net
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in wrapped.items()]
    try:
        net.eval()(calibration)
    finally:
        for h in handles:
            h.remove()
    for name, mod in wrapped.items():
        if name not in amax:  # not on the calibration batch's path (e.g. a masked-out branch)
            continue
        w = mod.linear.weight
        xmax, wmax = amax[name].to(w.dtype), w.abs().amax(dim=0)
        live = (xmax > 0) & (wmax > 0)
        s = torch.ones_like(xmax)
        s[live] = (xmax[live] ** alpha / wmax[live] ** (1.0 - alpha)).clamp(1e-4, 1e4)
        w.mul_(s.unsqueeze(0))
        mod.input_scale.copy_(1.0 / s)
    return net

"""Ghost-clipping norm samplers for nn.Embedding and nn.Conv2d, where Opacus's CPU path is slow.

Measured on AdPredictorNN at batch 1024 (benchmarks/dp_overhead.py): a ghost step cost 3.5x a
non-DP step with Opacus's samplers; the embedding one below took it to 2.9x and the conv one to
the figure in benchmarks/results/dp_overhead.json.

Embedding
---------

Ghost clipping needs each row's gradient norm for every parameter. For an embedding table a row's
gradient is, per distinct token id it used, the sum of the output gradients at that id's positions,
so ``||g_row||^2 = sum over distinct ids of ||sum of its positions' output gradients||^2``.

Opacus 1.6 (`opacus.grad_sample.embedding_norm_sample`) finds the distinct (row, id) pairs with
``torch.unique(dim=0)``, which on CPU compares pairs one ``aten::equal`` at a time: ~100k calls and
27% of a ghost step of AdPredictorNN at batch 1024. Packing the pair into one int64 key and taking
a 1-D unique is one sort. The table's `padding_idx` row receives no gradient in PyTorch, so its
positions are left out (Opacus counts them, which only overstates the norm).

Conv2d
------
Opacus has no conv norm sampler, so ghost clipping materialises every row's conv gradient
([B, C_out, C_in, k, k], zero-filled, then a bmm). With the unfolded input A [B, P, K] (P output
positions, K = C_in k k) and output gradients G [B, P, C], a row's weight gradient is G^T A, and

    ||G^T A||^2 = sum_{p, q} (A A^T)_{pq} (G G^T)_{pq}         (the ghost norm)

costs P^2 (K + C) per row against P K C for forming G^T A. Each layer takes the cheaper one, as in
mixed ghost clipping (Bu et al., "Scalable and Efficient Training of Large Convolutional Neural
Networks with Differential Privacy", NeurIPS 2022): the first 16x16 conv (P = 64) forms the
gradient, the deeper ones (P = 16, 4) use the ghost norm.
"""
from __future__ import annotations

import torch
from torch import nn


def embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-row gradient norms of `layer.weight`: {weight: [B]} (Opacus's norm-sampler signature)."""
    ids = activations[0].reshape(activations[0].shape[0], -1).long()
    n, per_row = ids.shape
    grads = backprops.reshape(n * per_row, -1)
    flat = ids.reshape(-1)
    if layer.padding_idx is not None:
        grads = grads * (flat != layer.padding_idx).unsqueeze(1).to(grads.dtype)
    rows = torch.arange(n, device=ids.device).repeat_interleave(per_row)
    keys = rows * layer.num_embeddings + flat
    distinct, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(distinct.numel(), grads.shape[1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads)
    squares = torch.zeros(n, dtype=grads.dtype, device=grads.device)
    squares.scatter_add_(0, torch.div(distinct, layer.num_embeddings, rounding_mode="floor"), summed.pow(2).sum(1))
    return {layer.weight: squares.sqrt()}


def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-row gradient norms of a Conv2d's weight and bias (module docstring)."""
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        from opacus.grad_sample.conv import compute_conv_grad_sample

        grads = compute_conv_grad_sample(layer, activations, backprops)  # the general path
        return {p: g.reshape(g.shape[0], -1).norm(dim=1) for p, g in grads.items()}
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    a = torch.nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                   stride=layer.stride)  # [B, K, P]
    g = backprops.reshape(n, backprops.shape[1], -1)  # [B, C, P]
    k, c, positions = a.shape[1], g.shape[1], a.shape[2]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if positions * (k + c) < k * c:
            sq = (torch.bmm(a.transpose(1, 2), a) * torch.bmm(g.transpose(1, 2), g)).sum(dim=(1, 2))
        else:
            sq = torch.bmm(g, a.transpose(1, 2)).pow(2).sum(dim=(1, 2))
        out[layer.weight] = sq.clamp_min(0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2).norm(dim=1)
    return out


def register() -> None:
    """Use these samplers in Opacus's ghost clipping (idempotent)."""
    from opacus.grad_sample.utils import register_norm_sampler

    register_norm_sampler(nn.Embedding)(embedding_norm_sample)
    register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)

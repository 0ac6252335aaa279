"""Post-fit step `quantize`: int8 copies of the networks (AdPredictorNN.quantize), what they cost in
test AUC / log loss, what they gain in speed at batch 1024, and a pickle-free int8 file.

The int8 file (`export/model_int8.safetensors`) stores each dynamically quantized Linear as int8
weights + scale + zero point and every other tensor as is, so `load_int8(bundle)` rebuilds the
quantized network from plain arrays. It is written only when the rebuilt network reproduces the
in-memory one exactly; otherwise the step records why and the fp32 bundle stays the artifact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from within.postfit.context import PostfitContext, labels_of, members_of

log = logging.getLogger(__name__)
INT8_FILE = "model_int8.safetensors"
_QLINEAR_TYPES: tuple[type, ...] = (torch.ao.nn.quantized.dynamic.Linear,)


@contextlib.contextmanager
def swapped_nets(members: list[Any], nets: list[nn.Module]) -> Iterator[None]:
    """Temporarily give each member another network (its int8 copy)."""
    saved = [m.net for m in members]
    try:
        for m, net in zip(members, nets):
            m.net = net
        yield
    finally:
        for m, net in zip(members, saved):
            m.net = net


@torch.no_grad()
def time_forward(nets: list[nn.Module], batch: list[dict[str, torch.Tensor]], repeats: int = 5) -> float:
    """Median seconds for one forward pass of every network on its batch (after warm-up)."""
    for net, b in zip(nets, batch):
        net(b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for net, b in zip(nets, batch):
            net(b)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _plain_tensors(qnet: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(key, module, attribute, tensor) for every parameter and buffer outside the quantized layers."""
    for name, mod in qnet.named_modules():
        if type(mod).__module__.startswith("torch.ao.nn.quantized"):
            continue
        for attr, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            yield (f"{name}.{attr}" if name else attr), mod, attr, t


def int8_state(qnet: nn.Module) -> dict[str, np.ndarray]:
    """Plain arrays for a dynamically quantized network; TypeError for layers this format can't hold."""
    arrays: dict[str, np.ndarray] = {}
    for name, mod in qnet.named_modules():
        if isinstance(mod, _QLINEAR_TYPES):
            w, b = mod._packed_params._weight_bias()
            if w.qscheme() != torch.per_tensor_affine:
                raise TypeError(f"{name}: int8 weights use {w.qscheme()}; only per-tensor affine is stored")
            arrays[f"{name}.qweight"] = w.int_repr().numpy()
            arrays[f"{name}.qscale"] = np.array([w.q_scale()], dtype=np.float64)
            arrays[f"{name}.qzero_point"] = np.array([w.q_zero_point()], dtype=np.int64)
            if b is not None:
                arrays[f"{name}.qbias"] = b.detach().numpy()
        elif isinstance(mod, torch.ao.nn.quantized.modules.linear.LinearPackedParams):
            continue  # the weight holder of a Linear handled above
        elif type(mod).__module__.startswith(("torch.ao.nn.quantized", "torchao")):
            raise TypeError(f"{name}: {type(mod).__name__} has no pickle-free int8 format here")
    for key, _, _, t in _plain_tensors(qnet):
        if t.is_quantized or type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            raise TypeError(f"{key}: {type(t).__name__} is not a plain tensor")
        arrays[key] = t.detach().numpy()
    return arrays


@torch.no_grad()
def rebuild_int8(fp32_net: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """The int8 network from `int8_state` arrays: quantize the structure, then set every tensor."""
    qnet = fp32_net.quantize()
    for key, _, _, t in _plain_tensors(qnet):
        if key not in arrays:
            raise ValueError(f"int8 state has no tensor {key!r} for this network")
        value = torch.from_numpy(np.array(arrays[key]))
        if value.shape != t.shape:
            raise ValueError(f"int8 state: {key} has shape {tuple(value.shape)}, the network {tuple(t.shape)}")
        t.copy_(value)
    for name, mod in qnet.named_modules():
        if isinstance(mod, _QLINEAR_TYPES):
            q = torch._make_per_tensor_quantized_tensor(
                torch.from_numpy(np.array(arrays[f"{name}.qweight"])), float(arrays[f"{name}.qscale"][0]),
                int(arrays[f"{name}.qzero_point"][0]))
            bias = arrays.get(f"{name}.qbias")
            mod.set_weight_bias(q, None if bias is None else torch.from_numpy(np.array(bias)))
    return qnet.eval()


def load_int8(bundle: str | Path, int8_file: str | Path | None = None) -> Any:
    """The bundle's predictor with its networks replaced by the int8 ones from `int8_file`
    (default: export/model_int8.safetensors beside the bundle)."""
    from safetensors.numpy import load_file

    from within.models.predictor import AdScorePredictor

    bundle = Path(bundle)
    path = Path(int8_file) if int8_file else bundle.parent / "export" / INT8_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no int8 file; it is written by the post-fit step `quantize`")
    predictor = AdScorePredictor.load(bundle)
    arrays = load_file(str(path))
    for i, member in enumerate(members_of(predictor)):
        prefix = f"member{i}/"
        own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        member.net = rebuild_int8(member.net, own)
    return predictor


class Quantize:
    """int8 copies via the model's quantize(); test AUC / log loss change and speedup at batch 1024."""

    name = "quantize"

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import auc, logloss

        settings = ctx.settings("quantize")
        batch_size = int(settings.get("batch_size", 1024))
        repeats = int(settings.get("repeats", 5))
        members = members_of(ctx.predictor)
        if not all(callable(getattr(getattr(m, "net", None), "quantize", None)) for m in members):
            log.warning("postfit quantize: a network has no quantize(); skipped")
            ctx.metadata["quantize"] = {"skipped": "a network has no quantize()"}
            return
        fp32 = [m.net.eval() for m in members]
        int8 = [net.quantize().eval() for net in fp32]
        frame = ctx.frames.get("test")
        if frame is None or not len(frame):
            _, frame = ctx.calibration_frame()
        max_rows = int(settings.get("max_rows", 20_000))
        if len(frame) > max_rows:  # the deltas need a sample, not every test row twice
            frame = frame.sample(n=max_rows, random_state=0)
        y, w = labels_of(ctx.predictor, frame)
        p32 = np.asarray(ctx.predictor.predict(frame))
        with swapped_nets(members, int8):
            p8 = np.asarray(ctx.predictor.predict(frame))
        sample = frame.sample(n=batch_size, replace=len(frame) < batch_size, random_state=0)
        batches = [{k: torch.as_tensor(v) for k, v in m.processor.transform(sample).items()} for m in members]
        t32 = time_forward(fp32, batches, repeats)
        t8 = time_forward(int8, batches, repeats)
        ctx.metrics.update({
            "quantize/auc_delta": auc(p8, y, weight=w) - auc(p32, y, weight=w),
            "quantize/logloss_delta": logloss(p8, y, weight=w) - logloss(p32, y, weight=w),
            f"quantize/speedup_b{batch_size}": t32 / t8,
            "quantize/max_abs_prob_diff": float(np.max(np.abs(p8 - p32))),
        })
        info: dict[str, Any] = {"batch_size": batch_size, "fp32_ms": 1e3 * t32, "int8_ms": 1e3 * t8,
                                "backend": type(int8[0]).__module__}
        info.update(self._save(ctx, members, int8, batches))
        ctx.metadata["quantize"] = info
        (ctx.subdir("export") / "quantize.json").write_text(json.dumps(info, indent=2))

    @staticmethod
    @torch.no_grad()
    def _save(ctx: PostfitContext, members: list[Any], int8: list[nn.Module], batches: list[dict]) -> dict[str, Any]:
        from safetensors.numpy import save_file

        try:
            arrays: dict[str, np.ndarray] = {}
            for i, (member, qnet, batch) in enumerate(zip(members, int8, batches)):
                own = int8_state(qnet)
                again = rebuild_int8(member.net, own)
                if not torch.equal(again(batch), qnet(batch)):
                    raise ValueError("the rebuilt int8 network does not reproduce the quantized one")
                arrays.update({f"member{i}/{k}": np.ascontiguousarray(v) for k, v in own.items()})
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            log.warning("postfit quantize: int8 state not saved (%s); the fp32 bundle is the artifact", err)
            return {"int8_saved": False, "why_not_saved": str(err)}
        path = ctx.subdir("export") / INT8_FILE
        save_file(arrays, str(path))
        return {"int8_saved": True, "int8_file": str(path), "load_with": "within.postfit.quantize.load_int8(bundle)"}

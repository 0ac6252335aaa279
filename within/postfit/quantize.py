"""Post-fit step `quantize`: int8 copies of the networks (AdPredictorNN.quantize), what they cost in
test AUC / log loss, what they gain in speed at batch 1024, and a pickle-free int8 file.

Before quantizing, SmoothQuant scales are set from `quantize.calibration_rows` calib rows
(`quantize.smooth_alpha`, within/nn/smoothquant.py): on the seed-11 default model they cut the
mean absolute logit change of int8 from 0.076 to 0.019 and its AUC change from -0.0012 to -0.0001.

The int8 file (`export/model_int8.safetensors`) stores each dynamically quantized Linear as int8
weights + scale + zero point and every other tensor as is, so `load_int8(bundle)` rebuilds the
quantized network from plain arrays. It is written only when the rebuilt network reproduces the
in-memory one exactly; otherwise the step records why and the fp32 bundle stays the artifact.

Timing (`compare_forward`): the same batch, the same thread count, warm-up, then fp32 and int8
forwards in alternation, and the speedup as the median of the per-pair ratios, so load from other
processes on a shared CPU hits both sides alike; the same measurement of fp32 against itself is
reported as the noise floor (`null_speedup_fp32_vs_fp32`). `time_breakdown_ms` says where a
forward pass spends its time: int8 dynamic quantization only touches Linear layers, and on the
default network the small-image CNN, the cross-modal attention and the modality fusion take most
of it, which bounds what int8 can gain.
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

from within.postfit.context import PostfitContext, labels_of, members_of, networks_of

log = logging.getLogger(__name__)
INT8_FILE = "model_int8.safetensors"
_QLINEAR_TYPES: tuple[type, ...] = (torch.ao.nn.quantized.dynamic.Linear,)


def member_batches(members: list[Any], frame: Any) -> list[dict[str, torch.Tensor]]:
    """The frame as one AdBatch per member (each member has its own feature processor)."""
    return [{k: torch.as_tensor(v) for k, v in m.processor.transform(frame).items()} for m in members]


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
def compare_forward(fp32: list[nn.Module], int8: list[nn.Module], batch: list[dict[str, torch.Tensor]],
                    repeats: int = 21, warmup: int = 3) -> dict[str, float]:
    """Paired timing of the fp32 and int8 networks on the SAME batch with the SAME thread count.

    Both are warmed up `warmup` times, then timed in alternation (fp32, int8, fp32, int8, ...),
    so a slowdown from other processes on a shared machine hits both alike; the speedup is the
    median of the per-pair ratios (and the ratio of the medians is reported beside it).
    """
    threads = torch.get_num_threads()

    def once(nets: list[nn.Module]) -> float:
        start = time.perf_counter()
        for net, b in zip(nets, batch):
            net(b)
        return time.perf_counter() - start

    for _ in range(max(warmup, 1)):
        once(fp32)
        once(int8)
    t32, t8 = [], []
    for _ in range(max(repeats, 1)):
        t32.append(once(fp32))
        t8.append(once(int8))
        if torch.get_num_threads() != threads:
            raise RuntimeError("quantize timing: the torch thread count changed during the measurement")
    t32, t8 = np.asarray(t32), np.asarray(t8)
    return {"fp32_s": float(np.median(t32)), "int8_s": float(np.median(t8)),
            "speedup": float(np.median(t32 / t8)), "speedup_of_medians": float(np.median(t32) / np.median(t8)),
            "fp32_iqr_s": float(np.subtract(*np.percentile(t32, [75, 25]))),
            "int8_iqr_s": float(np.subtract(*np.percentile(t8, [75, 25]))),
            "repeats": int(t32.size), "threads": threads}


def warn_if_timing_is_noise(timing: dict[str, float], tolerance: float = 0.1) -> bool:
    """Warn (and say True) when fp32 timed against itself is more than `tolerance` from 1: then the
    machine's load, not int8, moves the speedup. Measured here: with 2 torch threads on a 2-core
    machine whose other core was busy, alternate calls of one network ran 3x apart."""
    null = timing["null_speedup_fp32_vs_fp32"]
    if abs(null - 1.0) <= tolerance:
        return False
    log.warning("postfit quantize: fp32 timed against itself gave a speedup of %.2f, so the int8 speedup (%.2f) "
                "is load noise, not a measurement. Rerun on a quiet machine, or with fewer torch threads than "
                "free cores (OMP_NUM_THREADS).", null, timing["speedup"])
    return True


@torch.no_grad()
def time_breakdown(net: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 7) -> dict[str, float]:
    """Median milliseconds per top-level submodule (forward hooks) and for the whole forward;
    `other` is the rest (fusing modality vectors, masking)."""
    spent: dict[str, list[float]] = {}
    hooks = []
    for name, mod in net.named_children():
        def pre(_m, _i, name=name):
            spent.setdefault(name, []).append(-time.perf_counter())

        def post(_m, _i, _o, name=name):
            spent[name][-1] += time.perf_counter()

        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        net(batch)
        spent.clear()
        total = []
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            net(batch)
            total.append(time.perf_counter() - start)
    finally:
        for h in hooks:
            h.remove()
    reps = len(total)
    # a child called several times per forward (an encoder per field) adds up within one forward
    out = {k: 1e3 * float(np.median(np.asarray(v).reshape(reps, -1).sum(axis=1))) for k, v in spent.items()
           if len(v) % reps == 0}
    out["total"] = 1e3 * float(np.median(total))
    out["other"] = max(out["total"] - sum(v for k, v in out.items() if k != "total"), 0.0)
    return out


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
        if value.numel() == t.numel() == 1:  # a scalar buffer written as shape (1,) by older files
            value = value.reshape(t.shape)
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

    from within.models.base import BaseMLModel

    bundle = Path(bundle)
    path = Path(int8_file) if int8_file else bundle.parent / "export" / INT8_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no int8 file; it is written by the post-fit step `quantize`")
    predictor = BaseMLModel.load(bundle)
    arrays = load_file(str(path))
    for i, member in enumerate(members_of(predictor)):
        prefix = f"member{i}/"
        own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        member.net = rebuild_int8(member.net, own)
    return predictor


def _backend(qnet: nn.Module) -> str:
    """'torch.ao dynamic' when quantize() built torch.ao dynamic Linear layers, else 'torchao'."""
    if any(isinstance(m, _QLINEAR_TYPES) for m in qnet.modules()):
        return "torch.ao.quantization.quantize_dynamic"
    return "torchao Int8DynamicActivationInt8WeightConfig"


class Quantize:
    """int8 copies via the model's quantize(); test AUC / log loss change and speedup at batch 1024."""

    name = "quantize"

    @staticmethod
    def skip_reason(model) -> str | None:
        members = networks_of(model)
        if members is None:
            return f"{type(model).__name__} has no network to quantize"
        if not all(callable(getattr(m.net, "quantize", None)) for m in members):
            return "a network has no quantize()"
        return None

    def run(self, ctx: PostfitContext) -> None:
        from within.calibration.metrics import auc, logloss

        settings = ctx.settings("quantize")
        batch_size = int(settings.get("batch_size", 1024))
        repeats = int(settings.get("repeats", 21))  # paired fp32/int8 repeats (compare_forward)
        members = members_of(ctx.model)
        fp32 = [m.net.eval() for m in members]
        calibration = self.calibration_batches(ctx, members, int(settings.get("calibration_rows", 4096)))
        alpha = float(settings.get("smooth_alpha", 0.5))
        int8 = [net.quantize(calibration=b, smooth_alpha=alpha).eval() for net, b in zip(fp32, calibration)]
        frame = ctx.scoring_frame()
        max_rows = int(settings.get("max_rows", 20_000))
        if len(frame) > max_rows:  # the deltas need a sample, not every test row twice
            frame = frame.sample(n=max_rows, random_state=0)
        y, w = labels_of(ctx.model, frame)
        p32 = np.asarray(ctx.model.predict(frame))
        with swapped_nets(members, int8):
            p8 = np.asarray(ctx.model.predict(frame))
        sample = frame.sample(n=batch_size, replace=len(frame) < batch_size, random_state=0)
        batches = member_batches(members, sample)
        timing = compare_forward(fp32, int8, batches, repeats)
        # the same measurement of fp32 against itself: how far from 1 noise alone moves the ratio
        timing["null_speedup_fp32_vs_fp32"] = compare_forward(fp32, fp32, batches, repeats)["speedup"]
        warn_if_timing_is_noise(timing)
        ctx.metrics.update({
            "quantize/auc_delta": auc(p8, y, weight=w) - auc(p32, y, weight=w),
            "quantize/logloss_delta": logloss(p8, y, weight=w) - logloss(p32, y, weight=w),
            f"quantize/speedup_b{batch_size}": timing["speedup"],
            "quantize/max_abs_prob_diff": float(np.max(np.abs(p8 - p32))),
        })
        info: dict[str, Any] = {"batch_size": batch_size, "smooth_alpha": alpha,
                                "calibration_rows": int(next(iter(calibration[0].values())).shape[0]),
                                "fp32_ms": 1e3 * timing["fp32_s"],
                                "int8_ms": 1e3 * timing["int8_s"], "timing": timing,
                                "backend": _backend(int8[0]),
                                # where a forward pass spends its time (first member): int8 only
                                # helps the Linear layers, so their share bounds the speedup
                                "time_breakdown_ms": {"fp32": time_breakdown(fp32[0], batches[0]),
                                                      "int8": time_breakdown(int8[0], batches[0])}}
        info.update(self._save(ctx, members, int8, batches))
        ctx.metadata["quantize"] = info
        (ctx.subdir("export") / "quantize.json").write_text(json.dumps(info, indent=2))

    @staticmethod
    def calibration_batches(ctx: PostfitContext, members: list[Any], rows: int) -> list[dict[str, torch.Tensor]]:
        """SmoothQuant's activation ranges come from calib rows (never test), one batch per member."""
        if rows < 1:
            raise ValueError(f"quantize.calibration_rows must be >= 1, got {rows}")
        _, frame = ctx.calibration_frame()
        if len(frame) > rows:
            frame = frame.sample(n=rows, random_state=0)
        return member_batches(members, frame)

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
                arrays.update({f"member{i}/{k}": np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in own.items()})
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            log.warning("postfit quantize: int8 state not saved (%s); the fp32 bundle is the artifact", err)
            return {"int8_saved": False, "why_not_saved": str(err)}
        path = ctx.subdir("export") / INT8_FILE
        save_file(arrays, str(path))
        return {"int8_saved": True, "int8_file": str(path), "load_with": "within.postfit.quantize.load_int8(bundle)"}

"""Opacus wiring for DP-SGD (Abadi et al., 2016): noise calibration, accounting, private model/optimizer.

Knows torch and Opacus only (never `within.lit`). `make_private` is a thin layer over
`opacus.PrivacyEngine.make_private` with two corrections our Poisson loader needs:

- The loader already samples each row independently with rate q = batch_size / N (Opacus'
  `UniformWithReplacementSampler`), so it goes to Opacus with `poisson_sampling=False`.
  Opacus would then infer q as 1 / len(loader) = 1 / floor(1 / q), which is not q; the
  accountant hook is re-attached with the exact q and the optimizer's expected batch size set
  to q * N (per rank), the fixed, data-independent divisor DP-SGD averages with.
- Hooks are attached without wrapping (`wrap_model=False`), so the network keeps its own
  `state_dict` keys and the bundle sees a plain `nn.Module`.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")
# 16-bit per-sample norms round by up to 2**-8 relative, so a "clipped" gradient can exceed
# max_grad_norm and the Gaussian noise no longer covers the sensitivity.
DP_PRECISIONS = ("32", "32-true", "64", "64-true")


class PrivacyConfigError(ValueError):
    """A privacy setting that would give no (or a wrong) privacy guarantee; the message names it."""


def default_delta(n_train: int) -> float:
    """delta = 1 / (10 N): well below 1/N, the level at which releasing one whole row is 'private'."""
    if n_train < 1:
        raise PrivacyConfigError(f"privacy.target_delta: cannot default it with N_train={n_train} rows")
    return 1.0 / (10.0 * n_train)


def steps_per_epoch(sample_rate: float) -> int:
    """Batches per epoch of Opacus' UniformWithReplacementSampler: floor(1 / q)."""
    return int(1.0 / sample_rate)


def make_accountant(mechanism: str, history: Sequence[Sequence[float]] = ()) -> Any:
    """A fresh Opacus accountant ('prv' | 'rdp') holding `history` [(noise, q, steps), ...]."""
    from opacus.accountants import create_accountant

    if mechanism not in ACCOUNTANTS:
        raise PrivacyConfigError(f"privacy.accountant: {mechanism!r} is not one of {list(ACCOUNTANTS)}")
    acc = create_accountant(mechanism=mechanism)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of(history: Sequence[Sequence[float]], delta: float, mechanism: str) -> float:
    """Epsilon spent by `history` at `delta` (0 for an empty history)."""
    if not history or sum(int(h[2]) for h in history) == 0:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


def with_steps(history: Sequence[Sequence[float]], noise: float, q: float, steps: int) -> list[tuple]:
    """`history` extended by `steps` more DP-SGD steps at (noise, q)."""
    out = [(float(s), float(r), int(n)) for s, r, n in history]
    if steps > 0:
        out.append((float(noise), float(q), int(steps)))
    return out


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str
) -> float:
    """Smallest noise multiplier whose `steps` steps at rate q stay within target_epsilon
    (Opacus `get_noise_multiplier`, binary search to 0.01 in epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise PrivacyConfigError(f"trainer.max_epochs: plans {steps} DP steps; need at least one")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=mechanism, epsilon_tolerance=0.01,
        )
    )


def max_steps_within(
    history: Sequence[Sequence[float]], noise: float, q: float, delta: float, target_epsilon: float,
    mechanism: str, upper: int,
) -> int:
    """Most further steps at (noise, q) that keep epsilon <= target_epsilon, searched in [0, upper]."""
    if epsilon_of(with_steps(history, noise, q, upper), delta, mechanism) <= target_epsilon:
        return upper
    lo, hi = 0, upper  # eps(lo) <= target < eps(hi); epsilon only grows with steps
    if epsilon_of(history, delta, mechanism) > target_epsilon:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_of(with_steps(history, noise, q, mid), delta, mechanism) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def trainable_leaf_types(module: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in module.modules() if any(p.requires_grad for p in m.parameters(False))})


def resolve_grad_sample_mode(
    module: nn.Module, requested: str, probe: Callable[[nn.Module], torch.Tensor] | None = None
) -> tuple[str, str | None]:
    """(mode to use, reason for falling back or None).

    Ghost clipping (Li et al., 2022; Bu et al., 2023) computes per-sample gradient norms
    without materialising per-sample gradients, but Opacus refuses it when a layer with a
    ghost norm rule (Linear, Embedding) runs twice in one forward (parameter tying). That is
    only visible at run time, so a copy of the model runs `probe` (forward to per-sample
    losses) once under ghost hooks; any failure falls back to 'hooks'.
    """
    if requested not in GRAD_SAMPLE_MODES:
        raise PrivacyConfigError(
            f"privacy.grad_sample_mode: {requested!r} is not one of {list(GRAD_SAMPLE_MODES)}"
        )
    if requested != "ghost" or probe is None:
        return requested, None
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    trial = copy.deepcopy(module)
    gsm = GradSampleModuleFastGradientClipping(trial, max_grad_norm=1.0, loss_reduction="sum")
    try:
        probe(gsm).sum().backward()
        gsm.get_norm_sample()
    except Exception as e:  # noqa: BLE001 - any ghost failure means: use per-sample hooks
        reason = f"{type(e).__name__}: {e}"
        log.warning("privacy.grad_sample_mode=ghost is not supported by this model (%s); falling back to hooks",
                    reason)
        return "hooks", reason
    finally:
        gsm.cleanup()
    return "ghost", None


@dataclass
class PrivateTraining:
    """Everything DP-SGD training holds: Opacus engine (accountant), hooks, optimizer, criterion."""

    engine: Any
    hooks: Any
    optimizer: Any
    criterion: Any | None
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    delta: float
    accountant: str
    grad_sample_mode: str
    requested_grad_sample_mode: str
    fallback_reason: str | None = None
    world_size: int = 1
    secure_mode: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    @history.setter
    def history(self, value: Sequence[Sequence[float]]) -> None:
        self.engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in value]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        return epsilon_of(self.history, self.delta if delta is None else delta, self.accountant)

    def close(self) -> None:
        """Detach Opacus' hooks from the network (it is then a plain module again)."""
        cleanup = getattr(self.hooks, "cleanup", None) or getattr(self.hooks, "_close", None)
        if cleanup is not None:
            cleanup()


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Any,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    expected_batch_size: float,
    delta: float,
    accountant: str = "prv",
    grad_sample_mode: str = "ghost",
    criterion: nn.Module | None = None,
    probe: Callable[[nn.Module], torch.Tensor] | None = None,
    secure_mode: bool = False,
    world_size: int = 1,
) -> PrivateTraining:
    """Attach per-sample gradient hooks to `module`, make `optimizer` clip + noise, account steps.

    `data_loader` must already sample Poisson with rate `sample_rate` (checked again by
    DPTrainingValidator before the first step). `expected_batch_size` is per rank. With
    `world_size > 1` the module goes through Opacus' DPDDP (parameters broadcast from rank 0)
    and the optimizer becomes Opacus' distributed DP optimizer: each rank clips its own rows,
    rank 0 alone adds the noise, gradients are summed across ranks after noising.
    """
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from within.privacy.norm_samplers import register

    register()  # faster embedding and Conv2d norm samplers for ghost clipping (see their module docstring)
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"privacy.accountant: {accountant!r} is not one of {list(ACCOUNTANTS)}")
    mode, reason = resolve_grad_sample_mode(module, grad_sample_mode, probe)
    if mode == "ghost" and criterion is None:
        raise PrivacyConfigError("privacy.grad_sample_mode=ghost needs the per-sample criterion; pass criterion=")
    try:
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    except ImportError as e:
        raise PrivacyConfigError(
            f"privacy.secure_mode=true needs torchcsprng for cryptographically secure noise ({e}); "
            "install torchcsprng or set privacy.secure_mode=false"
        ) from e
    target = DPDDP(module) if world_size > 1 else module
    out = engine.make_private(
        module=target, optimizer=optimizer, criterion=criterion if criterion is not None else nn.MSELoss(),
        data_loader=data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=False, grad_sample_mode=mode, wrap_model=False, loss_reduction="mean",
    )
    hooks, dp_optimizer = out[0], out[1]
    dp_criterion = out[2] if mode == "ghost" else None
    # the exact q (see module docstring) and the fixed divisor of the noisy mean
    dp_optimizer.expected_batch_size = expected_batch_size
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    if mode != grad_sample_mode:
        log.info("privacy: grad_sample_mode %s -> %s (%s)", grad_sample_mode, mode, reason)
    return PrivateTraining(
        engine=engine, hooks=hooks, optimizer=dp_optimizer, criterion=dp_criterion,
        noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
        sample_rate=float(sample_rate), expected_batch_size=float(expected_batch_size), delta=float(delta),
        accountant=accountant, grad_sample_mode=mode, requested_grad_sample_mode=grad_sample_mode,
        fallback_reason=reason, world_size=int(world_size), secure_mode=bool(secure_mode),
    )


def zero_per_sample_grads(private: PrivateTraining, params: Sequence[nn.Parameter]) -> None:
    """What backward on an empty Poisson batch would leave: zero per-sample gradients.

    An empty batch is a legal Poisson draw; its step still adds noise and still counts, so
    skipping it would make the accountant (which assumes every step happens) wrong.
    """
    for p in params:
        if not p.requires_grad:
            continue
        if private.grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))


def is_finite_positive(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False

"""QuantumNoiseLayer: annealed training-time noise on hidden features.

Training with input/feature noise is equivalent, to first order, to Tikhonov regularisation
(Bishop, "Training with noise is equivalent to Tikhonov regularization", Neural Computation 1995);
annealing the noise from large to small follows "Adding gradient noise improves learning for
very deep networks" (Neelakantan et al., 2015), which decays the noise over training.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NOISE_TYPES = ("phase", "gaussian", "multiplicative")
SCHEDULES = ("constant", "linear", "cosine", "exponential")


def schedule_factor(schedule: str, progress: float, final_ratio: float, exp_floor: float = 1e-3) -> float:
    """Multiplier in [final_ratio, 1] for training progress t = step / total_steps, clipped to [0, 1].

    constant:    1
    linear:      1 - (1 - r) * t
    cosine:      r + (1 - r) * (1 + cos(pi * t)) / 2
    exponential: max(r, exp_floor) ** t   (a geometric decay can't reach 0, so r is floored)
    """
    t = min(max(float(progress), 0.0), 1.0)
    r = float(final_ratio)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - r) * t
    if schedule == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        return max(r, exp_floor) ** t
    raise ValueError(f"annealing_schedule={schedule!r} is not one of {SCHEDULES}")


class QuantumNoiseLayer(nn.Module):
    """Annealed noise on the last dimension of a feature tensor; identity in eval mode.

    "Quantum-inspired" means only this: in `phase` mode, consecutive channel pairs
    (x_{2k}, x_{2k+1}) are read as the real and imaginary parts of a complex amplitude and each
    is rotated by a random phase theta ~ N(0, (sigma * pi)^2). The rotation preserves every pair's
    norm |x_{2k} + i x_{2k+1}|, so the noise changes direction, not magnitude. Nothing here is
    quantum-computational. With an odd channel count the last channel passes through.

    Noise types, with sigma the current level (`get_current_noise_level()`):
      - `gaussian`:       x + sigma * N(0, 1). Additive in absolute units, so it assumes
                          features on a unit scale (e.g. after LayerNorm); it is not scale-aware.
      - `multiplicative`: x * (1 + sigma * N(0, 1)), Gaussian dropout (Srivastava et al., JMLR 2014);
                          scale-aware, and zero features stay zero.
      - `phase`:          the pairwise rotation above.

    Training with noise acts as Tikhonov regularisation (Bishop 1995); the level is annealed over
    training as in Neelakantan et al. (2015). `update_schedule(step)` sets
    sigma = noise_intensity * schedule(step / total_steps); see `schedule_factor` for each
    schedule's formula. `final_ratio` is the schedule's value at the end, as a fraction of
    `noise_intensity`; `exponential` floors it at `exp_floor` (default 1e-3). The current level is
    a buffer, so it is saved in checkpoints. `total_steps=None` leaves it to the
    `within.lit.dynamics.NoiseAnnealing` callback to fill from the trainer.
    """

    def __init__(
        self,
        channels: int,
        noise_type: str = "phase",
        noise_intensity: float = 0.1,
        annealing_schedule: str = "constant",
        total_steps: int | None = 1000,
        final_ratio: float = 0.0,
        exp_floor: float = 1e-3,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int (the feature dimension), got {channels!r}")
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type={noise_type!r}; choose one of {NOISE_TYPES}")
        if annealing_schedule not in SCHEDULES:
            raise ValueError(f"annealing_schedule={annealing_schedule!r}; choose one of {SCHEDULES}")
        if not noise_intensity >= 0.0:
            raise ValueError(f"noise_intensity must be >= 0, got {noise_intensity!r}")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio is a fraction of noise_intensity; use a value in [0, 1], got {final_ratio!r}")
        if not 0.0 < exp_floor <= 1.0:
            raise ValueError(f"exp_floor must be in (0, 1], got {exp_floor!r}")
        self.channels = channels
        self.noise_type = noise_type
        self.noise_intensity = float(noise_intensity)
        self.annealing_schedule = annealing_schedule
        self.total_steps = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.final_ratio = float(final_ratio)
        self.exp_floor = float(exp_floor)
        self.register_buffer("noise_level", torch.tensor(self.noise_intensity, dtype=torch.float32))

    def set_total_steps(self, total_steps: int) -> None:
        if isinstance(total_steps, float) and math.isfinite(total_steps) and total_steps.is_integer():
            total_steps = int(total_steps)
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (optimizer steps to anneal over), got {total_steps!r}")
        self.total_steps = total_steps

    def update_schedule(self, step: int) -> float:
        """Set the level to noise_intensity * schedule(step / total_steps); return it."""
        if self.total_steps is None:
            raise ValueError(
                "total_steps is None: pass total_steps=... to QuantumNoiseLayer or train with the "
                "NoiseAnnealing callback, which sets it from the trainer"
            )
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        level = self.noise_intensity * schedule_factor(
            self.annealing_schedule, step / self.total_steps, self.final_ratio, self.exp_floor
        )
        self.noise_level.fill_(level)
        return level

    def get_current_noise_level(self) -> float:
        return float(self.noise_level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.channels:
            raise ValueError(
                f"QuantumNoiseLayer(channels={self.channels}) got input with last dimension "
                f"{x.shape[-1]}; set channels to the feature dimension"
            )
        if not self.training:
            return x
        # Stays a tensor: reading it as a float would force a GPU sync every step.
        sigma = self.noise_level.to(x.dtype)
        if self.noise_type == "gaussian":
            return x + sigma * torch.randn_like(x)
        if self.noise_type == "multiplicative":
            return x * (1.0 + sigma * torch.randn_like(x))
        return self._rotate_pairs(x, sigma)

    def _rotate_pairs(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n_pairs = self.channels // 2
        if n_pairs == 0:
            return x
        paired = x[..., : 2 * n_pairs].reshape(*x.shape[:-1], n_pairs, 2)
        re, im = paired[..., 0], paired[..., 1]
        theta = torch.randn_like(re) * (sigma * math.pi)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rotated = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).reshape(
            *x.shape[:-1], 2 * n_pairs
        )
        if self.channels % 2:
            rotated = torch.cat((rotated, x[..., -1:]), dim=-1)
        return rotated

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, noise_type={self.noise_type!r}, "
            f"noise_intensity={self.noise_intensity}, schedule={self.annealing_schedule!r}, "
            f"total_steps={self.total_steps}, final_ratio={self.final_ratio}"
        )

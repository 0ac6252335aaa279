"""AdaptiveDropout: per-modality dropout rates steered by the generalisation gap and gradient noise;
FastDropout: nn.Dropout with a cheaper random mask on CPU.

Dropout itself is Srivastava et al., "Dropout: a simple way to prevent neural networks from
overfitting" (JMLR 2014), in its inverted form (scale by 1/(1-p) at train time, identity at eval).
The adaptation rule is ours and is stated exactly in `AdaptiveDropout.update_rate`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

# Slopes below this are rounding noise from a constant window, not a widening gap.
_TREND_EPS = 1e-9


def keep_mask(shape: Sequence[int], p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask of `shape`, each entry True with probability 1 - p, p rounded to a multiple of 1/65536.

    Four 16-bit lanes come from each 64-bit draw of the global generator (so torch.manual_seed
    governs it): torch's CPU bernoulli_ makes one draw per element, which made the two tower
    dropouts 17% of a CTR training step on CPU (docs/throughput.md)."""
    n = math.prod(int(d) for d in shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(*shape) >= round(quantised_rate(p) * 65536) - 32768


def quantised_rate(p: float) -> float:
    """The drop rate keep_mask draws with: p rounded to a multiple of 1/65536."""
    return round(p * 65536) / 65536


class FastDropout(nn.Dropout):
    """nn.Dropout (inverted: scaled by 1/(1-p) in training, identity in eval) whose CPU mask is
    `keep_mask`, about 5x cheaper than bernoulli_ at [1024, 256]; on other devices it is F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        scale = 1.0 / (1.0 - quantised_rate(self.p))
        return x * keep_mask(x.shape, self.p, x.device).to(x.dtype) * scale


class AdaptiveDropout(nn.Module):
    """Inverted dropout with one rate per feature group (e.g. text / image / tabular).

    `forward(x, group)` drops with that group's current rate in training and is the identity in
    eval mode; `forward(x)` (no group: the layer used as one plain dropout) drops with the mean of
    the group rates, which is every group's rate when only the gap or layer-wide gradient norms
    steer it. `update_rate` moves each rate by `step_size` up or down (rule in its docstring)
    and clamps it to `adaptive_range`. Rates and the gap-tracking state are buffers, so they
    are saved in checkpoints and restored on resume.
    """

    def __init__(
        self,
        p: float = 0.1,
        momentum: float = 0.9,
        window_size: int = 5,
        adaptive_range: tuple[float, float] = (0.0, 0.5),
        groups: Sequence[str] = ("text", "image", "tabular"),
        step_size: float = 0.02,
        noise_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in adaptive_range)
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"adaptive_range must be (lo, hi) with 0 <= lo <= hi < 1, got {adaptive_range!r}")
        if not lo <= p <= hi:
            raise ValueError(f"p={p!r} must lie inside adaptive_range={adaptive_range!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"window_size must be an int >= 2 (a trend needs two points), got {window_size!r}")
        if not step_size > 0.0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        if not noise_threshold > 0.0:
            raise ValueError(f"noise_threshold must be > 0, got {noise_threshold!r}")
        groups = tuple(groups)
        if not groups or len(set(groups)) != len(groups) or not all(isinstance(g, str) and g for g in groups):
            raise ValueError(f"groups must be distinct non-empty names, got {groups!r}")
        self.p = float(p)
        self.momentum = float(momentum)
        self.window_size = window_size
        self.adaptive_range = (lo, hi)
        self.groups = groups
        self.step_size = float(step_size)
        self.noise_threshold = float(noise_threshold)
        self._index = {g: i for i, g in enumerate(groups)}
        self.register_buffer("rates", torch.full((len(groups),), self.p, dtype=torch.float64))
        self.register_buffer("smoothed_gap", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gap_window", torch.zeros(window_size, dtype=torch.float64))
        self.register_buffer("n_observations", torch.zeros((), dtype=torch.long))
        # gradient history: per group, per update_rate call that brought it norms, (count, mean, M2)
        # of those norms; the newest call last, the last `window_size` calls kept
        self.register_buffer("grad_window", torch.zeros(len(groups), window_size, 3, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the gradient history have none: start it empty
        state_dict.setdefault(prefix + "grad_window", torch.zeros_like(self.grad_window))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, group: str | None = None) -> torch.Tensor:
        if group is not None and group not in self._index:
            raise ValueError(f"group={group!r} is not one of this AdaptiveDropout's groups {self.groups}")
        if not self.training:
            return x
        # Rate stays a tensor: reading it as a float would force a GPU sync every step.
        rate = self.rates.mean() if group is None else self.rates[self._index[group]]
        p = rate.to(x.dtype)
        keep = torch.rand_like(x) >= p
        return x * keep / (1.0 - p)

    def update_rate(
        self,
        grads: Mapping[str, torch.Tensor | Sequence[float] | np.ndarray] | torch.Tensor | Sequence[float]
        | np.ndarray | None = None,
        *,
        train_loss: float | None = None,
        val_loss: float | None = None,
    ) -> dict[str, float]:
        """Move each group's rate one step and return the new rates.

        `grads`: recent gradient norms, {group: norms} per group, or one sequence of norms for the
        whole layer (then every group reads it).

        The rule, per call:
          1. If both losses are given, the gap g = val_loss - train_loss is smoothed,
             s <- momentum * s + (1 - momentum) * g (s starts at the first g), and s joins a window
             of the last `window_size` values. The trend is the least-squares slope of that window
             (needs >= 2 values; slopes <= 1e-9 count as flat). A constant offset between the two losses has no slope, so only
             a *widening* gap counts.
          2. Gradient history: the norms in `grads[group]` join that group's history, which keeps
             the norms of its last `window_size` calls that brought any. For each group given
             norms in this call, and with at least two norms in its history, the gradient noise
             ratio is std / |mean| over all the norms in its history (population std).
          3. A group's rate rises by `step_size` if the trend is > 0 or its noise ratio exceeds
             `noise_threshold`; otherwise, if at least one of the two signals exists, it falls
             by `step_size`; with no signal it stays. The gap applies to all groups; the noise
             ratio only to its own. Rates are clamped to `adaptive_range`.
        """
        if (train_loss is None) != (val_loss is None):
            raise ValueError("pass train_loss and val_loss together (the gap needs both), or neither")
        trend = None
        if train_loss is not None:
            gap = float(val_loss) - float(train_loss)
            if not math.isfinite(gap):
                raise ValueError(f"train_loss={train_loss!r} and val_loss={val_loss!r} must be finite")
            trend = self._observe_gap(gap)
        if grads is not None and not isinstance(grads, Mapping):
            grads = dict.fromkeys(self.groups, grads)  # layer-wide norms steer every group
        unknown = set(grads or {}) - set(self.groups)
        if unknown:
            raise ValueError(f"grads has groups {sorted(unknown)} not in this AdaptiveDropout's groups {self.groups}")
        lo, hi = self.adaptive_range
        for group, i in self._index.items():
            ratio = self._observe_grads(i, (grads or {}).get(group))
            noisy = ratio is not None and ratio > self.noise_threshold
            widening = trend is not None and trend > _TREND_EPS
            if widening or noisy:
                delta = self.step_size
            elif trend is not None or ratio is not None:
                delta = -self.step_size
            else:
                continue
            self.rates[i] = min(hi, max(lo, float(self.rates[i]) + delta))
        return self.get_current_rate()

    def _observe_grads(self, i: int, norms: torch.Tensor | Iterable[float] | None) -> float | None:
        """Add this call's norms to group i's history; the noise ratio over it (None: no signal)."""
        arr = _as_array(norms)
        if arr.size == 0:
            return None
        mean = float(arr.mean())
        window = self.grad_window[i]
        window.copy_(torch.roll(window, -1, dims=0))
        window[-1] = torch.tensor([arr.size, mean, float(((arr - mean) ** 2).sum())], dtype=torch.float64)
        count, means, m2 = (window[:, j].cpu().numpy() for j in range(3))
        n = count.sum()
        if n < 2:
            return None
        pooled = float((count * means).sum() / n)
        # Chan et al.'s pairwise combination: the exact spread of the concatenated norms
        spread = float((m2 + count * (means - pooled) ** 2).sum())
        return math.sqrt(spread / n) / abs(pooled) if pooled != 0 else math.inf

    def _observe_gap(self, gap: float) -> float | None:
        k = int(self.n_observations)
        s = gap if k == 0 else self.momentum * float(self.smoothed_gap) + (1.0 - self.momentum) * gap
        self.smoothed_gap.fill_(s)
        # gap_window is a ring ordered oldest-first once rolled.
        self.gap_window.copy_(torch.roll(self.gap_window, -1))
        self.gap_window[-1] = s
        self.n_observations += 1
        m = min(k + 1, self.window_size)
        if m < 2:
            return None
        ys = self.gap_window[-m:].cpu().numpy()
        xs = np.arange(m, dtype=np.float64)
        return float(np.polyfit(xs, ys, 1)[0])

    def get_current_rate(self, group: str | None = None) -> float | dict[str, float]:
        if group is None:
            return {g: float(self.rates[i]) for g, i in self._index.items()}
        if group not in self._index:
            raise ValueError(f"group={group!r} is not one of this AdaptiveDropout's groups {self.groups}")
        return float(self.rates[self._index[group]])

    def reset(self) -> None:
        """Restore the initial rates and forget the gap and gradient histories."""
        self.rates.fill_(self.p)
        self.smoothed_gap.zero_()
        self.gap_window.zero_()
        self.n_observations.zero_()
        self.grad_window.zero_()

    def extra_repr(self) -> str:
        return f"groups={self.groups}, rates={self.get_current_rate()}, range={self.adaptive_range}"


def _as_array(norms: torch.Tensor | Iterable[float] | None) -> np.ndarray:
    if norms is None:
        return np.zeros(0)
    if isinstance(norms, torch.Tensor):
        return norms.detach().double().cpu().numpy().ravel()
    return np.asarray(list(norms), dtype=np.float64).ravel()


def default_regularisation(n_rows: int, n_features: int) -> dict[str, float]:
    """Starting dropout and weight decay from dataset size, with rho = n_rows / n_features.

    n_features stands in for the parameter count (rows per parameter is what overfitting
    depends on).
      weight_decay = clip(0.01 / rho, 1e-6, 1e-2)            (an L2 prior that fades as data grows)
      dropout      = clip(0.5 - 0.1 * log10(rho), 0.05, 0.5)  (0.5 at one row per feature,
                                                              0.05 from ~30k rows per feature)
    Both are non-increasing in n_rows and non-decreasing in n_features.
    """
    for name, v in (("n_rows", n_rows), ("n_features", n_features)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rho = n_rows / n_features
    weight_decay = float(np.clip(0.01 / rho, 1e-6, 1e-2))
    dropout = float(np.clip(0.5 - 0.1 * math.log10(rho), 0.05, 0.5))
    return {"dropout": dropout, "weight_decay": weight_decay}

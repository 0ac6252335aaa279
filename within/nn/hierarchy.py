"""HierarchicalEffects: nested random-effect offsets on the logit (account -> campaign), each shrunk toward its parent.

For levels l = 1..L (e.g. `account_id`, then `campaign_id`), every value g of level l has one scalar
delta_lg, and a row's offset is the sum over levels of its values' deltas. Campaigns nest in accounts,
so a campaign's effect is

    campaign_effect[c] = account_effect[account(c)] + delta_campaign[c]

and its own parameter is its deviation from its account. The prior is delta_lg ~ N(0, tau_l^2),
independent across values, so MAP training adds

    P = sum_l sum_g delta_lg^2 / (2 tau_l^2)

to the summed log loss; `penalty()` returns P / n_rows, the right weight beside a loss that is a mean
per impression. A campaign with few rows has little likelihood to hold its delta away from 0, so it
is pulled to its account; an account with few rows is pulled to 0, i.e. to what the rest of the
network predicts. Values the training rows never showed (OOV, padding) add nothing: an unseen
campaign of a known account is scored at its account's effect.

The shrinkage strength tau is fixed (`tau=[...]`) or set by empirical Bayes (`tau=None`): after each
training epoch, `update_prior()` takes one EM step on the Laplace-approximate marginal likelihood
(penalised quasi-likelihood, Breslow & Clayton, JASA 1993):

    tau_l^2 <- mean over seen values g of [ delta_lg^2 + 1 / (H_lg + 1 / tau_l^2) ]

where H_lg = sum over the value's training rows of n_i p_i (1 - p_i) is the Fisher information of
delta_lg, accumulated by `observe` while training. The second term is the posterior variance of
delta_lg; it keeps tau away from 0, where maximising jointly over delta and tau would collapse
(that is why tau is not a gradient-trained parameter).

Plain PyTorch: gathers and a sum, so it exports to ONNX with the rest of the network.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FIRST_VALUE = 2  # FeatureProcessor codes: 0 = padding, 1 = OOV, values from 2


class HierarchicalEffects(nn.Module):
    """Per-level scalar offsets for nested group fields, with a Gaussian prior per level.

    Args:
        fields: level names, parent first (e.g. ["account_id", "campaign_id"]).
        columns: each level's column in the AdBatch `groups` tensor.
        cardinalities: each level's code range (vocabulary + 2, as FeatureProcessor encodes it).
        tau: prior sd per level (one float for every level), fixed; None = empirical Bayes.
        init_tau: the starting tau of empirical Bayes.
        min_tau: the floor empirical Bayes keeps tau above.
        lr_scale: the offsets are stored as theta and used as lr_scale * theta, so Adam (whose step is
            scale-free) moves them lr_scale times faster than the rest of the network: a campaign's
            scalar sits in few batches, and at the tower's learning rate it would barely leave 0.
    """

    def __init__(
        self,
        fields: Sequence[str],
        columns: Sequence[int],
        cardinalities: Sequence[int],
        tau: float | Sequence[float] | None = None,
        init_tau: float = 0.3,
        min_tau: float = 1e-3,
        lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.fields = [str(f) for f in fields]
        if not self.fields:
            raise ValueError("hierarchy: name at least one group field, parent first (e.g. [account_id, campaign_id])")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"hierarchy: fields repeat in {self.fields}; name each level once")
        if not (len(columns) == len(cardinalities) == len(self.fields)):
            raise ValueError(f"hierarchy: {len(self.fields)} fields but {len(columns)} columns and "
                             f"{len(cardinalities)} cardinalities; give one of each per level")
        cards = [int(c) for c in cardinalities]
        if any(c < FIRST_VALUE for c in cards):
            raise ValueError(f"hierarchy: cardinalities must be >= {FIRST_VALUE} (pad + OOV + values), got {cards}")
        self.empirical_bayes = tau is None
        if tau is None:
            taus = [float(init_tau)] * len(cards)
        elif isinstance(tau, (int, float)):
            taus = [float(tau)] * len(cards)
        else:
            taus = [float(t) for t in tau]
            if len(taus) != len(cards):
                raise ValueError(f"hierarchy_tau: {len(taus)} values for {len(cards)} levels {self.fields}; "
                                 "give one per level, one for all, or null for empirical Bayes")
        if any(not t > 0 for t in taus) or not min_tau > 0:
            raise ValueError(f"hierarchy_tau: prior sds must be > 0, got {taus} (min_tau {min_tau})")
        self.min_tau = float(min_tau)
        if not float(lr_scale) > 0:
            raise ValueError(f"hierarchy_lr_scale must be > 0, got {lr_scale}")
        self.lr_scale = float(lr_scale)
        self.cardinalities = cards
        self.effects = nn.Embedding(sum(cards), 1)
        nn.init.zeros_(self.effects.weight)
        starts = [0]
        for c in cards[:-1]:
            starts.append(starts[-1] + c)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.register_buffer("columns", torch.tensor([int(c) for c in columns], dtype=torch.long), persistent=False)
        level = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(cards)])
        self.register_buffer("level_of", level, persistent=False)
        is_value = torch.cat([torch.arange(c) >= FIRST_VALUE for c in cards])
        self.register_buffer("is_value", is_value, persistent=False)
        self.register_buffer("tau2", torch.tensor(taus, dtype=torch.float64) ** 2)  # saved with the weights
        self.register_buffer("info", torch.zeros(sum(cards), dtype=torch.float64), persistent=False)
        self.register_buffer("rows_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("n_rows", torch.zeros((), dtype=torch.float64), persistent=False)

    # ---- scoring --------------------------------------------------------------------------
    def codes(self, groups: torch.Tensor) -> torch.Tensor:
        """Row indices into `effects` [B, L] from the AdBatch `groups` codes [B, n_group_fields]."""
        return groups.index_select(1, self.columns) + self.offsets

    def level_offsets(self, groups: torch.Tensor) -> torch.Tensor:
        """Each level's offset per row [B, L]; 0 for padding and OOV values."""
        idx = self.codes(groups)
        eff = self.effects(idx)[..., 0] * self.lr_scale
        return eff * self.is_value[idx].to(eff.dtype)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """The summed offset per row [B] (float32), to add to the logit."""
        return self.level_offsets(groups).sum(dim=1).float()

    def effect_table(self) -> list[torch.Tensor]:
        """Each level's deltas [cardinality] (codes 0 and 1 are padding and OOV)."""
        w = self.effects.weight.detach()[:, 0] * self.lr_scale
        return list(w.split(self.cardinalities))

    @property
    def tau(self) -> list[float]:
        return [float(t) for t in self.tau2.sqrt()]

    # ---- the prior ------------------------------------------------------------------------
    def set_rows(self, n: float) -> None:
        """The training impressions: P is divided by this, to sit beside a per-impression mean loss."""
        if not n > 0:
            raise ValueError(f"HierarchicalEffects.set_rows: need the number of training impressions > 0, got {n}")
        self.n_rows.fill_(float(n))

    def penalty(self) -> torch.Tensor:
        """P / n_rows (see the module docstring). Before `set_rows`, n_rows is the impressions observed so far."""
        w = self.effects.weight[:, 0] * self.lr_scale
        tau2 = self.tau2.to(w.dtype)[self.level_of]
        total = (w.pow(2) / (2 * tau2) * self.is_value.to(w.dtype)).sum()
        n = torch.where(self.n_rows > 0, self.n_rows, self.rows_seen.clamp_min(1.0))  # no device sync
        return total / n.to(w.dtype)

    @torch.no_grad()
    def observe(self, groups: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add the rows' Fisher information n p (1 - p) to their values (the E-step's H)."""
        p = torch.sigmoid(logits.detach().double())
        n = torch.ones_like(p) if weight is None else weight.detach().double()
        h = n * p * (1 - p)
        idx = self.codes(groups)
        self.info.index_add_(0, idx.reshape(-1), h.repeat_interleave(idx.shape[1]))
        self.rows_seen += n.sum()

    @torch.no_grad()
    def update_prior(self, info: torch.Tensor | None = None) -> dict[str, float]:
        """One empirical-Bayes EM step for each level's tau from the information observed since the last
        call (`info`: the same, summed across ranks), then reset the counts. With a fixed tau only the
        counts are reset. Returns {field: tau}."""
        info = self.info if info is None else info.to(self.info)
        if self.empirical_bayes:
            w = self.effects.weight.detach()[:, 0].double() * self.lr_scale
            for lvl, (delta, h, value) in enumerate(zip(w.split(self.cardinalities), info.split(self.cardinalities),
                                                        self.is_value.split(self.cardinalities))):
                seen = value & (h > 0)
                if not bool(seen.any()):
                    continue
                post_var = 1.0 / (h[seen] + 1.0 / self.tau2[lvl])
                self.tau2[lvl] = (delta[seen].pow(2) + post_var).mean().clamp_min(self.min_tau ** 2)
        if float(self.n_rows) <= 0 and float(self.rows_seen) > 0:
            self.n_rows.copy_(self.rows_seen)
        self.info.zero_()
        self.rows_seen.zero_()
        return dict(zip(self.fields, self.tau))


__all__ = ["HierarchicalEffects"]

"""SparseDenseOptimizer: lazy Adam for sparse-gradient embedding tables beside any dense optimizer.

A dense optimizer (Adam, AdamW) updates every row of an embedding table on every step: on a
130k-id CTR vocabulary that is most of a step's time, though a batch touches a few thousand rows.
With sparse embeddings (`model.net.sparse_embeddings=true`) the tables' gradients hold only the
touched rows, and LazyAdam updates only those (a row's moments advance when it is seen: the rule of
torch.optim.SparseAdam, which on CPU spent 10 ms a step sorting 26k ids in `coalesce`). The rest of
the network keeps the configured optimizer.

Lightning sees one optimizer: `param_groups` is both optimizers' groups (so LR schedulers move
both), `step(closure)` evaluates the closure once and steps both, and the state dict nests both.
LazyAdam has no weight decay: the tables are not decayed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import math

import torch


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer's closure, evaluated with gradients on (None without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [U], summed values [U, D]) of a sparse row gradient, duplicates added up. A mark per
    table row finds the distinct rows in linear time (coalesce sorts the ids instead)."""
    idx, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        return idx, values
    n_rows = grad.shape[0]
    seen = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
    seen[idx] = True
    rows = seen.nonzero().squeeze(1)
    slot = torch.empty(n_rows, dtype=torch.long, device=idx.device)
    slot[rows] = torch.arange(len(rows), device=idx.device)
    summed = values.new_zeros((len(rows),) + tuple(values.shape[1:])).index_add_(0, slot[idx], values)
    return rows, summed


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows a sparse gradient touches; the same update, bias correction (by the
    parameter's step count) and state keys (step, exp_avg, exp_avg_sq) as torch.optim.SparseAdam."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if not lr > 0 or not eps > 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LazyAdam: need lr > 0, eps > 0 and betas in [0, 1); got lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam takes sparse gradients (nn.Embedding(sparse=True)); step dense "
                                       "parameters with the dense optimizer")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                rows, g = unique_rows(p.grad)
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
        return loss


class SparseDenseOptimizer(torch.optim.Optimizer):
    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        # no super().__init__: the two optimizers own the parameters and their state
        self.dense, self.sparse = dense, sparse
        self.defaults = dict(dense.defaults)
        self.param_groups = dense.param_groups + sparse.param_groups
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return {**self.dense.state, **self.sparse.state}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        self.dense.step()
        self.sparse.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise ValueError("SparseDenseOptimizer.load_state_dict: expected the {'dense', 'sparse'} state of a "
                             "sparse_embeddings=true run; resume with the same model.net.sparse_embeddings setting")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        self.param_groups = self.dense.param_groups + self.sparse.param_groups

    def __repr__(self) -> str:
        return f"SparseDenseOptimizer(dense={self.dense!r}, sparse={self.sparse!r})"


def sparse_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of the module's sparse-gradient nn.Embedding / nn.EmbeddingBag tables."""
    return [m.weight for m in module.modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]


def build_optimizer(factory: Callable[..., torch.optim.Optimizer],
                    params: Iterable[torch.nn.Parameter], sparse: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`factory(params=dense)`, wrapped with LazyAdam over `sparse` (same lr, betas, eps) when there are any."""
    if not sparse:
        return factory(params=list(params))
    ids = {id(p) for p in sparse}
    dense = factory(params=[p for p in params if id(p) not in ids])
    d = dense.defaults
    sparse_opt = LazyAdam(sparse, lr=d.get("lr", 1e-3), betas=d.get("betas", (0.9, 0.999)), eps=d.get("eps", 1e-8))
    return SparseDenseOptimizer(dense, sparse_opt)

"""SparseDenseOptimizer: SparseAdam for sparse-gradient embedding tables beside any dense optimizer.

A dense optimizer (Adam, AdamW) updates every row of an embedding table on every step: on a
130k-id CTR vocabulary that is most of a step's time, though a batch touches a few thousand rows.
With sparse embeddings (`model.net.sparse_embeddings=true`) the tables' gradients hold only the
touched rows, and SparseAdam updates only those (lazy Adam: a row's moments advance when it is
seen). The rest of the network keeps the configured optimizer.

Lightning sees one optimizer: `param_groups` is both optimizers' groups (so LR schedulers move
both), `step(closure)` evaluates the closure once and steps both, and the state dict nests both.
SparseAdam has no weight decay: the tables are not decayed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
    """`factory(params=dense)`, wrapped with SparseAdam over `sparse` (same lr, betas, eps) when there are any."""
    if not sparse:
        return factory(params=list(params))
    ids = {id(p) for p in sparse}
    dense = factory(params=[p for p in params if id(p) not in ids])
    d = dense.defaults
    sparse_opt = torch.optim.SparseAdam(sparse, lr=d.get("lr", 1e-3), betas=d.get("betas", (0.9, 0.999)),
                                        eps=d.get("eps", 1e-8))
    return SparseDenseOptimizer(dense, sparse_opt)

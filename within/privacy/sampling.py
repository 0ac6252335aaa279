"""Poisson (Bernoulli-per-row) batch samplers for DP-SGD, single-process and distributed.

Opacus' `DistributedUniformWithReplacementSampler` silently drops an empty local batch
(`if len(selected_examples) > 0: yield ...`). Under DDP that is fatal twice over:
- the ranks then run different numbers of optimizer steps, and the distributed DP optimizer's
  all-reduce on one rank waits forever for the others (a hang);
- the accountant assumes every one of the floor(1/q) steps happens, empty draws included.

`DistributedPoissonSampler` keeps Opacus' sharding (one shared, epoch-seeded permutation split
into `world_size` disjoint shards) and per-row sampling at rate q inside each shard, but every
rank yields exactly `num_batches` batches, empty ones included. Each training row lives in
exactly one shard and joins a step with probability q, so the global batch is a Poisson sample
of the whole training set at rate q: the accountant's q is the GLOBAL q = E[global batch] / N.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler


class DistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler with a fixed number of batches per rank (empty ones kept).

    `num_replicas` / `rank` default to the initialized process group's.
    """

    def __init__(
        self,
        *,
        total_size: int,
        sample_rate: float,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if total_size <= 0:
            raise ValueError(f"total_size should be a positive integer value, but got total_size={total_size}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.total_size, self.sample_rate, self.generator = int(total_size), float(sample_rate), generator
        self.num_replicas = int(num_replicas) if num_replicas is not None else torch.distributed.get_world_size()
        self.rank = int(rank) if rank is not None else torch.distributed.get_rank()
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.epoch, self.shuffle, self.shuffle_seed = 0, bool(shuffle), int(shuffle_seed)
        # shard sizes differ by at most one row (Opacus' convention: no padding, no duplicated rows)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))
        self.num_batches = int(steps) if steps is not None else int(1 / self.sample_rate)

    def shard(self) -> torch.Tensor:
        """This rank's rows for the current epoch (disjoint from every other rank's)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[torch.Tensor]:
        indices = self.shard()
        for _ in range(self.num_batches):
            mask = torch.rand(len(indices), generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)]  # may be empty: the step still happens

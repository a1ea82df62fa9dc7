"""Which rows each worker trains on at each optimizer step: a pure function of (seed, step, rank).

Resume bugs are silent (dataloader position, epoch boundary, RNG); the contract here is that step ``s`` of a
resumed run sees exactly the batches step ``s`` of an uninterrupted run would see, because the plan is
recomputed from the seed rather than carried as iterator state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def epoch_micro_batches(lengths: list[int] | np.ndarray, micro_batch_size: int, seed: int, epoch: int,
                        group_size: int = 64) -> list[list[int]]:
    """Micro-batches of row indices for one epoch.

    Rows are shuffled, then sorted by length inside windows of ``group_size`` micro-batches, so that a
    micro-batch holds rows of similar length (little padding on skewed data) while the epoch stays shuffled.
    Every micro-batch has exactly ``micro_batch_size`` rows; the few left over are dropped for this epoch
    (the next epoch's shuffle includes them).
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = micro_batch_size * group_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for b in range(0, len(chunk) - micro_batch_size + 1, micro_batch_size):
            batches.append(chunk[b:b + micro_batch_size].tolist())
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


@dataclass(frozen=True)
class Plan:
    """The step plan for ``world`` workers each doing ``grad_accum`` micro-batches per optimizer step."""

    lengths: tuple[int, ...]
    micro_batch_size: int
    grad_accum: int
    world: int
    seed: int
    _epoch_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def per_step(self) -> int:
        return self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        n_batches = (len(self.lengths) // self.micro_batch_size)
        return n_batches // self.per_step

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"not enough training rows ({len(self.lengths)}) for one step of "
                f"{self.micro_batch_size} rows x {self.grad_accum} accumulation x {self.world} workers"
            )
        return max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))

    def step_batches(self, step: int, rank: int) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (row indices) worker ``rank`` trains on at 0-based ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()  # one epoch's plan at a time
            self._epoch_cache[epoch] = epoch_micro_batches(self.lengths, self.micro_batch_size, self.seed, epoch)
        batches = self._epoch_cache[epoch]
        base = within * self.per_step
        return [batches[base + g * self.world + rank] for g in range(self.grad_accum)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

"""Columnar training rows, and the shards of them that each worker fetches for its part of the batch plan.

* :class:`RowSet`: rows back to back in flat int32 arrays (``input_ids``, ``labels``, ``position_ids``) with
  ``offsets``. Four numpy arrays pickle as four buffers that Ray maps zero-copy from the object store; a
  ``list[Row]`` is three arrays and two Python objects per row, all rebuilt by every worker that fetches it.
* :class:`PlanShards`: made on the driver from the train rows and the batch plan
  (:class:`rayft.schedule.Plan`); puts one object per (epoch, rank) holding only the rows that rank trains on in that epoch, in the order it
  uses them. A worker fetches its object for the current epoch on first use and drops the previous one.
* :class:`EvalShards`: one object per rank holding ``rows[rank::world]``.

Memory, for ``B`` bytes of rows (12 bytes a token: 200k rows of 50-400 tokens are about 540 MB):

* driver: the RowSet (``B``), plus one shard (about ``B / world``) while :meth:`PlanShards.put` copies it into
  the object store.
* object store: ``epochs x B`` for the train shards (each epoch's shards hold the rows the plan uses in it:
  all but the few that do not fill a step), plus the eval rows once. Ray spills to disk past its
  ``object_store_memory``. The objects belong to the process that called ``put`` and go when its handle and
  every worker's copy of it are dropped (or that process ends).
* worker: the current (epoch, rank) shard, about ``B / world``, mapped zero-copy from its node's object store,
  and no per-row Python objects; the previous epoch's shard is released before the next is fetched.
* sweeps: put the RowSet once (``ray.put(rows)``, one zero-copy object) and call :meth:`PlanShards.put` inside
  each trial's function with that trial's plan: the shards then belong to the trial and go when it ends, so at
  most the running trials' shards are in the store. Calling ``put`` for every trial on the sweep driver
  would keep every trial's shards until the sweep ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayft.schedule import Plan

TOKEN_DTYPE = np.int32  # token ids, labels (-100) and positions all fit; collate widens to int64


@dataclass
class Row:
    """One training sequence: a packed bin, or a single example when not packing. All int64 ``[T]``."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray  # restarts at 0 at every example boundary


@dataclass(eq=False)
class RowSet:
    """Rows back to back: row ``i`` is ``[offsets[i], offsets[i+1])`` of the three flat ``[N]`` arrays.

    ``rows[i]`` is a :class:`Row` (int64 copies), ``rows[a:b]`` a RowSet view, ``rows.take(idx)`` a RowSet of
    the given rows in the given order. Arrays fetched from Ray are read-only; nothing here writes to them.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray  # [n_rows + 1] int64, offsets[0] == 0

    def __post_init__(self) -> None:
        n, first, last = len(self.input_ids), self.offsets[0], self.offsets[-1]
        if len(self.labels) != n or len(self.position_ids) != n or first != 0 or last != n:
            raise ValueError(f"inconsistent RowSet: {n} input_ids, {len(self.labels)} labels, "
                             f"{len(self.position_ids)} position_ids, offsets {first}..{last}")

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> RowSet:
        lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)

        def flat(name: str) -> np.ndarray:
            parts = [getattr(r, name) for r in rows]
            return np.concatenate(parts).astype(TOKEN_DTYPE) if parts else np.zeros(0, TOKEN_DTYPE)

        return cls(flat("input_ids"), flat("labels"), flat("position_ids"), _offsets(lengths))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Tokens per row, int64 ``[n_rows]``."""
        return np.diff(self.offsets)

    def num_tokens(self) -> int:
        return len(self.input_ids)

    def num_examples(self) -> int:
        """Examples packed into these rows (each starts at position 0)."""
        return int((self.position_ids == 0).sum())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.input_ids, self.labels, self.position_ids, self.offsets))

    def take(self, indices) -> RowSet:
        """The rows at ``indices``, in that order (a copy)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows: {idx.min()}..{idx.max()}")
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = _offsets(lengths)
        # source position of every output token: its row's start plus its place inside the row
        src = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return RowSet(self.input_ids[src], self.labels[src], self.position_ids[src], offsets)

    def __getitem__(self, key: int | slice) -> Row | RowSet:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.take(range(start, stop, step))
            stop = max(start, stop)
            lo, hi = self.offsets[start], self.offsets[stop]
            return RowSet(self.input_ids[lo:hi], self.labels[lo:hi], self.position_ids[lo:hi],
                          self.offsets[start:stop + 1] - lo)
        i = range(len(self))[key]  # IndexError past the end, negative indices count from it
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return Row(*(a[lo:hi].astype(np.int64) for a in (self.input_ids, self.labels, self.position_ids)))

    def __iter__(self) -> Iterator[Row]:
        return (self[i] for i in range(len(self)))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# --------------------------------------------------------------------------------------------- plan shards


def shard_indices(plan: Plan, total_steps: int, epoch: int, rank: int) -> np.ndarray:
    """Row indices worker ``rank`` trains on in ``epoch`` (steps before ``total_steps``), in the order it uses
    them: step by step, each step's ``grad_accum`` micro-batches as :meth:`Plan.step_batches` lists them."""
    spe = plan.steps_per_epoch
    steps = range(epoch * spe, min((epoch + 1) * spe, total_steps))
    return np.array([i for step in steps for mb in plan.step_batches(step, rank) for i in mb], dtype=np.int64)


@dataclass
class PlanShards:
    """Picklable handle to the per-(epoch, rank) train shards of one batch plan (see the module docstring).

    Driver (Ray running)::  shards = PlanShards.put(train_rows, plan, total_steps)
    Worker::                shards.micro_batches(step, rank)  # -> grad_accum RowSets of micro_batch_size rows
    """

    refs: list[list[Any]]  # [epoch][rank] -> ObjectRef of that worker's RowSet for that epoch
    steps_per_epoch: int
    grad_accum: int
    micro_batch_size: int
    total_steps: int
    _held: tuple[tuple[int, int], RowSet] | None = field(default=None, repr=False)

    @classmethod
    def put(cls, rows: RowSet, plan: Plan, total_steps: int) -> PlanShards:
        import ray

        if not np.array_equal(rows.lengths(), np.asarray(plan.lengths, dtype=np.int64)):
            raise ValueError(f"the plan was made for other rows ({len(plan.lengths)} lengths, "
                             f"{len(rows)} rows)")
        refs = [[ray.put(rows.take(shard_indices(plan, total_steps, epoch, rank))) for rank in range(plan.world)]
                for epoch in range(math.ceil(total_steps / plan.steps_per_epoch))]
        return cls(refs, plan.steps_per_epoch, plan.grad_accum, plan.micro_batch_size, total_steps)

    def micro_batches(self, step: int, rank: int) -> list[RowSet]:
        """The rows ``plan.step_batches(step, rank)`` names, one RowSet per micro-batch, in that order."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the plan's {self.total_steps} steps")
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._held is None or self._held[0] != (epoch, rank):
            import ray

            self._held = None  # release the previous epoch's shard before fetching the next
            self._held = ((epoch, rank), ray.get(self.refs[epoch][rank]))
        rows, size = self._held[1], self.micro_batch_size
        first = within * self.grad_accum
        return [rows[(first + g) * size:(first + g + 1) * size] for g in range(self.grad_accum)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}  # a handle travels without the shard it holds


@dataclass
class EvalShards:
    """Picklable handle to the eval rows split over ranks: ``shard(rank)`` is ``rows[rank::world]``.

    Driver (Ray running)::  shards = EvalShards.put(eval_rows, world)
    Worker::                shards.shard(rank)
    """

    refs: list[Any]  # [rank] -> ObjectRef of that rank's RowSet
    n_rows: int
    _held: tuple[int, RowSet] | None = field(default=None, repr=False)

    @classmethod
    def put(cls, rows: RowSet, world: int) -> EvalShards:
        import ray

        return cls([ray.put(rows[rank::world]) for rank in range(world)], len(rows))

    @property
    def world(self) -> int:
        return len(self.refs)

    def shard(self, rank: int) -> RowSet:
        if self._held is None or self._held[0] != rank:
            import ray

            self._held = (rank, ray.get(self.refs[rank]))
        return self._held[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}

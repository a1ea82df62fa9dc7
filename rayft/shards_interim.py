"""Interim: the whole row list in one object (replaced by rayft.rowset's per-(epoch, rank) shards)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayft.schedule import Plan


@dataclass
class PlanShards:
    ref: Any
    plan: Plan
    _rows: list | None = field(default=None, repr=False)

    @classmethod
    def put(cls, rows: list, plan: Plan, total_steps: int) -> PlanShards:
        import ray

        return cls(ray.put(rows), plan)

    def micro_batches(self, step: int, rank: int) -> list[list]:
        import ray

        if self._rows is None:
            self._rows = ray.get(self.ref)
        return [[self._rows[i] for i in idx] for idx in self.plan.step_batches(step, rank)]


@dataclass
class EvalShards:
    ref: Any
    world: int

    @classmethod
    def put(cls, rows: list, world: int) -> EvalShards:
        import ray

        return cls(ray.put(rows), world)

    def shard(self, rank: int) -> list:
        import ray

        return ray.get(self.ref)[rank::self.world]

"""A group of Ray actors of one class that form one torch.distributed group: the placement group, the ranks,
the master address and the fan-out of calls, in one place (the RL roles use it; OpenRLHF's RayActorGroup and
NeMo-RL's RayVirtualCluster are the same idea).

Resources are chosen at launch from config, never hard-coded on the class. Every fan-out waits with a
timeout and names the role that did not answer: a dead or hung actor is an error, not a hang.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


class GroupTimeout(RuntimeError):
    """A role's actors did not answer in time."""


class DistributedWorker:
    """Base of every actor in a group: joins the group's torch.distributed process group."""

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (rank 0's become the group's master address)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, rank: int, world: int, master: tuple[str, int], backend: str = "gloo") -> int:
        import deepspeed

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0")
        self.rank, self.world = rank, world
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return rank


class ActorGroup:
    """``n`` actors of ``cls`` (a :class:`DistributedWorker`), ranks ``0..n-1``, in one placement group."""

    def __init__(self, cls: type, n: int, *, role: str, num_cpus: float = 1, num_gpus: float = 0,
                 strategy: str = "PACK", timeout_s: float = 300, init_args: tuple = (), env: dict | None = None,
                 init_kwargs: dict | None = None, resources: dict[str, float] | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.role, self.timeout_s = role, timeout_s
        resources = dict(resources or {})  # custom resources: they pin the ranks to nodes that offer them
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
        self.pg = placement_group([bundle] * n, strategy=strategy)
        self._get(self.pg.ready(), "placement group")
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                               runtime_env={"env_vars": env} if env else None,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(*init_args, **(init_kwargs or {}))
            for i in range(n)
        ]
        master = self._get(self.actors[0].address.remote(), "address")
        backend = "nccl" if num_gpus else "gloo"
        self.call(lambda actor, rank: actor.init_distributed.remote(rank, n, master, backend))

    def _get(self, refs, what: str):
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise GroupTimeout(f"{self.role}: no answer to {what} within {self.timeout_s:g} s") from None

    def call(self, fn: Callable[[Any, int], Any], what: str = "call") -> list:
        """``fn(actor, rank)`` returns an ObjectRef (``actor.method.remote(...)``); waits for all, in rank order."""
        return self._get([fn(actor, rank) for rank, actor in enumerate(self.actors)], what)

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.pg)

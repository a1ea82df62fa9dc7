"""A pool of stateless role actors (rollout, reward) whose calls never hang the run.

Every call has a deadline. A call that fails because its actor died, or that is still running at the deadline,
is retried on a fresh actor (the old one is killed), up to ``retries`` times; then the run stops with a
:class:`RoleError` that names the role and what happened. The field's most reported RL failure is a dead or
hung rollout engine that blocks training forever; here it costs at most ``(retries + 1) * timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rayft.rl")


class RoleError(RuntimeError):
    """A role's actors kept failing or hanging: the message names the role."""


@dataclass
class _Call:
    actor: int
    method: str
    args: tuple
    ref: Any
    handle: Any = None  # the actor the call went to (a replaced actor's other calls must not replace again)
    attempt: int = 0
    started: float = 0.0


class Pending:
    """Calls in flight, collected by :meth:`ActorPool.collect` (so a caller can overlap them with other work)."""

    def __init__(self, calls: list[_Call]):
        self.calls = calls


class ActorPool:
    """``n`` actors of ``cls`` built with ``init_args``; ``on_replace(actor)`` brings a fresh actor up to date
    (the rollout role loads the current policy weights into it) before its retried call."""

    def __init__(self, cls: type, n: int, *, role: str, num_cpus: float, num_gpus: float = 0, timeout_s: float,
                 retries: int, init_args: tuple = (), env: dict | None = None,
                 on_replace: Callable[[Any], None] | None = None, init_timeout_s: float = 600,
                 resources: dict[str, float] | None = None):
        import ray

        self.role, self.timeout_s, self.retries = role, timeout_s, retries
        self.init_args, self.on_replace = init_args, on_replace
        self._remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}),
                                  runtime_env={"env_vars": env} if env else None)(cls)
        self.actors = [self._remote.remote(*init_args) for _ in range(n)]
        self.restarts = 0
        self._wait([a.__ray_ready__.remote() for a in self.actors], init_timeout_s, "start")

    def _wait(self, refs: list, timeout_s: float, what: str) -> list:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise RoleError(f"{self.role}: no answer to {what} within {timeout_s:g} s") from None
        except RayActorError as e:
            raise RoleError(f"{self.role}: an actor died during {what}: {str(e).splitlines()[0]}") from None

    def broadcast(self, method: str, *args, timeout_s: float | None = None) -> list:
        """The same call on every actor (weight updates); no retry: a failure here is the caller's to handle."""
        return self._wait([getattr(a, method).remote(*args) for a in self.actors],
                          timeout_s or self.timeout_s, method)

    def submit(self, method: str, shards: list[tuple]) -> Pending:
        """Shard ``i`` goes to actor ``i % n``; returns at once."""
        calls = []
        for i, args in enumerate(shards):
            actor = i % len(self.actors)
            handle = self.actors[actor]
            calls.append(_Call(actor, method, args, getattr(handle, method).remote(*args), handle,
                               started=time.monotonic()))
        return Pending(calls)

    def map(self, method: str, shards: list[tuple]) -> list:
        return self.collect(self.submit(method, shards))

    def collect(self, pending: Pending) -> list:
        """Every shard's result, in order, retrying failed or hung shards on fresh actors."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        results: dict[int, Any] = {}
        waiting = dict(enumerate(pending.calls))
        while waiting:
            by_ref = {c.ref: i for i, c in waiting.items()}
            first_deadline = min(c.started for c in waiting.values()) + self.timeout_s
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref),
                                timeout=max(0.0, first_deadline - time.monotonic()))
            for ref in ready:
                i = by_ref[ref]
                try:
                    results[i] = ray.get(ref)
                    del waiting[i]
                except RayActorError as e:
                    self._retry(waiting[i], f"its actor died ({str(e).splitlines()[0]})")
                except RayTaskError as e:
                    self._retry(waiting[i], f"it raised {str(e.cause or e).splitlines()[-1][:300]}")
            now = time.monotonic()
            for c in list(waiting.values()):
                if c.ref not in ready and now - c.started >= self.timeout_s:
                    self._retry(c, f"no answer within {self.timeout_s:g} s")
        return [results[i] for i in range(len(pending.calls))]

    def _retry(self, call: _Call, why: str) -> None:
        if call.attempt >= self.retries:
            raise RoleError(f"{self.role}: {call.method} failed {call.attempt + 1} time(s), the last because {why}")
        log.warning("%s actor %d: %s failed because %s; retrying on a fresh actor (%d/%d)", self.role,
                    call.actor, call.method, why, call.attempt + 1, self.retries)
        if self.actors[call.actor] is call.handle:
            self.replace(call.actor)
        call.attempt += 1
        call.handle = self.actors[call.actor]
        call.ref = getattr(call.handle, call.method).remote(*call.args)
        call.started = time.monotonic()

    def replace(self, i: int) -> None:
        """Kill actor ``i`` (dead or hung) and start a fresh one in its place, brought up to date."""
        import ray

        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._remote.remote(*self.init_args)
        self._wait([self.actors[i].__ray_ready__.remote()], max(self.timeout_s, 600), "restart")
        if self.on_replace is not None:
            self.on_replace(self.actors[i])
        self.restarts += 1

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)

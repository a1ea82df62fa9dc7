"""Weight sync over a collective: learner rank 0 broadcasts the trainable tensors to the rollout actors in a
process group of their own (``sync.transport: collective``; NCCL between GPUs, gloo on CPU).

The default transport (``object_store``) puts the tensors in Ray's object store once and every rollout actor
reads them: simple, and for LoRA (megabytes) as fast as anything. For full weights on separate GPUs the field
broadcasts from the learner over NCCL instead (``../shared/guide/FIELD.md``): the tensors go GPU to GPU, with
no host copy and no object-store traffic.

The group is built directly from a ``TCPStore`` and a ``ProcessGroupNCCL``/``ProcessGroupGloo`` object, not
through ``torch.distributed.init_process_group``: the learner's processes already have their default group
(DeepSpeed's) and a rollout engine may have its own, and a process has only one. Rank 0 is the learner's rank
0; rollout actor ``i`` is rank ``i + 1``.

Tensors travel in buckets (up to ``bucket_mb`` each, one dtype per bucket, in name order) so that a LoRA
update of hundreds of small tensors is a few broadcasts; the receiver derives the same buckets from the
tensors' names, shapes and dtypes (:func:`tensor_meta`), which it gets once per group.

Nothing waits forever: the rendezvous times out (the store's timeout), every broadcast has the same timeout,
and the controller waits on the remote calls with its own (a member that died mid-broadcast).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

Meta = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) in send order


class WeightSyncError(RuntimeError):
    """The weight group could not form, or a broadcast did not finish in time."""


def tensor_meta(tensors: dict[str, Any]) -> Meta:
    """What a receiver needs to allocate and unpack an update: names in send order, shapes, dtypes."""
    return [(name, tuple(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch."))
            for name in sorted(tensors)]


def buckets(meta: Meta, bucket_mb: float) -> list[list[int]]:
    """Indices of ``meta`` grouped into buckets of one dtype and at most ``bucket_mb`` (a larger tensor is a
    bucket of its own), in order; sender and receiver compute the same ones.

    >>> buckets([("a", (2,), "float32"), ("b", (2,), "float32"), ("c", (1,), "bfloat16"), ("d", (4,), "float32")], 1e-5)
    [[0], [1], [2], [3]]
    >>> buckets([("a", (2,), "float32"), ("b", (2,), "float32"), ("c", (1,), "bfloat16"), ("d", (4,), "float32")], 1)
    [[0, 1, 3], [2]]
    """
    import math

    import torch

    limit = bucket_mb * 2**20
    open_: dict[str, tuple[list[int], float]] = {}
    done: list[list[int]] = []
    for i, (_, shape, dtype) in enumerate(meta):
        size = math.prod(shape) * getattr(torch, dtype).itemsize
        idx, used = open_.get(dtype, ([], 0.0))
        if idx and used + size > limit:
            done.append(idx)
            idx, used = [], 0.0
        open_[dtype] = (idx + [i], used + size)
    done += [idx for idx, _ in open_.values() if idx]
    return sorted(done, key=lambda b: b[0])


class WeightGroup:
    """One member of the weight group. Rank 0 hosts the store and sends; the others receive."""

    def __init__(self, host: str, port: int, world: int, rank: int, backend: str = "gloo",
                 timeout_s: float = 120.0, bucket_mb: float = 256.0):
        import torch
        import torch.distributed as dist

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight sync backend must be nccl or gloo, got {backend!r}")
        self.rank, self.world, self.backend, self.bucket_mb = rank, world, backend, bucket_mb
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        try:
            store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=self.timeout)
            store = dist.PrefixStore("rayft-weights", store)
            if backend == "nccl":
                self.pg = dist.ProcessGroupNCCL(store, rank, world, self.timeout)
            else:
                self.pg = dist.ProcessGroupGloo(store, rank, world, self.timeout)
        except Exception as e:  # a member that never came: the store's timeout, or a refused connection
            raise WeightSyncError(f"weight group ({backend}, {world} members at {host}:{port}): rank {rank} could "
                                  f"not join within {timeout_s:g} s: {str(e).splitlines()[0]}") from None

    def _broadcast(self, flat) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, self.timeout
        try:
            self.pg.broadcast([flat], opts).wait()
        except Exception as e:
            raise WeightSyncError(f"weight group rank {self.rank}: a broadcast of {flat.numel()} elements did not "
                                  f"finish within {self.timeout.total_seconds():g} s: {str(e).splitlines()[0]}") from None

    def send(self, tensors: dict[str, Any]) -> Meta:
        """Rank 0: broadcast ``tensors`` (any device) to every other member; returns their meta."""
        import torch

        if self.rank != 0:
            raise RuntimeError("only rank 0 of the weight group sends")
        meta = tensor_meta(tensors)
        for bucket in buckets(meta, self.bucket_mb):
            flat = torch.cat([tensors[meta[i][0]].detach().reshape(-1).to(self.device) for i in bucket])
            self._broadcast(flat)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return meta

    def receive(self, meta: Meta) -> dict[str, Any]:
        """Ranks 1..: the tensors rank 0 sends for ``meta``, on this member's device."""
        import math

        import torch

        out = {}
        for bucket in buckets(meta, self.bucket_mb):
            sizes = [math.prod(meta[i][1]) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=getattr(torch, meta[bucket[0]][2]), device=self.device)
            self._broadcast(flat)
            for i, part in zip(bucket, flat.split(sizes), strict=True):
                out[meta[i][0]] = part.view(meta[i][1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)  # NCCL frees its communicator; gloo has nothing to free
        if shutdown is not None and self.backend == "nccl":
            shutdown()
        self.pg = None

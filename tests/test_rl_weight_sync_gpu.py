"""GPU tier of the collective weight sync (rl/weight_sync.py): the same round trip as test_rl_weight_sync.py
over NCCL, between two processes on two GPUs (NCCL cannot put two ranks on one GPU). Skipped with fewer than
two CUDA devices (CPU CI has none)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _member(rank: int, port: int, out) -> None:
    import torch

    from rayft.rl.weight_sync import WeightGroup, tensor_meta

    torch.cuda.set_device(rank)
    g = torch.Generator().manual_seed(0)
    src = {"a.lora_A.weight": torch.randn(8, 64, generator=g), "b.weight": torch.randn(64, 64, generator=g).bfloat16(),
           "c.weight": torch.randn(3, generator=g)}
    group = WeightGroup("127.0.0.1", port, 2, rank, "nccl", timeout_s=60, bucket_mb=1e-3)
    if rank == 0:
        group.send({k: v.cuda() for k, v in src.items()})
    else:
        got = group.receive(tensor_meta(src))
        out.put({k: (v.device.type, bool(torch.equal(v.cpu(), src[k]))) for k, v in got.items()})
    group.close()


def test_nccl_broadcast_between_two_gpus_is_bit_for_bit():
    import multiprocessing as mp

    from test_rl_weight_sync import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_member, args=(rank, port, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    got = out.get(timeout=120)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert got == {"a.lora_A.weight": ("cuda", True), "b.weight": ("cuda", True), "c.weight": ("cuda", True)}

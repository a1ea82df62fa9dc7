"""The collective weight sync's group (rl/weight_sync.py) on gloo, two members in one process (threads): what
rank 0 sends is what rank 1 gets, bit for bit, across buckets and dtypes; a member that never joins and a
broadcast nobody receives are errors within the timeout, not hangs. The same over NCCL is in test_rl_gpu.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(sender, receiver, timeout_s: float = 20.0):
    """``sender(port)`` and ``receiver(port)`` on two threads; returns their results (or raised errors)."""
    port, out = free_port(), {}

    def run(name, fn):
        try:
            out[name] = fn(port)
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out[name] = e

    threads = [threading.Thread(target=run, args=(n, f), daemon=True) for n, f in (("send", sender), ("recv", receiver))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a member hung"
    return out["send"], out["recv"]


def tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.1.self_attn.q_proj.lora_B.default.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(8, 16, generator=g),
        "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "lm_head.bias": torch.randn(3, generator=g).to(torch.float16),
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g),
        "step": torch.tensor(7),
    }


@pytest.mark.parametrize("bucket_mb", [1e-4, 256.0], ids=["a-bucket-per-tensor", "one-bucket-per-dtype"])
def test_what_rank_0_sends_rank_1_receives_bit_for_bit(bucket_mb):
    import torch

    from rayft.rl.weight_sync import WeightGroup, buckets, tensor_meta

    src = tensors()
    meta = tensor_meta(src)
    n = len(buckets(meta, bucket_mb))
    assert n == (len(src) if bucket_mb < 1 else 4)  # float32, bfloat16, float16, int64

    def send(port):
        return WeightGroup("127.0.0.1", port, 2, 0, "gloo", 10, bucket_mb).send(src)

    def recv(port):
        return WeightGroup("127.0.0.1", port, 2, 1, "gloo", 10, bucket_mb).receive(meta)

    sent_meta, got = run_pair(send, recv)
    assert sent_meta == meta
    assert got.keys() == src.keys()
    for name, t in src.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_a_receiver_with_other_buckets_gets_other_tensors():
    """The receiver unpacks by its own meta: a meta in another order puts the data under the wrong names, so
    the round trip above is not equal by accident."""
    import torch

    from rayft.rl.weight_sync import WeightGroup, tensor_meta

    src = {"a": torch.zeros(4), "b": torch.ones(4)}
    swapped = [("b", (4,), "float32"), ("a", (4,), "float32")]
    _, got = run_pair(lambda port: WeightGroup("127.0.0.1", port, 2, 0, "gloo", 10, 1).send(src),
                      lambda port: WeightGroup("127.0.0.1", port, 2, 1, "gloo", 10, 1).receive(swapped))
    assert tensor_meta(src) != swapped
    assert torch.equal(got["b"], src["a"]) and not torch.equal(got["b"], src["b"])


def test_a_member_that_never_joins_is_an_error_within_the_timeout():
    from rayft.rl.weight_sync import WeightGroup, WeightSyncError

    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"weight group \(gloo, 2 members at 127.0.0.1:\d+\): rank 0 could "
                                              r"not join within 2 s"):
        WeightGroup("127.0.0.1", free_port(), 2, 0, "gloo", timeout_s=2)
    assert time.monotonic() - t0 < 15


def test_a_broadcast_nobody_receives_is_an_error_within_the_timeout():
    import torch

    from rayft.rl.weight_sync import WeightGroup, WeightSyncError

    def send(port):
        return WeightGroup("127.0.0.1", port, 2, 0, "gloo", 3).send({"w": torch.ones(8)})

    def join_only(port):
        return WeightGroup("127.0.0.1", port, 2, 1, "gloo", 3)  # joins, never receives

    t0 = time.monotonic()
    sent, _ = run_pair(send, join_only, timeout_s=30)
    assert isinstance(sent, WeightSyncError), sent
    assert "weight group rank 0: a broadcast of 8 elements did not finish within 3 s" in str(sent)
    assert time.monotonic() - t0 < 30


def test_nccl_needs_gpus_on_both_sides_and_auto_picks_the_backend():
    from conftest import ROOT

    from rayft.config import ConfigError, load_config
    from rayft.rl.config import RLConfig

    base = ROOT / "configs" / "grpo_tiny.yaml"
    assert load_config(RLConfig, base, ["sync.transport=collective"]).sync_backend() == "gloo"
    with pytest.raises(ConfigError, match=r"sync.backend=nccl broadcasts between GPUs: it needs train.use_gpu=true"):
        load_config(RLConfig, base, ["sync.transport=collective", "sync.backend=nccl"])

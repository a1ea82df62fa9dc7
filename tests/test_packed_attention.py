"""Padding-free SDPA for packed rows (rayft.packed_attention) against attention with transformers' dense
block-diagonal mask, on segments long and short enough to land in several buckets, with grouped KV heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayft.packed_attention import packed_sdpa_forward, segment_layout


def _positions(rows: list[list[int]], width: int) -> torch.Tensor:
    """Rows of segment lengths, right-padded with a trailing 0..k-1 segment as rayft's collate does."""
    out = []
    for lengths in rows:
        pos = [p for n in lengths for p in range(n)]
        out.append(pos + list(range(width - len(pos))))
    return torch.tensor(out)


def _dense_reference(q, k, v, position_ids):
    """Causal attention within each segment via a dense [B, 1, T, T] mask (what transformers builds)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seg = starts.cumsum(-1)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True).transpose(1, 2)


class _Module(torch.nn.Module):
    is_causal = True


def test_matches_the_dense_block_mask_in_values_and_gradients():
    torch.manual_seed(0)
    position_ids = _positions([[40, 3, 17, 60], [1, 100, 9], [120]], width=128)
    b, t = position_ids.shape
    q = torch.randn(b, 4, t, 8, requires_grad=True)
    k = torch.randn(b, 2, t, 8, requires_grad=True)  # grouped-query attention: 2 KV heads for 4 query heads
    v = torch.randn(b, 2, t, 8, requires_grad=True)
    layout = segment_layout(position_ids)
    assert len(layout.buckets) >= 3  # 120/100/60 | 40/17 | 9/8(pad)/3 | 1: several buckets exercised

    out, _ = packed_sdpa_forward(_Module(), q, k, v, None, position_ids=position_ids)
    ref = _dense_reference(q, k, v, position_ids)
    real = position_ids.new_zeros(b, t, dtype=torch.bool)
    for row, n in enumerate([120, 110, 120]):
        real[row, :n] = True  # padding tokens' outputs are never used: compare real tokens
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(out) * real[:, :, None, None]
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_attention_crosses_no_segment_boundary():
    """Changing one segment's keys and values changes no other segment's outputs."""
    torch.manual_seed(1)
    position_ids = _positions([[30, 30]], width=60)
    q, k, v = torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8), torch.randn(1, 2, 60, 8)
    out, _ = packed_sdpa_forward(_Module(), q, k, v, None, position_ids=position_ids)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :30], v2[:, :, :30] = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    out2, _ = packed_sdpa_forward(_Module(), q, k2, v2, None, position_ids=position_ids)
    assert torch.equal(out[:, 30:], out2[:, 30:])
    assert not torch.allclose(out[:, :30], out2[:, :30])


def test_a_padding_mask_falls_back_to_transformers_sdpa():
    """Left-padded batches (generation, RL) carry an attention mask: transformers' own SDPA path, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    mask[0, :, :, :3] = False
    mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    out, _ = packed_sdpa_forward(_Module(), q, k, v, mask, position_ids=torch.arange(10)[None].expand(2, -1))
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask)
    assert torch.equal(out, ref)

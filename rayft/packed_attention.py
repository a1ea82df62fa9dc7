"""Padding-free attention for packed rows with PyTorch's SDPA, on any device.

A packed row holds several examples; transformers isolates them with a dense ``[B, 1, T, T]`` block-diagonal
mask, and SDPA then computes every ``T x T`` score of the row and throws most of them away. TRL avoids that only
with FlashAttention's variable-length kernels (GPU). Here each example (a segment: positions restart at 0) is
attended on its own: segments of similar length are gathered into small right-padded batches and run through
SDPA with ``is_causal=True`` and no mask, so a row of k examples of length L costs about k * L^2 instead of
(k * L)^2, and no mask is built. Right padding inside a batch is safe under a causal mask: a real query only
sees keys at or before it, all of them real; padded queries are computed and dropped.

``ATTN_IMPLEMENTATION`` is registered with transformers' attention and mask interfaces on import. Inputs with an
``attention_mask`` (left-padded generation, RL batches) fall back to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "rayft_packed_sdpa"
BUCKET_RATIO = 0.5  # a segment joins a bucket while at least this share of its longest: <= 4x wasted scores


@dataclass
class SegmentLayout:
    """Where each segment of a ``[B, T]`` batch goes: per bucket, the flat token index of every slot
    (``index[s, j]``, 0 where padded) and which slots are real; ``order`` puts the buckets' outputs (their real
    slots, concatenated) back into flat token order."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]
    order: torch.Tensor


def segment_layout(position_ids: torch.Tensor, batch: int | None = None,
                   ratio: float = BUCKET_RATIO) -> SegmentLayout:
    """Segments start where positions do not continue (``pos[t] != pos[t-1] + 1``) or a row starts, the rule
    transformers uses to detect packed sequences. Buckets take segments longest first. ``position_ids`` of
    shape ``[1, T]`` (a model's default ``arange``) stand for every row of a ``batch``."""
    pos = position_ids.detach().to("cpu").numpy().astype(np.int64)
    pos = np.broadcast_to(pos, (batch or pos.shape[0], pos.shape[1]))
    b, t = pos.shape
    new = np.ones((b, t), dtype=bool)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = np.flatnonzero(new.reshape(-1))
    lengths = np.diff(np.append(starts, b * t))
    buckets, sources = [], []
    by_length = np.argsort(-lengths, kind="stable")
    i = 0
    while i < len(by_length):
        longest = lengths[by_length[i]]
        j = i
        while j < len(by_length) and lengths[by_length[j]] >= ratio * longest:
            j += 1
        segs = by_length[i:j]
        slots = np.arange(longest)
        valid = slots[None, :] < lengths[segs][:, None]
        index = np.where(valid, starts[segs][:, None] + slots[None, :], 0)
        buckets.append((torch.from_numpy(index).to(position_ids.device),
                        torch.from_numpy(valid).to(position_ids.device)))
        sources.append(index[valid])
        i = j
    order = np.argsort(np.concatenate(sources), kind="stable")
    return SegmentLayout(buckets, torch.from_numpy(order).to(position_ids.device))


_cache: tuple[torch.Tensor, int, SegmentLayout] | None = None


def _layout_for(position_ids: torch.Tensor, batch: int) -> SegmentLayout:
    """Every layer of one forward gets the same ``position_ids`` tensor: compute its layout once (the cache
    holds the tensor itself, so an identical object is the same tensor, not a recycled id)."""
    global _cache
    if _cache is None or _cache[0] is not position_ids or _cache[1] != batch:
        _cache = (position_ids, batch, segment_layout(position_ids, batch))
    return _cache[2]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        sliding_window=None, position_ids=None, **kwargs):
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``;
    returns ``([B, T, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != t or t == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not implement sliding-window attention")
    layout = _layout_for(position_ids, b)
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]
    parts = []
    for index, valid in layout.buckets:
        q, k, v = (x[index].transpose(1, 2) for x in flat)  # [S, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=k.shape[1] != h)
        parts.append(out.transpose(1, 2)[valid])  # [real tokens, H, D]
    out = torch.cat(parts)[layout.order] if len(parts) > 1 else parts[0][layout.order]
    return out.view(b, t, h, d), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No mask to build unless the caller gave a padding mask (then transformers' SDPA mask, for the fallback)."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def supports(config) -> bool:
    """Full attention in every layer (no sliding window, which this path does not implement)."""
    return set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_sdpa_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_mask)
    return ATTN_IMPLEMENTATION

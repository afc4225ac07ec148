"""Attention variants of the 2026 families, in plain PyTorch (CPU and GPU alike): sliding-window masks
(GPT-OSS's alternating layers), attention sinks (GPT-OSS) and partial RoPE (GLM-4.5).

Shape legend: bs requests, T tokens of this forward, S slots the forward attends (a dense mask's width), Hq /
Hk query / key-value heads, d head dim, rd rotary dims (< d), W window.

    window_mask(mask, positions, slots, W)   bool [bs, T, S]: mask, and key position > query position - W
    sink_attention(q, k, v, mask, sinks, scale)   softmax over [q.k * scale, sink_h] (the sink's column then
                                                  dropped): the sink takes probability mass, contributes no value
    apply_partial_rope(x, cos, sin)          RoPE on x[..., :rd] (rd = cos.shape[-1]), the rest unchanged

Window semantics (transformers' sliding_window_overlay): a query at position p sees keys at positions k with
p - W < k <= p. A key's position is its slot index for every slot not written by this forward (committed
tokens sit at slot = position), and the position this forward gives it for its own slots (tree nodes sit at
slot prefix + i but position prefix + depth). That is exact for prefill, decode, verification (one forward
over the whole tree) and chain drafting (slot = position). Tree drafting writes a level's nodes in earlier
forwards at slot prefix + fed >= position: such an ancestor counts as nearer than it is, so only a window
shorter than the tree's depth could keep one it should drop -- a draft-quality effect, never an output one
(verification is exact).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rope import apply_rope


def window_mask(mask: Tensor, positions: Tensor, slots: Tensor | None, window: int) -> Tensor:
    """mask bool [bs, T, S], positions [bs, T] of the queries, slots [bs, T] they are written to (None: no
    cache, the keys are the T tokens themselves) -> mask & (key position > query position - window)."""
    bs, T, S = mask.shape
    if slots is None:
        keypos = positions                                            # [bs, T] = [bs, S]
    else:
        keypos = torch.arange(S + 1, device=mask.device).expand(bs, S + 1).clone()
        keypos.scatter_(1, torch.where(slots < S, slots, torch.full_like(slots, S)), positions)
        keypos = keypos[:, :S]
    return mask & (keypos[:, None, :] > positions[:, :, None] - window)


def sink_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """q [bs, Hq, T, d], k / v [bs, Hk, S, d], mask bool [bs, T, S], sinks [Hq] -> [bs, Hq, T, d] in v's dtype.
    Per query head h: softmax over the masked scores and one more logit sinks[h] (float32), whose share is
    dropped. Query head h reads KV head h // (Hq / Hk), folded into the query length as in model.attention."""
    bs, Hq, T, d = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = Hq // Hk
    qf = q.reshape(bs, Hk, rep * T, d)
    s = torch.matmul(qf, k.transpose(-1, -2)).float() * scale                  # [bs, Hk, rep*T, S]
    m = mask[:, None, None].expand(bs, 1, rep, T, S).reshape(bs, 1, rep * T, S)
    s = s.masked_fill(~m, float("-inf"))
    sink = sinks.float().view(1, Hk, rep, 1, 1).expand(bs, Hk, rep, T, 1).reshape(bs, Hk, rep * T, 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :S]
    return torch.matmul(p.to(v.dtype), v).reshape(bs, Hq, T, v.shape[-1])


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [bs, T, H, d]; cos / sin [bs, T, rd] -> RoPE (rotate-half) on x[..., :rd], x[..., rd:] as is."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)

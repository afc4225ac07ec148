"""Multi-head latent attention (DeepSeek-V2/V3) over a KV cache that stores the compressed latent.

Shape legend: bs requests, T tokens of this forward, S slots attended, h hidden, H heads, rq q_lora_rank,
r kv_lora_rank, dn / dr / dv the no-RoPE key, RoPE key and value dims of a head, D = r + dr (a cache row).

Per token (transformers' DeepseekV3Attention, the same maths):
    q      = q_b(norm(q_a(x))) or q_proj(x)          [H, dn + dr] -> q_nope [H, dn], q_rope [H, dr]
    c, kr  = kv_a(x)                                   c [r] (then normalized), kr [dr] (shared by all heads)
    q_rope, kr = RoPE (pairs (2i, 2i+1) when rope_interleave, else rotate-half)
    K_h = [W_UK[h] c, kr], V_h = W_UV[h] c             (kv_b = [W_UK; W_UV] per head: [H, dn + dv, r])
    out = o_proj(concat_h softmax(q_h . K_h * softmax_scale) V_h)

What is cached: the row [c, kr] (D = r + dr values per token and layer; DeepSeek-V3: 576 instead of
2 x 128 heads x 192 = 49152 for expanded K/V). Attention runs on the latent directly ("absorbed"):
    q_lat_h = W_UK[h]^T q_nope_h  [r];  score = [q_lat_h, q_rope_h] . [c, kr]  (one KV head of width D)
    out_h   = W_UV[h] (softmax(score) . c)
i.e. multi-query attention with keys = the cache rows and values = their first r dims, through the same
SDPA call (model.attention) on every device. The tree-attention kernel does not take these shapes (a
later GPU issue): tree / decode forwards use the dense mask.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelArgs
from .families import MLA_NORM_EPS
from .model import RMSNorm, attention
from .rope import apply_rope


def rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [bs, T, H, dr] with rotation pairs (2i, 2i+1) -> rotated, laid out as [evens | odds] (transformers'
    apply_rotary_pos_emb_interleave; a fixed permutation of the dims, the same for q and k)."""
    return apply_rope(torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1), cos, sin)


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        m = args.mla
        h, H = args.hidden_size, args.n_heads
        self.layer, self.n_heads, self.m = layer, H, m
        self.dn, self.dr, self.dv, self.r = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        dq = self.dn + self.dr
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(h, H * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=args.qkv_bias)
            self.q_a_norm = RMSNorm(m.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * dq, bias=False)
        self.kv_a_proj = nn.Linear(h, m.latent_dim, bias=args.qkv_bias)
        self.kv_a_norm = RMSNorm(self.r, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(H * self.dv, h, bias=args.o_bias)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return rope_interleaved(x, cos, sin) if self.m.rope_interleave else apply_rope(x, cos, sin)

    def latent(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [bs, T, h] -> the cache rows [bs, T, D] = [normalized c, rotated kr]."""
        c, kr = self.kv_a_proj(x).split([self.r, self.dr], dim=-1)
        return torch.cat([self.kv_a_norm(c), self._rope(kr[:, :, None, :], cos, sin)[:, :, 0]], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache, slots: Tensor | None, mask: Tensor) -> Tensor:
        bs, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.m.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(bs, T, H, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_rope = self._rope(q_rope, cos, sin)
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]                               # [H, dn, r], [H, dv, r]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        query = torch.cat([q_lat, q_rope], dim=-1).transpose(1, 2)              # [bs, H, T, D]
        lat = self.latent(x, cos, sin)                                           # [bs, T, D]
        if cache is not None:
            cache.write(self.layer, lat[:, :, None, :], None, slots)
            kv = cache.k[self.layer][:, :, :mask.shape[-1]]                      # [bs, 1, S, D]
        else:
            kv = lat[:, None]                                                    # [bs, 1, T, D]
        o = attention(query, kv, kv[..., :self.r], mask, scale=self.m.softmax_scale)   # [bs, H, T, r]
        out = torch.einsum("bhtr,hvr->bthv", o, w_uv).reshape(bs, T, H * self.dv)
        return self.wo(out)

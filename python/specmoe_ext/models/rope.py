"""Rotary position embeddings, numerically as transformers 5.17 computes them.

Shape legend: bs requests, T tokens, H heads, d head dim.

HF checkpoints use the "rotate half" convention (dims [0, d/2) pair with [d/2, d)), so unlike gpt-fast
no weight permutation is needed. cos/sin are computed in float32 from the integer positions (so tree
tokens can have any positions) and cast to the activation dtype before being applied, as HF does.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig, head_dim: int) -> tuple[Tensor, float]:
    """(inv_freq [d/2] float32, attention scaling applied to cos/sin)."""
    dim = head_dim
    base = rope.theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = rope.rope_type
    if t in ("default", "dynamic"):  # dynamic NTK equals default up to max_position_embeddings
        return inv, 1.0
    if t == "linear":
        return inv / rope.factor, 1.0
    if t == "llama3":
        factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_position_embeddings
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, inv_l), 1.0
    if t == "yarn":
        factor = rope.factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = rope.attention_factor
        if att is None:
            if rope.mscale and rope.mscale_all_dim:
                att = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
            else:
                att = get_mscale(factor)
        beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
        omax = rope.original_max_position_embeddings

        def corr_dim(n_rot: float) -> float:
            return (dim * math.log(omax / (n_rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        return inter * (1 - extra_factor) + extra * extra_factor, float(att)
    raise ValueError(f"unsupported rope type {t!r}")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions [bs, T] (int) -> cos, sin [bs, T, d] in `dtype`."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [bs, T, d/2]; an outer product like HF's matmul
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [bs, T, H, d]; cos/sin [bs, T, d] -> [bs, T, H, d] (rotate-half convention)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin

"""Attention visibility of a forward over cache slots: dense boolean masks and the compact ancestor-bit form.

Shape legend: bs requests, T tokens of this forward, S cache capacity (slots per request), W = ceil(T/32)
mask words.

    causal_mask(slots, S)                   [bs, T, S]  a token sees its request's slots 0..its own slot
    tree_mask(prefix, slots, ancestors, S)  [bs, T, S]  the committed prefix plus the token's ancestors
    pack_bits / unpack_bits                 bool [..., T] <-> int32 [..., W]  (bit j%32 of word j//32)
    PrefixTreeMask(prefix, bits)            the compact form the tree-attention kernel reads: every slot
                                            < prefix[b], plus slot prefix[b] + j where bit j of the row is set

Plain tensor code with no host synchronization; below both `reference.py` and `models/`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def pack_bits(A: Tensor) -> Tensor:
    """bool [..., T] -> int32 [..., ceil(T/32)] (bit j%32 of word j//32; bit 31 is the sign bit)."""
    T = A.shape[-1]
    W = (T + 31) // 32
    pad = W * 32 - T
    if pad:
        A = torch.cat([A, A.new_zeros(A.shape[:-1] + (pad,))], dim=-1)
    bits = A.reshape(A.shape[:-1] + (W, 32)).long() << torch.arange(32, device=A.device)
    words = bits.sum(-1)                                       # [0, 2^32) in int64
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_bits(words: Tensor, T: int) -> Tensor:
    """int32 [..., W] -> bool [..., T] (inverse of pack_bits)."""
    w = words.long() & 0xFFFFFFFF
    bits = (w[..., None] >> torch.arange(32, device=words.device)) & 1
    return bits.reshape(words.shape[:-1] + (-1,))[..., :T].bool()


def causal_mask(slots: Tensor, capacity: int) -> Tensor:
    """slots [bs, T] -> mask [bs, T, capacity]: a query in slot s sees slots 0..s of its request.
    Right for prefill/decode, where a request's slots 0..s hold its tokens in order."""
    cols = torch.arange(capacity, device=slots.device)
    return cols[None, None, :] <= slots[:, :, None]


def tree_mask(prefix_lens: Tensor, tree_slots: Tensor, ancestors: Tensor, capacity: int) -> Tensor:
    """Mask for T tree tokens verified after each request's committed prefix.

    prefix_lens [bs] int, tree_slots [bs, T] (cache slots of the tree tokens, all >= prefix_lens),
    ancestors [bs, T, T] bool with ancestors[b, i, j] = node j is node i or one of its ancestors
    -> [bs, T, capacity]: node i sees the prefix and its ancestors' slots (its own included)."""
    bs, T = tree_slots.shape
    cols = torch.arange(capacity, device=tree_slots.device)
    m = (cols[None, None, :] < prefix_lens.to(tree_slots.device)[:, None, None]).expand(bs, T, capacity).clone()
    m.scatter_(2, tree_slots[:, None, :].expand(bs, T, T).long(), ancestors.bool())
    return m


def causal_bits(T: int, device: torch.device | str | None = None) -> Tensor:
    """int32 [T, ceil(T/32)]: the ancestor bits of a chain (row i sees 0..i)."""
    return pack_bits(torch.ones(T, T, dtype=torch.bool, device=device).tril())


@dataclass
class PrefixTreeMask:
    """Visibility of T new tokens written at slots prefix_lens[b] + i: every slot of the committed prefix,
    plus the new slots whose bit is set in the query's ancestor bitmask row (a chain of ones = causal,
    T = 1 = decode).

    prefix_lens  [bs] int64 on the model's device (e.g. cache.lengths: graph replays follow it)
    bits         [bs, T, ceil(T/32)] int32 (pack_bits of the ancestor matrix)
    kv_len_hint  longest prefix + T expected (0 = cache capacity); steers the kernel's split count only
    """

    prefix_lens: Tensor
    bits: Tensor
    kv_len_hint: int = 0

    def dense(self, capacity: int) -> Tensor:
        """-> bool [bs, T, capacity] (the form SDPA takes)."""
        T = self.bits.shape[1]
        slots = self.prefix_lens.to(self.bits.device).long()[:, None] + torch.arange(T, device=self.bits.device)
        return tree_mask(self.prefix_lens, slots, unpack_bits(self.bits, T), capacity)

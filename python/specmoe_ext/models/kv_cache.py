"""Static KV cache: one preallocated row of `capacity` slots per request, and the geometry of each forward.

Shape legend: L layers, bs requests (rows), Hk key-value heads, S capacity (slots per request), d head dim,
T tokens written by one forward.

    k[l], v[l]   [bs, Hk, S, d]   (model dtype, on the model's device)
    MLA models (DeepSeek-V2/V3): k[l] [bs, 1, S, kv_lora_rank + qk_rope_head_dim] holds each token's normalized
                 latent then its rotated key part, and v is empty: values are the latent's first kv_lora_rank
                 dims (models/mla.py), so a token costs L x (r + dr) elements instead of L x 2 x Hk x d
    lengths      [bs] int64 on the device: committed tokens per request (slots 0..len-1 hold them in order)
    host lengths the same numbers on the host: capacity checks never need a device sync

Why static rows rather than pages: speculative decoding runs a fixed, small batch of requests whose
lengths are bounded by prompt + max new tokens, known when the batch starts. A contiguous row per request
(a) is what SDPA and the tree-attention kernel read directly, with no block-table indirection,
(b) keeps every address fixed, which CUDA-graph replay of the decode / speculative step requires, and
(c) makes compaction of an accepted tree path a copy within one row (`ops.kv_compact`). Paging would only
save memory for requests of very unequal lengths, which this engine does not need; capacity is set per batch.

Geometry: where the T tokens of one forward go, built here and nowhere else (SGLang's forward-batch idea):
    Geometry(positions [bs, T], slots [bs, T], mask)   mask: bool [bs, T, S'] (S' <= S: the forward attends
                                      slots < S') or a PrefixTreeMask
    geo = cache.append(width)         host: `width` new tokens after each committed prefix (a prefill of
                                      right-padded prompts); capacity checked before anything is written
    geo = cache.tree_geometry(depth, bits, prefix, offset)
                                      device only (graph-capturable): node i at slot prefix + offset + i and
                                      position prefix + depth[i], seeing every slot < prefix + offset and
                                      the new slots of its ancestor bits (decode: T = 1, verify: a tree,
                                      a causal window: depth = arange, bits = causal)
    logits, hidden = model(tokens, geo, cache)        the forward writes K/V at geo.slots
    cache.advance(lens)               commit (or a kernel advances cache.lengths on the device: kv_compact)
    cache.keep_rows(rows)             finished requests leave: the remaining rows move to the front
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..masks import PrefixTreeMask, causal_mask


class Geometry(NamedTuple):
    """Positions, cache slots and visibility of the T tokens of one forward (see the module docstring)."""

    positions: Tensor                    # [bs, T] int64 RoPE positions
    slots: Tensor                        # [bs, T] int64 cache slots the forward writes K/V to
    mask: "Tensor | PrefixTreeMask"      # bool [bs, T, S] (True = may attend) or the compact tree form


class CacheCapacityError(RuntimeError):
    """A request would exceed its preallocated KV capacity. Raised before any write."""


def _as_list(n: int | Sequence[int], bs: int, what: str) -> list[int]:
    if isinstance(n, int):
        return [n] * bs
    n = [int(x) for x in n]
    if len(n) != bs:
        raise ValueError(f"{what}: got {len(n)} values for a batch of {bs} requests")
    return n


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, values: bool = True):
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs capacity > 0 and batch_size > 0 (got {capacity}, {batch_size})")
        self.n_layers, self.batch_size, self.capacity = n_layers, batch_size, capacity
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)] if values else []
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._host_lengths = [0] * batch_size
        self._rows = torch.arange(batch_size, device=device)[:, None]
        self._full = (self.k, self.v, self.lengths, self._rows)
        self.attend_limit = capacity     # slots a dense-mask forward attends (see set_attend_limit)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "KVCache":
        a = model.args
        w = model.tok_embeddings.weight
        a.check_context(capacity)
        if a.mla is not None:    # one latent row per token and layer, no separate values
            return cls(a.n_layers, batch_size, 1, a.mla.latent_dim, capacity, w.dtype, w.device, values=False)
        return cls(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, capacity, w.dtype, w.device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def full_batch_size(self) -> int:
        """Rows allocated (keep_rows may have made fewer active)."""
        return self._full[2].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one request takes, over all layers (K and V, or the MLA latent)."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.k + self.v)

    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    def set_attend_limit(self, slots: int | None) -> None:
        """Dense-mask forwards (the CPU path, and the GPU fallback) attend only slots < `slots` (None: the
        whole capacity), so their cost follows the current length instead of the capacity. The caller
        guarantees that every slot a forward reads or writes lies below it; captured graphs keep the full
        capacity (shapes fixed)."""
        self.attend_limit = self.capacity if slots is None else max(1, min(int(slots), self.capacity))

    # ---- host-side bookkeeping (checks first, then state changes) ------------------------------------
    def _check(self, needed: list[int], what: str) -> None:
        for b, n in enumerate(needed):
            if n > self.capacity:
                raise CacheCapacityError(
                    f"KV cache: request {b} {what} needs {n} slots but its capacity is {self.capacity} "
                    f"(committed length {self._host_lengths[b]}); allocate a larger cache")

    def append(self, width: int) -> Geometry:
        """Geometry of appending `width` tokens after every request's committed tokens (a prefill of
        right-padded prompts): positions = slots = lengths[b] .. lengths[b] + width - 1, causal. A shorter
        prompt's padding writes slots past its own tokens, which its later tokens overwrite before anything
        attends them. Raises CacheCapacityError (nothing written, nothing changed) if any request would
        exceed capacity. Host work, for forwards outside the device-resident step."""
        self._check([l + width for l in self._host_lengths], f"appending {width} tokens")
        base = torch.tensor(self._host_lengths, dtype=torch.long)
        slots = (base[:, None] + torch.arange(width)[None, :]).to(self.device)
        return Geometry(slots, slots, causal_mask(slots, max(self._host_lengths) + width))

    def tree_geometry(self, depth: Tensor, bits: Tensor, prefix: Tensor | None = None, offset: int = 0) -> Geometry:
        """Geometry of T nodes written after each request's prefix (default: the committed lengths):
        node i at slot prefix + offset + i and position prefix + depth[:, i], seeing every slot below
        prefix + offset and the new slots whose bit is set in its row of bits [bs, T, ceil(T/32)] int32.
        Device tensors only (no host sync; CUDA-graph capturable: replays follow `prefix` in place). The
        caller guarantees room (prefix + offset + T <= capacity)."""
        prefix = self.lengths if prefix is None else prefix
        T = depth.shape[1]
        base = prefix + offset if offset else prefix
        slots = base[:, None] + torch.arange(T, device=depth.device)
        return Geometry(prefix[:, None] + depth, slots, PrefixTreeMask(base, bits, kv_len_hint=self.capacity))

    def advance(self, n: int | Sequence[int]) -> None:
        """Commit n more tokens per request (after their K/V were written at the reserved slots)."""
        ns = _as_list(n, self.batch_size, "advance")
        new = [l + k for l, k in zip(self._host_lengths, ns)]
        self._check(new, "advancing")
        if len(set(ns)) == 1:   # the decode loop's case: no host-to-device copy
            self._host_lengths = new
            self.lengths.add_(ns[0])
        else:
            self._set(new)

    def set_length(self, request: int, length: int) -> None:
        if not 0 <= length <= self.capacity:
            raise CacheCapacityError(f"KV cache: request {request} length {length} outside [0, {self.capacity}]")
        new = list(self._host_lengths)
        new[request] = length
        self._set(new)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        new = _as_list(lengths, self.batch_size, "set_lengths")
        self._check(new, "setting lengths")
        self._set(new)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only the requests `rows` (strictly ascending row indices) as rows 0..n-1, e.g. when
        finished requests leave a speculative batch. Only rows whose index changes are copied, in place,
        and every buffer (lengths included) becomes the view of its first n rows: no reallocation, and the
        same addresses at the same batch size every time (CUDA graphs captured there stay valid).
        `reset_rows` brings back the full batch."""
        rows = [int(r) for r in rows]
        if not rows or any(b <= a for a, b in zip(rows, rows[1:])) or rows[0] < 0 or rows[-1] >= self.batch_size:
            raise ValueError(f"KV cache keep_rows: need a non-empty, strictly ascending subset of "
                             f"[0, {self.batch_size}), got {rows}")
        from_host = [self._host_lengths[r] for r in rows]
        for i, r in enumerate(rows):   # r >= i, and rows < i were already moved: safe in this order
            if r != i:
                for buf in self.k + self.v:
                    buf[i].copy_(buf[r])
                self.lengths[i].copy_(self.lengths[r])
        n = len(rows)
        self.k = [t[:n] for t in self.k]
        self.v = [t[:n] for t in self.v]
        self.batch_size = n
        self._rows = self._rows[:n]
        self.lengths = self.lengths[:n]
        self._host_lengths = from_host

    def reset_rows(self) -> None:
        """Every row of the allocation back (after keep_rows), all lengths 0."""
        self.k, self.v, self.lengths, self._rows = self._full
        self.batch_size = self.lengths.shape[0]
        self.reset()

    def note_device_advance(self, lengths: Sequence[int]) -> None:
        """Host bookkeeping after a kernel already advanced the device lengths (the graph-captured verify
        step's kv_compact): only the host copy changes, nothing is copied to the device."""
        new = _as_list(lengths, self.batch_size, "note_device_advance")
        self._check(new, "advancing")
        self._host_lengths = new

    def reset(self) -> None:
        """Forget every request's tokens (the buffers are reused, stale entries are never attended)."""
        self._set([0] * self.batch_size)

    def _set(self, new: list[int]) -> None:
        self._host_lengths = new
        # in place: CUDA graphs captured against this cache read this exact tensor
        self.lengths.copy_(torch.tensor(new, dtype=torch.long), non_blocking=False)

    # ---- device-side writes (called from the forward; no host checks, graph-capturable) --------------
    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """k, v [bs, T, Hk, d] -> rows at slots [bs, T] of layer `layer` (v None: a cache without values)."""
        self.k[layer][self._rows, :, slots] = k
        if v is not None:
            self.v[layer][self._rows, :, slots] = v

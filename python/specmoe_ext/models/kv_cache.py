"""Static KV cache: one preallocated row of `capacity` slots per request.

Shape legend: L layers, bs requests (rows), Hk key-value heads, S capacity (slots per request), d head dim,
T tokens written by one forward, n entries moved by a compaction.

    k[l], v[l]   [bs, Hk, S, d]   (model dtype, on the model's device)
    lengths      [bs] int64 on the device: committed tokens per request (slots 0..len-1 hold them in order)
    host lengths the same numbers on the host: capacity checks never need a device sync

Why static rows rather than pages: speculative decoding runs a fixed, small batch of requests whose
lengths are bounded by prompt + max new tokens, known when the batch starts. A contiguous row per request
(a) is what SDPA and the tree-attention kernel read directly, with no block-table indirection,
(b) keeps every address fixed, which CUDA-graph replay of the decode / verify step requires, and
(c) makes compaction of an accepted tree path a copy within one row. Paging would only save memory for
requests of very unequal lengths, which this engine does not need; capacity is set per batch.

Protocol (all checks happen on the host BEFORE anything is written):
    slots = cache.reserve(n)        # [bs, n] slots lengths[b] .. lengths[b]+n-1; raises if over capacity
                                    # (check_append(n): the same check without building the slots)
    logits = model(tokens, positions, cache, slots, mask)   # forward writes K/V at `slots`
    cache.compact(b, src, dst)      # optional: move accepted tree entries into place
    cache.advance(n) / set_length   # commit
    cache.keep_rows(rows)           # finished requests leave: the remaining rows move to the front
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


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
                 dtype: torch.dtype, device: torch.device | str):
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs capacity > 0 and batch_size > 0 (got {capacity}, {batch_size})")
        self.n_layers, self.batch_size, self.capacity = n_layers, batch_size, capacity
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._host_lengths = [0] * batch_size
        self._rows = torch.arange(batch_size, device=device)[:, None]
        self.graphs: dict = {}   # decode CUDA graphs captured against this cache (see generate.py)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "KVCache":
        a = model.args
        w = model.tok_embeddings.weight
        a.check_context(capacity)
        return cls(a.n_layers, batch_size, a.n_kv_heads, a.head_dim, capacity, w.dtype, w.device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    # ---- host-side bookkeeping (checks first, then state changes) ------------------------------------
    def _check(self, needed: list[int], what: str) -> None:
        for b, n in enumerate(needed):
            if n > self.capacity:
                raise CacheCapacityError(
                    f"KV cache: request {b} {what} needs {n} slots but its capacity is {self.capacity} "
                    f"(committed length {self._host_lengths[b]}); allocate a larger cache")

    def check_append(self, n: int | Sequence[int]) -> None:
        """Raise CacheCapacityError if appending n tokens to any request would exceed capacity (host only)."""
        ns = _as_list(n, self.batch_size, "check_append")
        self._check([l + k for l, k in zip(self._host_lengths, ns)], f"appending {max(ns)} tokens")

    def reserve(self, n: int | Sequence[int]) -> Tensor:
        """Slots [bs, max(n)] for appending n tokens after each request's committed tokens. Raises
        CacheCapacityError (nothing written, nothing changed) if any request would exceed capacity.
        Requests with a smaller n get their extra columns clamped to their last reserved slot."""
        ns = _as_list(n, self.batch_size, "reserve")
        self._check([l + k for l, k in zip(self._host_lengths, ns)], f"appending {max(ns)} tokens")
        width = max(ns)
        base = torch.tensor(self._host_lengths, dtype=torch.long)
        cols = torch.arange(width)[None, :].expand(self.batch_size, width)
        cols = torch.minimum(cols, torch.tensor(ns)[:, None].clamp_min(1) - 1)
        return (base[:, None] + cols).to(self.device)

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
        finished requests leave a speculative batch. Only rows whose index changes are copied, and the
        buffers become views of their first n rows (no reallocation, no full copy). CUDA graphs captured
        on this cache are dropped (their batch size no longer exists)."""
        rows = [int(r) for r in rows]
        if not rows or any(b <= a for a, b in zip(rows, rows[1:])) or rows[0] < 0 or rows[-1] >= self.batch_size:
            raise ValueError(f"KV cache keep_rows: need a non-empty, strictly ascending subset of "
                             f"[0, {self.batch_size}), got {rows}")
        for i, r in enumerate(rows):   # r >= i, and rows < i were already moved: safe in this order
            if r != i:
                for buf in self.k + self.v:
                    buf[i].copy_(buf[r])
        n = len(rows)
        self.k = [t[:n] for t in self.k]
        self.v = [t[:n] for t in self.v]
        self.batch_size = n
        self._rows = self._rows[:n]
        self.lengths = self.lengths[:n].clone()
        self._set([self._host_lengths[r] for r in rows])
        self.graphs = {}

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
        """k, v [bs, T, Hk, d] -> rows at slots [bs, T] of layer `layer`."""
        self.k[layer][self._rows, :, slots] = k
        self.v[layer][self._rows, :, slots] = v

    # ---- compaction -----------------------------------------------------------------------------------
    def compact(self, request: int, src_slots: Sequence[int] | Tensor, dst_slots: Sequence[int] | Tensor) -> None:
        """Move the K/V entries of `request` at src_slots to dst_slots, in every layer (e.g. an accepted
        tree path to the slots right after the committed prefix). Sources are read before any write, so
        overlapping src/dst are fine. Validated on the host first; lengths are not changed (commit with
        set_length / advance)."""
        if not 0 <= request < self.batch_size:
            raise IndexError(f"KV cache: request {request} outside [0, {self.batch_size})")
        src = torch.as_tensor(src_slots, dtype=torch.long).flatten().cpu()
        dst = torch.as_tensor(dst_slots, dtype=torch.long).flatten().cpu()
        if src.numel() != dst.numel():
            raise ValueError(f"KV cache compact: {src.numel()} source slots but {dst.numel()} destinations")
        for name, t in (("source", src), ("destination", dst)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.capacity):
                raise CacheCapacityError(f"KV cache compact: {name} slot outside [0, {self.capacity}) "
                                         f"for request {request}: {t.tolist()}")
        if dst.unique().numel() != dst.numel():
            raise ValueError(f"KV cache compact: duplicate destination slots {dst.tolist()}")
        if src.numel() == 0:
            return
        src, dst = src.to(self.device), dst.to(self.device)
        for buf in self.k + self.v:
            row = buf[request]                      # [Hk, S, d] view
            row[:, dst] = row[:, src]              # advanced indexing gathers a copy first

"""KV compaction of accepted tree paths (the `kv_compact` op, reference implementation).

Shape legend: bs requests, T tree nodes, D deepest accepted path (path has D+1 columns, root first),
L layers, Hk kv heads, S cache capacity, d head dim.

During verification node i of request b wrote its K/V at slot prefix_b + i. The accepted path
root = path[b, 0] = 0, path[b, 1], ..., path[b, n_b] must end up in the slots prefix_b, prefix_b + 1, ...,
prefix_b + n_b (the root is already in place), after which the committed length is prefix_b + n_b + 1 and
every other tree entry is stale (never attended: masks only show committed slots and current tree slots).
One gather + one scatter per layer for the whole batch; a CUDA kernel can replace it with the same
signature.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..models.kv_cache import CacheCapacityError, KVCache


def kv_compact(cache: KVCache, prefix_lens: Sequence[int], path: Tensor, n_accepted: Sequence[int]) -> None:
    """Move the accepted path's K/V into place and commit: lengths become prefix_lens + n_accepted + 1.

    prefix_lens [bs] host ints (committed lengths before the step), path [bs, D+1] node indices (-1 pad),
    n_accepted [bs] host ints. Everything is checked on the host before any write: the cache is left
    untouched by a bad call."""
    bs = cache.batch_size
    prefix = [int(x) for x in prefix_lens]
    n = [int(x) for x in n_accepted]
    if len(prefix) != bs or len(n) != bs or path.dim() != 2 or path.shape[0] != bs:
        raise ValueError(f"kv_compact: need prefix_lens/n_accepted of {bs} requests and path [bs, D+1]; "
                         f"got {len(prefix)}, {len(n)}, {tuple(path.shape)}")
    D = path.shape[1] - 1
    p = path.cpu().long()
    for b in range(bs):
        if not 0 <= n[b] <= D or (n[b] and bool((p[b, 1:n[b] + 1] < 1).any())) or int(p[b, 0]) != 0:
            raise ValueError(f"kv_compact: request {b}: malformed path {p[b].tolist()} for n_accepted={n[b]}")
        top = prefix[b] + (int(p[b, 1:n[b] + 1].max()) if n[b] else 0)
        if prefix[b] + n[b] + 1 > cache.capacity or top >= cache.capacity:
            raise CacheCapacityError(f"kv_compact: request {b} needs slots up to {max(top, prefix[b] + n[b])} "
                                     f"but the capacity is {cache.capacity}")
    if D > 0 and any(n):
        j = torch.arange(1, D + 1)
        base = torch.tensor(prefix)[:, None]
        live = j[None, :] <= torch.tensor(n)[:, None]                           # [bs, D]
        # padding columns copy the root slot onto itself: never a destination of a real move, and
        # duplicate writes of one identical value are deterministic
        dst = torch.where(live, base + j, base).to(cache.device)
        src = torch.where(live, base + p[:, 1:].clamp_min(0), base).to(cache.device)
        rows = torch.arange(bs, device=cache.device)[:, None]
        for buf in cache.k + cache.v:                                           # [bs, Hk, S, d] each
            vals = buf[rows, :, src]                                            # gathered copy first
            buf[rows, :, dst] = vals
    cache.set_lengths([prefix[b] + n[b] + 1 for b in range(bs)])

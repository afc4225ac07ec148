"""The running batch on the device, and the one packed record a step sends to the host.

Shape legend: bs active requests (rows), S cache capacity, D deepest tree node of the step (its spec's
max_depth), T tree nodes, L_moe MoE layers, n_stop stop tokens.

    SpecBatch (every field is updated in place, so a CUDA graph captured once replays against it)
      cache      the target's KVCache; cache.lengths[b] = L_b committed tokens in the cache
      root       [bs] int64   the last committed token (not yet in the cache; position and slot L_b)
      history    [bs, S] int64 committed tokens: history[b, :L_b + 1] = prompt + generated (root last;
                              kept when a drafter reads it, i.e. not for plain decoding)
      prefix     [bs] int64   L_b at the start of the current step (the verifier advances cache.lengths)
      generated  [bs] int64   tokens emitted so far (the first one came from the prefill)
      finished   [bs] bool    stop token emitted or max_new_tokens reached: the row is frozen (its length,
                              root and history no longer change) until it leaves the batch
      max_new    [bs] int64,  stop [n_stop] int64 (-1 padded)
      seed, offset [bs] int64 Philox key and counter of each request (one random stream per request)
    rows     host: original request index of each row

commit (device, no host read): the step's emitted tokens E[b, j] (accepted draft tokens, then the bonus
token) are cut at the first stop token and at max_new_tokens; finished rows emit nothing and keep their
length. The packed record (int64, one flat tensor, `Record.parse` reads it on the host):
    count [bs]      tokens this step added to each request
    finished [bs]   after this step
    accepted [bs]   accepted draft tokens (before the cut)
    valid [bs]      tree nodes verified
    drafted [bs]    valid tree nodes the drafter proposed (more than `valid` when adaptive verification
                    truncated the tree)
    emitted [bs, D+1]
    touched [L_moe], loaded [L_moe]   only when the step's plan collects expert statistics
    predicted_us    the adaptive verifier's predicted step time (microseconds; 0 without it)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..models.kv_cache import KVCache


def keep_rows_(t: Tensor, rows: Sequence[int]) -> Tensor:
    """Move rows `rows` (strictly ascending) of t to the front, in place; -> the view t[:len(rows)]. Views
    of one buffer at one batch size always share an address, so graphs captured there stay valid."""
    for i, r in enumerate(rows):          # r >= i, and rows < i were already moved: safe in this order
        if r != i:
            t[i].copy_(t[r])
    return t[:len(rows)]


@dataclass
class Record:
    """One step as the host reads it (the parsed packed tensor)."""

    count: list[int]
    finished: list[bool]
    accepted: list[int]
    valid: list[int]
    drafted: list[int]
    emitted: list[list[int]]
    touched: list[int]
    loaded: list[int]
    predicted_s: float | None

    @staticmethod
    def parse(values: list[int], bs: int, depth: int, n_moe: int) -> "Record":
        W = depth + 1
        it = [values[i * bs:(i + 1) * bs] for i in range(5)]
        e0 = 5 * bs
        emitted = [values[e0 + b * W:e0 + (b + 1) * W] for b in range(bs)]
        s0 = e0 + bs * W
        pred = values[s0 + 2 * n_moe]
        return Record(it[0], [bool(x) for x in it[1]], it[2], it[3], it[4], emitted, values[s0:s0 + n_moe],
                      values[s0 + n_moe:s0 + 2 * n_moe], pred * 1e-6 if pred > 0 else None)

    def tokens(self, b: int) -> list[int]:
        return self.emitted[b][:self.count[b]]


class SpecBatch:
    """Device state of one batch of requests (see the module docstring). Buffers are allocated once for
    (cache, n_stop) and reused by later batches of the same size: `start` refills them."""

    def __init__(self, cache: KVCache, n_stop: int = 8, track_history: bool = True):
        bs, S, dev = cache.full_batch_size, cache.capacity, cache.device
        self.cache = cache
        z = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self._full = dict(root=z(bs), history=z(bs, S), prefix=z(bs), generated=z(bs),
                          finished=z(bs, dtype=torch.bool), max_new=z(bs), seed=z(bs), offset=z(bs))
        self.stop = torch.full((n_stop,), -1, dtype=torch.long, device=dev)
        self.track_history = track_history     # drafters read batch.history; plain decoding needs none
        self._views(bs)
        self.rows: list[int] = list(range(bs))
        self.prompts: list[list[int]] = []

    def _views(self, n: int) -> None:
        for k, t in self._full.items():
            setattr(self, k, t[:n])

    @property
    def bs(self) -> int:
        return self.root.shape[0]

    @property
    def device(self) -> torch.device:
        return self.root.device

    @property
    def full_size(self) -> int:
        return self._full["root"].shape[0]

    def fits(self, cache: KVCache, n_stop: int) -> bool:
        return cache is self.cache and n_stop <= self.stop.numel()

    # ---- host side: before the loop and between steps --------------------------------------------------
    def reset(self, seeds: Sequence[int]) -> None:
        """A new batch of len(seeds) requests (the full size): every row back in place, Philox streams
        seeded, counters at 0."""
        bs = len(seeds)
        self.cache.reset_rows()
        self._views(bs)
        self.rows = list(range(bs))
        self.seed.copy_(torch.tensor([s % (1 << 63) for s in seeds], dtype=torch.long))
        self.offset.zero_()

    def start(self, prompts: list[list[int]], first: Tensor, max_new: int, stop_ids: Sequence[int]) -> None:
        """Fill the buffers for the batch whose prompts were just prefilled (cache.lengths = prompt
        lengths), first [bs] = the first generated tokens (the roots). Host data, host-to-device copies."""
        bs, dev = len(prompts), self.device
        self.prompts = [list(p) for p in prompts]
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        hist = torch.zeros(bs, self.history.shape[1], dtype=torch.long)
        for b, p in enumerate(prompts):
            hist[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.history.copy_(hist)
        self.history.scatter_(1, lens.to(dev)[:, None], first[:, None])
        self.root.copy_(first)
        self.prefix.copy_(self.cache.lengths)
        self.generated.fill_(1)
        self.max_new.fill_(max_new)
        self.stop.fill_(-1)
        if stop_ids:
            self.stop[:len(stop_ids)].copy_(torch.tensor(list(stop_ids), dtype=torch.long))
        self.finished.copy_((first[:, None] == self.stop).any(1) | (self.generated >= self.max_new))

    def keep(self, rows: Sequence[int]) -> None:
        """Keep rows `rows` (ascending) as rows 0..n-1 (finished requests leave), cache included."""
        self.cache.keep_rows(rows)
        for k, t in self._full.items():
            setattr(self, k, keep_rows_(t, rows))
        self.rows = [self.rows[r] for r in rows]

    def observe(self, rec: Record) -> None:
        """Host bookkeeping from a step's record: the committed lengths the verifier set on the device
        (L += accepted + 1 for every row that was generating; a finished row keeps its length)."""
        lengths = self.cache.host_lengths()
        for b, (c, a) in enumerate(zip(rec.count, rec.accepted)):
            if c > 0:
                lengths[b] += a + 1
        self.cache.note_device_advance(lengths)

    def uniforms(self, n: int, stream: int) -> Tensor:
        """[bs, n] float32 Philox uniforms of this step (counter = each request's offset, `stream`)."""
        from .. import ops
        return ops.philox_uniform(self.seed, self.offset, n, stream)

    def context(self, b: int) -> list[int]:
        """Host copy of row b's committed tokens (tests and debugging; reads the device)."""
        n = int(self.cache.lengths[b]) + 1
        return self.history[b, :n].tolist()

    # ---- device side: inside the step -----------------------------------------------------------------
    def commit(self, emitted: Tensor, n_accepted: Tensor, bonus: Tensor, n_valid: Tensor, n_drafted: Tensor,
               stats=None, predicted_s: Tensor | None = None) -> Tensor:
        """emitted [bs, D+1] (accepted draft tokens, then the bonus token at index n_accepted), after the
        verifier advanced cache.lengths by n_accepted + 1 -> the packed record. Stop tokens and
        max_new_tokens are applied here; rows finished before this step keep their state."""
        W = emitted.shape[1]
        j = torch.arange(W, device=emitted.device)
        live = ~self.finished
        # a step emits tokens j <= n: cut after the first stop token among them, and at max_new_tokens
        is_stop = (emitted[..., None] == self.stop).any(-1) & (j <= n_accepted[:, None])
        stop_at = torch.where(is_stop, j, W).amin(1)                                   # W: no stop token
        count = (torch.minimum(torch.minimum(n_accepted, stop_at) + 1, self.max_new - self.generated)
                 .clamp_min(0) * live)
        done = live & ((stop_at < count) | (self.generated + count >= self.max_new))
        if self.track_history:
            idx = (self.prefix[:, None] + 1 + j).clamp(max=self.history.shape[1] - 1)
            self.history.scatter_(1, idx, torch.where(j < count[:, None], emitted, self.history.gather(1, idx)))
        self.generated.add_(count)
        self.root.copy_(torch.where(live, bonus, self.root))
        self.cache.lengths.copy_(torch.where(live, self.cache.lengths, self.prefix))
        self.finished.logical_or_(done)
        parts = [count, self.finished.long(), n_accepted, n_valid, n_drafted, emitted.flatten()]
        if stats is not None:
            parts += [stats.touched(), stats.loaded()]
        pred = torch.zeros(1, dtype=torch.long, device=emitted.device) if predicted_s is None else \
            (predicted_s * 1e6).round().long().clamp_min(1)
        return torch.cat(parts + [pred])

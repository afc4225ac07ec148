"""The verify step on the GPU as one CUDA graph: target forward over the tree, acceptance, KV compaction.

Shape legend: bs active requests, T tree nodes, W = ceil(T/32) mask words, V vocab, L_moe MoE layers,
E experts, h hidden.

    static inputs   tokens, parent, depth [bs, T] int64, valid [bs, T] bool, bits [bs, T, W] int32,
                    logp [bs, T] float32 (path token weights), philox seed / offset [bs] int64
    device state    cache.lengths (the committed prefixes: positions, slots and the attention mask are
                    derived from it on the device, and kv_compact advances it)
    body            logits = target(tree tokens at positions prefix + depth, slots prefix + i,
                                    PrefixTreeMask(prefix, bits))             (tree-attention kernel)
                    path, n, bonus = ops.tree_accept(logits, tokens, parent, valid, temperature, ...)
                    ops.kv_compact(cache K/V of every layer, cache.lengths, path, n)
    outputs         path [bs, T], n [bs], bonus [bs], expert counts natural / routed [L_moe, E],
                    the drafter's hidden features (if it asked for any)

The first step with a given key (bs, T, budget, sampling, hidden layers) warms the body up once (its effect
on the committed state undone), captures it and replays it; later steps only copy the inputs and replay.
The setup time is reported apart (VerifyOutput.setup_s), so step timings and the controller see replays. The host reads one packed tensor back per step (accepted lengths, paths, bonus tokens,
expert counts). Graphs live in cache.graphs, so they are dropped when the batch changes (keep_rows).
Acceptance here is greedy or the target-sampling rule (Philox per request); the q-aware rule stays eager.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.kv_cache import KVCache
from ..models.model import ExpertStats, MoEControl, PrefixTreeMask, Transformer
from .accept import Acceptance
from .tree import DraftTree


@dataclass
class VerifyOutput:
    acceptance: Acceptance          # path [bs, T] (-1 padded), n_accepted [bs], bonus [bs] (device copies)
    n_host: list[int]               # accepted draft tokens per request (host)
    natural: Tensor | None          # [L_moe, E] pairs per expert the tree's natural routing wanted
    routed: Tensor | None           # [L_moe, E] pairs per expert in the routing that ran
    hidden: list[Tensor] | None     # drafter features, [bs, T, h] each
    setup_s: float = 0.0            # warm-up + capture time spent in this call (first use of a key)


def verify_control(valid: Tensor, logp: Tensor, budget, padded: bool) -> tuple[MoEControl, ExpertStats]:
    """MoEControl + ExpertStats of a verify forward over tree nodes valid / logp [bs, T]. padded: some nodes
    are padding, which then skip the experts and the statistics (regrouping the routing costs ~15 small
    kernels per MoE layer, so unpadded trees skip it). budget: a BudgetConfig or None; its token weights
    are 1 ("uniform") or the draft probability of reaching the node ("path"; root logp 0 -> 1), 0 on
    padding; the root is protected when asked."""
    bs, T = valid.shape
    flat = valid.reshape(-1)
    stats = ExpertStats(mask=flat if padded else None)
    kw: dict = dict(stats=stats, token_mask=flat if padded else None)
    if budget is not None:
        w = flat.float() if budget.weights == "uniform" else torch.exp(logp.float()).reshape(-1) * flat
        protect = (torch.arange(T, device=flat.device) == 0).repeat(bs) if budget.protect_root else None
        kw.update(budget=budget.budget, policy=budget.policy, token_weights=w.contiguous(), protect=protect)
    return MoEControl(**kw), stats


class VerifyStep:
    """One captured verify step for a fixed key. See the module docstring."""

    def __init__(self, target: Transformer, cache: KVCache, bs: int, T: int, budget, sampling,
                 hidden_layers: tuple = (), padded: bool = True):
        dev = cache.device
        self.target, self.cache, self.budget, self.sampling = target, cache, budget, sampling
        self.hidden_layers = tuple(hidden_layers)
        self.bs, self.T, self.padded = bs, T, padded
        self.eager = False      # set when capture failed: the body then runs eagerly every step
        z = lambda dtype: torch.zeros(bs, T, dtype=dtype, device=dev)  # noqa: E731
        self.tokens, self.parent, self.depth = z(torch.long), z(torch.long), z(torch.long)
        self.valid = torch.ones(bs, T, dtype=torch.bool, device=dev)
        self.logp = z(torch.float32)
        self.bits = torch.zeros(bs, T, (T + 31) // 32, dtype=torch.int32, device=dev)
        self.seed = torch.zeros(bs, dtype=torch.long, device=dev)
        self.offset = torch.zeros(bs, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.out = None

    # ---- the captured body -------------------------------------------------------------------------
    def _body(self):
        from .. import ops
        cache, T = self.cache, self.T
        prefix = cache.lengths
        ar = torch.arange(T, device=prefix.device)
        slots = prefix[:, None] + ar[None, :]
        positions = prefix[:, None] + self.depth
        moe, stats = verify_control(self.valid, self.logp, self.budget, self.padded)
        hidden: list[Tensor] | None = [] if self.hidden_layers else None
        mask = PrefixTreeMask(prefix, self.bits, kv_len_hint=cache.capacity)
        logits = self.target(self.tokens, positions, cache, slots, mask, moe,
                             hidden_layers=self.hidden_layers, hidden_out=hidden)
        s = self.sampling
        path, n, bonus = ops.tree_accept(logits, self.tokens, self.parent, self.valid, temperature=s.temperature,
                                         top_p=s.top_p, top_k=s.top_k, seed=self.seed, offset=self.offset)
        ops.kv_compact(cache.k + cache.v, cache.lengths, path, n)
        natural = stats.natural() if stats.layers else None
        routed = stats.routed() if stats.layers else None
        # one packed int64 tensor for the host: n, bonus, path
        packed = torch.cat([n[:, None], bonus[:, None], path], 1)
        return packed, path, n, bonus, natural, routed, hidden

    # ---- per step ----------------------------------------------------------------------------------
    def run(self, tree: DraftTree, seed: Tensor | None, offset: Tensor | None) -> VerifyOutput:
        """Verify `tree` against the cache's committed prefixes and commit the accepted paths (device
        lengths advance by n + 1; the caller updates the host lengths from n_host)."""
        self.tokens.copy_(tree.tokens)
        self.parent.copy_(tree.parent)
        self.depth.copy_(tree.depth)
        self.valid.copy_(tree.valid)
        self.logp.copy_(tree.logp)
        self.bits.copy_(tree.anc)
        if seed is not None:
            self.seed.copy_(seed)
            self.offset.copy_(offset)
        setup_s = 0.0
        if self.graph is None and not self.eager:
            setup_s = self._capture()
        if self.eager:
            self.out = self._body()
        else:
            self.graph.replay()
        self.calls += 1
        packed, path, n, bonus, natural, routed, hidden = self.out
        if offset is not None:
            offset.copy_(self.offset)
        host = packed.cpu()
        acc = Acceptance(path.clone(), n.clone(), bonus.clone())
        return VerifyOutput(acc, host[:, 0].tolist(),
                            natural.clone() if natural is not None else None,
                            routed.clone() if routed is not None else None,
                            [h.clone() for h in hidden] if hidden else None, setup_s)

    def _capture(self) -> float:
        """Warm up (one eager run of the body on a side stream: library handles, allocator), undo its effect on
        the committed state, capture. Returns the seconds spent (reported apart from step times). The warm-up
        writes K/V only past every committed prefix (slots the real step overwrites) and advances
        cache.lengths and the Philox offsets, which are restored before the capture."""
        t0 = time.perf_counter()
        cache = self.cache
        lengths, offset = cache.lengths.clone(), self.offset.clone()
        s = torch.cuda.Stream(device=cache.device)
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._body()
        torch.cuda.current_stream().wait_stream(s)
        cache.lengths.copy_(lengths)
        self.offset.copy_(offset)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self._body()
            self.graph = graph
        except RuntimeError as e:   # an op of this configuration is not capturable: stay eager, say so once
            import warnings
            warnings.warn(f"verify step (bs={self.bs}, T={self.T}) could not be captured in a CUDA graph "
                          f"({type(e).__name__}: {str(e)[:160]}); running it eagerly")
            self.eager, self.graph, self.out = True, None, None
            torch.cuda.synchronize(cache.device)
        torch.cuda.synchronize(cache.device)
        return time.perf_counter() - t0


def verify_step_for(target: Transformer, cache: KVCache, bs: int, T: int, budget, sampling,
                    hidden_layers: tuple, padded: bool = True) -> VerifyStep:
    """The VerifyStep for this key, created on first use and kept on the cache. padded: the tree has invalid
    (padding) nodes, which then skip the experts and the statistics."""
    bkey = None if budget is None else (str(budget.budget), budget.policy, budget.weights, budget.protect_root)
    key = ("verify", id(target), bs, T, bkey, float(sampling.temperature), float(sampling.top_p),
           int(sampling.top_k), tuple(hidden_layers), bool(padded))
    vs = cache.graphs.get(key)
    if vs is None:
        vs = cache.graphs[key] = VerifyStep(target, cache, bs, T, budget, sampling, hidden_layers, padded)
    return vs

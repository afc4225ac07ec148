"""Benchmark-only drafter: CONTROLLED per-token acceptance with a real draft model's cost.

Shape legend: bs requests, S cache capacity, D the tree's max depth, F frontier nodes, k children per node,
V vocab, R reference length.

    ControlledDrafter(draft, target, references, alpha, seed)
references[r]: request r's prompt followed by the target's own greedy continuation (recorded by a greedy
autoregressive run over the same prompts, a few tokens longer than the generation). Every draft forward of
`draft` runs exactly as in ModelDrafter (own KV cache, catch-up, one forward per tree level), so the
drafting COST is that model's; its logits are discarded and replaced by controlled proposals:

    a frontier node whose path from the root follows the reference ("on reference") proposes, as its
    first (best) child, the reference's next token with probability alpha, else a uniformly random token
    != it; further children (trees) are random tokens != the reference token (never accepted). Nodes off
    the reference (or past its end) propose random tokens.

Under greedy verification the accepted length of a chain is then truncated-geometric with per-token
acceptance alpha (alpha = 1: every draft accepted while the reference lasts; alpha = 0: none), and the
output still equals autoregressive decoding (the target verifies). Everything runs on the device inside the
captured step: the reference and the committed history are compared there, and the randomness is Philox
(ops.philox_uniform) keyed by `seed` per request, with its own counter that advances each step (the same
seed and batch give the same drafts). Labelled "controlled acceptance" in `describe()`; benchmark use only
(it needs the answer in advance).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from specmoe_ext import ops
from specmoe_ext.models.model import Transformer
from specmoe_ext.speculative.drafters import ModelDrafter
from specmoe_ext.speculative.tree import GrowingTree, TreeSpec

STREAM = 1000        # Philox streams of the proposals: STREAM + 3 * level + {0, 1, 2}


class ControlledDrafter(ModelDrafter):
    name = "controlled"

    def __init__(self, draft: Transformer, target: Transformer, references: Sequence[Sequence[int]],
                 alpha: float, seed: int = 0, draft_dir=None):
        super().__init__(draft, target, draft_dir)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"controlled drafter: alpha must be in [0, 1], got {alpha}")
        self.alpha, self.seed = float(alpha), int(seed)
        self.V = target.args.vocab_size
        self.set_references(references)

    def set_references(self, references: Sequence[Sequence[int]]) -> None:
        refs = [list(map(int, r)) for r in references]
        if not refs or any(not r for r in refs):
            raise ValueError("controlled drafter: one non-empty reference sequence per request is needed")
        self.refs = refs

    def prefill(self, batch, spec: TreeSpec, hidden, stats) -> None:
        if batch.bs != len(self.refs):
            raise ValueError(f"controlled drafter: {len(self.refs)} reference sequences for a batch of {batch.bs}")
        super().prefill(batch, spec, hidden, stats)
        self._load_references(batch, spec)

    def _load_references(self, batch, spec: TreeSpec) -> None:
        """The references on the device ([bs, S], -1 past their end), the per-request Philox seeds and offsets
        (shared with bench_offload's controlled self drafter)."""
        S, dev = batch.history.shape[1], batch.device
        ref = torch.full((batch.bs, S), -1, dtype=torch.long)
        for b, r in enumerate(self.refs):
            ref[b, :min(len(r), S)] = torch.tensor(r[:S], dtype=torch.long)
        if getattr(self, "_ref_full", None) is None or self._ref_full.shape != ref.shape:
            self._ref_full = torch.empty_like(ref, device=dev)
            self._seed_full = torch.zeros(batch.bs, dtype=torch.long, device=dev)
            self._off_full = torch.zeros(batch.bs, dtype=torch.long, device=dev)
            self.buffers += 1
        self._ref_full.copy_(ref)
        self._seed_full.copy_(torch.arange(batch.bs) * 7919 + self.seed)
        self._off_full.zero_()
        self.ref, self.seeds, self.offsets = self._ref_full, self._seed_full, self._off_full
        self.depth_window = spec.max_depth

    def keep(self, rows: Sequence[int]) -> None:
        super().keep(rows)
        self._keep_references(rows)

    def _keep_references(self, rows: Sequence[int]) -> None:
        from specmoe_ext.speculative.batch import keep_rows_
        self.ref = keep_rows_(self._ref_full, rows)
        self.seeds = keep_rows_(self._seed_full, rows)
        self.offsets = keep_rows_(self._off_full, rows)

    def _unif(self, n: int, stream: int) -> Tensor:
        return ops.philox_uniform(self.seeds, self.offsets, n, stream)

    def propose(self, batch, plan):
        self._level = 0
        self._spec = plan.tree
        self._win = self._window(batch, max(self.depth_window, plan.tree.max_depth))
        tree = super().propose(batch, plan)
        self.offsets.add_(1)
        return tree

    def _window(self, batch, D: int) -> Tensor:
        """[bs, D] the reference's next D tokens after each root (-1 where unknown: past the reference's end,
        or the committed tokens no longer follow the reference)."""
        L = batch.prefix
        S = batch.history.shape[1]
        j = torch.arange(S, device=L.device)
        follows = ((batch.history == self.ref) | (j[None, :] > L[:, None])).all(1)           # [bs]
        idx = L[:, None] + 1 + torch.arange(D, device=L.device)
        w = self.ref.gather(1, idx.clamp(max=S - 1))
        return torch.where(follows[:, None] & (idx < S), w, torch.full_like(w, -1))

    def _proposals(self, on_ref: Tensor, depth: Tensor) -> Tensor:
        """on_ref, depth [bs, F] of the frontier nodes -> [bs, F, V] float32 logits whose top-k (k children at
        this level) are the controlled proposals, best first; every other token -inf."""
        self._level += 1
        k = min(self._spec.children_at(self._level), self.V - 1)
        bs, F = depth.shape
        dev, D, V = depth.device, self._win.shape[1], self.V
        st = STREAM + 3 * self._level
        t = torch.gather(self._win, 1, depth.clamp(max=D - 1))
        t = torch.where(on_ref & (depth < D), t, torch.full_like(t, -1))       # reference's next token or -1
        known = t >= 0
        u = self._unif(F, st)
        r = (self._unif(F, st + 1) * (V - 1)).long().clamp(max=V - 2)
        wrong = torch.where(known & (r >= t), r + 1, r)                          # uniform over tokens != t
        best = torch.where(known & (u < self.alpha), t, wrong)
        cand = best[..., None]
        if k > 1:                   # other children: k-1 distinct random tokens, none the reference's nor `best`
            o = (self._unif(F, st + 2) * V).long().clamp(max=V - 1)[..., None]
            pool = (o + torch.arange(k + 1, device=dev)) % V                     # [bs, F, k+1]
            bad = (pool == t[..., None]) | (pool == best[..., None])
            pick = torch.sort(bad.to(torch.int8), dim=-1, stable=True).indices[..., :k - 1]
            cand = torch.cat([cand, pool.gather(-1, pick)], -1)
        logits = torch.full((bs, F, V), float("-inf"), dtype=torch.float32, device=dev)
        score = -torch.arange(k, dtype=torch.float32, device=dev).expand(bs, F, k)
        return logits.scatter_(2, cand, score.contiguous())

    def root_logits(self) -> Tensor:
        super().root_logits()                                  # the draft model's catch-up ran: cost only
        bs = self._win.shape[0]
        dev = self._win.device
        z = torch.zeros(bs, 1, dtype=torch.long, device=dev)
        return self._proposals(torch.ones(bs, 1, dtype=torch.bool, device=dev), z)[:, 0]

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        super().expand(nodes, tree, fed)                       # the draft model's forward: cost only
        D = self._win.shape[1]
        ref_tok = torch.gather(self._win, 1, (tree.depth - 1).clamp(0, D - 1))   # [bs, n] reference at each node
        match = (tree.tokens == ref_tok) & (tree.depth <= D)
        match[:, 0] = True                                     # the root (committed)
        on_ref = (~tree.anc | match[:, None, :]).all(-1)      # every node on the path follows the reference
        return self._proposals(tree.gather(on_ref, nodes), tree.gather(tree.depth, nodes))

    def describe(self) -> dict:
        return {**super().describe(), "drafter": "controlled", "acceptance": "controlled acceptance",
                "alpha": self.alpha, "seed": self.seed}

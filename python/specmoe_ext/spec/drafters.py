"""Drafters: a dense draft model, the self-assisted MoE drafter (SpecMoE), n-gram lookup, EAGLE-3 heads.

Shape legend: bs active requests, V vocab, F frontier nodes expanded at once, n nodes created so far in
this step's tree, T verified tree nodes, E experts, L_moe MoE layers, h hidden, S cache capacity.

The engine <-> drafter contract, per batch (`SpecState` is owned by the engine):
    observe(natural)   expert heat: [L_moe, E] (token, slot) pairs the target's natural routing wanted, from
                       the prefill and then every verification (the self drafter picks residents from it)
    start(state, spec, hidden)   after the target prefill. state.ctx[b] = the committed tokens of request b (prompt
                       + generated; the last one, the ROOT, is not yet in the target cache). hidden: the
                       target features the drafter asked for (`hidden_layers`), [bs, P, h] each
    draft(spec, ...)   -> DraftTree for this step, grown by `tree.build_tree` from root_logits / expand
    commit(outcome)    after acceptance and KV compaction; state.ctx already holds the new tokens
    keep(rows)         finished requests leave: keep these rows (ascending), in this order
    target_slots(spec) slots past the committed prefix the drafter writes into the TARGET cache per step
                       (the engine checks capacity for max(tree nodes, this) before any work)

Caches. A drafter with its own network keeps its own KV cache whose committed part is a prefix of ctx;
drafting writes tree nodes PAST the committed length (never advancing it), so "rolling back" a rejected
tree is free: the next step first feeds the committed tokens it has not seen (accepted + bonus) in one
forward (the catch-up) and overwrites those slots. The self drafter shares the target's cache the same
way: its entries past the committed prefix are overwritten by the verification of the same step.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..models.generate import SamplingParams
from ..models.kv_cache import CacheCapacityError, KVCache
from ..models.model import MoEControl, Transformer, causal_mask
from .accept import Acceptance
from .tree import DraftTree, GrowingTree, TreeSpec, build_tree


class DraftVocabError(ValueError):
    """The draft model's vocabulary differs from the target's."""


@dataclass
class SpecState:
    """The running batch, as the engine keeps it (drafters read it, the engine writes it)."""

    target: Transformer
    cache: KVCache                       # the target's cache; committed length of row b = len(ctx[b]) - 1
    ctx: list[list[int]]                 # committed tokens per active request; ctx[b][-1] is the root
    rows: list[int]                      # original request index of each active row
    generators: list[torch.Generator] | None
    sampling: SamplingParams
    out: list[list[int]] = field(default_factory=list)      # generated tokens per ORIGINAL request
    done: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def bs(self) -> int:
        return len(self.ctx)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def prefix_lens(self) -> list[int]:
        return self.cache.host_lengths()


@dataclass
class StepOutcome:
    """What one verification decided, for `Drafter.commit`."""

    prefix_lens: list[int]               # committed target lengths before the step (root slot)
    acceptance: Acceptance
    emitted: list[list[int]]             # tokens committed per request (accepted draft tokens + bonus)
    hidden: Tensor | None                # [bs, T, 3h] target features at every tree node (EAGLE-3)


class Drafter:
    """Base class: see the module docstring for the contract."""

    name = "drafter"
    hidden_layers: tuple[int, ...] = ()

    def target_slots(self, spec: TreeSpec) -> int:
        return 0

    def extra_capacity(self, spec: TreeSpec) -> int:
        """Slots beyond the target's capacity the drafter's own cache needs (tree nodes + catch-up)."""
        return spec.fed_nodes + spec.max_depth + 2

    def check(self, target_capacity: int, spec: TreeSpec) -> None:
        """Raise before any work if this drafter cannot serve a batch whose target cache holds
        target_capacity slots (e.g. the draft model's context limit)."""

    def observe(self, natural: Tensor) -> None:
        pass

    def start(self, state: SpecState, spec: TreeSpec, hidden: list[Tensor] | None = None) -> None:
        self.state = state

    def root_logits(self) -> Tensor:
        raise NotImplementedError

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        raise NotImplementedError

    def draft(self, spec: TreeSpec, *, sample: bool = False, sampling: SamplingParams | None = None,
              generators: Sequence[torch.Generator] | None = None) -> DraftTree:
        roots = torch.tensor([c[-1] for c in self.state.ctx], dtype=torch.long, device=self.state.device)
        return build_tree(self, spec, roots, sample=sample, sampling=sampling, generators=generators)

    def commit(self, outcome: StepOutcome) -> None:
        pass

    def keep(self, rows: Sequence[int]) -> None:
        pass

    def describe(self) -> dict:
        return {"drafter": self.name}


class _TreeFeeder:
    """Places draft-tree nodes in a KV cache past each request's committed prefix.

    base[b]: the request's committed length in that cache (slots < base are attended by every node). The
    j-th node fed this step goes to slot base[b] + j and sees the prefix plus the slots of its fed
    ancestors (itself included); ancestors that were not fed (e.g. the root when it lies in the prefix)
    are already covered by the prefix."""

    def __init__(self, cache: KVCache, base: Sequence[int]):
        self.cache = cache
        self.base_host = [int(x) for x in base]
        self.base = torch.tensor(self.base_host, dtype=torch.long, device=cache.device)
        self.n_fed = 0
        self.slot_of = torch.full((cache.batch_size, 0), -1, dtype=torch.long, device=cache.device)

    def place(self, nodes: Tensor, anc: Tensor, n_nodes: int) -> tuple[Tensor, Tensor]:
        """nodes [bs, F] (tree indices), anc [bs, F, n] (ancestor rows of those nodes) -> (slots [bs, F],
        mask [bs, F, S])."""
        bs, F = nodes.shape
        S = self.cache.capacity
        top = max(self.base_host) + self.n_fed + F
        if top > S:
            raise CacheCapacityError(f"draft tree: {self.n_fed + F} fed nodes past a prefix of {max(self.base_host)} "
                                     f"exceed the cache capacity {S}")
        if self.slot_of.shape[1] < n_nodes:
            pad = torch.full((bs, n_nodes - self.slot_of.shape[1]), -1, dtype=torch.long, device=self.base.device)
            self.slot_of = torch.cat([self.slot_of, pad], 1)
        slots = self.base[:, None] + self.n_fed + torch.arange(F, device=self.base.device)
        rows = torch.arange(bs, device=self.base.device)[:, None]
        self.slot_of[rows, nodes] = slots
        self.n_fed += F
        mask = (torch.arange(S, device=self.base.device)[None, None, :] < self.base[:, None, None]).expand(bs, F, S)
        so = self.slot_of[:, :anc.shape[-1]][:, None, :]                          # [bs, 1, n]
        cols = torch.where(anc & (so >= 0), so, torch.full_like(so, S))           # [bs, F, n]
        extra = torch.zeros(bs, F, S + 1, dtype=torch.bool, device=self.base.device)
        extra.scatter_(2, cols, True)
        return slots, mask | extra[..., :S]


def _gather_rows(t: Tensor, nodes: Tensor) -> Tensor:
    rows = torch.arange(nodes.shape[0], device=nodes.device)[:, None]
    return t[rows, nodes]


# ---- 1. a separate dense draft model -----------------------------------------------------------------

def _tokenizer_vocab(path: Path) -> dict[str, int] | None:
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["model"]["vocab"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None


def check_same_vocab(draft: Transformer, target: Transformer, draft_dir: str | os.PathLike | None = None,
                     target_dir: str | os.PathLike | None = None) -> None:
    """Raise DraftVocabError unless the draft shares the target's vocabulary: equal vocab_size and, when
    both folders carry a tokenizer.json, the same token -> id map."""
    vd, vt = draft.args.vocab_size, target.args.vocab_size
    if vd != vt:
        raise DraftVocabError(f"draft model vocabulary ({vd} tokens) differs from the target's ({vt}): a draft "
                              f"must share the target's tokenizer and vocabulary")
    if draft_dir is not None and target_dir is not None:
        a, b = _tokenizer_vocab(Path(draft_dir)), _tokenizer_vocab(Path(target_dir))
        if a is not None and b is not None and a != b:
            diff = next((t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)), "?")
            raise DraftVocabError(f"draft tokenizer ({draft_dir}) differs from the target's ({target_dir}): token "
                                  f"{diff!r} has id {a.get(diff)} vs {b.get(diff)}")


class ModelDrafter(Drafter):
    """A small dense model sharing the target's vocabulary, with its own KV cache (see the module
    docstring: committed prefix + catch-up; tree nodes are written past the committed length)."""

    name = "model"

    def __init__(self, draft: Transformer, target: Transformer, draft_dir=None, target_dir=None):
        check_same_vocab(draft, target, draft_dir, target_dir)
        if draft.tok_embeddings.weight.device != target.tok_embeddings.weight.device:
            raise ValueError("draft and target models must be on the same device")
        self.model = draft
        self.source = str(draft_dir) if draft_dir is not None else None

    def check(self, target_capacity: int, spec: TreeSpec) -> None:
        self.model.args.check_context(target_capacity + self.extra_capacity(spec))

    def start(self, state: SpecState, spec: TreeSpec, hidden=None) -> None:
        self.state = state
        cap = state.cache.capacity + self.extra_capacity(spec)
        self.cache = KVCache.for_model(self.model, state.bs, cap)
        self.dlen = [0] * state.bs            # committed tokens in the draft cache: the first catch-up is the prefill

    def root_logits(self) -> Tensor:
        ctx = self.state.ctx
        # feed what the draft cache lacks, and at least the root: drafting again without a commit (a
        # controller trying another tree) recomputes the same root logits
        start = [min(d, len(c) - 1) for c, d in zip(ctx, self.dlen)]
        self.cache.set_lengths(start)
        pend = [c[d:] for c, d in zip(ctx, start)]
        ns = [len(p) for p in pend]
        W = max(ns)
        slots = self.cache.reserve(W)                       # uniform width: padding writes slots past n_b
        toks = torch.zeros(len(ctx), W, dtype=torch.long)
        for b, p in enumerate(pend):
            toks[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        dev = self.cache.device
        last = torch.tensor(ns, device=dev)[:, None] - 1
        logits = self.model(toks.to(dev), slots, self.cache, slots, causal_mask(slots, self.cache.capacity),
                            logits_index=last)[:, 0]
        self.cache.advance(ns)
        self.dlen = [len(c) for c in ctx]
        self.feeder = _TreeFeeder(self.cache, self.dlen)
        return logits.float()

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        tokens = tree.gather(tree.tokens, nodes)
        positions = self.feeder.base[:, None] - 1 + tree.gather(tree.depth, nodes)   # root at len(ctx) - 1
        slots, mask = self.feeder.place(nodes, _gather_rows(tree.anc, nodes), tree.n)
        return self.model(tokens, positions, self.cache, slots, mask).float()

    def keep(self, rows: Sequence[int]) -> None:
        self.cache.keep_rows(rows)
        self.dlen = [self.dlen[r] for r in rows]

    def describe(self) -> dict:
        a = self.model.args
        return {"drafter": "model", "draft": self.source, "architecture": a.architecture,
                "parameters": self.model.num_parameters()}


# ---- 2. the self-assisted drafter (SpecMoE) ---------------------------------------------------------

@torch.no_grad()
def expert_affinity(w13: Tensor, w2: Tensor, chunk: int = 1 << 22) -> Tensor:
    """Cosine similarity of the experts' flattened weights [w13[e], w2[e]]: w13 [E, 2f, h], w2 [E, h, f]
    -> [E, E] float32. Accumulated in float32 over column chunks (bounded extra memory)."""
    E = w13.shape[0]
    G = torch.zeros(E, E, dtype=torch.float32, device=w13.device)
    for W in (w13.reshape(E, -1), w2.reshape(E, -1)):
        for a in range(0, W.shape[1], chunk):
            c = W[:, a:a + chunk].float()
            G += c @ c.t()
    n = G.diagonal().clamp_min(1e-30).sqrt()
    return G / n[:, None] / n[None, :]


class SelfDrafter(Drafter):
    """The target drafts for itself with each MoE layer restricted to N resident experts (SpecMoE).

    Residents: the N hottest experts per layer by an exponentially decayed count of the (token, slot)
    pairs the target's natural routing wanted in recent verifications (and the prefill), refreshed every
    `refresh` steps. A slot routed to a non-resident expert runs the resident expert with the highest
    cosine affinity to it (E x E table per layer, computed once here), keeping its routing weight.
    Shares the target's KV cache (prefix KV is exact); see the module docstring."""

    name = "self"

    def __init__(self, target: Transformer, n_resident: int | None = None, refresh: int = 8, decay: float = 0.8):
        a = target.args
        if not a.is_moe:
            raise ValueError(f"the self-assisted drafter needs an MoE target ({a.architecture} has no experts)")
        E, K = a.n_experts, a.top_k
        N = max(K, E // 2) if n_resident is None else int(n_resident)
        if not K <= N <= E:
            raise ValueError(f"self drafter: resident experts per layer must be in [top_k={K}, E={E}], got {N}")
        if refresh < 1 or not 0 <= decay <= 1:
            raise ValueError(f"self drafter: need refresh >= 1 and decay in [0, 1] (got {refresh}, {decay})")
        self.target, self.n_resident, self.refresh, self.decay = target, N, refresh, decay
        self.E = E
        self.moe_layers = [i for i, m in enumerate(a.moe_layers) if m]
        self.affinity = torch.stack([expert_affinity(target.layers[i].ffn.w13, target.layers[i].ffn.w2)
                                     for i in self.moe_layers])                   # [L_moe, E, E]
        self.heat = torch.zeros(len(self.moe_layers), E, dtype=torch.float32)
        self.steps = 0
        self._refresh()

    def target_slots(self, spec: TreeSpec) -> int:
        return spec.fed_nodes

    def extra_capacity(self, spec: TreeSpec) -> int:
        return 0

    def observe(self, natural: Tensor) -> None:
        self.heat = self.decay * self.heat + natural.float().cpu()

    def _refresh(self) -> None:
        """Residents = top-N hottest experts per layer (ties: lower id); map[e] = e for residents, else the
        most similar resident by affinity."""
        dev = self.target.tok_embeddings.weight.device
        order = torch.sort(self.heat, dim=1, descending=True, stable=True).indices
        self.resident = torch.sort(order[:, :self.n_resident], dim=1).values           # [L_moe, N]
        maps: list[Tensor | None] = [None] * self.target.args.n_layers
        for j, layer in enumerate(self.moe_layers):
            res = self.resident[j].to(self.affinity.device)
            best = res[self.affinity[j][:, res].argmax(1)]                             # [E]
            best[res] = res
            maps[layer] = best.to(dev)
        self.maps = maps

    def start(self, state: SpecState, spec: TreeSpec, hidden=None) -> None:
        self.state = state
        self._refresh()

    def _moe(self) -> MoEControl:
        return MoEControl(expert_map=self.maps)

    def root_logits(self) -> Tensor:
        st = self.state
        L = st.prefix_lens()
        self.feeder = _TreeFeeder(st.cache, L)                   # root goes to slot L (not yet in the cache)
        bs, dev = st.bs, st.device
        nodes = torch.zeros(bs, 1, dtype=torch.long, device=dev)
        slots, mask = self.feeder.place(nodes, torch.ones(bs, 1, 1, dtype=torch.bool, device=dev), 1)
        roots = torch.tensor([c[-1] for c in st.ctx], dtype=torch.long, device=dev)[:, None]
        return self.target(roots, slots, st.cache, slots, mask, self._moe())[:, 0].float()

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        st = self.state
        tokens = tree.gather(tree.tokens, nodes)
        positions = self.feeder.base[:, None] + tree.gather(tree.depth, nodes)
        slots, mask = self.feeder.place(nodes, _gather_rows(tree.anc, nodes), tree.n)
        return self.target(tokens, positions, st.cache, slots, mask, self._moe()).float()

    def commit(self, outcome: StepOutcome) -> None:
        self.steps += 1
        if self.steps % self.refresh == 0:
            self._refresh()

    def describe(self) -> dict:
        return {"drafter": "self", "resident_experts": self.n_resident, "experts": self.E,
                "refresh_steps": self.refresh, "heat_decay": self.decay}


# ---- 3. n-gram / prompt lookup ------------------------------------------------------------------------

class _NGramIndex:
    """For one request: (n-gram -> {next token: (count, last position)}) for n = 1..max_n over its
    committed tokens, extended incrementally."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.tables: list[dict] = [dict() for _ in range(max_n + 1)]
        self.done = 0

    def extend(self, ctx: Sequence[int]) -> None:
        for i in range(max(self.done, 1), len(ctx)):
            nxt = ctx[i]
            for n in range(1, self.max_n + 1):
                if i - n < 0:
                    break
                entry = self.tables[n].setdefault(tuple(ctx[i - n:i]), {})
                c = entry.get(nxt)
                entry[nxt] = (1 if c is None else c[0] + 1, i)
        self.done = max(self.done, len(ctx))

    def lookup(self, tail: Sequence[int], min_n: int) -> dict | None:
        """Continuations of the longest suffix of `tail` (n from max_n down to min_n) seen before."""
        for n in range(min(self.max_n, len(tail)), min_n - 1, -1):
            e = self.tables[n].get(tuple(tail[-n:]))
            if e:
                return e
        return None


class NGramDrafter(Drafter):
    """Prompt lookup: propose what followed the longest recent match of the current suffix (n = max_n down
    to min_n) in the prompt + output. Its draft distribution puts mass on those continuations in
    proportion to their counts (ties: the most recent occurrence first); no match = no children."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafter: need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.V, self.max_n, self.min_n = vocab_size, max_n, min_n

    def extra_capacity(self, spec: TreeSpec) -> int:
        return 0

    def start(self, state: SpecState, spec: TreeSpec, hidden=None) -> None:
        self.state = state
        self.index = [_NGramIndex(self.max_n) for _ in state.ctx]
        for ix, c in zip(self.index, state.ctx):
            ix.extend(c)

    def _logits(self, tails: list[list[list[int]]]) -> Tensor:
        """tails[b][f] = context tail of frontier node f of request b -> [bs, F, V] logits."""
        bs, F = len(tails), len(tails[0])
        out = torch.full((bs, F, self.V), float("-inf"), dtype=torch.float32)
        bi, fi, ti, vals = [], [], [], []
        for b in range(bs):
            for f in range(F):
                e = self.index[b].lookup(tails[b][f], self.min_n)
                if not e:
                    continue
                last = max(p for _, p in e.values()) + 1
                for tok, (cnt, pos) in e.items():
                    if 0 <= tok < self.V:
                        bi.append(b), fi.append(f), ti.append(tok)
                        vals.append(math.log(cnt) + 1e-3 * pos / last)
        if vals:
            out[torch.tensor(bi), torch.tensor(fi), torch.tensor(ti)] = torch.tensor(vals)
        return out.to(self.state.device)

    def root_logits(self) -> Tensor:
        return self._logits([[c[-self.max_n:]] for c in self.state.ctx])[:, 0]

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        toks, par, nd = tree.tokens.tolist(), tree.parent.tolist(), nodes.tolist()
        tails = []
        for b, c in enumerate(self.state.ctx):
            row = []
            for node in nd[b]:
                path = []
                while node > 0:                     # walk up to (not including) the root
                    path.append(toks[b][node])
                    node = par[b][node]
                row.append((c[-self.max_n:] + path[::-1])[-self.max_n:])
            tails.append(row)
        return self._logits(tails)

    def commit(self, outcome: StepOutcome) -> None:
        for ix, c in zip(self.index, self.state.ctx):
            ix.extend(c)

    def keep(self, rows: Sequence[int]) -> None:
        self.index = [self.index[r] for r in rows]

    def describe(self) -> dict:
        return {"drafter": "ngram", "max_n": self.max_n, "min_n": self.min_n}


# ---- 4. EAGLE-3 draft heads ---------------------------------------------------------------------------

class Eagle3Drafter(Drafter):
    """An EAGLE-3 head (`spec.eagle`) with its own one-layer KV cache. Pairs (target feature at position
    t, token t+1) sit at head position t; the committed pairs are fed in the catch-up, tree node x at depth
    d is fed as (head output of its parent, x) at position root_pair + d."""

    name = "eagle"

    def __init__(self, head, target: Transformer, source: str | None = None):
        if head.args.vocab_size != target.args.vocab_size:
            raise DraftVocabError(f"EAGLE-3 head vocabulary {head.args.vocab_size} != target {target.args.vocab_size}")
        self.head, self.target, self.source = head, target, source
        self.hidden_layers = tuple(head.capture_layers)

    def start(self, state: SpecState, spec: TreeSpec, hidden: list[Tensor] | None = None) -> None:
        if hidden is None or len(hidden) != 3:
            raise ValueError("EAGLE-3 drafter: the engine must pass the 3 captured target features")
        self.state = state
        feats = torch.cat(hidden, -1)                                           # [bs, P, 3h]
        a = self.head.args
        w = self.head.fc.weight
        cap = state.cache.capacity + self.extra_capacity(spec)
        self.cache = KVCache(1, state.bs, a.n_kv_heads, a.head_dim, cap, w.dtype, w.device)
        # prompt pairs (f_t, x_{t+1}) for t < P: x_P is the first generated token (the root)
        self.pending = [(feats[b, :len(c) - 1], c[1:]) for b, c in enumerate(state.ctx)]
        self.dlen = [0] * state.bs

    def root_logits(self) -> Tensor:
        for b, (fb, tb) in enumerate(self.pending):
            if not tb:                     # drafting again without a commit: re-feed the root pair
                self.pending[b] = self.root_pair[b]
                self.dlen[b] -= 1
        self.cache.set_lengths(self.dlen)
        ns = [len(t) for _, t in self.pending]
        W = max(ns)
        bs = len(ns)
        dev = self.cache.device
        th = self.head.target_hidden
        f = torch.zeros(bs, W, 3 * th, dtype=self.head.fc.weight.dtype, device=dev)
        toks = torch.zeros(bs, W, dtype=torch.long)
        for b, (fb, tb) in enumerate(self.pending):
            f[b, :len(tb)] = fb
            toks[b, :len(tb)] = torch.tensor(tb, dtype=torch.long)
        slots = self.cache.reserve(W)
        out, logits = self.head(toks.to(dev), self.head.fuse(f), slots, self.cache, slots,
                                causal_mask(slots, self.cache.capacity))
        rows = torch.arange(bs, device=dev)
        last = torch.tensor(ns, device=dev) - 1
        self.cache.advance(ns)
        self.dlen = [d + n for d, n in zip(self.dlen, ns)]
        self.root_pair = [(fb[-1:], tb[-1:]) for fb, tb in self.pending]
        self.pending = [(fb[:0], []) for fb, _ in self.pending]
        self.feeder = _TreeFeeder(self.cache, self.dlen)
        self.root_pos = self.feeder.base - 1                                     # head position of the root pair
        self.node_out = out[rows, last][:, None]                                 # [bs, n, h] head output per node
        return logits[rows, last]

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        bs, n = nodes.shape[0], tree.n
        if self.node_out.shape[1] < n:
            pad = self.node_out.new_zeros(bs, n - self.node_out.shape[1], self.node_out.shape[2])
            self.node_out = torch.cat([self.node_out, pad], 1)
        parents = tree.gather(tree.parent, nodes)
        feats = _gather_rows(self.node_out, parents)
        tokens = tree.gather(tree.tokens, nodes)
        positions = self.root_pos[:, None] + tree.gather(tree.depth, nodes)
        slots, mask = self.feeder.place(nodes, _gather_rows(tree.anc, nodes), n)
        out, logits = self.head(tokens, feats, positions, self.cache, slots, mask)
        rows = torch.arange(bs, device=nodes.device)[:, None]
        self.node_out[rows, nodes] = out
        return logits

    def commit(self, outcome: StepOutcome) -> None:
        if outcome.hidden is None:
            raise ValueError("EAGLE-3 drafter: the verification must capture the target features")
        acc = outcome.acceptance
        n = acc.n_accepted.tolist()
        path = acc.path
        self.pending = []
        for b, em in enumerate(outcome.emitted):
            nodes = path[b, :n[b] + 1]                       # root, a1..ak: their features pair with a1..ak, bonus
            self.pending.append((outcome.hidden[b, nodes], list(em)))

    def keep(self, rows: Sequence[int]) -> None:
        self.cache.keep_rows(rows)
        self.dlen = [self.dlen[r] for r in rows]
        self.pending = [self.pending[r] for r in rows]
        if hasattr(self, "root_pair"):
            self.root_pair = [self.root_pair[r] for r in rows]

    def describe(self) -> dict:
        return {"drafter": "eagle", "head": self.source, "draft_vocab": self.head.draft_vocab,
                "feature_layers": list(self.hidden_layers)}


# ---- construction from a --draft string ---------------------------------------------------------------

DRAFT_FORMS = "model | model:DIR | self | self:N | ngram | ngram:N | eagle:DIR"


def make_drafter(spec: str, target: Transformer, *, default_draft_dir: str | os.PathLike | None = None,
                 target_dir: str | os.PathLike | None = None, dtype=None) -> Drafter:
    """Build a drafter from its --draft form (checked before anything is loaded where possible):
      model       the preset's bundled draft model (default_draft_dir)   model:DIR   a checkpoint folder
      self        self-assisted with E/2 resident experts per layer       self:N      N resident experts
      ngram       prompt lookup, suffixes up to 4 tokens                  ngram:N     up to N tokens
      eagle:DIR   an EAGLE-3 head folder in the published layout"""
    from ..models.loader import load_model
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    dev = target.tok_embeddings.weight.device
    if kind == "model":
        path = arg or default_draft_dir
        if not path:
            raise ValueError("--draft model: this target has no bundled draft model; use --draft model:DIR")
        draft = load_model(path, dev, dtype or target.tok_embeddings.weight.dtype)
        return ModelDrafter(draft, target, path, target_dir)
    if kind == "self":
        if arg and not arg.isdigit():
            raise ValueError(f"--draft {spec!r}: self:N needs an integer N (resident experts per layer)")
        return SelfDrafter(target, int(arg) if arg else None)
    if kind == "ngram":
        if arg and not arg.isdigit():
            raise ValueError(f"--draft {spec!r}: ngram:N needs an integer N (longest suffix matched)")
        return NGramDrafter(target.args.vocab_size, max_n=int(arg) if arg else 4)
    if kind == "eagle":
        if not arg:
            raise ValueError("--draft eagle needs the head folder: --draft eagle:DIR")
        from .eagle import load_eagle3
        return Eagle3Drafter(load_eagle3(arg, target, dtype=dtype), target, arg)
    raise ValueError(f"--draft {spec!r}: unknown drafter {kind!r}; expected {DRAFT_FORMS}")


# ---- 5. controlled acceptance (benchmarks) ------------------------------------------------------------

class ControlledDrafter(ModelDrafter):
    """A benchmark drafter with a CONTROLLED per-token acceptance rate alpha and a real draft model's cost.

    references[r]: request r's prompt followed by the target's own greedy continuation (recorded by a
    greedy autoregressive run over the same prompts, a few tokens longer than the generation). Every draft
    forward of `draft` runs exactly as in ModelDrafter (own KV cache, catch-up, one forward per tree level),
    so the drafting COST is that model's; its logits are discarded and replaced by controlled proposals:

        a frontier node whose path from the root follows the reference ("on reference") proposes, as its
        first (best) child, the reference's next token with probability alpha, else a uniformly random
        token != it; further children (trees) are random tokens != the reference token (never accepted).
        Nodes off the reference (or past its end) propose random tokens.

    Under greedy verification the accepted length of a chain is then truncated-geometric with per-token
    acceptance alpha (alpha = 1: every draft accepted while the reference lasts; alpha = 0: none), and the
    output still equals autoregressive decoding (the target verifies). Randomness: one torch.Generator on
    the device, seeded with `seed` at every `start` (the same run twice gives the same drafts). Labelled
    "controlled acceptance" in `describe()`; benchmark use only (it needs the answer in advance)."""

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

    def start(self, state: SpecState, spec: TreeSpec, hidden=None) -> None:
        if state.bs != len(self.refs):
            raise ValueError(f"controlled drafter: {len(self.refs)} reference sequences for a batch of {state.bs}")
        super().start(state, spec, hidden)
        self.gen = torch.Generator(device=state.device)
        self.gen.manual_seed(self.seed)
        self.depth_window = spec.max_depth

    def draft(self, spec: TreeSpec, *, sample: bool = False, sampling: SamplingParams | None = None,
              generators: Sequence[torch.Generator] | None = None) -> DraftTree:
        self.spec_now, self.level = spec, 0
        self.depth_window = max(self.depth_window, spec.max_depth)
        return super().draft(spec, sample=sample, sampling=sampling, generators=generators)

    def _window(self) -> Tensor:
        """[bs, D] the reference's next D tokens after each root (-1 where unknown: past the reference's end,
        or the committed tokens no longer follow the reference)."""
        D, st = self.depth_window, self.state
        rows = []
        for r, c in zip(st.rows, st.ctx):
            ref, n = self.refs[r], len(c)
            w = ref[n:n + D] if len(ref) >= n and ref[:n] == c else []
            rows.append(w + [-1] * (D - len(w)))
        return torch.tensor(rows, dtype=torch.long).to(self.state.device)

    def _proposals(self, on_ref: Tensor, depth: Tensor) -> Tensor:
        """on_ref, depth [bs, F] of the frontier nodes -> [bs, F, V] float32 logits whose top-k (k children at
        this level) are the controlled proposals, best first; every other token -inf."""
        self.level += 1
        k = min(self.spec_now.children_at(self.level), self.V - 1)
        bs, F = depth.shape
        dev, g, D = depth.device, self.gen, self.win.shape[1]
        t = torch.gather(self.win, 1, depth.clamp(max=D - 1))
        t = torch.where(on_ref & (depth < D), t, torch.full_like(t, -1))       # reference's next token or -1
        known = t >= 0
        u = torch.rand((bs, F), generator=g, device=dev)
        r = torch.randint(0, self.V - 1, (bs, F), generator=g, device=dev)
        wrong = torch.where(known & (r >= t), r + 1, r)                          # uniform over tokens != t
        best = torch.where(known & (u < self.alpha), t, wrong)
        cand = best[..., None]
        if k > 1:                   # other children: k-1 distinct random tokens, none the reference's nor `best`
            o = torch.randint(0, self.V, (bs, F, 1), generator=g, device=dev)
            pool = (o + torch.arange(k + 1, device=dev)) % self.V                # [bs, F, k+1]
            bad = (pool == t[..., None]) | (pool == best[..., None])
            pick = torch.sort(bad.to(torch.int8), dim=-1, stable=True).indices[..., :k - 1]
            cand = torch.cat([cand, pool.gather(-1, pick)], -1)
        logits = torch.full((bs, F, self.V), float("-inf"), dtype=torch.float32, device=dev)
        score = -torch.arange(k, dtype=torch.float32, device=dev).expand(bs, F, k)
        return logits.scatter_(2, cand, score.contiguous())

    def root_logits(self) -> Tensor:
        super().root_logits()                                  # the draft model's forward: cost only
        self.win = self._window()
        bs = self.win.shape[0]
        dev = self.win.device
        z = torch.zeros(bs, 1, dtype=torch.long, device=dev)
        return self._proposals(torch.ones(bs, 1, dtype=torch.bool, device=dev), z)[:, 0]

    def expand(self, nodes: Tensor, tree: GrowingTree) -> Tensor:
        super().expand(nodes, tree)                            # the draft model's forward: cost only
        D = self.win.shape[1]
        ref_tok = torch.gather(self.win, 1, (tree.depth - 1).clamp(0, D - 1))   # [bs, n] reference at each node
        match = (tree.tokens == ref_tok) & (tree.depth <= D)
        match[:, 0] = True                                     # the root (committed)
        on_ref = (~tree.anc | match[:, None, :]).all(-1)      # every node on the path follows the reference
        return self._proposals(tree.gather(on_ref, nodes), tree.gather(tree.depth, nodes))

    def describe(self) -> dict:
        return {**super().describe(), "drafter": "controlled", "acceptance": "controlled acceptance",
                "alpha": self.alpha, "seed": self.seed}

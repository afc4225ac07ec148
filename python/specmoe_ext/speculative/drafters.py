"""Drafters: a dense draft model, the self-assisted MoE drafter (SpecMoE), n-gram lookup, EAGLE-3 heads.

Shape legend: bs active requests, V vocab, F frontier nodes expanded at once, n nodes created so far in
this step's tree, T verified tree nodes, D the tree's max depth, E experts, L_moe MoE layers, h hidden,
S cache capacity, L_b committed tokens of request b (its root sits at position and slot L_b), M n-gram order.

A drafter only proposes. The engine <-> drafter contract:
    check(capacity, spec)           before any work: can it serve a batch whose target cache holds
                                    `capacity` slots (the draft model's context limit, ...)
    prefill(batch, spec, hidden, stats)   once per batch, after the target prefill (host data allowed):
                                    batch.prompts, batch.root; hidden = the target features it asked for
                                    (`hidden_layers`, [bs, P, h] each); stats = the prompts' expert counts
    propose(batch, plan) -> DraftTree     INSIDE the step: device tensors only, fixed shape for plan.tree
                                    (grown by tree.build_tree from root_logits / expand); it first catches up
                                    on the committed tokens it has not seen (batch.history, batch.prefix)
    commit(batch, plan, tree, verdict)    INSIDE the step, after verification (every step, speculation-off
                                    ones too): keep its own state in step, on the device
    after_step()                    host side, between steps (e.g. the self drafter's resident refresh)
    keep(rows)                      finished requests leave: keep these rows (ascending), in this order
Class attributes: hidden_layers (target features to capture in every verify forward), pads (its trees may
hold invalid nodes, which then skip the experts), catches_up (it needs plan.lag), target_slots(spec) (slots past L it writes in the TARGET
cache), extra_capacity(spec) (slots its own cache needs beyond the target's).

Caches. A drafter with its own network keeps its own KV cache laid out like the target's (slot j = the
committed token at position j); drafting writes node i at slot L + fed[i] (root: fed 0, slot L), past the
committed part, so a rejected tree costs nothing to roll back. After a step the accepted nodes' K/V move to
L+1.. (ops.kv_compact with the fed indices; chains need no move), so the draft model is always exact up to
L' - 2 and its next catch-up is 2 tokens (L' - 1 and the new root L'), plus one per speculation-off step
in between (plan.lag). The self drafter shares the target's cache the same way: its entries past L are
overwritten by the verification of the same step. The EAGLE-3 head feeds its new (feature, token) pairs in
commit, because their target features exist only then.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..masks import causal_bits
from ..models.generate import prefill as model_prefill
from ..models.kv_cache import Geometry, KVCache
from ..models.model import MoEControl, Transformer
from .config import StepPlan
from .tree import DraftTree, GrowingTree, TreeSpec, build_tree


class DraftVocabError(ValueError):
    """The draft model's vocabulary differs from the target's."""


class Drafter:
    """Base class: see the module docstring for the contract."""

    name = "drafter"
    hidden_layers: tuple[int, ...] = ()
    pads = False
    catches_up = False           # its catch-up covers the tokens of speculation-off steps (plan.lag)
    buffers = 0                  # bumped whenever it reallocates device buffers a captured step reads

    def target_slots(self, spec: TreeSpec) -> int:
        return 0

    def extra_capacity(self, spec: TreeSpec) -> int:
        return 0

    def check(self, target_capacity: int, spec: TreeSpec) -> None:
        pass

    def prefill(self, batch, spec: TreeSpec, hidden: list[Tensor], stats: Tensor | None) -> None:
        pass

    def propose(self, batch, plan: StepPlan) -> DraftTree:
        self._batch, self._chain = batch, plan.tree.max_children == 1
        return build_tree(self, plan.tree, batch.root, sample=plan.sample_drafts, sampling=plan.sampling,
                          uniforms=batch.uniforms)

    def root_logits(self) -> Tensor:
        raise NotImplementedError

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        raise NotImplementedError

    def commit(self, batch, plan: StepPlan, tree: DraftTree, verdict) -> None:
        pass

    def after_step(self) -> None:
        pass

    def attend_limit(self, target_slots: int | None, spec: TreeSpec) -> None:
        """Host side, before an eager step: its forwards read target slots < target_slots (None: no bound);
        a drafter with its own cache bounds that cache's dense-mask attention likewise."""
        for c in self.caches():
            c.set_attend_limit(None if target_slots is None else target_slots + self.extra_capacity(spec))

    def caches(self) -> list:
        return [self.cache] if getattr(self, "cache", None) is not None else []

    def keep(self, rows: Sequence[int]) -> None:
        pass

    def describe(self) -> dict:
        return {"drafter": self.name}


def level_geometry(cache: KVCache, prefix: Tensor, tree: GrowingTree, nodes: Tensor, fed: int,
                   chain: bool) -> Geometry:
    """Geometry of frontier nodes [bs, F] fed at slots prefix + fed + j, positions prefix + depth. A chain's
    node sees every slot below its own (the compact mask: the prefix and the chain so far); a tree's node
    sees the slots below `prefix` plus those of its fed ancestors (a dense mask over the cache)."""
    bs, F = nodes.shape
    depth = tree.gather(tree.depth, nodes)
    if chain:
        ones = torch.ones(bs, F, 1, dtype=torch.int32, device=nodes.device)
        return cache.tree_geometry(depth, ones, prefix=prefix, offset=fed)
    S = cache.attend_limit
    slots = prefix[:, None] + fed + torch.arange(F, device=nodes.device)
    A = tree.rows_of(tree.anc, nodes)                                             # [bs, F, n]
    fi = tree.fed[:, None, :].expand_as(A)
    cols = torch.where(A & (fi >= 0), prefix[:, None, None] + fi, torch.full_like(fi, S))
    extra = torch.zeros(bs, F, S + 1, dtype=torch.bool, device=nodes.device).scatter_(2, cols, True)[..., :S]
    seen = torch.arange(S, device=nodes.device)[None, None, :] < prefix[:, None, None]
    return Geometry(prefix[:, None] + depth, slots, seen | extra)


def compact_fed_path(cache: KVCache, prefix: Tensor, tree: DraftTree, verdict) -> None:
    """Move the accepted nodes' draft K/V from slot prefix + fed[a_j] to prefix + j (a drafter cache laid out
    like the target's). An accepted node that was never fed (the last one, a leaf) moves onto itself."""
    from .. import ops
    path = verdict.path
    j = torch.arange(path.shape[1], device=path.device)
    fp = tree.fed.gather(1, path.clamp_min(0))
    fp = torch.where((path >= 0) & (fp >= 0), fp, j.expand_as(fp))
    ops.kv_compact(cache.k + cache.v, prefix.clone(), fp.contiguous(), verdict.n_accepted)


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
    """A small dense model sharing the target's vocabulary, with its own KV cache (module docstring:
    catch-up of 2 + lag tokens from batch.history, tree nodes at L + fed, accepted nodes compacted)."""

    name = "model"
    catches_up = True

    def __init__(self, draft: Transformer, target: Transformer, draft_dir=None, target_dir=None):
        check_same_vocab(draft, target, draft_dir, target_dir)
        if draft.tok_embeddings.weight.device != target.tok_embeddings.weight.device:
            raise ValueError("draft and target models must be on the same device")
        self.model = draft
        self.source = str(draft_dir) if draft_dir is not None else None
        self.cache: KVCache | None = None

    def extra_capacity(self, spec: TreeSpec) -> int:
        return spec.fed_nodes + 2

    def check(self, target_capacity: int, spec: TreeSpec) -> None:
        self.model.args.check_context(target_capacity + self.extra_capacity(spec))

    def prefill(self, batch, spec: TreeSpec, hidden, stats) -> None:
        cap = batch.cache.capacity + self.extra_capacity(spec)
        c = self.cache
        if c is None or c.full_batch_size != batch.full_size or c.capacity < cap:
            self.cache = c = KVCache.for_model(self.model, batch.full_size, cap)
            self.buffers += 1
        c.reset_rows()
        model_prefill(self.model, batch.prompts, c)       # exact up to L - 1; the first catch-up re-feeds it

    def propose(self, batch, plan: StepPlan) -> DraftTree:
        L, w = batch.prefix, 2 + plan.lag
        base = (L - (w - 1)).clamp_min(0)
        cols = base[:, None] + torch.arange(w, device=L.device)
        toks = batch.history.gather(1, cols.clamp(max=batch.history.shape[1] - 1))
        depth = torch.arange(w, device=L.device).expand(L.shape[0], w)
        geo = self.cache.tree_geometry(depth, causal_bits(w, L.device).expand(L.shape[0], w, -1), prefix=base)
        logits, _ = self.model(toks, geo, self.cache, logits_index=(L - base)[:, None])
        self._root = logits[:, 0].float()
        return super().propose(batch, plan)

    def root_logits(self) -> Tensor:
        return self._root

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        geo = level_geometry(self.cache, self._batch.prefix, tree, nodes, fed, self._chain)
        return self.model(tree.gather(tree.tokens, nodes), geo, self.cache)[0].float()

    def commit(self, batch, plan: StepPlan, tree: DraftTree, verdict) -> None:
        if plan.speculates and plan.tree.max_children > 1:   # a chain's accepted drafts are already in place
            compact_fed_path(self.cache, batch.prefix, tree, verdict)

    def keep(self, rows: Sequence[int]) -> None:
        self.cache.keep_rows(rows)

    def describe(self) -> dict:
        a = self.model.args
        return {"drafter": "model", "draft": self.source, "architecture": a.architecture,
                "parameters": self.model.num_parameters()}


# ---- 2. the self-assisted drafter (SpecMoE) ---------------------------------------------------------

@torch.no_grad()
def expert_affinity(w13: Tensor, w2: Tensor, chunk: int = 1 << 22, device: torch.device | None = None) -> Tensor:
    """Cosine similarity of the experts' flattened weights [w13[e], w2[e]]: w13 [E, 2f, h], w2 [E, h, f]
    -> [E, E] float32 on `device` (default: the weights'; offloaded host weights are streamed there chunk
    by chunk). Accumulated in float32 over column chunks (bounded extra memory)."""
    E = w13.shape[0]
    G = torch.zeros(E, E, dtype=torch.float32, device=device or w13.device)
    for W in (w13.reshape(E, -1), w2.reshape(E, -1)):
        for a in range(0, W.shape[1], chunk):
            c = W[:, a:a + chunk].to(G.device).float()
            G += c @ c.t()
    return cosine_from_gram(G)


def cosine_from_gram(G: Tensor) -> Tensor:
    """[E, E] Gram matrix of flattened expert weights -> their cosine similarities."""
    n = G.diagonal().clamp_min(1e-30).sqrt()
    return G / n[:, None] / n[None, :]


def layer_affinity(ffn, device: torch.device) -> Tensor:
    """[E, E] expert affinity of one MoE layer; a sharded layer (models/parallel.py) computes the whole
    layer's from its shards, identically on every rank."""
    own = getattr(ffn, "expert_affinity", None)
    return own(device) if own is not None else expert_affinity(ffn.w13, ffn.w2, device=device)


class SelfDrafter(Drafter):
    """The target drafts for itself with each MoE layer restricted to N resident experts (SpecMoE).

    Residents: the N hottest experts per layer by an exponentially decayed count of the (token, slot)
    pairs the target's natural routing wanted in recent verifications (and the prefill), refreshed every
    `refresh` steps (host side, between steps; the counts stay on the device). A slot routed to a
    non-resident expert runs the resident expert with the highest cosine affinity to it (E x E table per
    layer, computed once here), keeping its routing weight. Shares the target's KV cache (prefix KV is
    exact); see the module docstring.

    Offloaded target (models/offload.py): residency is real. The resident experts are the expert cache's
    (its N slots per layer; self:N must equal it), read from its device slot table at the start of every
    proposal (inside the step); drafting runs resident experts only (`MoEControl.resident_only`: no fetch,
    no prefetch), verification fetches what the tree needs. No heat / refresh of its own then."""

    name = "self"

    def __init__(self, target: Transformer, n_resident: int | None = None, refresh: int = 8, decay: float = 0.8):
        a = target.args
        if not a.is_moe:
            raise ValueError(f"the self-assisted drafter needs an MoE target ({a.architecture} has no experts)")
        E, K = a.n_experts, a.top_k
        from ..models.offload import expert_offload
        self.offload = expert_offload(target)
        if self.offload is not None:
            cached = self.offload.plan.resident
            if n_resident is not None and int(n_resident) != cached:
                raise ValueError(f"self drafter: the target's experts are offloaded with {cached} resident per MoE "
                                 f"layer, so the drafter's resident experts are those {cached} (got {n_resident}; "
                                 f"use 'self' or 'self:{cached}')")
            n_resident = cached
        N = max(K, E // 2) if n_resident is None else int(n_resident)
        if not K <= N <= E:
            raise ValueError(f"self drafter: resident experts per layer must be in [top_k={K}, E={E}], got {N}")
        if refresh < 1 or not 0 <= decay <= 1:
            raise ValueError(f"self drafter: need refresh >= 1 and decay in [0, 1] (got {refresh}, {decay})")
        self.target, self.n_resident, self.refresh, self.decay = target, N, refresh, decay
        self.E = E
        dev = target.tok_embeddings.weight.device
        self.moe_layers = [i for i, m in enumerate(a.moe_layers) if m]
        self.affinity = torch.stack([layer_affinity(target.layers[i].ffn, dev)
                                     for i in self.moe_layers])                   # [L_moe, E, E]
        self.heat = torch.zeros(len(self.moe_layers), E, dtype=torch.float32, device=dev)
        self.maps: list[Tensor | None] = [None] * a.n_layers
        for layer in self.moe_layers:
            self.maps[layer] = torch.arange(E, device=dev)
        self.steps = 0
        self._refresh()

    def target_slots(self, spec: TreeSpec) -> int:
        return spec.fed_nodes

    def _refresh(self) -> None:
        """Residents = top-N hottest experts per layer (ties: lower id); map[e] = e for residents, else the
        most similar resident by affinity. Device ops, in place (graphs read the maps). Offloaded: the
        residents are the expert cache's now (its slot table)."""
        if self.offload is not None:
            self.resident = None
            res = self.offload.resident_mask()                                          # [L_moe, E]
            ids = torch.arange(self.E, device=res.device)
            for j, layer in enumerate(self.moe_layers):
                aff = self.affinity[j].masked_fill(~res[j][None, :], float("-inf"))
                self.maps[layer].copy_(torch.where(res[j], ids, aff.argmax(1)))
            return
        order = torch.sort(self.heat, dim=1, descending=True, stable=True).indices
        self.resident = torch.sort(order[:, :self.n_resident], dim=1).values            # [L_moe, N]
        for j, layer in enumerate(self.moe_layers):
            res = self.resident[j]
            best = res[self.affinity[j][:, res].argmax(1)]                             # [E]
            best[res] = res
            self.maps[layer].copy_(best)

    def prefill(self, batch, spec: TreeSpec, hidden, stats) -> None:
        self.heat.zero_()
        if stats is not None:
            self.heat.add_(stats.float())
        self.steps = 0
        self._refresh()

    def propose(self, batch, plan: StepPlan) -> DraftTree:
        if self.offload is not None:        # the cache's residency after the last verification's fetches
            self._refresh()
        return super().propose(batch, plan)

    def _moe(self) -> MoEControl:
        return MoEControl(expert_map=self.maps, resident_only=self.offload is not None)

    def root_logits(self) -> Tensor:
        b = self._batch
        bs = b.bs
        dev = b.device
        geo = b.cache.tree_geometry(torch.zeros(bs, 1, dtype=torch.long, device=dev),
                                    torch.ones(bs, 1, 1, dtype=torch.int32, device=dev), prefix=b.prefix)
        return self.target(b.root[:, None], geo, b.cache, self._moe())[0][:, 0].float()

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        b = self._batch
        geo = level_geometry(b.cache, b.prefix, tree, nodes, fed, self._chain)
        return self.target(tree.gather(tree.tokens, nodes), geo, b.cache, self._moe())[0].float()

    def commit(self, batch, plan: StepPlan, tree: DraftTree, verdict) -> None:
        if verdict.stats is not None:
            self.heat.mul_(self.decay).add_(verdict.stats.natural().float())

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.refresh == 0 and self.offload is None:
            self._refresh()

    def describe(self) -> dict:
        return {"drafter": "self", "resident_experts": self.n_resident, "experts": self.E,
                "refresh_steps": self.refresh, "heat_decay": self.decay,
                "residency": "expert cache (offloaded)" if self.offload is not None else "simulated"}


# ---- 3. n-gram / prompt lookup, on the device ----------------------------------------------------------

class NGramDrafter(Drafter):
    """Prompt lookup: propose what followed the longest earlier occurrence of the current suffix (n = max_n
    down to min_n) in the committed tokens. Matching runs on the device over batch.history: for a node
    whose context is (committed tokens + the node's path), every position i < L_b + 1 whose preceding n
    tokens equal the context's last n is an occurrence, and its next token history[i] a continuation. The
    draft distribution puts log(count) + 1e-3 * (last position / (latest position + 1)) on the continuations
    of the longest matching n (ties: the most recent occurrence); no match = no children (padding)."""

    name = "ngram"
    pads = True

    def __init__(self, vocab_size: int, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafter: need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.V, self.max_n, self.min_n = vocab_size, max_n, min_n

    def continuations(self, history: Tensor, ctx_len: Tensor, tail: Tensor) -> Tensor:
        """history [bs, S], ctx_len [bs] committed tokens, tail [bs, F, M] the last M context tokens of each
        node (-1 = before the start) -> logits [bs, F, V] float32 (-inf = not proposed)."""
        bs, S = history.shape
        F, M = tail.shape[1], tail.shape[2]
        dev = history.device
        i = torch.arange(S, device=dev)
        pos = i[:, None] - M + torch.arange(M, device=dev)                          # [S, M] tokens before i
        hv = history.gather(1, pos.clamp_min(0).reshape(1, -1).expand(bs, -1)).view(bs, 1, S, M)
        eq = (hv == tail[:, :, None, :]) & (pos >= 0) & (tail >= 0)[:, :, None, :]  # [bs, F, S, M]
        run = eq.flip(-1).int().cumprod(-1).sum(-1)                                  # trailing matches at i
        ok = (i >= 1)[None, :] & (i[None, :] < ctx_len[:, None])                     # next token committed
        run = torch.where(ok[:, None, :], run, torch.zeros_like(run))                # [bs, F, S]
        best = run.amax(-1, keepdim=True)
        hit = (run == best) & (best >= self.min_n)                                   # occurrences of the longest n
        nxt = history[:, None, :].expand(bs, F, S)
        cnt = torch.zeros(bs, F, self.V, dtype=torch.float32, device=dev).scatter_add_(2, nxt, hit.float())
        last = torch.full((bs, F, self.V), -1.0, device=dev).scatter_reduce_(
            2, nxt, torch.where(hit, i.float().expand(bs, F, S), torch.full_like(cnt[..., :1], -1.0).expand(bs, F, S)),
            "amax")
        latest = last.amax(-1, keepdim=True)
        score = cnt.clamp_min(1).log() + 1e-3 * last / (latest + 1)
        return torch.where(cnt > 0, score, torch.full_like(score, float("-inf")))

    def _tails(self, nodes: Tensor | None, tree: GrowingTree | None) -> Tensor:
        """[bs, F, M]: the last M tokens of committed context + the node's path (root excluded: it is the
        last committed token)."""
        b = self._batch
        L, M = b.prefix, self.max_n
        clen = L + 1
        dev = L.device
        if nodes is None:
            depth, A, toks = 0, None, None
            F = 1
        else:
            F = nodes.shape[1]
            depth = self._level - 1                                   # every frontier node of a level
            A, toks = tree.rows_of(tree.anc, nodes), tree.tokens
        k = torch.arange(M, device=dev)
        v = clen[:, None] - M + depth + k                             # index into committed + path
        ctx = b.history.gather(1, v.clamp(0, b.history.shape[1] - 1))
        ctx = torch.where(v >= 0, ctx, torch.full_like(ctx, -1))
        tail = ctx[:, None, :].expand(L.shape[0], F, M)
        if depth > 0:                                                 # path token at depth e = v - clen + 1
            e = v - clen[:, None] + 1                                 # [bs, M]
            path_tok = torch.zeros(L.shape[0], F, depth + 1, dtype=torch.long, device=dev)
            for d in range(1, depth + 1):
                on = A & (tree.depth[:, None, :] == d)
                path_tok[..., d] = (on.long() * toks[:, None, :]).sum(-1)
            pt = path_tok.gather(2, e.clamp(0, depth)[:, None, :].expand(-1, F, -1))
            tail = torch.where((e >= 1)[:, None, :], pt, tail)
        return tail

    def propose(self, batch, plan: StepPlan) -> DraftTree:
        self._level = 0
        return super().propose(batch, plan)

    def root_logits(self) -> Tensor:
        self._level = 1
        b = self._batch
        return self.continuations(b.history, b.prefix + 1, self._tails(None, None))[:, 0]

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        self._level += 1
        b = self._batch
        return self.continuations(b.history, b.prefix + 1, self._tails(nodes, tree))

    def describe(self) -> dict:
        return {"drafter": "ngram", "max_n": self.max_n, "min_n": self.min_n}


# ---- 4. EAGLE-3 draft heads ---------------------------------------------------------------------------

class Eagle3Drafter(Drafter):
    """An EAGLE-3 head (`speculative.eagle`) with its own one-layer KV cache. Pair t = (target feature at
    position t, token t+1) sits at head slot and position t; the pair of the root is (feature at L - 1,
    root), head slot L - 1. Tree node x at depth d is fed as (head output of its parent, x) at position
    L - 1 + d, slot L - 1 + fed. The committed pairs are fed in commit (the features come from the step's
    verification): n + 1 of them after a step, a fixed window of D + 1."""

    name = "eagle"

    def __init__(self, head, target: Transformer, source: str | None = None):
        if head.args.vocab_size != target.args.vocab_size:
            raise DraftVocabError(f"EAGLE-3 head vocabulary {head.args.vocab_size} != target {target.args.vocab_size}")
        self.head, self.target, self.source = head, target, source
        self.hidden_layers = tuple(head.capture_layers)
        self.cache: KVCache | None = None

    def extra_capacity(self, spec: TreeSpec) -> int:
        return spec.fed_nodes + spec.max_depth + 2

    # -- what the MTP drafter (mtp.py) changes: the features it takes, its cache, its state width ----------
    def _features(self, hidden) -> Tensor:
        """The engine's captured target features -> the head's input states [bs, P, h]."""
        if hidden is None or len(hidden) != 3:
            raise ValueError("EAGLE-3 drafter: the engine must pass the 3 captured target features")
        return self.head.fuse(torch.cat(hidden, -1))

    def _new_cache(self, bs: int, capacity: int) -> KVCache:
        a, w = self.head.args, self.head.fc.weight
        return KVCache(1, bs, a.n_kv_heads, a.head_dim, capacity, w.dtype, w.device)

    def _state_dtype_width(self) -> tuple[torch.dtype, int]:
        return self.head.fc.weight.dtype, self.head.args.hidden_size

    def prefill(self, batch, spec: TreeSpec, hidden, stats) -> None:
        feats = self._features(hidden)                                               # [bs, P, h]
        dev = feats.device
        cap = batch.cache.capacity + self.extra_capacity(spec)
        bs = batch.full_size
        if self.cache is None or self.cache.full_batch_size != bs or self.cache.capacity < cap:
            self.cache = self._new_cache(bs, cap)
            dtype, width = self._state_dtype_width()
            self._root_full = torch.zeros(bs, self.target.args.vocab_size, dtype=torch.float32, device=dev)
            self._out_full = torch.zeros(bs, width, dtype=dtype, device=dev)
            self.buffers += 1
        self.cache.reset_rows()
        self.root, self.root_out = self._root_full, self._out_full
        # prompt pairs (f_t, x_{t+1}) for t < P, where x_P is the root (the first generated token)
        lens = [len(p) for p in batch.prompts]
        toks = torch.zeros(bs, max(lens), dtype=torch.long)
        for b, p in enumerate(batch.prompts):
            toks[b, :len(p) - 1] = torch.tensor(p[1:], dtype=torch.long)
        toks = toks.to(dev)
        toks.scatter_(1, torch.tensor(lens, device=dev)[:, None] - 1, batch.root[:, None])
        out, logits = self.head(toks, feats, self.cache.append(max(lens)), self.cache)
        self.cache.advance(lens)
        last = torch.tensor(lens, device=dev) - 1
        rows = torch.arange(bs, device=dev)
        self.root.copy_(logits[rows, last])
        self.root_out.copy_(out[rows, last])

    def propose(self, batch, plan: StepPlan) -> DraftTree:
        self._node_out = [self.root_out[:, None]]                                    # per level: [bs, F, h]
        self._nodes = [torch.zeros_like(batch.root)[:, None]]
        return super().propose(batch, plan)

    def root_logits(self) -> Tensor:
        return self.root

    def expand(self, nodes: Tensor, tree: GrowingTree, fed: int) -> Tensor:
        b = self._batch
        # the head output of each node's parent: the parents are last level's frontier
        parents = tree.gather(tree.parent, nodes)
        prev_nodes, prev_out = self._nodes[-1], self._node_out[-1]                     # [bs, F'], [bs, F', h]
        which = (prev_nodes[:, None, :] == parents[:, :, None]).long().argmax(-1)     # [bs, F]
        feats = tree.rows_of(prev_out, which)
        geo = level_geometry(self.cache, b.prefix - 1, tree, nodes, fed, self._chain)
        out, logits = self.head(tree.gather(tree.tokens, nodes), feats, geo, self.cache)
        self._nodes.append(nodes)
        self._node_out.append(out)
        return logits

    def commit(self, batch, plan: StepPlan, tree: DraftTree, verdict) -> None:
        if verdict.hidden is None:
            raise ValueError("EAGLE-3 drafter: the verification must capture the target features")
        # pairs (feature at path node j, emitted token j) for j = 0..n at head slots prefix + j
        W = verdict.emitted.shape[1]
        L = batch.prefix
        nodes = verdict.path[:, :W].clamp_min(0)
        feats = self.head.fuse(tree_rows(verdict.hidden, nodes))                      # [bs, W, h]
        depth = torch.arange(W, device=L.device).expand(L.shape[0], W)
        geo = self.cache.tree_geometry(depth, causal_bits(W, L.device).expand(L.shape[0], W, -1), prefix=L)
        out, logits = self.head(verdict.emitted, feats, geo, self.cache)
        n = verdict.n_accepted.clamp(0, W - 1)
        rows = torch.arange(L.shape[0], device=L.device)
        self.root.copy_(logits[rows, n])
        self.root_out.copy_(out[rows, n])

    def keep(self, rows: Sequence[int]) -> None:
        from .batch import keep_rows_
        self.cache.keep_rows(rows)
        self.root = keep_rows_(self._root_full, rows)
        self.root_out = keep_rows_(self._out_full, rows)

    def describe(self) -> dict:
        return {"drafter": "eagle", "head": self.source, "draft_vocab": self.head.draft_vocab,
                "feature_layers": list(self.hidden_layers)}


def tree_rows(t: Tensor, nodes: Tensor) -> Tensor:
    """t [bs, T, ...], nodes [bs, m] -> t[b, nodes[b, j]] [bs, m, ...]."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], nodes]


# ---- construction from a --draft string ---------------------------------------------------------------

DRAFT_FORMS = "model | model:DIR | self | self:N | ngram | ngram:N | eagle:DIR | mtp"


def make_drafter(spec: str, target: Transformer, *, default_draft_dir: str | os.PathLike | None = None,
                 target_dir: str | os.PathLike | None = None, dtype=None) -> Drafter:
    """Build a drafter from its --draft form (checked before anything is loaded where possible):
      model       the preset's bundled draft model (default_draft_dir)   model:DIR   a checkpoint folder
      self        self-assisted with E/2 resident experts per layer       self:N      N resident experts
      ngram       prompt lookup, suffixes up to 4 tokens                  ngram:N     up to N tokens
      eagle:DIR   an EAGLE-3 head folder in the published layout
      mtp         the checkpoint's own MTP layer (DeepSeek-V3 / GLM-4.5; speculative/mtp.py)"""
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
    if kind == "mtp":
        if arg:
            raise ValueError(f"--draft {spec!r}: mtp takes no argument (it drafts with the checkpoint's MTP layer)")
        from .mtp import MTPDrafter
        return MTPDrafter(target)
    raise ValueError(f"--draft {spec!r}: unknown drafter {kind!r}; expected {DRAFT_FORMS}")

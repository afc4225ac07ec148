"""Draft trees: the one representation shared by drafting, verification (attention) and acceptance.

Shape legend: bs requests, T tree nodes per request (node 0 = the root = the last committed token, not yet
in the target's KV cache), W = ceil(T/32) bitmask words, V vocab, F frontier nodes being expanded,
k children drafted per frontier node, n nodes created so far while a tree grows, S cache capacity.

    DraftTree
      tokens   [bs, T] int64    token of each node (padding nodes: 0)
      parent   [bs, T] int64    parent node index, -1 for the root; parent[i] < i (topological order)
      depth    [bs, T] int64    root 0; a node's target position is prefix_len + depth
      valid    [bs, T] bool     False = padding (requests of one batch may have trees of different sizes;
                                padding nodes hang off the root, are never accepted, never attended by
                                valid nodes, and are kept out of the experts and the statistics)
      logp     [bs, T] float32  cumulative draft log-probability of the path root..node (root 0); exp(logp)
                                is the path probability used by MoE-Spec's path token weights
      anc      [bs, T, W] int32 ancestor bitmask: bit j of word j//32 in row i = node j is node i or one of
                                its ancestors (what the tree-attention kernel reads; `ancestors()` expands it)
      q        [bs, T, V] float32 or None: the draft distribution each node's children were SAMPLED from
      sampled  bool             children were drawn i.i.d. from q (enables the q-aware acceptance rule)

Tree shapes (`TreeSpec.parse`): "chain:G" (G drafted tokens in a line), "static:b1,b2,..." (every node at
depth d-1 gets b_d children: a fixed shape), "dynamic:topk=K,depth=D,tokens=M" (EAGLE-2: expand the K best
frontier nodes by cumulative draft log-probability for D levels, K children each, then keep the M best
nodes overall, root included). `build_tree` grows any of them from a `DraftSource` (what drafters
implement): deterministic children (top-k of the draft distribution) or sampled ones (i.i.d. from q).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import Tensor

from ..models.generate import SamplingParams, process_logits
from ..models.model import pack_bits, unpack_bits  # noqa: F401  (re-exported: the tree's bitmask form)


class TreeSpecError(ValueError):
    """A malformed --tree specification."""


_MAX_NODES = 1024   # a sanity bound: verification attends T x T per request


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the draft tree grown each step (see the module docstring for the string forms)."""

    kind: str                           # "chain" | "static" | "dynamic"
    branching: tuple[int, ...] = ()     # chain / static: children per node at depth 1, 2, ...
    top_k: int = 0                      # dynamic
    depth: int = 0                      # dynamic
    tokens: int = 0                     # dynamic: nodes kept, root included

    @staticmethod
    def parse(spec: "str | TreeSpec") -> "TreeSpec":
        if isinstance(spec, TreeSpec):
            return spec
        s = str(spec).strip()
        kind, _, arg = s.partition(":")
        kind = kind.strip().lower()
        forms = "chain:G | static:b1,b2,... | dynamic:topk=K,depth=D,tokens=M"
        if kind == "chain":
            n = _int(arg, "chain length", s, forms)
            if n < 1:
                raise TreeSpecError(f"tree {s!r}: chain length must be >= 1")
            out = TreeSpec("chain", (1,) * n)
        elif kind == "static":
            if not arg.strip():
                raise TreeSpecError(f"tree {s!r}: static needs branching factors per depth, e.g. static:4,2,1")
            b = tuple(_int(x, "branching factor", s, forms) for x in arg.split(","))
            if any(x < 1 for x in b):
                raise TreeSpecError(f"tree {s!r}: branching factors must be >= 1")
            out = TreeSpec("static", b)
        elif kind == "dynamic":
            kv: dict[str, int] = {}
            for part in filter(None, (p.strip() for p in arg.split(","))):
                key, eq, val = part.partition("=")
                key = key.strip().lower().replace("top_k", "topk")
                if not eq or key not in ("topk", "depth", "tokens"):
                    raise TreeSpecError(f"tree {s!r}: unknown or malformed field {part!r}; expected {forms}")
                if key in kv:
                    raise TreeSpecError(f"tree {s!r}: field {key!r} given twice")
                kv[key] = _int(val, key, s, forms)
            missing = [k for k in ("topk", "depth", "tokens") if k not in kv]
            if missing:
                raise TreeSpecError(f"tree {s!r}: dynamic needs topk, depth and tokens (missing "
                                    f"{', '.join(missing)}), e.g. dynamic:topk=4,depth=5,tokens=32")
            k, d, m = kv["topk"], kv["depth"], kv["tokens"]
            if k < 1 or d < 1 or m < 2:
                raise TreeSpecError(f"tree {s!r}: need topk >= 1, depth >= 1, tokens >= 2")
            most = 1 + k + (d - 1) * k * k      # root + every candidate the expansion can create
            if m > most:
                raise TreeSpecError(f"tree {s!r}: tokens={m} exceeds the {most} nodes that topk={k}, "
                                    f"depth={d} can produce")
            out = TreeSpec("dynamic", top_k=k, depth=d, tokens=m)
        else:
            raise TreeSpecError(f"tree {s!r}: unknown kind {kind!r}; expected {forms}")
        if out.max_nodes > _MAX_NODES:
            raise TreeSpecError(f"tree {s!r}: {out.max_nodes} nodes exceeds the limit of {_MAX_NODES}")
        return out

    def __str__(self) -> str:
        if self.kind == "chain":
            return f"chain:{len(self.branching)}"
        if self.kind == "static":
            return "static:" + ",".join(map(str, self.branching))
        return f"dynamic:topk={self.top_k},depth={self.depth},tokens={self.tokens}"

    @property
    def max_depth(self) -> int:
        return self.depth if self.kind == "dynamic" else len(self.branching)

    def children_at(self, depth: int) -> int:
        """Children drafted per frontier node for nodes at `depth` (>= 1)."""
        return self.top_k if self.kind == "dynamic" else self.branching[depth - 1]

    @property
    def max_nodes(self) -> int:
        """Upper bound of T, root included."""
        if self.kind == "dynamic":
            return self.tokens
        n, level = 1, 1
        for b in self.branching:
            level *= b
            n += level
        return n

    @property
    def fed_nodes(self) -> int:
        """Nodes a drafter runs through its network while growing the tree (root + every expanded
        frontier node): the KV slots it writes beyond the committed prefix."""
        if self.kind == "dynamic":
            return 1 + self.top_k * (self.depth - 1)
        n, level = 1, 1
        for b in self.branching[:-1]:
            level *= b
            n += level
        return n


def _int(text: str, what: str, spec: str, forms: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"[0-9]+", t):
        raise TreeSpecError(f"tree {spec!r}: {what} must be a positive integer, got {t!r}; expected {forms}")
    return int(t)


# ---- the tree ------------------------------------------------------------------------------------------

def ancestor_bitmask(parent: Tensor) -> Tensor:
    """parent [bs, T] (-1 root, parent[i] < i) -> ancestor bitmask [bs, T, ceil(T/32)] int32."""
    return pack_bits(ancestors_from_parent(parent))


def ancestors_from_parent(parent: Tensor) -> Tensor:
    """parent [bs, T] -> bool [bs, T, T], A[b, i, j] = node j is node i or an ancestor of node i.
    Row i is row parent[i] plus bit i; rows are filled in index order (parents come first)."""
    bs, T = parent.shape
    A = torch.eye(T, dtype=torch.bool, device=parent.device).repeat(bs, 1, 1)
    rows = torch.arange(bs, device=parent.device)
    for i in range(1, T):
        p = parent[:, i].clamp_min(0)
        A[:, i] |= A[rows, p] & (parent[:, i] >= 0)[:, None]
    return A


@dataclass
class DraftTree:
    tokens: Tensor
    parent: Tensor
    depth: Tensor
    valid: Tensor
    logp: Tensor
    anc: Tensor
    q: Tensor | None = None
    sampled: bool = False
    _anc_bool: Tensor | None = field(default=None, repr=False)

    @staticmethod
    def from_parents(tokens: Tensor, parent: Tensor, valid: Tensor | None = None, logp: Tensor | None = None,
                     q: Tensor | None = None, sampled: bool = False, ancestors: Tensor | None = None) -> "DraftTree":
        """Build (and check) a tree from tokens [bs, T] and parent [bs, T]; depth and the ancestor
        bitmask are derived (`ancestors` [bs, T, T] bool may be passed when the caller already has it).
        Raises ValueError on a malformed structure."""
        if tokens.dim() != 2 or parent.shape != tokens.shape:
            raise ValueError(f"DraftTree: tokens and parent must both be [bs, T]; got {tuple(tokens.shape)}, "
                             f"{tuple(parent.shape)}")
        bs, T = tokens.shape
        idx = torch.arange(T, device=parent.device)
        if T == 0 or bool((parent[:, 0] != -1).any()):
            raise ValueError("DraftTree: node 0 must be the root (parent -1)")
        if T > 1 and bool(((parent[:, 1:] < 0) | (parent[:, 1:] >= idx[1:])).any()):
            raise ValueError("DraftTree: every non-root node needs a parent with a smaller index")
        A = ancestors_from_parent(parent) if ancestors is None else ancestors.bool()
        depth = A.sum(-1) - 1
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
        logp = torch.zeros(bs, T, dtype=torch.float32, device=tokens.device) if logp is None else logp.float()
        if q is not None and q.shape[:2] != (bs, T):
            raise ValueError(f"DraftTree: q must be [bs, T, V], got {tuple(q.shape)}")
        if sampled and q is None:
            raise ValueError("DraftTree: a sampled tree needs the draft distribution q")
        return DraftTree(tokens.long(), parent.long(), depth, valid, logp, pack_bits(A), q, sampled, A)

    @property
    def bs(self) -> int:
        return self.tokens.shape[0]

    @property
    def T(self) -> int:
        return self.tokens.shape[1]

    def max_depth(self) -> int:
        return int(self.depth.max())

    def ancestors(self) -> Tensor:
        """[bs, T, T] bool, from the bitmask (cached)."""
        if self._anc_bool is None:
            self._anc_bool = unpack_bits(self.anc, self.T)
        return self._anc_bool

    def n_valid(self) -> Tensor:
        return self.valid.sum(1)

    def positions(self, prefix_lens: Tensor) -> Tensor:
        """[bs, T] target positions: prefix_len + depth (the root sits right after the prefix)."""
        return prefix_lens.to(self.depth.device)[:, None] + self.depth

    def slots(self, prefix_lens: Tensor) -> Tensor:
        """[bs, T] cache slots of the nodes during verification: prefix_len + node index."""
        return prefix_lens.to(self.depth.device)[:, None] + torch.arange(self.T, device=self.depth.device)

    def children(self) -> Tensor:
        """[bs, T, C] valid children of each node in index order, -1 padded (C = most children of a node)."""
        bs, T = self.tokens.shape
        is_child = (self.parent[:, None, :] == torch.arange(T, device=self.parent.device)[None, :, None]) \
            & self.valid[:, None, :]                                             # [bs, node, child]
        C = max(int(is_child.sum(-1).max()), 1)
        idx = torch.arange(T, device=self.parent.device).expand(bs, T, T)
        key = torch.where(is_child, idx, T + idx)                                # children first, in order
        order = key.sort(-1).values[..., :C]
        return torch.where(order < T, order, torch.full_like(order, -1))


# ---- growing a tree from a drafter ------------------------------------------------------------------

class DraftSource(Protocol):
    """What a drafter implements so `build_tree` can grow any tree shape from it."""

    def root_logits(self) -> Tensor:
        """[bs, V] float32 logits of the root's children (-inf = never propose). The drafter may first
        catch up on committed tokens it has not seen."""

    def expand(self, nodes: Tensor, tree: "GrowingTree") -> Tensor:
        """nodes [bs, F] (indices into `tree`, all already created) -> [bs, F, V] float32 logits of their
        children. `tree` gives tokens / parent / depth / ancestors of every node created so far."""


class GrowingTree:
    """A tree under construction: nodes are appended level by level (creation order is topological)."""

    def __init__(self, root_tokens: Tensor):
        bs = root_tokens.shape[0]
        dev = root_tokens.device
        self.bs, self.device = bs, dev
        self.tokens = root_tokens.long()[:, None]
        self.parent = torch.full((bs, 1), -1, dtype=torch.long, device=dev)
        self.depth = torch.zeros(bs, 1, dtype=torch.long, device=dev)
        self.score = torch.zeros(bs, 1, dtype=torch.float32, device=dev)
        self.valid = torch.ones(bs, 1, dtype=torch.bool, device=dev)
        self.anc = torch.ones(bs, 1, 1, dtype=torch.bool, device=dev)
        self.q: Tensor | None = None             # [bs, n_q, V] draft distributions of expanded nodes

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    def gather(self, t: Tensor, nodes: Tensor) -> Tensor:
        return torch.gather(t, 1, nodes)

    def add(self, tokens: Tensor, parents: Tensor, depth: int, score: Tensor, valid: Tensor) -> Tensor:
        """Append children (all [bs, m]) -> their node indices [bs, m]."""
        bs, m = tokens.shape
        n = self.n
        self.tokens = torch.cat([self.tokens, tokens.long()], 1)
        self.parent = torch.cat([self.parent, parents], 1)
        self.depth = torch.cat([self.depth, torch.full_like(parents, depth)], 1)
        self.score = torch.cat([self.score, score], 1)
        self.valid = torch.cat([self.valid, valid], 1)
        rows = torch.arange(bs, device=self.device)[:, None]
        pa = self.anc[rows, parents]                                             # [bs, m, n]
        new = torch.cat([pa, torch.zeros(bs, m, m, dtype=torch.bool, device=self.device)], 2)
        new[:, torch.arange(m), n + torch.arange(m)] = True
        self.anc = torch.cat([torch.cat([self.anc, self.anc.new_zeros(bs, n, m)], 2), new], 1)
        return n + torch.arange(m, device=self.device).expand(bs, m)

    def store_q(self, nodes: Tensor, q: Tensor) -> None:
        """Remember q [bs, F, V], the draft distribution of the children of nodes [bs, F]."""
        need = int(nodes.max()) + 1
        V = q.shape[-1]
        if self.q is None:
            self.q = torch.zeros(self.bs, need, V, dtype=torch.float32, device=self.device)
        elif self.q.shape[1] < need:
            self.q = torch.cat([self.q, self.q.new_zeros(self.bs, need - self.q.shape[1], V)], 1)
        rows = torch.arange(self.bs, device=self.device)[:, None]
        self.q[rows, nodes] = q.float()


def _safe_log_softmax(logits: Tensor) -> Tensor:
    """float32 log-probabilities; rows without a finite logit give all -inf (no proposals)."""
    x = logits.float()
    finite = torch.isfinite(x).any(-1, keepdim=True)
    lp = torch.log_softmax(torch.where(finite, x, torch.zeros_like(x)), -1)
    return torch.where(finite & torch.isfinite(x), lp, torch.full_like(lp, float("-inf")))


def draft_distribution(logits: Tensor, sampling: SamplingParams) -> Tensor:
    """[..., V] logits -> q [..., V] float32: the distribution sampled children are drawn from (the
    drafter's logits under the same temperature / top-k / top-p as the target; all-zero where a row has
    no finite logit)."""
    shape = logits.shape
    x = process_logits(logits.reshape(-1, shape[-1]), sampling)
    finite = torch.isfinite(x).any(-1, keepdim=True)
    q = torch.softmax(torch.where(finite, x, torch.zeros_like(x)), -1)
    q = torch.where(finite & torch.isfinite(x), q, torch.zeros_like(q))
    return q.reshape(shape)


def _topk(lp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim, best first. Exact ties between draft logits are broken by the device's
    topk (deterministic per device); acceptance never depends on which tied token was proposed."""
    return torch.topk(lp, k, dim=-1, sorted=True)


def build_tree(source: DraftSource, spec: TreeSpec, root_tokens: Tensor, *, sample: bool = False,
               sampling: SamplingParams | None = None, generators: Sequence[torch.Generator] | None = None,
               keep_q: bool = False) -> DraftTree:
    """Grow one draft tree per request from `source`.

    root_tokens [bs]: the last committed token of each request. sample=False: each frontier node's
    children are the top-k tokens of its draft distribution (distinct tokens). sample=True
    (chain / static only): k i.i.d. draws from q = draft_distribution(logits, sampling), one
    torch.Generator per request, and q is stored on the tree (the q-aware rule needs it); keep_q also
    stores q for deterministic trees. Nodes whose logits are all -inf get no children (the tree is then
    padded: see DraftTree.valid). Scores are cumulative log-probabilities at temperature 1.
    """
    if sample and spec.kind == "dynamic":
        raise ValueError("sampled drafting applies to chain / static trees; dynamic trees pick top-k "
                         "children deterministically (accept them with the target-sampling rule)")
    if sample and (sampling is None or generators is None or len(generators) != root_tokens.shape[0]):
        raise ValueError("build_tree(sample=True) needs sampling params and one generator per request")
    g = GrowingTree(root_tokens)
    bs = g.bs
    frontier = torch.zeros(bs, 1, dtype=torch.long, device=g.device)
    logits = source.root_logits().float()[:, None]                              # [bs, 1, V]
    for d in range(1, spec.max_depth + 1):
        if d > 1:
            logits = source.expand(frontier, g).float()                         # [bs, F, V]
        F, V = logits.shape[1], logits.shape[2]
        k = min(spec.children_at(d), V)
        lp = _safe_log_softmax(logits)
        if sample or keep_q:
            q = draft_distribution(logits, sampling or SamplingParams(temperature=1.0))   # [bs, F, V]
            g.store_q(frontier, q)
        if sample:
            draws = []
            for b in range(bs):
                ok = q[b].sum(-1, keepdim=True) > 0        # rows without candidates: dummy draws, invalid
                qb = torch.where(ok, q[b], torch.ones_like(q[b]))
                draws.append(torch.multinomial(qb, k, replacement=True, generator=generators[b]))
            tok = torch.stack(draws)                                             # [bs, F, k]
            clp = lp.gather(2, tok)
        else:
            clp, tok = _topk(lp, k)                                              # [bs, F, k]
        cvalid = g.gather(g.valid, frontier)[..., None] & torch.isfinite(clp)
        cscore = g.gather(g.score, frontier)[..., None] + torch.where(cvalid, clp, torch.zeros_like(clp))
        cscore = torch.where(cvalid, cscore, torch.full_like(cscore, float("-inf")))
        parents = frontier[..., None].expand(bs, F, k)
        ids = g.add(tok.reshape(bs, F * k), parents.reshape(bs, F * k), d, cscore.reshape(bs, F * k),
                    cvalid.reshape(bs, F * k))
        if spec.kind == "dynamic":      # EAGLE-2: expand only the top_k best new nodes next
            m = min(spec.top_k, F * k)
            best = torch.sort(cscore.reshape(bs, F * k), dim=1, descending=True, stable=True).indices[:, :m]
            frontier = torch.gather(ids, 1, best)
        else:
            frontier = ids
    return _finalize(g, spec, sampled=sample, keep_q=sample or keep_q)


def _finalize(g: GrowingTree, spec: TreeSpec, sampled: bool, keep_q: bool) -> DraftTree:
    """Select the nodes to keep, compact the valid ones to the front, re-index parents, pad the batch."""
    bs, n, dev = g.bs, g.n, g.device
    if spec.kind == "dynamic":
        key = torch.where(g.valid, g.score, torch.full_like(g.score, float("-inf")))
        key[:, 0] = float("inf")                                   # the root is always kept
        order = torch.sort(key, dim=1, descending=True, stable=True).indices   # ties: created first
        cap = min(spec.tokens, n)
    else:
        order = torch.sort((~g.valid).long(), dim=1, stable=True).indices      # valid first, in order
        cap = n
    T = max(1, min(cap, int(g.valid.sum(1).max())))
    sel = order[:, :T]
    sel = torch.sort(sel, dim=1).values           # creation order: parents before children
    keep = torch.gather(g.valid, 1, sel)
    # Score-ordered selection is closed under ancestors (a child's score <= its parent's, ties broken
    # towards the earlier-created parent); padding (invalid) nodes are re-hung under the root.
    new_of = torch.full((bs, n), -1, dtype=torch.long, device=dev)
    new_of.scatter_(1, sel, torch.arange(T, device=dev).expand(bs, T))
    old_parent = torch.gather(g.parent, 1, sel)
    parent = torch.where(old_parent >= 0, torch.gather(new_of, 1, old_parent.clamp_min(0)), old_parent)
    if bool((keep & (parent < 0) & (torch.arange(T, device=dev) > 0)).any()):
        raise AssertionError("draft tree selection dropped the parent of a kept node")
    parent = torch.where(keep | (torch.arange(T, device=dev) == 0), parent, torch.zeros_like(parent))
    parent[:, 0] = -1
    tokens = torch.where(keep, torch.gather(g.tokens, 1, sel), torch.zeros_like(sel))
    logp = torch.where(keep, torch.gather(g.score, 1, sel), torch.full((bs, T), float("-inf"), device=dev))
    logp[:, 0] = 0.0
    q = None
    if keep_q and g.q is not None:      # nodes never expanded (leaves) get q = 0
        qd, V = g.q, g.q.shape[-1]
        src = sel.clamp(max=qd.shape[1] - 1)
        q = torch.gather(qd, 1, src[..., None].expand(bs, T, V))
        q = torch.where((sel < qd.shape[1])[..., None], q, torch.zeros_like(q))
    # ancestors of the kept nodes, straight from the growing tree's matrix (padding: root + itself)
    A = g.anc[torch.arange(bs, device=dev)[:, None, None], sel[:, :, None], sel[:, None, :]]
    eye = torch.eye(T, dtype=torch.bool, device=dev)
    A = torch.where(keep[:, :, None], A, eye | (torch.arange(T, device=dev) == 0))
    return DraftTree.from_parents(tokens, parent, valid=keep, logp=logp, q=q, sampled=sampled, ancestors=A)

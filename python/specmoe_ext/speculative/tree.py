"""Draft trees: the one representation shared by drafting, verification (attention) and acceptance.

Shape legend: bs requests, T tree nodes per request (node 0 = the root = the last committed token, not yet
in the target's KV cache), W = ceil(T/32) bitmask words, V vocab, F frontier nodes being expanded, k children
drafted per frontier node, n nodes created so far while a tree grows, C most children of one node, N_f fed
(expanded) nodes of a tree.

    DraftTree (fixed shape per TreeSpec: T = spec.max_nodes whatever the drafter found)
      tokens   [bs, T] int64    token of each node (invalid nodes: 0)
      parent   [bs, T] int64    parent node index, -1 for the root; parent[i] < i (topological order)
      depth    [bs, T] int64    root 0; a node's target position is prefix_len + depth
      valid    [bs, T] bool     False = padding: a drafter found no candidate there. Invalid nodes are never
                                accepted, never attended by valid nodes, and (for drafters that pad) kept out
                                of the experts and the statistics
      logp     [bs, T] float32  cumulative draft log-probability of the path root..node (root 0); exp(logp)
                                is the path probability used by MoE-Spec's path token weights
      anc      [bs, T, W] int32 ancestor bitmask: bit j of word j//32 in row i = node j is node i or one of
                                its ancestors (what the tree-attention kernel reads; `ancestors()` expands it)
      fed      [bs, T] int64    fed index: the order in which the drafter expanded (ran) the node, root 0,
                                -1 for nodes never expanded; a drafter with a cache wrote node i's K/V at
                                slot prefix + fed[i]
      kids     [bs, T, C] int64 children of each node in index order, -1 padded (chain / static trees)
      q        [bs, N_f, V] float32 or None: for SAMPLED trees, the draft distribution each fed node's
                                children were drawn from (row fed[i] for node i)
      sampled  bool             children were drawn i.i.d. from q (enables the q-aware acceptance rule)
      max_depth int             spec.max_depth (static: loops over levels need no host read)

Tree shapes (`TreeSpec.parse`): "chain:G" (G drafted tokens in a line), "static:b1,b2,..." (every node at
depth d-1 gets b_d children: a fixed shape), "dynamic:topk=K,depth=D,tokens=M" (EAGLE-2: expand the K best
frontier nodes by cumulative draft log-probability for D levels, K children each, then keep the M best
nodes overall, root included). TreeSpec.ROOT is the root alone: a step without speculation.

`build_tree` grows any of them from a `DraftSource` (what drafters implement) with device tensors only: every
shape is fixed by the spec, so growth never reads the device (CUDA-graph capturable). Children are the top-k
of the draft distribution, or k i.i.d. draws from it (Philox uniforms: sampled chain / static trees).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from torch import Tensor

from ..masks import pack_bits, unpack_bits
from ..models.generate import SamplingParams, process_logits


class TreeSpecError(ValueError):
    """A malformed --tree specification."""


_MAX_NODES = 1024   # a sanity bound: verification attends T x T per request


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the draft tree grown each step (see the module docstring for the string forms)."""

    kind: str                           # "root" | "chain" | "static" | "dynamic"
    branching: tuple[int, ...] = ()     # chain / static: children per node at depth 1, 2, ...
    top_k: int = 0                      # dynamic
    depth: int = 0                      # dynamic
    tokens: int = 0                     # dynamic: nodes kept, root included

    ROOT: ClassVar["TreeSpec"]

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
        if self.kind == "root":
            return "root"
        if self.kind == "chain":
            return f"chain:{len(self.branching)}"
        if self.kind == "static":
            return "static:" + ",".join(map(str, self.branching))
        return f"dynamic:topk={self.top_k},depth={self.depth},tokens={self.tokens}"

    @property
    def speculates(self) -> bool:
        return self.kind != "root"

    @property
    def max_depth(self) -> int:
        return self.depth if self.kind == "dynamic" else len(self.branching)

    def children_at(self, depth: int) -> int:
        """Children drafted per frontier node for nodes at `depth` (>= 1)."""
        return self.top_k if self.kind == "dynamic" else self.branching[depth - 1]

    @property
    def max_children(self) -> int:
        return self.top_k if self.kind == "dynamic" else max(self.branching, default=1)

    @property
    def max_nodes(self) -> int:
        """T, root included."""
        if self.kind == "dynamic":
            return self.tokens
        n, level = 1, 1
        for b in self.branching:
            level *= b
            n += level
        return n

    def frontier_widths(self) -> list[int]:
        """Nodes expanded per level (level d expands F_d nodes at depth d-1 into depth-d children)."""
        if self.kind == "dynamic":
            return [1] + [self.top_k] * (self.depth - 1)
        out, level = [], 1
        for b in self.branching:
            out.append(level)
            level *= b
        return out

    @property
    def fed_nodes(self) -> int:
        """Nodes a drafter runs through its network while growing the tree (root + every expanded
        frontier node): the KV slots it writes from the root's slot on."""
        return sum(self.frontier_widths())


TreeSpec.ROOT = TreeSpec("root")


def _int(text: str, what: str, spec: str, forms: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"[0-9]+", t):
        raise TreeSpecError(f"tree {spec!r}: {what} must be a positive integer, got {t!r}; expected {forms}")
    return int(t)


# ---- the tree ------------------------------------------------------------------------------------------

def ancestors_from_parent(parent: Tensor) -> Tensor:
    """parent [bs, T] (-1 root, parent[i] < i) -> bool [bs, T, T], A[b, i, j] = node j is node i or an
    ancestor of node i. Row i is row parent[i] plus bit i; rows are filled in index order (parents first)."""
    bs, T = parent.shape
    A = torch.eye(T, dtype=torch.bool, device=parent.device).repeat(bs, 1, 1)
    rows = torch.arange(bs, device=parent.device)
    for i in range(1, T):
        p = parent[:, i].clamp_min(0)
        A[:, i] |= A[rows, p] & (parent[:, i] >= 0)[:, None]
    return A


def ancestor_bitmask(parent: Tensor) -> Tensor:
    """parent [bs, T] (-1 root, parent[i] < i) -> ancestor bitmask [bs, T, ceil(T/32)] int32."""
    return pack_bits(ancestors_from_parent(parent))


def children_table(parent: Tensor, valid: Tensor, C: int) -> Tensor:
    """parent / valid [bs, T] -> [bs, T, C] the first C valid children of each node in index order, -1
    padded (no host read)."""
    bs, T = parent.shape
    idx = torch.arange(T, device=parent.device)
    is_child = (parent[:, None, :] == idx[None, :, None]) & valid[:, None, :]          # [bs, node, child]
    key = torch.where(is_child, idx.expand(bs, T, T), T + idx.expand(bs, T, T))          # children first
    order = key.sort(-1).values[..., :C]
    return torch.where(order < T, order, torch.full_like(order, -1))


@dataclass
class DraftTree:
    tokens: Tensor
    parent: Tensor
    depth: Tensor
    valid: Tensor
    logp: Tensor
    anc: Tensor
    fed: Tensor
    kids: Tensor | None
    max_depth: int
    q: Tensor | None = None
    sampled: bool = False

    @staticmethod
    def from_parents(tokens: Tensor, parent: Tensor, valid: Tensor | None = None,
                     logp: Tensor | None = None) -> "DraftTree":
        """A checked tree from tokens [bs, T] and parent [bs, T] (tests, hand-made trees): depth, the
        ancestor bitmask and the children table are derived. Reads the device (validation); raises
        ValueError on a malformed structure. Drafters build trees with `build_tree` instead."""
        if tokens.dim() != 2 or parent.shape != tokens.shape:
            raise ValueError(f"DraftTree: tokens and parent must both be [bs, T]; got {tuple(tokens.shape)}, "
                             f"{tuple(parent.shape)}")
        bs, T = tokens.shape
        idx = torch.arange(T, device=parent.device)
        if T == 0 or bool((parent[:, 0] != -1).any()):
            raise ValueError("DraftTree: node 0 must be the root (parent -1)")
        if T > 1 and bool(((parent[:, 1:] < 0) | (parent[:, 1:] >= idx[1:])).any()):
            raise ValueError("DraftTree: every non-root node needs a parent with a smaller index")
        parent = parent.long().contiguous()
        A = ancestors_from_parent(parent)
        depth = A.sum(-1) - 1
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
        logp = torch.zeros(bs, T, dtype=torch.float32, device=tokens.device) if logp is None else logp.float()
        C = max(int((parent[:, :, None] == idx).sum(1).max()), 1)
        return DraftTree(tokens.long().contiguous(), parent, depth, valid.contiguous(), logp, pack_bits(A),
                         torch.full_like(parent, -1), children_table(parent, valid, C), int(depth.max()))

    @staticmethod
    def root_only(roots: Tensor) -> "DraftTree":
        """The tree of a step without speculation: the root alone (roots [bs] int64)."""
        bs = roots.shape[0]
        col = lambda v, dtype: torch.full((bs, 1), v, dtype=dtype, device=roots.device)  # noqa: E731
        return DraftTree(roots[:, None].long(), col(-1, torch.long), col(0, torch.long), col(True, torch.bool),
                         col(0.0, torch.float32), col(1, torch.int32)[..., None], col(0, torch.long),
                         col(-1, torch.long)[..., None], 0)

    @property
    def bs(self) -> int:
        return self.tokens.shape[0]

    @property
    def T(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> Tensor:
        """[bs, T, T] bool, from the bitmask."""
        return unpack_bits(self.anc, self.T)

    def n_valid(self) -> Tensor:
        return self.valid.sum(1)


# ---- growing a tree from a drafter ------------------------------------------------------------------

class DraftSource(Protocol):
    """What a drafter implements so `build_tree` can grow any tree shape from it (device tensors only)."""

    def root_logits(self) -> Tensor:
        """[bs, V] float32 logits of the root's children (-inf = never propose). The drafter first catches
        up on committed tokens it has not seen; the root is fed index 0."""

    def expand(self, nodes: Tensor, tree: "GrowingTree", fed: int) -> Tensor:
        """nodes [bs, F] (indices into `tree`, all already created, fed indices fed .. fed + F - 1) ->
        [bs, F, V] float32 logits of their children. `tree` gives tokens / parent / depth / ancestors / fed
        indices of every node created so far."""


class GrowingTree:
    """A tree under construction: nodes are appended level by level (creation order is topological)."""

    def __init__(self, root_tokens: Tensor, max_children: int):
        bs = root_tokens.shape[0]
        dev = root_tokens.device
        self.bs, self.device, self.C = bs, dev, max_children
        self.tokens = root_tokens.long()[:, None]
        self.parent = torch.full((bs, 1), -1, dtype=torch.long, device=dev)
        self.depth = torch.zeros(bs, 1, dtype=torch.long, device=dev)
        self.score = torch.zeros(bs, 1, dtype=torch.float32, device=dev)
        self.valid = torch.ones(bs, 1, dtype=torch.bool, device=dev)
        self.anc = torch.ones(bs, 1, 1, dtype=torch.bool, device=dev)
        self.fed = torch.full((bs, 1), -1, dtype=torch.long, device=dev)
        self.kids = torch.full((bs, 1, max_children), -1, dtype=torch.long, device=dev)
        self.q: list[Tensor] = []                # per level [bs, F, V]: draft distributions of fed nodes

    @property
    def n(self) -> int:
        return self.tokens.shape[1]

    def gather(self, t: Tensor, nodes: Tensor) -> Tensor:
        return torch.gather(t, 1, nodes)

    def rows_of(self, t: Tensor, nodes: Tensor) -> Tensor:
        """t [bs, n, ...] -> t[b, nodes[b, f]] [bs, F, ...]."""
        return t[torch.arange(self.bs, device=self.device)[:, None], nodes]

    def mark_fed(self, nodes: Tensor, first: int) -> None:
        F = nodes.shape[1]
        self.fed = self.fed.scatter(1, nodes, first + torch.arange(F, device=self.device).expand(self.bs, F))

    def add(self, tokens: Tensor, parents: Tensor, depth: int, score: Tensor, valid: Tensor) -> Tensor:
        """Append children (all [bs, m]) -> their node indices [bs, m]."""
        bs, m = tokens.shape
        n, dev = self.n, self.device
        self.tokens = torch.cat([self.tokens, tokens.long()], 1)
        self.parent = torch.cat([self.parent, parents], 1)
        self.depth = torch.cat([self.depth, torch.full_like(parents, depth)], 1)
        self.score = torch.cat([self.score, score], 1)
        self.valid = torch.cat([self.valid, valid], 1)
        self.fed = torch.cat([self.fed, torch.full_like(parents, -1)], 1)
        self.kids = torch.cat([self.kids, torch.full((bs, m, self.C), -1, dtype=torch.long, device=dev)], 1)
        pa = self.rows_of(self.anc, parents)                                      # [bs, m, n]
        new = torch.cat([pa, torch.eye(m, dtype=torch.bool, device=dev).expand(bs, m, m)], 2)
        self.anc = torch.cat([torch.cat([self.anc, self.anc.new_zeros(bs, n, m)], 2), new], 1)
        return n + torch.arange(m, device=dev).expand(bs, m)

    def set_kids(self, nodes: Tensor, children: Tensor) -> None:
        """children [bs, F, k] of nodes [bs, F] (k <= C)."""
        k = children.shape[-1]
        rows = torch.arange(self.bs, device=self.device)[:, None]
        self.kids[rows, nodes, :k] = children


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


def sample_rows(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws: p [..., V] (non-negative, any scale), u [..., k] in [0, 1) -> [..., k] int64.
    Tokens with zero mass are never drawn (first index whose cumulative mass exceeds u * total)."""
    cdf = p.float().cumsum(-1)
    x = (u.float() * cdf[..., -1:]).contiguous()
    return torch.searchsorted(cdf.contiguous(), x, right=True).clamp(max=p.shape[-1] - 1)


DRAFT_STREAM = 16   # Philox stream of level d's draws: DRAFT_STREAM + d (acceptance uses 0..2)


def build_tree(source: DraftSource, spec: TreeSpec, root_tokens: Tensor, *, sample: bool = False,
               sampling: SamplingParams | None = None,
               uniforms: Callable[[int, int], Tensor] | None = None) -> DraftTree:
    """Grow one draft tree per request from `source`, with fixed shapes (T = spec.max_nodes).

    root_tokens [bs]: the last committed token of each request. sample=False: each frontier node's
    children are the top-k tokens of its draft distribution (distinct tokens). sample=True (chain /
    static only): k i.i.d. draws from q = draft_distribution(logits, sampling) with uniforms(n, stream)
    -> [bs, n] (Philox per request: `ops.philox_uniform`), and q is stored on the tree (the q-aware rule
    needs it). Nodes whose logits are all -inf get no children (their would-be children are invalid).
    Scores are cumulative log-probabilities at temperature 1.
    """
    if sample and spec.kind == "dynamic":
        raise ValueError("sampled drafting applies to chain / static trees; dynamic trees pick top-k "
                         "children deterministically (accept them with the target-sampling rule)")
    if sample and (sampling is None or uniforms is None):
        raise ValueError("build_tree(sample=True) needs sampling params and a uniform source")
    if not spec.speculates:
        return DraftTree.root_only(root_tokens)
    g = GrowingTree(root_tokens, spec.max_children)
    bs = g.bs
    frontier = torch.zeros(bs, 1, dtype=torch.long, device=g.device)
    fed = 0
    for d, F in enumerate(spec.frontier_widths(), start=1):
        g.mark_fed(frontier, fed)
        logits = (source.root_logits()[:, None] if d == 1 else source.expand(frontier, g, fed)).float()
        fed += F
        V = logits.shape[-1]
        k = min(spec.children_at(d), V)
        lp = _safe_log_softmax(logits)
        if sample:
            q = draft_distribution(logits, sampling)                                   # [bs, F, V]
            g.q.append(q)
            tok = sample_rows(q, uniforms(F * k, DRAFT_STREAM + d).view(bs, F, k))     # [bs, F, k]
            clp = lp.gather(2, tok)
        else:
            clp, tok = torch.topk(lp, k, dim=-1, sorted=True)                        # [bs, F, k]
        cvalid = g.gather(g.valid, frontier)[..., None] & torch.isfinite(clp)
        cscore = g.gather(g.score, frontier)[..., None] + torch.where(cvalid, clp, torch.zeros_like(clp))
        cscore = torch.where(cvalid, cscore, torch.full_like(cscore, float("-inf")))
        parents = frontier[..., None].expand(bs, F, k)
        ids = g.add(tok.reshape(bs, F * k), parents.reshape(bs, F * k), d, cscore.reshape(bs, F * k),
                    cvalid.reshape(bs, F * k))
        g.set_kids(frontier, ids.view(bs, F, k))
        if spec.kind == "dynamic":      # EAGLE-2: expand only the top_k best new nodes next
            m = min(spec.top_k, F * k)
            best = torch.sort(cscore.reshape(bs, F * k), dim=1, descending=True, stable=True).indices[:, :m]
            frontier = torch.gather(ids, 1, best)
        else:
            frontier = ids
    return _finalize(g, spec, sample)


def _finalize(g: GrowingTree, spec: TreeSpec, sampled: bool) -> DraftTree:
    """The fixed-shape tree: chain / static keep every created node in creation order (invalid ones in
    place); dynamic keeps the spec.tokens best nodes by score (root first; closed under ancestors), in
    creation order, with invalid kept nodes re-hung under the root."""
    q = torch.cat(g.q, 1) if sampled else None
    if spec.kind != "dynamic":
        tokens = torch.where(g.valid, g.tokens, torch.zeros_like(g.tokens))
        logp = torch.where(g.valid, g.score, torch.full_like(g.score, float("-inf")))
        logp[:, 0] = 0.0
        return DraftTree(tokens, g.parent, g.depth, g.valid, logp, pack_bits(g.anc), g.fed, g.kids,
                         spec.max_depth, q, sampled)
    tokens, parent, depth, keep, logp, anc, fed = _select(g.score, g.valid, spec.tokens, g.tokens, g.parent,
                                                          g.depth, g.score, g.anc, g.fed)
    return DraftTree(tokens, parent, depth, keep, logp, anc, fed, None, spec.max_depth, None, False)


def _select(key: Tensor, valid: Tensor, width: int, tokens: Tensor, parent: Tensor, depth: Tensor, logp: Tensor,
            anc: Tensor, fed: Tensor) -> tuple[Tensor, ...]:
    """The `width` best nodes per request by key [bs, n] (root first, invalid nodes last), in creation order
    -> (tokens, parent, depth, valid, logp, ancestor bits, fed) of that [bs, width] tree (anc: the bool
    ancestor matrix [bs, n, n]). Score-ordered selection is closed under ancestors when a child's key never
    exceeds its parent's (ties go to the earlier-created node, the parent); padding (invalid) nodes are
    re-hung under the root."""
    bs, n = key.shape
    dev = key.device
    k = torch.where(valid, key.float(), torch.full((bs, n), float("-inf"), device=dev))
    k[:, 0] = float("inf")                                     # the root is always kept
    order = torch.sort(k, dim=1, descending=True, stable=True).indices    # ties: created first
    sel = torch.sort(order[:, :width], dim=1).values           # creation order: parents before children
    keep = torch.gather(valid, 1, sel) & (torch.gather(k, 1, sel) > float("-inf"))
    ar = torch.arange(width, device=dev)
    new_of = torch.full((bs, n), -1, dtype=torch.long, device=dev).scatter(1, sel, ar.expand(bs, width))
    old_parent = torch.gather(parent, 1, sel)
    par = torch.where(old_parent >= 0, torch.gather(new_of, 1, old_parent.clamp_min(0)), old_parent)
    par = torch.where(keep | (ar == 0), par, torch.zeros_like(par))
    par[:, 0] = -1
    toks = torch.where(keep, torch.gather(tokens, 1, sel), torch.zeros_like(sel))
    lp = torch.where(keep, torch.gather(logp, 1, sel), torch.full((bs, width), float("-inf"), device=dev))
    lp[:, 0] = 0.0
    dep = torch.where(keep, torch.gather(depth, 1, sel), (ar > 0).long().expand(bs, width))
    A = anc[torch.arange(bs, device=dev)[:, None, None], sel[:, :, None], sel[:, None, :]]
    A = torch.where(keep[:, :, None], A, torch.eye(width, dtype=torch.bool, device=dev) | (ar == 0))
    f = torch.where(keep, torch.gather(fed, 1, sel), torch.full_like(sel, -1))
    return toks, par, dep, keep, lp, pack_bits(A), f


def compact_tree(tree: DraftTree, key: Tensor, width: int) -> DraftTree:
    """The `width` best nodes of every request's tree by `key` [bs, T] (larger first; the root always kept;
    invalid nodes and key -inf never chosen before valid ones), as a tree of `width` nodes in creation order:
    what adaptive verification's verify forward runs over, so its cost follows the kept nodes, not the
    drafted ones. The key must not increase from a node to its children (a gain or a path log-probability;
    ties go to the lower index, the parent), so the selection is closed under ancestors. Kept nodes that are
    invalid (a request with fewer than `width` valid nodes) are padding re-hung under the root, as in a
    dynamic tree. tokens / parent / depth / ancestors / fed / q follow the selection; the children table is
    rebuilt with the same width. Device tensors only, fixed shapes (graph-capturable)."""
    bs, T = tree.tokens.shape
    if not 1 <= width <= T:
        raise ValueError(f"compact_tree: width must be in [1, {T}], got {width}")
    if width == T:
        return tree
    tokens, parent, depth, keep, logp, anc, fed = _select(key, tree.valid, width, tree.tokens, tree.parent,
                                                          tree.depth, tree.logp, tree.ancestors(), tree.fed)
    kids = None if tree.kids is None else children_table(parent, keep, tree.kids.shape[-1])
    return DraftTree(tokens, parent, depth, keep, logp, anc, fed, kids, tree.max_depth, tree.q, tree.sampled)

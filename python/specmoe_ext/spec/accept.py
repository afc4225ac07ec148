"""Acceptance of a verified draft tree: greedy, and lossless stochastic (two rules), with a bonus token.

Shape legend: bs requests, T tree nodes (node 0 = root), V vocab, D = deepest node depth, C most children
of one node.

Plain-PyTorch reference functions with fixed, kernel-shaped signatures: tree tensors + target logits or
probabilities + explicit uniform random numbers in, (path, count, bonus) out. A CUDA kernel
(`tree_accept_greedy` / `tree_accept_sample`, Philox per request) replaces them without changing callers.
They are vectorized over the batch and loop only over tree depth (and children for the q-aware rule).

    accept_greedy(tree, logits)                      temperature 0: output == greedy autoregressive decoding
    accept_target_sampling(tree, p, u)               exact for ANY tree: at the current node draw y ~ p; if a
                                                     child carries y, move there, else emit y as the bonus
    accept_q_aware(tree, p, q, u)                    exact when each node's children were drawn i.i.d. from
                                                     q (SpecInfer recursive rejection): accept child x with
                                                     prob. min(1, p(x)/q(x)), else p <- norm(max(p - q, 0));
                                                     for a chain this is the standard u * q(x) < p(x) test
    p   [bs, T, V] float32: the target's sampling distribution at each node (`target_probs`)
    q   [bs, T, V] float32: the draft distribution each node's children were sampled from (tree.q)
    u   [bs, T, 2] float32 in [0, 1): u[., i, 0] is node i's own draw (target rule: the sample at node i;
        q-aware rule: the accept test of node i as a child), u[., i, 1] the residual draw at node i (q-aware
        bonus). Each is used at most once per step, so one Philox stream per request reproduces a run.

Result `Acceptance`: path [bs, D+1] node indices from the root (-1 padded), n_accepted [bs] (accepted
draft tokens = path length - 1), bonus [bs] (the token sampled where the walk stopped). The emitted tokens
of request b are tree.tokens[b, path[b, 1:n+1]] followed by bonus[b].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..models.generate import SamplingParams, process_logits
from .tree import DraftTree

RULES = ("auto", "target", "q")


@dataclass
class Acceptance:
    path: Tensor         # [bs, D+1] int64
    n_accepted: Tensor   # [bs] int64
    bonus: Tensor        # [bs] int64

    def emitted(self, tree: DraftTree) -> list[list[int]]:
        """Host lists of the tokens each request commits this step (accepted draft tokens + bonus)."""
        n = self.n_accepted.tolist()
        path = self.path.tolist()
        toks = tree.tokens.tolist()
        bonus = self.bonus.tolist()
        return [[toks[b][j] for j in path[b][1:n[b] + 1]] + [bonus[b]] for b in range(len(n))]


def target_probs(logits: Tensor, sampling: SamplingParams) -> Tensor:
    """[bs, T, V] target logits -> [bs, T, V] float32 sampling distribution (temperature, top-k, top-p as
    in autoregressive sampling)."""
    bs, T, V = logits.shape
    return torch.softmax(process_logits(logits.reshape(bs * T, V), sampling), -1).reshape(bs, T, V)


def _path_from_ancestors(tree: DraftTree, best: Tensor, D: int) -> Tensor:
    """best [bs] node -> [bs, D+1] its root-to-node path (-1 padded), from the ancestor bitmask."""
    bs, T = tree.tokens.shape
    rows = torch.arange(bs, device=best.device)
    on = tree.ancestors()[rows, best]                                           # [bs, T]
    path = torch.full((bs, D + 2), -1, dtype=torch.long, device=best.device)
    col = torch.where(on, tree.depth, torch.full_like(tree.depth, D + 1))       # off-path nodes -> dump column
    path.scatter_(1, col, torch.arange(T, device=best.device).expand(bs, T))
    return path[:, :D + 1]


def accept_greedy(tree: DraftTree, logits: Tensor) -> Acceptance:
    """Greedy acceptance. logits [bs, T, V] (any float dtype). A node is on an accepted path when its
    token equals the target's argmax at its parent, and so are all its ancestors'; the deepest such node
    wins (ties: lowest index -- duplicate siblings carry the same token, so the emitted tokens are the
    same), and the target's argmax there is the bonus token."""
    bs, T = tree.tokens.shape
    am = logits.argmax(-1)                                                      # [bs, T]
    ok = tree.valid & (tree.tokens == torch.gather(am, 1, tree.parent.clamp_min(0)))
    ok[:, 0] = True
    path_ok = ~(tree.ancestors() & ~ok[:, None, :]).any(-1)                     # [bs, T]
    idx = torch.arange(T, device=tree.tokens.device)
    key = torch.where(path_ok, tree.depth * (T + 1) + (T - idx), torch.full_like(tree.depth, -1))
    best = key.argmax(1)
    n = torch.gather(tree.depth, 1, best[:, None])[:, 0]
    D = int(tree.depth.max())
    return Acceptance(_path_from_ancestors(tree, best, D), n, torch.gather(am, 1, best[:, None])[:, 0])


def _sample_rows(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw per row: p [n, V] (non-negative, any scale), u [n] in [0, 1) -> [n] int64.
    Tokens with zero mass are never drawn (first index whose cumulative mass exceeds u * total)."""
    cdf = p.float().cumsum(-1)
    x = (u.float() * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp(max=p.shape[-1] - 1)


def _walk_start(tree: DraftTree):
    """State of a root-to-leaf acceptance walk: (bs, rows [bs], max depth D, current node cur [bs],
    alive [bs], bonus [bs], accepted path [bs, D+1] (root first, -1 after the end), accepted count n)."""
    bs = tree.tokens.shape[0]
    dev = tree.tokens.device
    D = int(tree.depth.max())
    path = torch.full((bs, D + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    zeros = torch.zeros(bs, dtype=torch.long, device=dev)
    return (bs, torch.arange(bs, device=dev), D, zeros.clone(), torch.ones(bs, dtype=torch.bool, device=dev),
            zeros.clone(), path, zeros.clone())


def _walk_advance(path: Tensor, n: Tensor, cur: Tensor, alive: Tensor, bonus: Tensor, has: Tensor,
                  child: Tensor, y: Tensor, level: int, D: int) -> tuple[Tensor, Tensor, Tensor]:
    """One level of the walk: requests with `has` move to `child` (path and count n updated in place);
    live requests without it stop, emitting y as the bonus token. Returns (cur, alive, bonus)."""
    if level < D:
        path[:, level + 1] = torch.where(has, child, path[:, level + 1])
    n += has.long()
    return torch.where(has, child, cur), has, torch.where(alive & ~has, y, bonus)


def accept_target_sampling(tree: DraftTree, p: Tensor, u: Tensor) -> Acceptance:
    """Lossless acceptance for any tree: at the current node draw y ~ p (with u[., node, 0]); move to the
    first valid child carrying y, else emit y as the bonus token. The emitted tokens are distributed
    exactly as sampling the target autoregressively."""
    dev = tree.tokens.device
    bs, rows, D, cur, alive, bonus, path, n = _walk_start(tree)
    for level in range(D + 1):
        y = _sample_rows(p[rows, cur], u[rows, cur, 0])
        match = (tree.parent == cur[:, None]) & (tree.tokens == y[:, None]) & tree.valid      # [bs, T]
        has = match.any(1) & alive
        child = match.long().argmax(1)                                          # first matching child
        cur, alive, bonus = _walk_advance(path, n, cur, alive, bonus, has, child, y, level, D)
    return Acceptance(path, n, bonus)


def accept_q_aware(tree: DraftTree, p: Tensor, q: Tensor, u: Tensor) -> Acceptance:
    """Lossless acceptance for trees whose children were sampled i.i.d. from q at each node (recursive
    rejection sampling). Children are tried in index order: child x is accepted when
    u[., x, 0] * q(x) < p(x) (probability min(1, p/q)); on rejection p <- normalize(max(p - q, 0)). When
    every child is rejected, the bonus is drawn from the final residual with u[., node, 1]."""
    dev = tree.tokens.device
    bs, rows, D, cur, alive, bonus, path, n = _walk_start(tree)
    kids = tree.children()                                                      # [bs, T, C]
    C = kids.shape[2]
    for level in range(D + 1):
        pr = p[rows, cur].float()                                               # [bs, V] running residual
        qc = q[rows, cur].float()
        chosen = torch.full((bs,), -1, dtype=torch.long, device=dev)
        for j in range(C):
            c = kids[rows, cur, j]
            live = alive & (c >= 0) & (chosen < 0)
            cc = c.clamp_min(0)
            x = tree.tokens[rows, cc]
            px = pr.gather(1, x[:, None])[:, 0]
            qx = qc.gather(1, x[:, None])[:, 0]
            acc = live & (u[rows, cc, 0] * qx < px)
            chosen = torch.where(acc, c, chosen)
            rej = live & ~acc
            resid = (pr - qc).clamp_min(0)
            tot = resid.sum(-1, keepdim=True)
            # p == q leaves no residual mass: that rejection had probability 0 (numerically possible);
            # keeping p then is as good as any choice.
            resid = torch.where(tot > 0, resid / torch.where(tot > 0, tot, torch.ones_like(tot)), pr)
            pr = torch.where(rej[:, None], resid, pr)
        has = alive & (chosen >= 0)
        y = _sample_rows(pr, u[rows, cur, 1])
        cur, alive, bonus = _walk_advance(path, n, cur, alive, bonus, has, chosen, y, level, D)
    return Acceptance(path, n, bonus)


def uniforms(generators: Sequence[torch.Generator], T: int, device: torch.device | str) -> Tensor:
    """[bs, T, 2] float32 uniforms, row b from generators[b] (one stream per request: reproducible from a
    seed whatever the rest of the batch does)."""
    return torch.stack([torch.rand(T, 2, generator=g, device=device) for g in generators])


def resolve_rule(rule: str, tree: DraftTree, greedy: bool) -> str:
    """"greedy" | "target" | "q" for this tree. auto: greedy at temperature 0, else q-aware for sampled
    trees and the target-sampling rule otherwise."""
    if rule not in RULES:
        raise ValueError(f"acceptance rule {rule!r}: choose one of {RULES}")
    if greedy:
        return "greedy"
    if rule == "q" and not tree.sampled:
        raise ValueError("acceptance rule 'q' needs sampled drafts (chain / static trees drawn from q); "
                         "this tree's children were picked deterministically: use 'target'")
    if rule == "auto":
        return "q" if tree.sampled else "target"
    return rule


def accept(tree: DraftTree, logits: Tensor, sampling: SamplingParams, rule: str = "auto",
           generators: Sequence[torch.Generator] | None = None) -> Acceptance:
    """Dispatch: greedy at temperature 0; otherwise the target-sampling or q-aware rule (see resolve_rule)
    with uniforms from one generator per request."""
    how = resolve_rule(rule, tree, sampling.greedy)
    if how == "greedy":
        return accept_greedy(tree, logits)
    if generators is None or len(generators) != tree.bs:
        raise ValueError("stochastic acceptance needs one torch.Generator per request")
    p = target_probs(logits, sampling)
    u = uniforms(generators, tree.T, logits.device)
    if how == "target":
        return accept_target_sampling(tree, p, u)
    return accept_q_aware(tree, p, tree.q, u)

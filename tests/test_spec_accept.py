"""Acceptance: greedy walks, and the two lossless stochastic rules reproduce the target distribution.

Shape legend: N independent trials (batched as N requests), T tree nodes, V vocabulary (4 here), D tree
depth; sequences of D + 1 tokens are compared with the target's autoregressive distribution.

Statistical setup: a toy "target" and "draft" are tables P, Q of next-token distributions for every
context of up to D tokens. Each trial builds a tree (fixed top-k children, or children sampled i.i.d.
from Q), runs one acceptance, and completes the emitted tokens to D + 1 tokens by sampling P. Exactness
means these sequences follow P's autoregressive distribution: a chi-square test over the V^(D+1) cells
(cells with expected count < 5 pooled) must give p > 0.001. A deliberately wrong rule must fail it.
"""
from __future__ import annotations

import pytest
import torch

from specmoe_ext.models.generate import SamplingParams
from specmoe_ext.spec.accept import (_sample_rows, accept, accept_greedy, accept_q_aware, accept_target_sampling,
                                     resolve_rule)
from specmoe_ext.spec.tree import DraftTree

V = 4


def chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    counts, expected = counts.double().flatten(), expected.double().flatten()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


def cid(ctx: torch.Tensor) -> torch.Tensor:
    """[N, l] context tokens -> [N] row of the tables (all contexts of length 0..l in one index space)."""
    N, l = ctx.shape
    base = sum(V ** j for j in range(l))
    idx = torch.zeros(N, dtype=torch.long)
    for j in range(l):
        idx = idx * V + ctx[:, j]
    return base + idx


def tables(seed: int, depth: int, spread: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    n = sum(V ** j for j in range(depth + 1))
    P = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * spread, -1)
    Q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * spread, -1)
    return P.float(), Q.float()


def make_trees(N: int, branching: list[int], P, Q, sampled: bool, g: torch.Generator, duplicates: bool = False):
    """Trees for N trials: level by level, each node gets b children, top-b of Q (deterministic) or b
    i.i.d. draws from Q. duplicates: deterministic trees whose first two children share a token."""
    tokens, parent, ctxs = [torch.zeros(N, dtype=torch.long)], [torch.full((N,), -1)], [torch.zeros(N, 0, dtype=torch.long)]
    level = [0]
    for b in branching:
        nxt = []
        for node in level:
            q = Q[cid(ctxs[node])]
            if sampled:
                draws = torch.multinomial(q, b, replacement=True, generator=g)
            else:
                draws = torch.topk(q, b, dim=-1).indices
                if duplicates and b >= 2:
                    draws[:, 1] = draws[:, 0]
            for j in range(b):
                tokens.append(draws[:, j])
                parent.append(torch.full((N,), node))
                ctxs.append(torch.cat([ctxs[node], draws[:, j:j + 1]], 1))
                nxt.append(len(tokens) - 1)
        level = nxt
    node_cid = torch.stack([cid(c) for c in ctxs], 1)                          # [N, T]
    tree = DraftTree.from_parents(torch.stack(tokens, 1), torch.stack(parent, 1), q=Q[node_cid], sampled=sampled)
    return tree, P[node_cid]


def emitted_sequences(tree, acc, P, length: int, g: torch.Generator) -> torch.Tensor:
    """[N, length]: accepted tokens + bonus, completed by sampling P autoregressively."""
    N = tree.bs
    rows = torch.arange(N)
    seq = torch.full((N, length), -1, dtype=torch.long)
    n = acc.n_accepted
    for j in range(acc.path.shape[1] - 1):
        tok = tree.tokens[rows, acc.path[:, j + 1].clamp_min(0)]
        seq[:, j] = torch.where(j < n, tok, seq[:, j])
    seq[rows, n] = acc.bonus
    for pos in range(length):
        miss = seq[:, pos] < 0
        if miss.any():
            draw = torch.multinomial(P[cid(seq[:, :pos].clamp_min(0))], 1, generator=g)[:, 0]
            seq[:, pos] = torch.where(miss, draw, seq[:, pos])
    return seq


def exact_distribution(P, length: int) -> torch.Tensor:
    """[V^length] probabilities of every sequence under P (autoregressive)."""
    probs = torch.ones(1, dtype=torch.float64)
    seqs = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(length):
        nxt = P[cid(seqs)].double()                                             # [n, V]
        probs = (probs[:, None] * nxt).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return probs


def run_trials(rule: str, branching: list[int], sampled: bool, seed: int, N: int = 20000, duplicates=False):
    D = len(branching)
    P, Q = tables(seed, D)
    g = torch.Generator().manual_seed(seed + 100)
    tree, p = make_trees(N, branching, P, Q, sampled, g, duplicates)
    u = torch.rand(N, tree.T, 2, generator=g)
    if rule == "target":
        acc = accept_target_sampling(tree, p, u)
    elif rule == "q":
        acc = accept_q_aware(tree, p, tree.q, u)
    else:   # a wrong rule: accept the first child x with probability p(x), else emit a fresh draw from p
        acc = _naive_accept(tree, p, u)
    seq = emitted_sequences(tree, acc, P, D + 1, g)
    code = torch.zeros(N, dtype=torch.long)
    for j in range(D + 1):
        code = code * V + seq[:, j]
    counts = torch.bincount(code, minlength=V ** (D + 1))
    return chi2_pvalue(counts, N * exact_distribution(P, D + 1)), acc


def _naive_accept(tree, p, u):
    from specmoe_ext.spec.accept import Acceptance
    N, T = tree.tokens.shape
    rows = torch.arange(N)
    kids = tree.children()
    D = tree.max_depth()
    cur = torch.zeros(N, dtype=torch.long)
    alive = torch.ones(N, dtype=torch.bool)
    path = torch.full((N, D + 1), -1)
    path[:, 0] = 0
    n = torch.zeros(N, dtype=torch.long)
    bonus = torch.zeros(N, dtype=torch.long)
    for level in range(D + 1):
        c = kids[rows, cur, 0]
        x = tree.tokens[rows, c.clamp_min(0)]
        ok = alive & (c >= 0) & (u[rows, c.clamp_min(0), 0] < p[rows, cur].gather(1, x[:, None])[:, 0])
        y = _sample_rows(p[rows, cur], u[rows, cur, 1])
        bonus = torch.where(alive & ~ok, y, bonus)
        if level < D:
            path[:, level + 1] = torch.where(ok, c, path[:, level + 1])
        n += ok.long()
        cur = torch.where(ok, c, cur)
        alive = ok
    return Acceptance(path, n, bonus)


@pytest.mark.parametrize("rule,branching,sampled,dup", [
    ("target", [1, 1], False, False),         # a chain of the draft's top tokens
    ("target", [2, 2], False, False),         # a static tree of top-2 children
    ("target", [3, 1], False, True),          # any tree: duplicate sibling tokens too
    ("target", [2, 2], True, False),          # sampled trees are trees as well
    ("q", [1, 1], True, False),               # standard speculative sampling (chain drawn from q)
    ("q", [2, 2], True, False),               # SpecInfer multi-draft recursive rejection
    ("q", [3, 1], True, False),
])
def test_stochastic_acceptance_reproduces_the_target_distribution(rule, branching, sampled, dup):
    pval, acc = run_trials(rule, branching, sampled, seed=7 + len(branching) + 3 * sampled + dup, duplicates=dup)
    assert pval > 1e-3, pval
    assert float(acc.n_accepted.float().mean()) > 0.1      # the drafts were really used, not all rejected


@pytest.mark.parametrize("rule,branching,sampled", [
    ("naive", [1, 1], False),                 # accept with prob p(x), no residual: biased
    ("q", [2, 2], False),                     # q-aware rule on children that were NOT sampled: biased
])
def test_chi_square_detects_a_wrong_rule(rule, branching, sampled):
    pval, _ = run_trials(rule, branching, sampled, seed=11)
    assert pval < 1e-6, pval


def test_greedy_walk_on_a_hand_built_tree():
    #   0 -> 1(tok 5) -> 3(tok 7) ; 0 -> 2(tok 6) -> 4(tok 8) -> 5(tok 9)
    parent = torch.tensor([[-1, 0, 0, 1, 2, 4]] * 2)
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9]] * 2)
    tree = DraftTree.from_parents(tokens, parent)
    V_ = 12
    am = torch.tensor([[6, 1, 8, 1, 9, 11],        # request 0: 0->2 (6), 2->4 (8), 4->5 (9), bonus 11
                       [5, 3, 1, 2, 2, 2]])       # request 1: 0->1 (5), 1 wants 3 (no child): bonus 3
    logits = torch.nn.functional.one_hot(am, V_).float()
    acc = accept_greedy(tree, logits)
    assert acc.n_accepted.tolist() == [3, 1] and acc.bonus.tolist() == [11, 3]
    assert acc.path.tolist() == [[0, 2, 4, 5], [0, 1, -1, -1]]
    assert acc.emitted(tree) == [[6, 8, 9, 11], [5, 3]]


def test_greedy_ignores_padding_nodes():
    tree = DraftTree.from_parents(torch.tensor([[0, 4, 4]]), torch.tensor([[-1, 0, 0]]),
                                  valid=torch.tensor([[True, False, True]]))
    logits = torch.nn.functional.one_hot(torch.tensor([[4, 1, 2]]), 6).float()
    acc = accept_greedy(tree, logits)
    assert acc.path.tolist() == [[0, 2]] and acc.bonus.tolist() == [2]


def test_inverse_cdf_never_draws_zero_mass_tokens():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(6, 1)
    u = torch.tensor([0.0, 1e-9, 0.4999999, 0.5, 0.75, 1 - 1e-7])
    assert set(_sample_rows(p, u).tolist()) <= {1, 3}


def test_dispatch_and_rule_errors():
    tree = DraftTree.from_parents(torch.tensor([[0, 1]]), torch.tensor([[-1, 0]]))
    logits = torch.randn(1, 2, 5)
    assert resolve_rule("auto", tree, greedy=True) == "greedy"
    assert resolve_rule("auto", tree, greedy=False) == "target"
    with pytest.raises(ValueError, match="needs sampled drafts"):
        accept(tree, logits, SamplingParams(temperature=1.0), "q", [torch.Generator()])
    with pytest.raises(ValueError, match="one torch.Generator per request"):
        accept(tree, logits, SamplingParams(temperature=1.0), "target", None)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_rule("bogus", tree, greedy=False)
    # seeded: the same generator seeds give the same acceptance
    sp = SamplingParams(temperature=1.0)
    a = accept(tree, logits, sp, "target", [torch.Generator().manual_seed(3)])
    b = accept(tree, logits, sp, "target", [torch.Generator().manual_seed(3)])
    assert torch.equal(a.bonus, b.bonus) and torch.equal(a.path, b.path)

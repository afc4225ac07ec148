"""Acceptance through the verifier's rules: greedy walks, and the two lossless stochastic rules reproduce
the target distribution.

Shape legend: N independent trials (batched as N requests), T tree nodes, V vocabulary (4 here), D tree
depth; sequences of D + 1 tokens are compared with the target's autoregressive distribution.

Statistical setup: a toy "target" and "draft" are tables P, Q of next-token distributions for every
context of up to D tokens. Each trial grows a tree with `build_tree` (top-k children of Q, or children
drawn i.i.d. from Q with the request's Philox uniforms), runs one acceptance with `verifier.accept` (the
tree_accept op for the target rule, the device q-aware rule), and completes the emitted tokens to D + 1
tokens by sampling P. Exactness means these sequences follow P's autoregressive distribution: a
chi-square test over the V^(D+1) cells (cells with expected count < 5 pooled) must give p > 0.001. A
deliberately wrong rule must fail it.
"""
from __future__ import annotations

import pytest
import torch

from specmoe_ext import ops, reference as R
from specmoe_ext.models.generate import SamplingParams
from specmoe_ext.speculative.tree import DraftTree, TreeSpec, build_tree, sample_rows
from specmoe_ext.speculative.verifier import accept, accept_q_aware, emitted_tokens, resolve_rule

V = 4
SP = SamplingParams(temperature=1.0)


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


def base(level: int) -> int:
    return sum(V ** j for j in range(level))


def cid(ctx: torch.Tensor) -> torch.Tensor:
    """[N, l] context tokens -> [N] row of the tables (all contexts of length 0..l in one index space)."""
    N, l = ctx.shape
    idx = torch.zeros(N, dtype=torch.long)
    for j in range(l):
        idx = idx * V + ctx[:, j]
    return base(l) + idx


def node_cids(tokens: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[N, n] table row of every node's context (its path's tokens, root excluded)."""
    N, n = tokens.shape
    out = torch.zeros(N, n, dtype=torch.long)
    for i in range(1, n):
        d = depth[:, i]
        pc = out.gather(1, parent[:, i:i + 1].clamp_min(0))[:, 0]
        bd = torch.tensor([base(int(x)) for x in d])
        bp = torch.tensor([base(int(x) - 1) for x in d])
        out[:, i] = bd + (pc - bp) * V + tokens[:, i]
    return out


def tables(seed: int, depth: int, spread: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    n = base(depth + 1)
    P = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * spread, -1)
    Q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * spread, -1)
    return P.float(), Q.float()


class QSource:
    """A DraftSource whose draft distribution at a node is Q[its context]."""

    def __init__(self, Q, N):
        self.Q, self.N = Q, N

    def root_logits(self):
        return self.Q[torch.zeros(self.N, dtype=torch.long)].log()

    def expand(self, nodes, tree, fed):
        c = node_cids(tree.tokens, tree.parent, tree.depth)
        return self.Q[c.gather(1, nodes)].log()


def philox(N, seed):
    s = torch.arange(N, dtype=torch.long) * 1_000_003 + seed
    return s, torch.zeros(N, dtype=torch.long)


def make_tree(N, branching, Q, sampled, seed):
    s, off = philox(N, seed)
    spec = TreeSpec("static", tuple(branching))
    tree = build_tree(QSource(Q, N), spec, torch.zeros(N, dtype=torch.long), sample=sampled, sampling=SP,
                      uniforms=lambda n, stream: ops.philox_uniform(s, off, n, stream))
    return tree, s, off


def target_logits(tree, P):
    return P[node_cids(tree.tokens, tree.parent, tree.depth)].log()


def emitted_sequences(emitted, n, P, length: int, g: torch.Generator) -> torch.Tensor:
    """[N, length]: accepted tokens + bonus, completed by sampling P autoregressively."""
    N = emitted.shape[0]
    j = torch.arange(emitted.shape[1])
    seq = torch.full((N, length), -1, dtype=torch.long)
    seq[:, :emitted.shape[1]] = torch.where(j <= n[:, None], emitted, torch.full_like(emitted, -1))
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


def _duplicate_tree(N, Q):
    """root -> three top-Q children of which the first two share a token, each with one top-Q child."""
    q0 = torch.topk(Q[torch.zeros(N, dtype=torch.long)], 3, -1).indices
    kids = torch.stack([q0[:, 0], q0[:, 0], q0[:, 1]], 1)
    gk = [torch.topk(Q[cid(kids[:, j:j + 1])], 1, -1).indices[:, 0] for j in range(3)]
    tokens = torch.stack([torch.zeros(N, dtype=torch.long), *kids.unbind(1), *gk], 1)
    parent = torch.tensor([-1, 0, 0, 0, 1, 2, 3]).expand(N, 7)
    return DraftTree.from_parents(tokens, parent)


def run_trials(rule: str, branching: list[int], sampled: bool, seed: int, N: int = 20000, duplicates=False):
    D = len(branching)
    P, Q = tables(seed, D)
    g = torch.Generator().manual_seed(seed + 100)
    if duplicates:
        tree, (s, off) = _duplicate_tree(N, Q), philox(N, seed)
    else:
        tree, s, off = make_tree(N, branching, Q, sampled, seed)
    logits = target_logits(tree, P)
    if rule == "naive":
        path, n, bonus = _naive_accept(tree, logits.softmax(-1), ops.philox_uniform(s, off, 2 * tree.T, 5))
    else:
        if rule == "q" and tree.q is None:         # the q-aware rule on children that were NOT sampled from q
            fed_cids = node_cids(tree.tokens, tree.parent, tree.depth)
            order = torch.sort(torch.where(tree.fed >= 0, tree.fed, 1 << 20), 1).indices[:, :int((tree.fed >= 0).sum(1)[0])]
            tree.q = Q[fed_cids.gather(1, order)]
        path, n, bonus = accept(logits, tree, rule, SP, s, off)
    seq = emitted_sequences(emitted_tokens(tree, path, n, bonus), n, P, D + 1, g)
    code = torch.zeros(N, dtype=torch.long)
    for j in range(D + 1):
        code = code * V + seq[:, j]
    counts = torch.bincount(code, minlength=V ** (D + 1))
    return chi2_pvalue(counts, N * exact_distribution(P, D + 1)), n


def _naive_accept(tree, p, u):
    """A wrong rule: accept the first child x with probability p(x), else emit a fresh draw from p."""
    N, T = tree.tokens.shape
    rows = torch.arange(N)
    cur = torch.zeros(N, dtype=torch.long)
    alive = torch.ones(N, dtype=torch.bool)
    path = torch.full((N, T), -1)
    path[:, 0] = 0
    n = torch.zeros(N, dtype=torch.long)
    bonus = torch.zeros(N, dtype=torch.long)
    for level in range(tree.max_depth + 1):
        c = tree.kids[rows, cur, 0]
        x = tree.tokens[rows, c.clamp_min(0)]
        ok = alive & (c >= 0) & (u[rows, c.clamp_min(0)] < p[rows, cur].gather(1, x[:, None])[:, 0])
        y = sample_rows(p[rows, cur], u[rows, T + cur][:, None])[:, 0]
        bonus = torch.where(alive & ~ok, y, bonus)
        if level + 1 < T:
            path[:, level + 1] = torch.where(ok, c, path[:, level + 1])
        n += ok.long()
        cur = torch.where(ok, c, cur)
        alive = ok
    return path, n, bonus


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
    pval, n = run_trials(rule, branching, sampled, seed=7 + len(branching) + 3 * sampled + dup, duplicates=dup)
    assert pval > 1e-3, pval
    assert float(n.float().mean()) > 0.1      # the drafts were really used, not all rejected


@pytest.mark.parametrize("rule,branching,sampled", [
    ("naive", [1, 1], False),                 # accept with prob p(x), no residual: biased
    ("q", [2, 2], False),                     # q-aware rule on children that were NOT sampled: biased
])
def test_chi_square_detects_a_wrong_rule(rule, branching, sampled):
    pval, _ = run_trials(rule, branching, sampled, seed=11)
    assert pval < 1e-6, pval


@pytest.mark.parametrize("branching", [[1, 1, 1], [2, 2], [3, 1], [1, 4]])
def test_device_q_aware_equals_the_reference_walk(branching):
    """The fixed-shape q-aware rule (static loops, children table, q indexed by fed node) takes exactly the
    decisions of the reference walk given the same Philox uniforms."""
    N = 3000
    P, Q = tables(5, len(branching))
    tree, s, off = make_tree(N, branching, Q, True, 3)
    logits = target_logits(tree, P)
    path, n, bonus = accept_q_aware(logits, tree, SP, s, off)
    u = ops.philox_uniform(s, off, tree.T, 1)
    u_res = ops.philox_uniform(s, off, tree.T, 2)
    q_node = tree.q[torch.arange(N)[:, None], tree.fed.clamp_min(0)]
    q_node = torch.where((tree.fed >= 0)[..., None], q_node, torch.zeros_like(q_node))
    ref = R.accept_q_aware(tree.tokens, tree.parent, tree.valid, logits.softmax(-1), q_node, u, u_res)
    D = len(branching)
    assert torch.equal(path[:, :D + 1], ref[0]) and torch.equal(n, ref[1]) and torch.equal(bonus, ref[2])
    assert float(n.float().mean()) > 0.3


def test_greedy_walk_on_a_hand_built_tree():
    #   0 -> 1(tok 5) -> 3(tok 7) ; 0 -> 2(tok 6) -> 4(tok 8) -> 5(tok 9)
    parent = torch.tensor([[-1, 0, 0, 1, 2, 4]] * 2)
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9]] * 2)
    tree = DraftTree.from_parents(tokens, parent)
    am = torch.tensor([[6, 1, 8, 1, 9, 11],        # request 0: 0->2 (6), 2->4 (8), 4->5 (9), bonus 11
                       [5, 3, 1, 2, 2, 2]])       # request 1: 0->1 (5), 1 wants 3 (no child): bonus 3
    logits = torch.nn.functional.one_hot(am, 12).float()
    s, off = philox(2, 0)
    path, n, bonus = accept(logits, tree, "greedy", SamplingParams(), s, off)
    assert n.tolist() == [3, 1] and bonus.tolist() == [11, 3]
    assert path.tolist() == [[0, 2, 4, 5, -1, -1], [0, 1, -1, -1, -1, -1]]
    assert emitted_tokens(tree, path, n, bonus).tolist() == [[6, 8, 9, 11], [5, 3, 0, 0]]


def test_greedy_ignores_padding_nodes():
    tree = DraftTree.from_parents(torch.tensor([[0, 4, 4]]), torch.tensor([[-1, 0, 0]]),
                                  valid=torch.tensor([[True, False, True]]))
    logits = torch.nn.functional.one_hot(torch.tensor([[4, 1, 2]]), 6).float()
    path, n, bonus = accept(logits, tree, "greedy", SamplingParams(), *philox(1, 0))
    assert path.tolist() == [[0, 2, -1]] and bonus.tolist() == [2]


def test_inverse_cdf_never_draws_zero_mass_tokens():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(6, 1)
    u = torch.tensor([0.0, 1e-9, 0.4999999, 0.5, 0.75, 1 - 1e-7])[:, None]
    assert set(sample_rows(p, u).flatten().tolist()) <= {1, 3}


def test_rule_resolution_and_errors():
    chain, dyn = TreeSpec.parse("chain:2"), TreeSpec.parse("dynamic:topk=2,depth=2,tokens=4")
    assert resolve_rule("auto", chain, greedy=True) == "greedy"
    assert resolve_rule("auto", chain, greedy=False) == "q"
    assert resolve_rule("auto", dyn, greedy=False) == "target"
    assert resolve_rule("q", TreeSpec.ROOT, greedy=False) == "target"       # speculation off: sample p
    with pytest.raises(ValueError, match="needs sampled drafts"):
        resolve_rule("q", dyn, greedy=False)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_rule("bogus", chain, greedy=False)
    # seeded: the same Philox key and counter give the same acceptance
    tree = DraftTree.from_parents(torch.tensor([[0, 1]]), torch.tensor([[-1, 0]]))
    logits = torch.randn(1, 2, 5)
    a = accept(logits, tree, "target", SP, *philox(1, 3))
    b = accept(logits, tree, "target", SP, *philox(1, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))

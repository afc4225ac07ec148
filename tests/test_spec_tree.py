"""Draft trees: spec parsing, the ancestor bitmask, and growing chain / static / dynamic (EAGLE-2) trees.

Shape legend: bs requests, T tree nodes, W = ceil(T/32) bitmask words, V vocab, F frontier nodes.
"""
from __future__ import annotations

import math

import pytest
import torch

from specmoe_ext import ops
from specmoe_ext.masks import pack_bits, unpack_bits
from specmoe_ext.speculative.tree import (DraftTree, TreeSpec, TreeSpecError, ancestor_bitmask, ancestors_from_parent,
                                          build_tree)


@pytest.mark.parametrize("text,kind,nodes,depth,fed", [
    ("chain:4", "chain", 5, 4, 4),
    ("chain:1", "chain", 2, 1, 1),
    ("static:3,2,1", "static", 1 + 3 + 6 + 6, 3, 1 + 3 + 6),
    ("dynamic:topk=4,depth=5,tokens=32", "dynamic", 32, 5, 1 + 4 * 4),
    (" Dynamic:tokens=8, depth=3, top_k=2 ", "dynamic", 8, 3, 1 + 2 * 2),
])
def test_tree_spec_parse(text, kind, nodes, depth, fed):
    s = TreeSpec.parse(text)
    assert (s.kind, s.max_nodes, s.max_depth, s.fed_nodes) == (kind, nodes, depth, fed)
    assert TreeSpec.parse(str(s)) == s                      # canonical form round-trips


@pytest.mark.parametrize("text,msg", [
    ("chain:0", "chain length must be >= 1"),
    ("chain:x", "chain length must be a positive integer"),
    ("chain", "chain length must be a positive integer"),
    ("static:", "static needs branching factors"),
    ("static:2,0", "branching factors must be >= 1"),
    ("dynamic:topk=4,depth=5", "missing tokens"),
    ("dynamic:topk=4,depth=5,tokens=32,foo=1", "unknown or malformed field 'foo=1'"),
    ("dynamic:topk=4,topk=2,depth=5,tokens=8", "given twice"),
    ("dynamic:topk=2,depth=2,tokens=100", "exceeds the 7 nodes"),
    ("tree:5", "unknown kind 'tree'"),
    ("static:64,64", "exceeds the limit"),
])
def test_tree_spec_errors(text, msg):
    with pytest.raises(TreeSpecError, match=msg):
        TreeSpec.parse(text)


def test_bitmask_round_trip_beyond_32_nodes():
    """A 70-node chain: word boundaries and bit 31 (the int32 sign bit) survive pack/unpack."""
    T = 70
    parent = torch.arange(-1, T - 1)[None]
    words = ancestor_bitmask(parent)
    assert words.shape == (1, T, 3) and words.dtype == torch.int32
    A = unpack_bits(words, T)[0]
    assert torch.equal(A, torch.tril(torch.ones(T, T, dtype=torch.bool)))
    assert int(words[0, 40, 0]) == -1                       # all 32 bits of word 0 set = -1 in int32
    r = torch.rand(2, 5, 45) > 0.5
    assert torch.equal(unpack_bits(pack_bits(r), 45), r)


def test_from_parents_depth_children_and_validation():
    #   0 -> 1 -> 3 ; 0 -> 2 -> 4, 2 -> 5
    parent = torch.tensor([[-1, 0, 0, 1, 2, 2]])
    t = DraftTree.from_parents(torch.arange(6)[None], parent)
    assert t.depth.tolist() == [[0, 1, 1, 2, 2, 2]]
    assert t.kids[0].tolist() == [[1, 2], [3, -1], [4, 5], [-1, -1], [-1, -1], [-1, -1]]
    assert t.ancestors()[0, 5].tolist() == [True, False, True, False, False, True]
    assert t.max_depth == 2 and t.fed.tolist() == [[-1] * 6]
    with pytest.raises(ValueError, match="smaller index"):
        DraftTree.from_parents(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 2, 0]]))
    with pytest.raises(ValueError, match="root"):
        DraftTree.from_parents(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 0]]))


class TableSource:
    """A DraftSource whose logits depend only on (request, depth of the node, its token): deterministic
    and easy to reason about. Records how it was called."""

    def __init__(self, logits: torch.Tensor):           # [bs, depth, V]
        self.logits = logits
        self.calls: list[int] = []
        self.fed: list[int] = []

    def root_logits(self):
        return self.logits[:, 0]

    def expand(self, nodes, tree, fed):
        self.calls.append(nodes.shape[1])
        self.fed.append(fed)
        d = tree.gather(tree.depth, nodes)                  # [bs, F]
        tok = tree.gather(tree.tokens, nodes)
        base = self.logits[torch.arange(nodes.shape[0])[:, None], d]          # [bs, F, V]
        return base + 0.01 * tok[..., None].float()          # children depend a little on the token


def test_chain_and_static_trees_take_top_children():
    g = torch.Generator().manual_seed(0)
    src = TableSource(torch.randn(2, 3, 16, generator=g))
    chain = build_tree(src, TreeSpec.parse("chain:3"), torch.tensor([5, 6]))
    assert chain.T == 4 and chain.parent.tolist() == [[-1, 0, 1, 2]] * 2
    assert chain.tokens[:, 1].tolist() == src.logits[:, 0].argmax(-1).tolist()
    static = build_tree(TableSource(src.logits), TreeSpec.parse("static:3,2"), torch.tensor([5, 6]))
    assert static.T == 1 + 3 + 6 and bool(static.valid.all())
    top3 = torch.topk(src.logits[:, 0], 3).indices
    assert static.tokens[:, 1:4].tolist() == top3.tolist()
    lp = torch.log_softmax(src.logits[:, 0], -1)
    torch.testing.assert_close(static.logp[:, 1:4], lp.gather(1, top3))


def test_dynamic_tree_is_eagle2_top_m_closed_under_ancestors():
    g = torch.Generator().manual_seed(1)
    V, k, D, M = 12, 3, 4, 10
    src = TableSource(torch.randn(3, D, V, generator=g) * 2)
    t = build_tree(src, TreeSpec.parse(f"dynamic:topk={k},depth={D},tokens={M}"), torch.tensor([1, 2, 3]))
    assert src.calls == [k] * (D - 1)                       # expand the top_k frontier at each deeper level
    assert src.fed == [1 + k * i for i in range(D - 1)]      # fed indices: root 0, then k per level
    assert t.T == M and bool(t.valid.all())
    assert bool((t.fed[:, 0] == 0).all()) and int(t.fed.max()) < 1 + k * (D - 1)
    A = t.ancestors()
    for b in range(3):
        for i in range(1, M):
            p = int(t.parent[b, i])
            assert 0 <= p < i
            # cumulative score = parent's score + log-prob of the token under the parent's distribution
            assert t.logp[b, i] <= t.logp[b, p] + 1e-6
        assert bool(A[b].sum(-1).sub(1).eq(t.depth[b]).all())
    # the kept set is the M best candidates: nothing dropped scores higher than the worst kept node
    # (checked against an exhaustive re-run that keeps everything)
    full = build_tree(TableSource(src.logits), TreeSpec.parse(f"dynamic:topk={k},depth={D},tokens={1 + k + (D - 1) * k * k}"),
                      torch.tensor([1, 2, 3]))
    for b in range(3):
        allscores = sorted(full.logp[b, 1:].tolist(), reverse=True)
        assert sorted(t.logp[b, 1:].tolist(), reverse=True) == pytest.approx(allscores[:M - 1])


def test_nodes_without_candidates_are_padding():
    """A drafter that proposes nothing beyond depth 1 for request 1: its tree keeps the fixed shape with
    the missing nodes invalid (in place, so the children table stays static); request 0 keeps its chain."""
    V = 8
    logits = torch.randn(2, 3, V)
    logits[1, 1:] = float("-inf")                           # request 1: no children below depth 1
    t = build_tree(TableSource(logits), TreeSpec.parse("chain:3"), torch.tensor([0, 0]))
    assert t.T == 4 and t.valid[0].all() and t.valid[1].tolist() == [True, True, False, False]
    assert t.parent[1].tolist() == [-1, 0, 1, 2] and t.tokens[1, 2:].tolist() == [0, 0]
    assert t.fed.tolist() == [[0, 1, 2, -1]] * 2 and t.kids[0, :, 0].tolist() == [1, 2, 3, -1]


def test_sampled_chain_stores_q_and_is_reproducible():
    from specmoe_ext.models.generate import SamplingParams
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(3))
    sp = SamplingParams(temperature=0.7)

    def run(seed):
        s, off = torch.tensor([seed, seed + 1]), torch.zeros(2, dtype=torch.long)
        return build_tree(TableSource(logits), TreeSpec.parse("static:2,2"), torch.tensor([0, 0]), sample=True,
                          sampling=sp, uniforms=lambda n, stream: ops.philox_uniform(s, off, n, stream))

    a, b = run(0), run(0)
    assert torch.equal(a.tokens, b.tokens) and a.sampled and a.q.shape == (2, 3, 10)   # q of the 3 fed nodes
    q_root = torch.softmax(logits[:, 0] / 0.7, -1)
    torch.testing.assert_close(a.q[:, 0], q_root)
    assert a.fed.tolist() == [[0, 1, 2, -1, -1, -1, -1]] * 2                # leaves were never expanded
    assert any(not torch.equal(run(0).tokens, run(s).tokens) for s in range(1, 5))
    with pytest.raises(ValueError, match="dynamic trees pick top-k"):
        build_tree(TableSource(logits), TreeSpec.parse("dynamic:topk=2,depth=2,tokens=4"), torch.tensor([0, 0]),
                   sample=True, sampling=sp, uniforms=lambda n, stream: torch.rand(2, n))


def test_ancestors_match_a_direct_walk():
    g = torch.Generator().manual_seed(4)
    T = 40
    parent = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]])
    A = ancestors_from_parent(parent)[0]
    for i in range(T):
        walk, j = set(), i
        while j >= 0:
            walk.add(j)
            j = int(parent[0, j])
        assert set(torch.nonzero(A[i]).flatten().tolist()) == walk
    assert math.ceil(T / 32) == ancestor_bitmask(parent).shape[-1]

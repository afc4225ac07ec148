"""Adaptive verification (speculative/adaptive.py): the truncation picks the argmax of its formula on
hand-computable cases, keeps ancestor-closed prefixes and every root, its calibration converges to a known
acceptance rate, and generation with it stays lossless (greedy == autoregressive for every drafter and
tree kind; the sampled distribution through the q-aware and target rules).

Shape legend: bs requests, T tree nodes, E experts (8), K experts per token (2).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from specmoe_ext.models import SamplingParams
from specmoe_ext.speculative import (Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine, generate,
                                     load_eagle3, save_random_eagle3)
from specmoe_ext.speculative.adaptive import BUCKETS, AdaptiveVerifier, _bucket
from specmoe_ext.speculative.config import StepPlan
from specmoe_ext.speculative.perf_model import PerfProfile
from specmoe_ext.speculative.tree import DraftTree, TreeSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from controlled import ControlledDrafter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_profile(a: float, b: float, E=8, K=2) -> PerfProfile:
    """A profile whose step time is a + b * t for t tokens verified (no draft or acceptance cost): the
    roofline's linear branch from t = 0 (knee lam * RP ~ 0), no expert terms."""
    s = math.e
    return PerfProfile(E, K, 1e-9, dict(bias=a - b, k1=b, k2=0.0, k3=0.0, s=s, lam=0.2, draft_bias=0.0, draft_k=0.0,
                                        reject_bias=0.0, reject_k=0.0))


class _Batch:
    def __init__(self, bs):
        self.finished = torch.zeros(bs, dtype=torch.bool)


def set_rate(av: AdaptiveVerifier, rate: float) -> None:
    av.trials.fill_(1e6)
    av.accepts.fill_(rate * 1e6)


def tree_of(parent: list[int], cond: list[float]) -> DraftTree:
    """One request's tree: parent indices and each node's conditional draft probability (root's ignored)."""
    t = DraftTree.from_parents(torch.arange(len(parent))[None], torch.tensor([parent]))
    logp = torch.zeros(1, len(parent))
    for i in range(1, len(parent)):
        logp[0, i] = logp[0, parent[i]] + math.log(cond[i])
    t.logp = logp
    return t


PLAN = StepPlan(TreeSpec.parse("chain:4"), "greedy", SamplingParams(), adaptive=True)


@pytest.mark.parametrize("b,kept", [(0.5, 4), (1.0, 3), (3.0, 1), (10.0, 0)])
def test_chain_truncation_is_the_argmax_of_the_formula(b, kept):
    """Chain of 4 with calibrated acceptance 0.9 per node: gains 0.9, 0.81, 0.729, 0.6561; time = 1 + b * t.
    Objective (1 + sum of kept gains) / (1 + b (1 + M)): b = 1 -> M = 3 (0.688 > 0.683 at M = 4)."""
    av = AdaptiveVerifier(linear_profile(1.0, b), "cpu")
    set_rate(av, 0.9)
    tree = tree_of([-1, 0, 1, 2, 3], [1, 0.8, 0.8, 0.8, 0.8])
    gains = [0.9, 0.81, 0.729, 0.6561]
    objective = [(1 + sum(gains[:m])) / (1 + b * (1 + m)) for m in range(5)]
    assert max(range(5), key=lambda m: objective[m]) == kept
    pred = av.truncate(_Batch(1), tree, PLAN)
    assert tree.valid[0].tolist() == [True] * (1 + kept) + [False] * (4 - kept)
    assert float(pred) == pytest.approx(1 + b * (1 + kept), rel=1e-5)


def test_tree_truncation_keeps_ancestor_closed_prefixes_across_the_batch():
    """Two requests, one step time: the batch-wide best nodes by gain, whatever request they belong to;
    a kept node's ancestors are kept; roots always; finished rows keep only their root."""
    av = AdaptiveVerifier(linear_profile(1.0, 0.35), "cpu")
    set_rate(av, 0.9)
    # conditional draft probabilities in distinct buckets, calibrated to: 0.9 -> 0.9, 0.05 -> 0.1, 0.3 -> 0.3,
    # 0.15 -> 0.6 (an under-confident bucket). request 0: root -> 1 (0.9) -> 3 (0.9); root -> 2 (0.05) -> 4 (0.9)
    # request 1: root -> 1 (0.3) -> 3 (0.3); root -> 2 (0.15) -> 4 (0.3)
    t0 = tree_of([-1, 0, 0, 1, 2], [1, 0.9, 0.05, 0.9, 0.9])
    t1 = tree_of([-1, 0, 0, 1, 2], [1, 0.3, 0.15, 0.3, 0.3])
    tree = DraftTree(torch.cat([t0.tokens, t1.tokens]), torch.cat([t0.parent, t1.parent]),
                     torch.cat([t0.depth, t1.depth]), torch.ones(2, 5, dtype=torch.bool), torch.cat([t0.logp, t1.logp]),
                     torch.cat([t0.anc, t1.anc]), torch.full((2, 5), -1), torch.cat([t0.kids, t1.kids]), 2)
    rates = torch.full((BUCKETS,), 0.9)
    rates[int(_bucket(torch.tensor(0.05)))] = 0.1
    rates[int(_bucket(torch.tensor(0.3)))] = 0.3
    rates[int(_bucket(torch.tensor(0.15)))] = 0.6
    assert len({int(_bucket(torch.tensor(x))) for x in (0.9, 0.05, 0.3, 0.15)}) == 4
    av.trials.fill_(1e6)
    av.accepts.copy_(rates * 1e6)
    g = av.gains(tree, "greedy", torch.ones(2, dtype=torch.bool))
    want = torch.tensor([[1, .9, .1, .81, .09], [1, .3, .6, .09, .18]])
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    # batch objective over M kept non-root nodes: (2 + top-M gains) / (1 + 0.35 * (2 + M))
    flat = sorted(want[:, 1:].flatten().tolist(), reverse=True)
    obj = [(2 + sum(flat[:m])) / (1 + 0.35 * (2 + m)) for m in range(9)]
    M = max(range(9), key=lambda m: obj[m])
    av.truncate(_Batch(2), tree, PLAN)
    kept = set(zip(*torch.nonzero(tree.valid[:, 1:]).T.add(torch.tensor([[0], [1]])).tolist()))
    order = sorted(((v, b, i) for b in range(2) for i, v in enumerate(want[b, 1:].tolist(), start=1)), reverse=True)
    assert kept == {(b, i) for _, b, i in order[:M]} and 0 < M < 8
    A = tree.ancestors()
    for b in range(2):
        assert tree.valid[b, 0]
        for i in range(5):
            if tree.valid[b, i]:
                assert bool(tree.valid[b][A[b, i]].all()), (b, i)       # ancestor closure
    # a finished row keeps only its root
    tree.valid.fill_(True)
    fin = _Batch(2)
    fin.finished[1] = True
    av.truncate(fin, tree, PLAN)
    assert tree.valid[1].tolist() == [True, False, False, False, False]


def test_calibration_converges_to_a_known_acceptance_rate(tiny):
    """A controlled drafter (proposals of confidence 1, accepted with probability alpha by construction):
    the calibrated rate of its bucket converges to alpha."""
    from specmoe_ext.models import load_tokenizer
    from specmoe_ext.models.presets import TINY_DIR
    target, draft = tiny
    tok = load_tokenizer(TINY_DIR / "target")
    prompts = [tok.encode(t) for t in ["Return a new", "The default value of the", "Raise ValueError if the",
                                        "This module provides"]]
    ref = generate(target, prompts, 160).tokens
    refs = [p + o for p, o in zip(prompts, ref)]
    alpha = 0.7
    eng = SpecEngine(target, ControlledDrafter(draft, target, refs, alpha, seed=1), "chain:3", verify="adaptive",
                     profile=linear_profile(1e-3, 1e-6))
    eng.adaptive.decay = 1.0
    res = eng.generate(prompts, 150)
    assert res.tokens == [r[:150] for r in ref]
    row = res.config["calibration"]["buckets"][0]
    assert row["trials"] > 300
    assert abs(row["rate"] - alpha) < 0.06, row


def _drafter(kind, target, draft, eagle_dir):
    return {"model": lambda: ModelDrafter(draft, target), "self": lambda: SelfDrafter(target, 4, refresh=2),
            "ngram": lambda: NGramDrafter(target.args.vocab_size, 3),
            "eagle": lambda: Eagle3Drafter(load_eagle3(eagle_dir, target), target)}[kind]()


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny):
    return save_random_eagle3(tmp_path_factory.mktemp("eagle3"), tiny[0], draft_vocab_size=512, layer_ids=(0, 1, 2),
                              std=0.2, seed=3)


PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [100, 200, 300, 400, 5], [1200, 17]]


@pytest.mark.parametrize("tree", ["chain:4", "static:2,2,1", "dynamic:topk=3,depth=4,tokens=16"])
@pytest.mark.parametrize("kind", ["model", "self", "ngram", "eagle"])
def test_greedy_with_truncation_equals_autoregressive(tiny, eagle_dir, kind, tree):
    target, draft = tiny
    ref = generate(target, PROMPTS, 20).tokens
    for cost in (0.2, 2.0):                          # mild and aggressive truncation
        eng = SpecEngine(target, _drafter(kind, target, draft, eagle_dir), tree, verify="adaptive",
                         profile=linear_profile(1.0, cost))
        res = eng.generate(PROMPTS, 20)
        assert res.tokens == ref, (kind, tree, cost)
        s = res.summary()
        assert s["nodes_verified_per_step"] <= s["nodes_drafted_per_step"]
    assert s["nodes_verified_per_step"] < s["nodes_drafted_per_step"] or kind in ("ngram", "eagle")


def test_adaptive_needs_a_matching_profile(tiny):
    target, draft = tiny
    with pytest.raises(ValueError, match="needs a cost profile"):
        SpecEngine(target, ModelDrafter(draft, target), "chain:2", verify="adaptive")
    with pytest.raises(ValueError, match="E=64, K=8; this target has E=8, K=2"):
        SpecEngine(target, ModelDrafter(draft, target), "chain:2", verify="adaptive", profile=linear_profile(1, 1, 64, 8))
    with pytest.raises(ValueError, match="verify 'some'"):
        SpecEngine(target, ModelDrafter(draft, target), "chain:2", verify="some")


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_adaptive_loop_never_synchronizes(graphs):
    """The truncation runs inside the step on the device: a second generate() (everything warmed, or
    captured) runs its loop under torch.cuda.set_sync_debug_mode("error"), and with graphs every step
    is a replay (an op that synchronizes or cannot be captured would fail here with its traceback)."""
    from conftest import loop_without_syncs
    from specmoe_ext.models import build_draft, build_preset
    t, d = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    prompts = [[380, 259, 656], [451, 12]]
    eng = SpecEngine(t, ModelDrafter(d, t), "dynamic:topk=2,depth=3,tokens=8", verify="adaptive",
                     profile=linear_profile(1e-3, 2e-4), cuda_graph=graphs)
    first = eng.generate(prompts, 24)
    with loop_without_syncs():
        second = eng.generate(prompts, 24)
    assert second.tokens == first.tokens == generate(t, prompts, 24, cuda_graph=False).tokens
    assert second.cuda_graph == graphs and all(s.replayed == graphs for s in second.steps)


def test_compact_tree_keeps_the_best_nodes_in_creation_order():
    """A hand-made tree: root 0; 1, 2 children of 0; 3 child of 1; 4 child of 2; 5 child of 3. Keys (gains)
    non-increasing along paths; width 4 keeps the root and the 3 best (ties to the lower index), remaps
    parents, rebuilds ancestors, children and fed, and pads when fewer nodes are valid."""
    from specmoe_ext.speculative.tree import compact_tree
    tok = torch.tensor([[10, 11, 12, 13, 14, 15]])
    par = torch.tensor([[-1, 0, 0, 1, 2, 3]])
    tree = DraftTree.from_parents(tok, par, logp=torch.tensor([[0.0, -0.1, -0.5, -0.2, -0.9, -0.3]]))
    tree.fed = torch.tensor([[0, 1, 2, 3, -1, -1]])
    key = torch.tensor([[1.0, 0.9, 0.5, 0.8, 0.2, 0.5]])
    c = compact_tree(tree, key, 4)                     # best: 1 (0.9), 3 (0.8), then 2 / 5 tie at 0.5 -> 2
    assert c.tokens.tolist() == [[10, 11, 12, 13]] and c.parent.tolist() == [[-1, 0, 0, 1]]
    assert c.depth.tolist() == [[0, 1, 1, 2]] and c.valid.all() and c.fed.tolist() == [[0, 1, 2, 3]]
    A = c.ancestors()[0].int().tolist()
    assert A == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert c.kids[0, 0, :2].tolist() == [1, 2] and c.kids[0, 1, 0].item() == 3
    tree.valid[0, 2:] = False                          # only 0 and 1 valid: the rest of the width is padding
    p = compact_tree(tree, key, 4)
    assert p.valid.tolist() == [[True, True, False, False]] and p.parent.tolist() == [[-1, 0, 0, 0]]
    assert compact_tree(tree, key, 6) is tree
    with pytest.raises(ValueError, match="width must be in"):
        compact_tree(tree, key, 7)


@pytest.mark.parametrize("tree,width", [("static:2,2,1", 5), ("dynamic:topk=3,depth=4,tokens=16", 6)])
@pytest.mark.parametrize("kind", ["model", "self", "ngram", "eagle"])
def test_greedy_with_compacted_verification_equals_autoregressive(tiny, eagle_dir, kind, tree, width):
    """verify_width: at most `width` nodes per request, verified as a `width`-node tree (the drafters' commit,
    the draft-cache compaction and EAGLE's features follow the compacted indices)."""
    target, draft = tiny
    ref = generate(target, PROMPTS, 20).tokens
    eng = SpecEngine(target, _drafter(kind, target, draft, eagle_dir), tree, verify="adaptive",
                     profile=linear_profile(1.0, 0.05), verify_width=width)
    res = eng.generate(PROMPTS, 20)
    assert res.tokens == ref, (kind, tree)
    s = res.summary()
    assert s["nodes_verified_per_step"] <= width and (s["nodes_drafted_per_step"] > width or kind == "ngram")


def test_verify_width_is_checked(tiny):
    target, draft = tiny
    prof = linear_profile(1.0, 0.1)
    with pytest.raises(ValueError, match="needs verify='adaptive'"):
        SpecEngine(target, ModelDrafter(draft, target), "static:2,2,1", verify_width=4)
    with pytest.raises(ValueError, match=r"verify_width must be in \[4, 11\]"):
        SpecEngine(target, ModelDrafter(draft, target), "static:2,2,1", verify="adaptive", profile=prof, verify_width=3)
    with pytest.raises(ValueError, match=r"verify_width must be in \[4, 11\]"):
        SpecEngine(target, ModelDrafter(draft, target), "static:2,2,1", verify="adaptive", profile=prof, verify_width=12)

"""The speculative engine: lossless greedy output for every drafter x tree x batch size (budget off and
B >= E), batches that shrink, KV compaction, bad input, seeded sampling, the target distribution at
temperature > 0, and MoE-Spec budget statistics. GPU variants are marked `gpu`.

Shape legend: bs requests, T tree nodes, V vocab (2048), E experts (8), K experts per token (2), L layers (4),
Hk kv heads, S cache capacity, d head dim.
"""
from __future__ import annotations

import pytest
import torch

from specmoe_ext.models import (CacheCapacityError, KVCache, SamplingParams, build_draft, build_preset, generate,
                                load_tokenizer, prefill)
from specmoe_ext.models.generate import process_logits
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.spec import (BudgetConfig, Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine,
                              TreeSpecError, kv_compact, load_eagle3, save_random_eagle3)

gpu = pytest.mark.gpu


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(TINY_DIR / "target")
    return [tok.encode("Return a new"), tok.encode('def parse(text):\n    """Parse the header'),
            tok.encode("The")]


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny):
    return save_random_eagle3(tmp_path_factory.mktemp("eagle3"), tiny[0], draft_vocab_size=512, layer_ids=(0, 1, 2),
                              std=0.2, seed=3)


def make(kind, target, draft, eagle_dir):
    if kind == "model":
        return ModelDrafter(draft, target, TINY_DIR / "draft", TINY_DIR / "target")
    if kind == "self":
        return SelfDrafter(target, n_resident=4, refresh=3)
    if kind == "ngram":
        return NGramDrafter(target.args.vocab_size, max_n=3)
    return Eagle3Drafter(load_eagle3(eagle_dir, target), target)


_AR: dict = {}


def ar_ref(target, plist, n, stop=()):
    key = (tuple(map(tuple, plist)), n, tuple(stop))
    if key not in _AR:
        _AR[key] = generate(target, plist, n, stop_ids=stop)
    return _AR[key]


TREES = ["chain:3", "static:2,2,1", "dynamic:topk=3,depth=3,tokens=8"]
N_NEW = 20


@pytest.mark.parametrize("budget", [None, 8], ids=["no-budget", "B=E"])
@pytest.mark.parametrize("bs", [1, 3])
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", ["model", "self", "ngram", "eagle"])
def test_greedy_speculative_equals_autoregressive(tiny, prompts, eagle_dir, kind, tree, bs, budget):
    target, draft = tiny
    plist = prompts[:bs]
    ref = ar_ref(target, plist, N_NEW)
    bcfg = None if budget is None else BudgetConfig(budget, weights="path")
    res = SpecEngine(target, make(kind, target, draft, eagle_dir), tree, bcfg).generate(plist, N_NEW)
    assert res.tokens == ref.tokens
    assert res.finish_reasons == ["length"] * bs
    assert len(res.steps) >= 1 and all(len(s.accepted) == s.batch for s in res.steps)
    for s in res.steps:
        assert len(s.touched) == 4 and s.touched == s.loaded      # nothing cut: B >= E or no budget
    if kind != "eagle":                                            # a random EAGLE head may never be right
        assert sum(a for s in res.steps for a in s.accepted) > 0
    # tokens per step really are accepted + 1 (before the last step's truncation at N_NEW)
    assert sum(a + 1 for s in res.steps for a in s.accepted) + bs >= bs * N_NEW


def test_requests_leave_when_they_stop(tiny, prompts):
    """Request 0 hits a stop token early: it leaves the batch (rows shrink), the others are unaffected."""
    target, draft = tiny
    free = ar_ref(target, prompts, 24).tokens
    stop = free[0][4]
    assert stop not in free[1][:4] and stop not in free[2][:4]
    ref = ar_ref(target, prompts, 24, (stop,))
    batches = []
    eng = SpecEngine(target, make("model", target, draft, None), "chain:3")
    res = eng.generate(prompts, 24, stop_ids=[stop], on_step=lambda st, em: batches.append(st.batch))
    assert res.tokens == ref.tokens and res.finish_reasons == ref.finish_reasons
    assert res.finish_reasons[0] == "stop" and batches[0] == 3 and min(batches) < 3
    assert batches == sorted(batches, reverse=True)


@pytest.mark.parametrize("kind", ["model", "self"])
def test_cache_holds_exactly_the_committed_tokens(tiny, prompts, kind):
    """After speculative steps (tree written, path compacted, self-drafts written past the prefix), the
    target cache's committed entries equal a fresh prefill of the committed tokens."""
    target, draft = tiny
    eng = SpecEngine(target, make(kind, target, draft, None), "static:2,2")
    cache = KVCache.for_model(target, 3, 96)
    state = eng.start(prompts, SamplingParams(), cache)
    for _ in range(4):
        eng.step(state)
    L = cache.host_lengths()
    assert L == [len(c) - 1 for c in state.ctx]
    fresh = KVCache.for_model(target, 3, 96)
    with torch.no_grad():
        prefill(target, [c[:-1] for c in state.ctx], fresh)
    for layer in range(4):
        for b in range(3):
            for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
                torch.testing.assert_close(got[layer][b, :, :L[b]], want[layer][b, :, :L[b]], atol=2e-5, rtol=1e-4)


def _snapshot(cache):
    return [t.clone() for t in cache.k + cache.v], cache.host_lengths(), cache.lengths.clone()


def _assert_unchanged(cache, snap):
    ts, host, dev = snap
    assert cache.host_lengths() == host and torch.equal(cache.lengths, dev)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, ts))


def test_kv_compact_moves_exactly_the_accepted_entries():
    g = torch.Generator().manual_seed(0)
    c = KVCache(2, 2, 2, 4, 24, torch.float32, "cpu")
    for t in c.k + c.v:
        t.copy_(torch.randn(t.shape, generator=g))
    c.set_lengths([5, 9])
    before = [t.clone() for t in c.k + c.v]
    path = torch.tensor([[0, 2, 5, 6], [0, 3, -1, -1]])
    kv_compact(c, [5, 9], path, [3, 1])
    assert c.host_lengths() == [9, 11]
    for t, o in zip(c.k + c.v, before):
        assert torch.equal(t[0, :, :6], o[0, :, :6])                        # prefix + root untouched
        assert torch.equal(t[0, :, 6:9], o[0, :, [7, 10, 11]])              # nodes 2, 5, 6 -> slots 6, 7, 8
        assert torch.equal(t[0, :, 9:], o[0, :, 9:])                        # the rest is left alone
        assert torch.equal(t[1, :, 10], o[1, :, 12])                        # node 3 -> slot 10
        assert torch.equal(t[1, :, :10], o[1, :, :10]) and torch.equal(t[1, :, 11:], o[1, :, 11:])
    snap = _snapshot(c)
    with pytest.raises(CacheCapacityError, match="capacity is 24"):
        kv_compact(c, [9, 11], torch.tensor([[0, 20, -1], [0, 1, 2]]), [1, 2])
    with pytest.raises(ValueError, match="malformed path"):
        kv_compact(c, [9, 11], torch.tensor([[0, 0, -1], [0, 1, 2]]), [1, 2])
    _assert_unchanged(c, snap)


def test_tree_bigger_than_the_remaining_cache_is_refused_before_any_write(tiny, prompts):
    target, draft = tiny
    for kind, tree in (("model", "chain:4"), ("self", "dynamic:topk=3,depth=3,tokens=6")):
        eng = SpecEngine(target, make(kind, target, draft, None), tree)
        cap = max(len(p) for p in prompts) + 3                              # room for the prompt, not the tree
        cache = KVCache.for_model(target, 3, cap)
        state = eng.start(prompts, SamplingParams(), cache)
        snap = _snapshot(cache)
        with pytest.raises(CacheCapacityError, match=rf"tree {tree.split(':')[0]}.* needs \d+ cache slots past the committed prefix"):
            eng.step(state)
        _assert_unchanged(cache, snap)
    # generate() with a caller's cache that is too small: refused before prefill
    cache = KVCache.for_model(target, 3, 40)
    cache.set_lengths([7, 7, 7])
    snap = _snapshot(cache)
    with pytest.raises(CacheCapacityError, match="need batch 3 / capacity"):
        SpecEngine(target, make("ngram", target, draft, None), "chain:4").generate(prompts, 30, cache=cache)
    _assert_unchanged(cache, snap)


@pytest.mark.parametrize("make_engine,err,msg", [
    (lambda t, d: SpecEngine(t, d, "chain:0"), TreeSpecError, "chain length must be >= 1"),
    (lambda t, d: SpecEngine(t, d, "dynamic:topk=4"), TreeSpecError, "missing depth, tokens"),
    (lambda t, d: SpecEngine(t, d, "chain:3", BudgetConfig(1)), ValueError, r"expert budget 1 < top_k 2 \(layer 0\)"),
    (lambda t, d: SpecEngine(t, d, "chain:3", BudgetConfig((8, 1, 8, 8))), ValueError, r"budget 1 < top_k 2 \(layer 1\)"),
    (lambda t, d: SpecEngine(t, d, "chain:3", BudgetConfig((8, 8))), ValueError, "2 entries, the model has 4 layers"),
    (lambda t, d: SpecEngine(t, d, "chain:3", BudgetConfig(4, policy="drop")), ValueError, "budget policy 'drop'"),
    (lambda t, d: SpecEngine(t, d, "chain:3", BudgetConfig(4, weights="depth")), ValueError, "token weights 'depth'"),
    (lambda t, d: SpecEngine(t, d, "dynamic:topk=2,depth=2,tokens=4", rule="q"), ValueError, "needs sampled drafts"),
])
def test_bad_configuration_is_refused_and_leaves_the_cache_alone(tiny, prompts, make_engine, err, msg):
    target, draft = tiny
    cache = KVCache.for_model(target, 3, 64)
    SpecEngine(target, make("ngram", target, draft, None), "chain:2").generate(prompts, 5, cache=cache)
    snap = _snapshot(cache)
    with pytest.raises(err, match=msg):
        make_engine(target, make("ngram", target, draft, None))
    _assert_unchanged(cache, snap)
    with pytest.raises(ValueError, match="--budget 'x'"):
        BudgetConfig.parse("x")
    assert BudgetConfig.parse("6,-,4,none").budget == (6, None, 4, None)


@pytest.mark.parametrize("kind,tree,rule", [("model", "chain:3", "auto"), ("self", "static:2,2", "auto"),
                                            ("ngram", "dynamic:topk=2,depth=3,tokens=6", "auto"),
                                            ("model", "chain:3", "target")])
def test_sampling_is_reproducible_from_the_seed(tiny, prompts, kind, tree, rule):
    target, draft = tiny
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    run = lambda s: SpecEngine(target, make(kind, target, draft, None), tree, rule=rule).generate(  # noqa: E731
        prompts, 16, s).tokens
    a = run(sp)
    assert a == run(sp)
    assert a != run(SamplingParams(temperature=0.9, top_p=0.95, seed=12))


def _chi2_p(counts, expected):
    from test_spec_accept import chi2_pvalue
    return chi2_pvalue(counts, expected)


@pytest.mark.parametrize("tree,rule", [("chain:3", "q"), ("dynamic:topk=3,depth=3,tokens=8", "target")])
def test_engine_samples_the_targets_distribution(tiny, prompts, tree, rule):
    """N copies of one prompt, 2 new tokens each (the first from the prefill, the second from a
    speculative step): the joint of (x1, x2) matches the target's exact distribution (top-k 6,
    temperature 0.8), chi-square p > 0.001."""
    target, draft = tiny
    N, sp = 1200, SamplingParams(temperature=0.8, top_k=6, seed=5)
    p = prompts[0]
    res = SpecEngine(target, make("model", target, draft, None), tree, rule=rule).generate([p] * N, 2, sp)
    pairs = torch.tensor(res.tokens)                                          # [N, 2]
    with torch.no_grad():
        l1 = target(torch.tensor([p]), torch.arange(len(p))[None])[:, -1]
        p1 = torch.softmax(process_logits(l1, sp), -1)[0]                     # [V]
        x1s = torch.nonzero(p1).flatten()
        seqs = torch.tensor([p + [int(x)] for x in x1s])
        l2 = target(seqs, torch.arange(len(p) + 1).expand(len(x1s), -1))[:, -1]
        p2 = torch.softmax(process_logits(l2, sp), -1)                        # [n1, V]
    V = p1.shape[0]
    joint = torch.zeros(V, V, dtype=torch.float64)
    joint[x1s] = p1[x1s, None].double() * p2.double()
    counts = torch.zeros(V * V, dtype=torch.float64)
    counts.index_add_(0, pairs[:, 0] * V + pairs[:, 1], torch.ones(N, dtype=torch.float64))
    assert float(counts[joint.flatten() == 0].sum()) == 0                     # nothing outside the support
    keep = joint.flatten() > 0
    pval = _chi2_p(counts[keep], N * joint.flatten()[keep])
    assert pval > 1e-3, pval
    assert sum(a for s in res.steps for a in s.accepted) > 0.2 * N           # drafts were accepted


@pytest.mark.parametrize("policy,weights", [("substitute", "uniform"), ("truncate", "path")])
def test_budget_bounds_the_experts_loaded_per_layer(tiny, prompts, policy, weights):
    target, draft = tiny
    res = SpecEngine(target, make("model", target, draft, None), "dynamic:topk=4,depth=4,tokens=16",
                     BudgetConfig(3, policy=policy, weights=weights)).generate(prompts, 24)
    s = res.summary()
    assert all(max(st.loaded) <= 3 for st in res.steps)
    assert all(t > 3 for t in s["experts_touched_per_layer"])                # the trees wanted more
    assert max(s["experts_loaded_per_layer"]) <= 3
    per = SpecEngine(target, make("model", target, draft, None), "dynamic:topk=4,depth=4,tokens=16",
                     BudgetConfig((None, 2, 4, None))).generate(prompts, 12)
    for st in per.steps:
        assert st.loaded[1] <= 2 and st.loaded[2] <= 4 and st.loaded[0] == st.touched[0]


def test_padding_nodes_stay_out_of_experts_and_stats(tiny):
    """n-gram trees of different sizes in one batch: padding nodes are neither counted as touched nor
    loaded, and do not change any request's output."""
    target, _ = tiny
    plist = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [900, 17, 1500, 3, 44]]   # request 0 repeats; request 1 does not
    res = SpecEngine(target, NGramDrafter(2048, max_n=3), "chain:4").generate(plist, 12)
    assert res.tokens == ar_ref(target, plist, 12).tokens
    padded = [st for st in res.steps if st.batch == 2 and min(st.valid_nodes) < st.tree_nodes]
    assert padded, "expected a step where the two trees differ in size"


# ---- GPU (run by `pytest -m gpu` on the H100) -----------------------------------------------------------

@gpu
@pytest.mark.parametrize("kind,tree", [("model", "chain:4"), ("self", "dynamic:topk=4,depth=4,tokens=16"),
                                       ("ngram", "static:2,2,1"), ("eagle", "chain:3")])
def test_gpu_greedy_speculative_equals_autoregressive(prompts, tmp_path, kind, tree):
    target, draft = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    eg = save_random_eagle3(tmp_path / "e", target, draft_vocab_size=512, layer_ids=(0, 1, 2), std=0.2)
    ref = generate(target, prompts, 32, cuda_graph=False).tokens
    res = SpecEngine(target, make(kind, target, draft, eg), tree).generate(prompts, 32)
    assert res.tokens == ref
    assert all(s.touched == s.loaded for s in res.steps)


@gpu
def test_gpu_budget_statistics_match_cpu(prompts):
    """The same greedy budgeted run on CPU and CUDA (float32): budget respected, statistics agree."""
    out = {}
    for dev in ("cpu", "cuda"):
        t, d = build_preset("tiny", dev, "float32"), build_draft("tiny", dev, "float32")
        res = SpecEngine(t, ModelDrafter(d, t), "dynamic:topk=4,depth=4,tokens=16", BudgetConfig(4)).generate(prompts, 24)
        assert all(max(s.loaded) <= 4 for s in res.steps)
        out[dev] = res
    a, b = out["cpu"].summary(), out["cuda"].summary()
    # averages over steps: equal up to the rare routing near-tie that float differences between devices flip
    assert a["experts_loaded_per_layer"] == pytest.approx(b["experts_loaded_per_layer"], abs=0.75)
    assert a["experts_touched_per_layer"] == pytest.approx(b["experts_touched_per_layer"], abs=0.75)
    # bf16 runs too (lossless up to bf16 noise: only check it completes and respects the budget)
    t, d = build_preset("tiny", "cuda", "bfloat16"), build_draft("tiny", "cuda", "bfloat16")
    res = SpecEngine(t, ModelDrafter(d, t), "chain:4", BudgetConfig(4)).generate(prompts, 24)
    assert all(max(s.loaded) <= 4 for s in res.steps) and res.n_generated == 72


@gpu
@pytest.mark.parametrize("budget", [None, BudgetConfig(4)], ids=["no-budget", "B=4"])
def test_gpu_graph_verify_equals_eager(prompts, budget):
    """The CUDA-graph verify step (forward + tree_accept + kv_compact, replayed) commits exactly what the
    eager path commits: tokens, accepted counts and expert statistics, step by step."""
    t, d = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    runs = {}
    for graph in (True, False):
        eng = SpecEngine(t, ModelDrafter(d, t), "chain:4", budget, cuda_graph=graph)
        runs[graph] = eng.generate(prompts, 32)
    a, b = runs[True], runs[False]
    assert a.tokens == b.tokens
    # step by step while the batches agree (with graphs, finished requests ride along a few steps longer)
    same = [(x, y) for x, y in zip(a.steps, b.steps) if x.batch == y.batch]
    assert len(same) >= 5
    for x, y in same:
        assert (x.accepted, x.loaded, x.touched) == (y.accepted, y.loaded, y.touched)


@gpu
def test_gpu_graph_is_captured_and_replayed(prompts):
    from specmoe_ext.spec.verify_graph import VerifyStep
    t, d = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    eng = SpecEngine(t, ModelDrafter(d, t), "chain:4")
    cache = KVCache.for_model(t, 1, eng.capacity_for(len(prompts[1]), 40))
    res = eng.generate(prompts[1:2], 40, cache=cache)
    steps = [v for v in cache.graphs.values() if isinstance(v, VerifyStep)]
    assert steps and steps[0].graph is not None and steps[0].calls == len(res.steps)
    assert res.tokens == generate(t, prompts[1:2], 40, cuda_graph=False).tokens
    # the device lengths the kernel advanced agree with the host's bookkeeping
    assert cache.lengths.tolist() == cache.host_lengths()


@gpu
def test_gpu_graph_sampling_is_reproducible(prompts):
    """Temperature > 0 through the graph (target-sampling rule, Philox per request): same seed, same tokens;
    another seed, other tokens."""
    t, d = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    eng = SpecEngine(t, ModelDrafter(d, t), "chain:4", rule="target")
    sp = lambda s: SamplingParams(temperature=0.9, top_p=0.95, seed=s)  # noqa: E731
    a, b, c = (eng.generate(prompts, 24, sp(s)).tokens for s in (1, 1, 2))
    assert a == b and a != c


@gpu
def test_gpu_tree_attention_runtime_path_matches_sdpa(prompts):
    """bf16 target: the verify forward with PrefixTreeMask (tree-attention kernel) matches the dense-mask SDPA
    forward on the same cache state."""
    from specmoe_ext.models.model import PrefixTreeMask
    from specmoe_ext.spec.tree import ancestor_bitmask
    t = build_preset("tiny", "cuda", "bfloat16")
    plist = [prompts[0], prompts[1]]
    cache = KVCache.for_model(t, 2, 128)
    generate(t, plist, 1, cache=cache)
    par = torch.tensor([[-1, 0, 1, 0, 3, 3], [-1, 0, 0, 1, 2, 4]], device="cuda")
    bits = ancestor_bitmask(par)
    toks = torch.randint(0, t.args.vocab_size, (2, 6), device="cuda")
    L = cache.lengths.clone()
    depth = torch.tensor([[0, 1, 2, 1, 2, 2], [0, 1, 1, 2, 2, 3]], device="cuda")
    slots = L[:, None] + torch.arange(6, device="cuda")
    m = PrefixTreeMask(L, bits)
    out_k = t(toks, L[:, None] + depth, cache, slots, m).float()
    out_d = t(toks, L[:, None] + depth, cache, slots, m.dense(cache.capacity)).float()
    err = float((out_k - out_d).norm() / out_d.norm())
    assert err < 2e-2, err


@gpu
def test_gpu_speculation_off_runs_the_decode_graph(prompts):
    """With the controller, speculation-off steps run as the runtime's CUDA-graph decode step: output still
    equals greedy autoregressive decoding, and those steps carry no draft tree."""
    from specmoe_ext.spec.controller import CascadeController, make_candidates
    t, d = build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")
    eng = SpecEngine(t, ModelDrafter(d, t), "chain:4")
    res = eng.generate(prompts, 24, controller=CascadeController(make_candidates(ks=(0, 2))))
    assert res.tokens == generate(t, prompts, 24, cuda_graph=False).tokens
    assert any(s.tree_nodes == 1 and not s.touched for s in res.steps)
    assert res.summary()["steps"] == len(res.steps)

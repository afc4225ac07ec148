"""The speculative engine: lossless greedy output for every drafter x tree x batch size (budget off and
B >= E), batches that shrink, the committed cache, bad input, seeded sampling (one seed, the same tokens
through every CPU path), and MoE-Spec budget statistics (the target distribution at temperature > 0:
test_sampling_power.py). GPU
variants are marked `gpu`.

Shape legend: bs requests, T tree nodes, V vocab (2048), E experts (8), K experts per token (2), L layers (4),
Hk kv heads, S cache capacity, d head dim.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import loop_without_syncs

from specmoe_ext.models import (CacheCapacityError, KVCache, SamplingParams, build_draft, build_preset,
                                load_tokenizer, prefill)
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.speculative import (BudgetConfig, Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine,
                                     TreeSpecError, generate, load_eagle3, save_random_eagle3)

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
    target cache's committed entries equal a fresh prefill of the committed tokens, and so do the draft
    model's (exact up to its catch-up point L - 1)."""
    target, draft = tiny
    eng = SpecEngine(target, make(kind, target, draft, None), "static:2,2")
    cache = KVCache.for_model(target, 3, 96)
    batch = eng.start(prompts, SamplingParams(), 40, cache=cache)
    for _ in range(4):
        eng.step(batch)
    L = cache.lengths.tolist()
    ctx = [batch.context(b) for b in range(3)]
    assert L == [len(c) - 1 for c in ctx] == cache.host_lengths()
    fresh = KVCache.for_model(target, 3, 96)
    with torch.no_grad():
        prefill(target, [c[:-1] for c in ctx], fresh)
    caches = [(cache, fresh, L)]
    if kind == "model":
        dfresh = KVCache.for_model(draft, 3, 96)
        with torch.no_grad():
            prefill(draft, [c[:-1] for c in ctx], dfresh)
        caches.append((eng.drafter.cache, dfresh, [n - 1 for n in L]))
    for got_c, want_c, n in caches:
        for layer in range(len(got_c.k)):
            for b in range(3):
                for got, want in ((got_c.k, want_c.k), (got_c.v, want_c.v)):
                    torch.testing.assert_close(got[layer][b, :, :n[b]], want[layer][b, :, :n[b]], atol=2e-5, rtol=1e-4)


def _snapshot(cache):
    return [t.clone() for t in cache.k + cache.v], cache.host_lengths(), cache.lengths.clone()


def _assert_unchanged(cache, snap):
    ts, host, dev = snap
    assert cache.host_lengths() == host and torch.equal(cache.lengths, dev)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, ts))


def test_a_cache_too_small_for_the_run_is_refused_before_any_write(tiny, prompts):
    target, draft = tiny
    for kind, tree in (("model", "chain:4"), ("self", "dynamic:topk=3,depth=3,tokens=6")):
        eng = SpecEngine(target, make(kind, target, draft, None), tree)
        cap = max(len(p) for p in prompts) + 3                              # room for the prompt, not the tree
        cache = KVCache.for_model(target, 3, cap)
        cache.set_lengths([2, 2, 2])
        snap = _snapshot(cache)
        with pytest.raises(CacheCapacityError, match=rf"need batch 3 / capacity \d+ .*slots for the tree {tree.split(':')[0]}"):
            eng.start(prompts, SamplingParams(), 3, cache=cache)
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


@pytest.mark.parametrize("kind,tree", [("model", "chain:3"), ("self", "static:2,2"), ("ngram", "chain:3"),
                                       ("eagle", "dynamic:topk=2,depth=3,tokens=6")])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_one_seed_one_output_through_every_cpu_path(tiny, prompts, eagle_dir, kind, tree, temperature):
    """The pipelined generation loop and a step-by-step loop over the same batch (eng.start + eng.step) give
    the same tokens for one seed, greedy and sampled; a second generate() call (reused buffers) too."""
    target, draft = tiny
    sp = SamplingParams(temperature=temperature, top_p=0.9, seed=21)
    eng = SpecEngine(target, make(kind, target, draft, eagle_dir), tree)
    n = 14
    a = eng.generate(prompts, n, sp).tokens
    assert eng.generate(prompts, n, sp).tokens == a
    batch = eng.start(prompts, sp, n)
    out = [[t] for t in batch.root.tolist()]
    while any(len(o) < n for o in out):
        rec = eng.step(batch, eng.plan(sp))
        for b in range(3):
            out[b] += rec.tokens(b)
    assert out == a


# ---- GPU (run by `pytest -m gpu` on the H200) -----------------------------------------------------------

def _tiny_cuda():
    return build_preset("tiny", "cuda", "float32"), build_draft("tiny", "cuda", "float32")


@gpu
@pytest.mark.parametrize("kind,tree", [("model", "chain:4"), ("self", "dynamic:topk=4,depth=4,tokens=16"),
                                       ("ngram", "static:2,2,1"), ("eagle", "chain:3")])
def test_gpu_greedy_speculative_equals_autoregressive(prompts, tmp_path, kind, tree):
    target, draft = _tiny_cuda()
    eg = save_random_eagle3(tmp_path / "e", target, draft_vocab_size=512, layer_ids=(0, 1, 2), std=0.2)
    ref = generate(target, prompts, 32, cuda_graph=False).tokens
    eng = SpecEngine(target, make(kind, target, draft, eg), tree)
    res = eng.generate(prompts, 32)
    assert res.tokens == ref and res.cuda_graph
    assert all(s.touched == s.loaded for s in res.steps)
    again = eng.generate(prompts, 32)                 # buffers and graphs reused: every step replays
    assert again.tokens == ref and all(s.replayed for s in again.steps)


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
@pytest.mark.parametrize("kind,tree", [("model", "chain:4"), ("model", "static:2,2"), ("self", "chain:3"),
                                       ("ngram", "chain:3")])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_gpu_one_seed_same_tokens_on_graph_eager_and_cpu(prompts, kind, tree, temperature):
    """The captured step (drafting included), the eager GPU step and the CPU step commit the same tokens
    for one seed (float32: the same decisions; one Philox stream per request on every path), with the
    same accepted counts step by step while the batches agree."""
    sp = SamplingParams(temperature=temperature, top_p=0.95, seed=9)
    t, d = _tiny_cuda()
    tc, dc = build_preset("tiny", "cpu", "float32"), build_draft("tiny", "cpu", "float32")
    runs = {}
    for name, (tt, dd, graph) in {"graph": (t, d, True), "eager": (t, d, False), "cpu": (tc, dc, True)}.items():
        runs[name] = SpecEngine(tt, make(kind, tt, dd, None), tree, cuda_graph=graph).generate(prompts, 32, sp)
    assert runs["graph"].tokens == runs["eager"].tokens == runs["cpu"].tokens
    assert runs["graph"].cuda_graph and not runs["eager"].cuda_graph
    # step by step while every request is live in both runs (afterwards the graph loop keeps finished rows
    # in the batch until half have finished, so the batches, and the experts they load, differ)
    same = list(itertools.takewhile(lambda p: p[0].batch == p[1].batch == len(prompts),
                                    zip(runs["graph"].steps, runs["eager"].steps)))
    diff = [(i, x.accepted, y.accepted, x.loaded, y.loaded) for i, (x, y) in enumerate(same)
            if x.accepted != y.accepted or x.loaded != y.loaded]
    assert len(same) >= 5 and not diff, diff


@gpu
@pytest.mark.parametrize("kind,tree", [("model", "chain:4"), ("self", "static:2,2"), ("ngram", "chain:3"),
                                       ("eagle", "dynamic:topk=2,depth=3,tokens=6")])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_gpu_loop_never_synchronizes(prompts, tmp_path, kind, tree, temperature):
    """With every graph captured (a first call), a second generate() runs its whole loop under
    torch.cuda.set_sync_debug_mode("error"): no step, no drafter, no bookkeeping synchronizes the device;
    the one host read per step is an event wait on a pinned non_blocking copy."""
    t, d = _tiny_cuda()
    eg = save_random_eagle3(tmp_path / "e", t, draft_vocab_size=512, layer_ids=(0, 1, 2), std=0.2)
    sp = SamplingParams(temperature=temperature, seed=4)
    eng = SpecEngine(t, make(kind, t, d, eg), tree)
    first = eng.generate(prompts, 24, sp)
    with loop_without_syncs():
        second = eng.generate(prompts, 24, sp)
    assert second.tokens == first.tokens and all(s.replayed for s in second.steps)


@gpu
def test_gpu_phase_times_and_overlap(prompts):
    """Replayed steps report device time per phase (events recorded inside the graph) that adds up to the
    step; the loop keeps the device busy (wall time per step close to device time per step)."""
    t, d = _tiny_cuda()
    eng = SpecEngine(t, ModelDrafter(d, t), "chain:4")
    eng.generate(prompts, 48)
    res = eng.generate(prompts, 48)
    st = [s for s in res.steps if s.replayed]
    assert st and all(s.draft_s is not None and s.draft_s > 0 and s.verify_s > 0 for s in st)
    for s in st:
        assert s.draft_s + s.verify_s + s.accept_s == pytest.approx(s.step_s, rel=0.05)


@gpu
def test_gpu_tree_attention_runtime_path_matches_sdpa(prompts):
    """bf16 target: the verify forward with PrefixTreeMask (tree-attention kernel) matches the dense-mask SDPA
    forward on the same cache state."""
    from specmoe_ext.models.kv_cache import Geometry
    from specmoe_ext.speculative.tree import ancestor_bitmask
    t = build_preset("tiny", "cuda", "bfloat16")
    plist = [prompts[0], prompts[1]]
    cache = KVCache.for_model(t, 2, 128)
    prefill(t, plist, cache)
    par = torch.tensor([[-1, 0, 1, 0, 3, 3], [-1, 0, 0, 1, 2, 4]], device="cuda")
    bits = ancestor_bitmask(par)
    toks = torch.randint(0, t.args.vocab_size, (2, 6), device="cuda")
    depth = torch.tensor([[0, 1, 2, 1, 2, 2], [0, 1, 1, 2, 2, 3]], device="cuda")
    geo = cache.tree_geometry(depth, bits)
    with torch.no_grad():
        out_k = t(toks, geo, cache)[0].float()
        out_d = t(toks, Geometry(geo.positions, geo.slots, geo.mask.dense(cache.capacity)), cache)[0].float()
    err = float((out_k - out_d).norm() / out_d.norm())
    assert err < 2e-2, err


@gpu
def test_gpu_speculation_off_steps_are_root_only_replays(prompts):
    """With the controller, speculation-off steps are root-only steps of the same runner (replayed once
    captured): output still equals greedy autoregressive decoding."""
    from specmoe_ext.speculative.controller import CascadeController, make_candidates
    t, d = _tiny_cuda()
    eng = SpecEngine(t, ModelDrafter(d, t), "chain:4")
    mk = lambda: CascadeController(make_candidates(ks=(0, 2)), test_steps=2)  # noqa: E731
    ref = generate(t, prompts, 40, cuda_graph=False).tokens
    assert eng.generate(prompts, 40, controller=mk()).tokens == ref
    res = eng.generate(prompts, 40, controller=mk())
    assert res.tokens == ref
    off = [s for s in res.steps if s.tree_nodes == 1]
    assert off and not any(s.touched for s in off) and any(s.replayed for s in off)


@pytest.mark.parametrize("kind", ["model", "eagle", None])
def test_cpu_attention_follows_the_current_length_not_the_capacity(tiny, prompts, eagle_dir, kind, monkeypatch):
    """A run allotted 1500 new tokens (a cache of 1500+ slots) that stops after ~10: every dense-mask
    attention of the loop (target, draft model, EAGLE head) spans the slots the step can touch, not the
    capacity; the output is the same as a run with a small cache."""
    from specmoe_ext.models import model as M
    target, draft = tiny
    free = generate(target, prompts, 10).tokens
    stop = sorted({t[-1] for t in free})
    small = (SpecEngine(target, make(kind, target, draft, eagle_dir), "static:2,2") if kind else None)
    ref = small.generate(prompts, 10, stop_ids=stop) if small else generate(target, prompts, 10, stop_ids=stop)
    widths = []
    attn = M.attention

    def recording(q, k, v, mask):
        widths.append(mask.shape[-1])
        return attn(q, k, v, mask)
    monkeypatch.setattr(M, "attention", recording)
    from specmoe_ext.speculative import eagle as eagle_mod
    monkeypatch.setattr(eagle_mod, "attention", recording)
    big = SpecEngine(target, make(kind, target, draft, eagle_dir), "static:2,2") if kind else SpecEngine(target, None)
    res = big.generate(prompts, 1500, stop_ids=stop)
    assert res.tokens == ref.tokens and set(res.finish_reasons) == {"stop"}
    assert big._ws.batch.cache.capacity >= 1500
    longest = max(len(p) for p in prompts) + 10
    assert widths and max(widths) <= longest + 40, (max(widths), longest)


def test_controller_over_dynamic_tree_sizes_and_adaptive_verification(tiny, prompts):
    """--spec auto over a dynamic tree: each candidate keeps k + 1 nodes of the engine's tree shape (k = 0:
    speculation off); with adaptive verification on top, greedy output still equals autoregressive."""
    from specmoe_ext.speculative.controller import CascadeController, make_candidates
    from test_adaptive import linear_profile
    target, draft = tiny
    ref = generate(target, prompts, 30).tokens
    for verify, profile in (("full", None), ("adaptive", linear_profile(1.0, 0.3))):
        eng = SpecEngine(target, make("model", target, draft, None), "dynamic:topk=3,depth=3,tokens=8",
                         verify=verify, profile=profile)
        res = eng.generate(prompts, 30, controller=CascadeController(make_candidates(ks=(0, 3, 7)), test_steps=2))
        assert res.tokens == ref
        assert {s.tree_nodes for s in res.steps} >= {1, 4, 8}
    with pytest.raises(ValueError, match="keeps at most 7 draft nodes"):
        eng.generate(prompts, 4, controller=CascadeController(make_candidates(ks=(0, 8))))
    with pytest.raises(ValueError, match=r"static tree \(static:2,2\) is on \(k=6\) or off"):
        SpecEngine(target, make("model", target, draft, None), "static:2,2").generate(
            prompts, 4, controller=CascadeController(make_candidates(ks=(0, 2))))

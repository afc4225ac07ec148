"""Expert offloading (models/offload.py) on the CPU, where the host store and the expert cache are both CPU
memory and the same fetch code runs as on the GPU: outputs equal the all-resident model exactly (fp32) for
plain decoding and every drafter, with batching, budgets and --spec auto; fetch counts equal cache misses
(against a host simulation of the LRU cache); the budget caps fetched experts; eviction / prefetch policies;
the self drafter's residency is the cache's; one host read per step; bad input named before allocation.
GPU variants (CUDA graph replay of fetching steps) are marked `gpu`.

Shape legend: bs requests (up to 3), E experts (8), K experts per token (2), N resident slots per MoE layer,
S = E - N staging slots, L_moe MoE layers (4), Nt tokens of a forward, h hidden (128), V vocab (2048).
"""
from __future__ import annotations

import collections

import pytest
import torch
from conftest import loop_without_syncs

from specmoe_ext.models import load_tokenizer
from specmoe_ext.models.config import ModelArgs
from specmoe_ext.models.loader import empty_model, load_model
from specmoe_ext.models.offload import (LayerExperts, OffloadConfig, OffloadError, empty_offloaded_model,
                                        eviction_order, expert_offload, init_random_offloaded, plan_offload,
                                        predict_heat, predict_router, prefetch_candidates)
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.speculative import (BudgetConfig, Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine,
                                     generate, load_eagle3, save_random_eagle3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
gpu = pytest.mark.gpu
N_NEW = 16


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(TINY_DIR / "target")
    return [tok.encode("Return a new"), tok.encode('def parse(text):\n    """Parse the header'), tok.encode("The")]


_MODELS: dict = {}


def offloaded(device: str = "cpu", dtype=None, **kw):
    """The tiny target with its experts offloaded (one model per configuration, reused across tests: any
    cache state must give the same outputs)."""
    key = (device, dtype, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = load_model(TINY_DIR / "target", device, dtype, offload=OffloadConfig(**kw))
    return _MODELS[key]


_AR: dict = {}


def ar(target, plist, n=N_NEW):
    key = (id(target), tuple(map(tuple, plist)), n)
    if key not in _AR:
        _AR[key] = generate(target, plist, n)
    return _AR[key]


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny):
    return save_random_eagle3(tmp_path_factory.mktemp("eagle3"), tiny[0], draft_vocab_size=512, layer_ids=(0, 1, 2),
                              std=0.2, seed=3)


def make_drafter(kind, target, draft, eagle_dir):
    return {"model": lambda: ModelDrafter(draft, target), "self": lambda: SelfDrafter(target),
            "ngram": lambda: NGramDrafter(target.args.vocab_size, 3),
            "eagle": lambda: Eagle3Drafter(load_eagle3(eagle_dir, target), target)}[kind]()


# ---- outputs equal the all-resident model --------------------------------------------------------------------

@pytest.mark.parametrize("N,eviction,prefetch", [(2, "lru", "none"), (3, "lru", "router"), (4, "heat", "heat"),
                                                 (5, "heat", "router"), (8, "lru", "router")])
def test_plain_decoding_equals_resident(tiny, prompts, N, eviction, prefetch):
    m = offloaded(resident_experts=N, eviction=eviction, prefetch=prefetch)
    off = expert_offload(m)
    off.reset_stats()
    res = generate(m, prompts, N_NEW)
    assert res.tokens == ar(tiny[0], prompts).tokens
    rep = off.report(steps=res.decode_steps)
    st = rep["steps"]
    assert st["forwards_per_layer"] == [res.decode_steps] * 4
    c = off.counters()["stats"]                              # [bucket, L_moe, fields]
    assert torch.equal(c[:, :, 1], c[:, :, 2] + c[:, :, 3])  # needed = hits + misses, per layer
    if N < 8:
        assert sum(st["misses_per_layer"]) > 0
    else:                                       # everything fits: each expert is fetched at most once, never evicted
        assert 0 < sum(st["misses_per_layer"]) + sum(rep["prefill"]["misses_per_layer"]) <= 8 * 4


@pytest.mark.parametrize("tree", ["chain:3", "dynamic:topk=3,depth=3,tokens=8"])
@pytest.mark.parametrize("kind", ["model", "self", "ngram", "eagle"])
def test_every_drafter_equals_resident(tiny, prompts, eagle_dir, kind, tree):
    target = offloaded(resident_experts=3)
    res = SpecEngine(target, make_drafter(kind, target, tiny[1], eagle_dir), tree).generate(prompts, N_NEW)
    assert res.tokens == ar(tiny[0], prompts).tokens
    if kind != "eagle":                          # a random EAGLE head may never be right
        assert sum(a for s in res.steps for a in s.accepted) > 0


@pytest.mark.parametrize("bs", [1, 3])
def test_lossless_budget_and_stop_tokens_equal_resident(tiny, prompts, bs):
    """B = E (a budget that keeps everything) and requests that leave the batch at a stop token."""
    target = offloaded(resident_experts=2, eviction="heat")
    plist = prompts[:bs]
    free = ar(tiny[0], plist, 20).tokens
    stop = free[0][5]
    ref = SpecEngine(tiny[0], None).generate(plist, 20, stop_ids=[stop])
    res = SpecEngine(target, SelfDrafter(target), "static:2,2,1", BudgetConfig(8)).generate(plist, 20, stop_ids=[stop])
    assert res.tokens == ref.tokens and res.finish_reasons == ref.finish_reasons


def test_spec_auto_equals_resident(tiny, prompts):
    from specmoe_ext.speculative.controller import CascadeController, make_candidates
    target = offloaded(resident_experts=3)
    eng = SpecEngine(target, ModelDrafter(tiny[1], target), "chain:4")
    res = eng.generate(prompts, 24, controller=CascadeController(make_candidates(ks=(0, 1, 4)), test_steps=2))
    assert res.tokens == ar(tiny[0], prompts, 24).tokens
    assert {s.tree_nodes for s in res.steps} >= {1, 5}


def test_sampling_equals_resident(tiny, prompts):
    from specmoe_ext.models import SamplingParams
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=4)
    target = offloaded(resident_experts=3)
    b = SpecEngine(target, ModelDrafter(tiny[1], target), "chain:3").generate(prompts, N_NEW, sp).tokens
    c = generate(target, prompts, N_NEW, sp).tokens
    assert c == generate(tiny[0], prompts, N_NEW, sp).tokens          # seeded sampling: the same draws
    assert b == SpecEngine(tiny[0], ModelDrafter(tiny[1], tiny[0]), "chain:3").generate(prompts, N_NEW, sp).tokens


# ---- fetch counts, the LRU cache against a host simulation -------------------------------------------------------

def _simulate_lru(calls, N):
    """calls: [(moe_index, needed [E] bool list, pairs [E] list)] in execution order -> (misses per layer,
    final expert_of per layer). The cache semantics of the module docstring, in plain Python."""
    slots = collections.defaultdict(lambda: [-1] * N)
    used = collections.defaultdict(lambda: [0] * N)
    misses = collections.Counter()
    for clock, (layer, needed, pairs) in enumerate(calls, start=1):
        s, u = slots[layer], used[layer]
        need = {e for e, x in enumerate(needed) if x}
        miss = sorted(need - set(s), key=lambda e: (-pairs[e], e))
        holds = [x in need for x in s]
        order = sorted(range(N), key=lambda i: (1 if holds[i] else 0, -1 if s[i] < 0 and not holds[i] else 0,
                                                u[i] if s[i] >= 0 else 0, i))
        evictable = [i for i in order if not holds[i]]
        for e, i in zip(miss, evictable):
            s[i], u[i] = e, clock
        misses[layer] += len(miss)
        for i, x in enumerate(s):
            if x in need:
                u[i] = clock
    return misses, dict(slots)


def test_fetch_counts_equal_lru_cache_misses(tiny, prompts, monkeypatch):
    m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, prefetch="none"))
    off = expert_offload(m)
    calls = []
    admit = LayerExperts._admit

    def recording(self, needed, priority, lanes, staging, kind):
        assert kind == "demand"
        calls.append((self.moe_index, needed.tolist(), priority.tolist()))
        return admit(self, needed, priority, lanes, staging, kind)
    monkeypatch.setattr(LayerExperts, "_admit", recording)
    generate(m, prompts, 12)
    SpecEngine(m, ModelDrafter(tiny[1], m), "dynamic:topk=3,depth=3,tokens=8").generate(prompts, 12)
    misses, slots = _simulate_lru(calls, 3)
    c = off.counters()["stats"]
    dev_misses = (c[0, :, 3] + c[1, :, 3]).tolist()
    assert dev_misses == [misses[i] for i in range(4)]
    assert off.rows_copied == sum(dev_misses) > 0                  # every copied row is a miss, and back
    for le in off.layers:
        assert le.expert_of[:3].tolist() == slots[le.moe_index]
    assert max(sum(n) for _, n, _ in calls) > 3                     # some forward needed more than the cache ...
    assert int(c[:, :, 4].sum()) > 0                                 # ... and staged the overflow


def test_prefetch_copies_are_counted_and_hit(tiny, prompts):
    m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, prefetch="router"))
    off = expert_offload(m)
    generate(m, prompts, 16)
    c = off.counters()["stats"].sum(0)                               # [L_moe, fields] over both buckets
    assert off.rows_copied == int(c[:, 3].sum() + c[:, 5].sum())
    assert int(c[0, 5]) == 0 and int(c[1:, 5].sum()) > 0            # the first MoE layer has no predecessor
    assert 0 < int(c[:, 6].sum()) <= int(c[:, 5].sum())             # some prefetched experts were used
    assert all(int(c[i, 2]) >= int(c[i, 6]) for i in range(4))      # a prefetch hit is a hit


# ---- the budget caps fetched experts ------------------------------------------------------------------------------

@pytest.mark.parametrize("aware", [False, True])
def test_budget_caps_fetched_experts(tiny, prompts, aware, monkeypatch):
    B = 3
    target = offloaded(resident_experts=2, residency_aware_budget=aware, residency_margin=0.3)
    off = expert_offload(target)
    needed = []
    admit = LayerExperts._admit

    def recording(self, need, priority, lanes, staging, kind):
        if kind == "demand":
            needed.append(int(need.sum()))
        return admit(self, need, priority, lanes, staging, kind)
    monkeypatch.setattr(LayerExperts, "_admit", recording)
    eng = SpecEngine(target, ModelDrafter(tiny[1], target), "dynamic:topk=3,depth=3,tokens=8", BudgetConfig(B))
    off.reset_stats()
    eng.generate(prompts, 12)
    steps = needed[4:]                                               # after the prefill's 4 MoE layers
    rep = off.report()
    assert max(steps) <= B and max(rep["steps"]["max_fetched_per_forward"]) <= B
    assert max(rep["steps"]["misses_per_layer"]) > 0
    needed.clear()
    SpecEngine(target, ModelDrafter(tiny[1], target), "dynamic:topk=3,depth=3,tokens=8").generate(prompts, 12)
    assert max(needed[4:]) > B                                       # without the budget the trees need more
    if aware:
        ab = rep["steps"]["residency_aware_budget"]
        assert ab["routing_mass_lost"] >= 0 and ab["bytes_saved"] > 0
        for p, a in zip(ab["nonresident_kept_plain_per_layer"], ab["nonresident_kept_aware_per_layer"]):
            assert a <= p
    else:
        assert "residency_aware_budget" not in rep["steps"]


@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_residency_aware_router_with_zero_margin_is_route_budget(policy):
    """margin 0: the op's kept set and routing; a large margin keeps resident experts first."""
    from specmoe_ext import ops
    m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, residency_aware_budget=True,
                                                                      residency_margin=0.0))
    le = expert_offload(m).layers[0]
    le.load_resident([1, 4, 6])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 8, generator=g)
    protect = torch.zeros(12, dtype=torch.bool)
    protect[0] = True
    w = torch.rand(12, generator=g)
    for B in (2, 4, 6):
        ref = ops.route_budget(logits, 2, B, renormalize=True, token_weights=w, protect=protect, policy=policy)
        got = le.aware_route(logits, 2, B, renormalize=True, token_weights=w, protect=protect, policy=policy)
        assert got.kept_experts.tolist() == ref.kept_experts.tolist()
        assert got.ids.tolist() == ref.ids.tolist()
        torch.testing.assert_close(got.weights, ref.weights)
        assert got.expert_counts.tolist() == ref.expert_counts.tolist()
    object.__setattr__(le.owner.cfg, "residency_margin", 10.0)
    try:
        got = le.aware_route(logits, 2, 4, token_weights=w, policy=policy)
    finally:
        object.__setattr__(le.owner.cfg, "residency_margin", 0.0)
    assert {1, 4, 6} <= set(got.kept_experts.tolist())


# ---- policies -----------------------------------------------------------------------------------------------------

def test_eviction_order_lru_and_heat():
    expert_of = torch.tensor([5, -1, 2, 7, 0])
    last_used = torch.tensor([9, 0, 3, 4, 1])
    heat = torch.zeros(8)
    heat[torch.tensor([5, 2, 7, 0])] = torch.tensor([0.5, 3.0, 0.1, 2.0])
    none = torch.zeros(5, dtype=torch.bool)
    assert eviction_order("lru", expert_of, last_used, heat, none).tolist() == [1, 4, 2, 3, 0]
    assert eviction_order("heat", expert_of, last_used, heat, none).tolist() == [1, 3, 0, 4, 2]
    needed = torch.tensor([False, False, True, False, False])           # slot 2 holds a needed expert: last
    assert eviction_order("lru", expert_of, last_used, heat, needed).tolist() == [1, 4, 3, 0, 2]
    ties = torch.tensor([3, 3, 3, 3, 3])
    assert eviction_order("lru", torch.arange(5), ties, heat, none).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="eviction policy"):
        eviction_order("fifo", expert_of, last_used, heat, none)


def test_prefetch_policies():
    g = torch.Generator().manual_seed(1)
    x, gate = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    score = predict_router(x, gate, 2)
    want = collections.Counter(e for row in torch.topk(x @ gate.t(), 2).indices.tolist() for e in row)
    assert score.tolist() == [float(want[e]) for e in range(8)] and score.sum() == 10
    top = sorted(range(8), key=lambda e: (-want[e], e))[:3]
    assert prefetch_candidates(score, 3).nonzero().flatten().tolist() == sorted(top)
    heat = torch.tensor([0.0, 5.0, 0.5, 0.0, 9.0, 0.0, 0.0, 2.0])
    assert predict_heat(heat).tolist() == heat.tolist()
    assert prefetch_candidates(predict_heat(heat), 3).nonzero().flatten().tolist() == [1, 4, 7]
    assert prefetch_candidates(torch.tensor([0.0, 1.0, 0.0, 0.0]), 3).tolist() == [False, True, False, False]


def test_prefetch_lands_the_predicted_experts_in_the_next_layer():
    """A prefetch from layer 0's input fills layer 1's cache with what its router predicts (router policy)
    and with its hottest experts (heat policy), into evictable slots only."""
    for policy in ("router", "heat"):
        m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, prefetch=policy,
                                                                          prefetch_experts=2))
        le0, le1 = expert_offload(m).layers[:2]
        le1.load_resident([0])
        x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
        if policy == "router":
            score = predict_router(x, le1.ffn.gate.weight, 2)
        else:
            le1.heat.copy_(torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0, 7.0, 1.0, 0.0]))
            score = predict_heat(le1.heat)
        want = set(prefetch_candidates(score, 2).nonzero().flatten().tolist())
        le1._prefetch(x, 1)
        assert want <= set(le1.expert_of[:3].tolist())
        for e in want:                                               # the copied rows are that expert's weights
            s = int(le1.slot_of[e])
            assert torch.equal(le1.view13[s], le1.ffn.w13[e]) and torch.equal(le1.view2[s], le1.ffn.w2[e])
        fetched = want - {0}                                         # expert 0 was resident already
        assert fetched and all(bool(le1.prefetched[int(le1.slot_of[e])]) for e in fetched)
        assert not bool(le1.prefetched[int(le1.slot_of[0])])        # not fetched by the prefetch, not flagged


def test_local_rows_are_a_bijection_and_tables_consistent():
    m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, prefetch="none"))
    off = expert_offload(m)
    g = torch.Generator().manual_seed(5)
    for le in off.layers:
        locals_ = set(range(3)) | set(range(le.stage_base, le.stage_base + le.S))
        for _ in range(20):
            needed = torch.rand(8, generator=g) < 0.5
            pairs = torch.randint(1, 9, (8,), generator=g) * needed
            off.clock.add_(1)
            _, cand, _, to_stage, stage_rows = le._admit(needed, pairs, 8, True, "demand")
            rows = le._local_rows(cand, to_stage, stage_rows)
            assert set(rows.tolist()) == locals_ and len(rows) == 8
            for e in range(8):                                       # slot_of and expert_of are inverses
                s = int(le.slot_of[e])
                assert s == -1 or (int(le.expert_of[s]) == e and int(rows[e]) == s)
                if needed[e]:                                        # every needed expert's weights are there
                    assert torch.equal(le.view13[int(rows[e])], le.ffn.w13[e])
                    assert torch.equal(le.view2[int(rows[e])], le.ffn.w2[e])


# ---- the self drafter drafts with the cache's residents -------------------------------------------------------------

def test_self_drafter_uses_the_cache_residency_and_never_fetches(prompts):
    from specmoe_ext.models import SamplingParams
    m = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=3, prefetch="router"))
    off = expert_offload(m)
    d = SelfDrafter(m)
    assert d.n_resident == 3 and d.describe()["residency"] == "expert cache (offloaded)"
    eng = SpecEngine(m, d, "chain:3")
    batch = eng.start(prompts, SamplingParams(), 24)
    for le in off.layers:
        le.load_resident([7, 0, 3][: le.N] if le.moe_index % 2 else [1, 2, 5])
    d._batch, d._chain = batch, True
    d._refresh()
    res = off.resident_mask()
    for j, layer in enumerate(d.moe_layers):
        assert res[j][d.maps[layer]].all()                           # every expert maps into the cache
        assert d.maps[layer][res[j]].tolist() == res[j].nonzero().flatten().tolist()
    rows, stats = off.rows_copied, off.counters()["stats"].clone()
    with torch.no_grad():
        logits = d.root_logits()
    assert off.rows_copied == rows and torch.equal(off.counters()["stats"], stats)   # drafting fetched nothing
    assert torch.isfinite(logits).all()
    for _ in range(3):
        eng.step(batch)
    assert off.rows_copied > rows                                    # verification did fetch


# ---- one host read per step --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [None, "self"])
def test_one_host_read_per_step_with_offload(tiny, prompts, kind):
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    from test_host_reads import _SyncingOps, counting_loop_reads
    target = offloaded(resident_experts=3)
    eng = SpecEngine(target, None if kind is None else SelfDrafter(target), "chain:3")
    off = expert_offload(target)
    copies, copy = [0], off._copy

    def counted_copy(*a, **k):          # copies made inside the loop (not the prefill's)
        copies[0] += any(isinstance(m, _SyncingOps) for m in _get_current_dispatch_mode_stack())
        return copy(*a, **k)
    off._copy = counted_copy
    try:
        with counting_loop_reads() as counts:
            res = eng.generate(prompts, 12)
    finally:
        del off._copy
    # the CPU copy backend ("index") selects its rows with one nonzero per copy: CPU-only code (CUDA copies
    # run the Triton kernel over fixed lanes; test_gpu_offloaded_loop_never_synchronizes checks them)
    assert off.backend == "index" and copies[0] > 0 and counts.pop("aten:aten.nonzero.default", 0) == copies[0]
    assert counts == collections.Counter(tolist=len(res.steps)), dict(counts)


# ---- construction -------------------------------------------------------------------------------------------------------

def test_experts_live_in_the_host_store_and_the_cache_is_small():
    m = offloaded(resident_experts=3)
    off = expert_offload(m)
    p = off.plan
    assert (p.resident, p.staging, p.groups) == (3, 5, 1) and p.cache_rows == 4 * 3 + 5
    ref = load_model(TINY_DIR / "target", "cpu")
    for i, blk in enumerate(m.layers):
        assert torch.equal(blk.ffn.w13, ref.layers[i].ffn.w13) and blk.ffn.offload is off.layers[i]
    views = {le.view13.untyped_storage().data_ptr() for le in off.layers}
    assert len(views) == 1                                           # one group buffer, viewed by every layer
    assert off.layers[0].view13.untyped_storage().nbytes() == p.cache_rows * p.expert_bytes * 2 // 3


def test_random_init_of_an_offloaded_model_equals_init_random(tiny):
    args = tiny[0].args
    a = init_random_offloaded(empty_offloaded_model(args, "cpu", torch.float32, OffloadConfig(resident_experts=4)),
                              std=0.05, seed=3)
    b = empty_model(args, "cpu", torch.float32).init_random(std=0.05, seed=3)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_gpu_memory_derives_the_most_resident_experts_that_fit(tiny):
    args = tiny[0].args
    small = plan_offload(args, torch.float32, OffloadConfig(resident_experts=2))
    budget = small.device_bytes + 3 * 4 * small.expert_bytes + 100           # room for 3 more per layer, less staging
    p = plan_offload(args, torch.float32, OffloadConfig(gpu_memory_gb=budget / 2**30))
    nxt = plan_offload(args, torch.float32, OffloadConfig(resident_experts=p.resident + 1))
    assert p.device_bytes <= budget < nxt.device_bytes and p.resident >= 2
    r = plan_offload(args, torch.float32, OffloadConfig(gpu_memory_gb=budget / 2**30), reserve_bytes=small.expert_bytes * 8)
    assert r.resident < p.resident                                   # KV caches / drafts reserve room


def test_groups_keep_every_view_within_the_kernel_limit():
    args = ModelArgs.from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                     "intermediate_size": 64, "moe_intermediate_size": 64, "num_hidden_layers": 48,
                                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                     "num_experts": 128, "num_experts_per_tok": 8})
    for N in (8, 13, 32, 64, 128):
        p = plan_offload(args, torch.bfloat16, OffloadConfig(resident_experts=N))
        assert p.layers_per_group * p.resident + p.staging <= 512
        assert p.groups * p.layers_per_group >= 48 and (p.groups - 1) * p.layers_per_group < 48


# ---- bad input: named, before anything is allocated -------------------------------------------------------------------

BAD = [(dict(resident_experts=1), "resident_experts.*< top_k = 2"),
       (dict(resident_experts=9), "resident_experts.*> the 8 experts"),
       (dict(gpu_memory_gb=1e-4), "gpu_memory_gb.*cannot hold the non-expert weights"),
       (dict(gpu_memory_gb=2.2e-3), "gpu_memory_gb.*fewer than top_k = 2"),
       (dict(), "exactly one of resident_experts"),
       (dict(resident_experts=3, gpu_memory_gb=1.0), "exactly one of resident_experts"),
       (dict(resident_experts=3, eviction="fifo"), "eviction 'fifo'"),
       (dict(resident_experts=3, prefetch="oracle"), "prefetch 'oracle'"),
       (dict(resident_experts=3, copy="dma"), "copy 'dma'"),
       (dict(resident_experts=3, residency_margin=-1.0), "residency_margin"),
       (dict(gpu_memory_gb=-2.0), "gpu_memory_gb.*positive")]


@pytest.mark.bad_input(1)
@pytest.mark.parametrize("kw,match", BAD, ids=[m.split(".")[0].split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_offload_config_is_named_before_allocation(kw, match, monkeypatch):
    from specmoe_ext.models import offload as offload_mod

    def no_alloc(*a, **k):
        raise AssertionError("allocated before the check")
    monkeypatch.setattr(offload_mod, "empty_offloaded_model", no_alloc)
    with pytest.raises(OffloadError, match=match):
        load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(**kw))


@pytest.mark.bad_input(2)
def test_bad_offload_targets(tiny):
    with pytest.raises(OffloadError, match="needs an MoE model"):
        load_model(TINY_DIR / "draft", "cpu", offload=OffloadConfig(resident_experts=2))
    with pytest.raises(ValueError, match="offloaded with 3 resident.*use 'self' or 'self:3'"):
        SelfDrafter(offloaded(resident_experts=3), 4)


CLI_BAD = [(["--offload-experts", "--resident-experts", "1"], "--resident-experts.*< top_k"),
           (["--offload-experts", "--resident-experts", "12"], "--resident-experts.*> the 8 experts"),
           (["--offload-experts", "--gpu-memory", "0.0001"], "--gpu-memory.*non-expert weights"),
           (["--offload-experts"], "--resident-experts N.*--gpu-memory GB"),
           (["--resident-experts", "3"], "--resident-experts apply to expert offloading: add --offload-experts"),
           (["--offload-experts", "--resident-experts", "3", "--residency-aware-budget"], "add --budget"),
           (["--offload-experts", "--resident-experts", "3", "--draft", "self:5"], "offloaded with 3 resident")]


@pytest.mark.bad_input(1)
@pytest.mark.parametrize("argv,match", CLI_BAD, ids=[f"cli{i}" for i in range(len(CLI_BAD))])
def test_cli_bad_offload_flags(argv, match, monkeypatch):
    from specmoe_ext import cli
    from specmoe_ext.models import offload as offload_mod

    def no_alloc(*a, **k):
        raise AssertionError("allocated before the check")
    monkeypatch.setattr(offload_mod, "init_random_offloaded", no_alloc)
    monkeypatch.setattr(cli, "_load_target", no_alloc)
    with pytest.raises(SystemExit, match=match):
        cli.main(["generate", "--no-progress", *argv])


def test_cli_generate_json_reports_offload(capsys, tiny):
    import json
    from specmoe_ext import cli
    argv = ["generate", "--no-progress", "--json", "--max-new-tokens", "12", "--draft", "model", "--budget", "4"]
    assert cli.main(argv + ["--offload-experts", "--resident-experts", "3", "--residency-aware-budget", "0.1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert cli.main(argv) == 0
    ref = json.loads(capsys.readouterr().out)
    off = doc["offload"]
    st = off["steps"]
    assert off["config"]["resident_experts"] == 3 and off["config"]["copy"] == "index"
    assert len(st["hits_per_layer"]) == 4 and st["bytes_per_token"] > 0 and st["fetch_s"] > 0
    assert st["bytes_moved"] == (sum(st["misses_per_layer"]) + sum(st["prefetched_per_layer"])) * off["config"]["expert_bytes"]
    assert max(st["max_fetched_per_forward"]) <= 4 and "residency_aware_budget" in st
    assert doc["outputs"][0]["tokens"][:2] == ref["outputs"][0]["tokens"][:2]   # lossy budget: same start
    assert cli.main(["generate", "--no-progress", "--json", "--max-new-tokens", "10", "--offload-experts",
                     "--gpu-memory", "0.02"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["offload"]["config"]["resident_experts"] == 8
    assert plain["outputs"][0]["tokens"] == ar(tiny[0], [load_tokenizer(TINY_DIR / "target").encode("Return a new")],
                                               10).tokens[0]


# ---- GPU: fetching steps replayed from CUDA graphs ---------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("kind", [None, "self", "model"])
def test_gpu_offloaded_graphs_equal_resident(tiny, prompts, kind):
    ref_model = load_model(TINY_DIR / "target", "cuda")
    target = offloaded("cuda", resident_experts=3)
    off = expert_offload(target)
    assert off.backend == "triton" and off.capturable
    draft = load_model(TINY_DIR / "draft", "cuda")

    def eng(t):
        d = None if kind is None else (SelfDrafter(t) if kind == "self" else ModelDrafter(draft, t))
        return SpecEngine(t, d, "chain:3")
    ref = SpecEngine(ref_model, None).generate(prompts, 24).tokens
    e = eng(target)
    e.generate(prompts, 24)                                           # warm-up and capture
    off.reset_stats()
    res = e.generate(prompts, 24)
    assert res.cuda_graph and sum(s.replayed for s in res.steps) >= len(res.steps) - 2
    st = off.report(steps=len(res.steps))["steps"]
    assert sum(st["misses_per_layer"]) > 0 and sum(st["hits_per_layer"]) > 0
    if kind is None:
        assert res.tokens == ref
    else:                                                             # greedy speculative == its own AR (bf16)
        assert res.tokens == generate(target, prompts, 24).tokens


@gpu
@pytest.mark.parametrize("kind", [None, "self"])
def test_gpu_offloaded_loop_never_synchronizes(prompts, kind):
    """Fetching steps replayed from graphs: the whole loop runs under set_sync_debug_mode("error")."""
    target = offloaded("cuda", resident_experts=3)
    eng = SpecEngine(target, None if kind is None else SelfDrafter(target), "chain:3")
    off = expert_offload(target)

    def empty_cache():      # both runs start from the same (empty) residency: the self drafter drafts from
        for le in off.layers:   # it, so a warm cache would change acceptance and with it the steps' keys
            le.reset()
    empty_cache()
    first = eng.generate(prompts, 24)
    empty_cache()
    with loop_without_syncs():
        second = eng.generate(prompts, 24)
    assert second.tokens == first.tokens and all(s.replayed for s in second.steps)

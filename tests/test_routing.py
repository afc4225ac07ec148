"""specmoe::route_topk / route_budget against reference.py, plus ties, NaN, errors, compile, graphs.

Shape legend: T tokens, E experts, K experts per token, B budget.
"""
import itertools

import pytest
import torch

from specmoe_ext import ops, reference
from conftest import devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(T, E, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 2).to(dtype).to(device)


def assert_routing_equal(got, ref, check_weights_exact=False):
    """ids and grouping exactly, weights to float32 rounding (both sides compute in float32)."""
    got = [t.cpu() for t in got]
    names = ["weights", "ids", "kept_experts", "expert_counts", "expert_offsets", "sorted_pairs"]
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
        if name == "weights" and not check_weights_exact:
            torch.testing.assert_close(g, r, rtol=2e-6, atol=2e-6, msg=lambda m: f"weights: {m}")
        else:
            assert torch.equal(g, r), f"{name} differs:\n{g}\nvs reference\n{r}"


def assert_grouping_consistent(r, T, K):
    """The grouping is a stable partition of the valid (token, slot) pairs by kept expert."""
    ids = r.ids.cpu().flatten()
    kept, counts, offs, pairs = (t.cpu() for t in r[2:])
    n = int(offs[-1])
    assert n == int((ids >= 0).sum())
    assert torch.equal(offs[1:] - offs[:-1], counts)
    for j, e in enumerate(kept.tolist()):
        seg = pairs[offs[j]:offs[j + 1]]
        assert torch.all(ids[seg.long()] == e)
        assert torch.all(seg[1:] > seg[:-1])
    assert torch.all(pairs[n:] == -1)


CASES = list(itertools.product([1, 7, 64, 123, 511], [8, 60, 64, 128, 256]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T,E", CASES)
def test_route_budget_matches_reference(device, T, E):
    """Every K in {1,2,4,6,8}, B in {K,16,E} and dtype; scoring/policy/options cycle across cases."""
    variants = itertools.cycle([
        dict(scoring="softmax", renormalize=True, policy="substitute"),
        dict(scoring="sigmoid", renormalize=False, policy="truncate"),
        dict(scoring="softmax", renormalize=False, policy="truncate", weighted=True),
        dict(scoring="sigmoid", renormalize=True, policy="substitute", bias=True, protect=True),
    ])
    seed = 1000 * T + E
    for K, B, dtype in itertools.product([1, 2, 4, 6, 8], [None, 16, E], DTYPES):
        if K > E:
            continue
        B = K if B is None else max(B, K)
        v = dict(next(variants))
        seed += 1
        g = torch.Generator().manual_seed(seed)
        logits = make_logits(T, E, dtype, device, seed)
        kw = dict(scoring=v["scoring"], renormalize=v["renormalize"], policy=v["policy"])
        if v.get("bias"):
            kw["bias"] = (torch.randn(E, generator=g) * 0.1).to(device)
        if v.get("weighted"):
            kw["token_weights"] = torch.rand(T, generator=g).to(device)
        if v.get("protect"):
            kw["protect"] = (torch.arange(T) == 0).to(device)
        got = ops.route_budget(logits, K, B, **kw)
        ref = reference.route_budget(logits, K, B, **kw)
        assert_routing_equal(got, ref)
        assert_grouping_consistent(got, T, K)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_topk_matches_reference_and_unbudgeted_budget(device, scoring, dtype):
    for T, E, K in [(1, 8, 2), (7, 60, 4), (99, 128, 8), (123, 256, 6), (77, 512, 16), (5, 3, 3)]:
        logits = make_logits(T, E, dtype, device, T * E)
        w, ids = ops.route_topk(logits, K, scoring=scoring)
        rw, rids = reference.route_topk(logits, K, scoring=scoring)
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=2e-6)
        # B >= E reproduces plain routing exactly, and the grouping covers every pair.
        for B in (E, E + 5):
            r = ops.route_budget(logits, K, B, scoring=scoring)
            assert torch.equal(r.ids, ids) and torch.equal(r.weights, w)
            assert r.kept_experts.tolist() == list(range(E))
            assert_grouping_consistent(r, T, K)


@pytest.mark.parametrize("device", devices())
def test_ties_go_to_the_lower_expert_id(device):
    T, E, K = 5, 16, 4
    logits = torch.zeros(T, E, device=device)
    w, ids = ops.route_topk(logits, K)
    assert ids.cpu().tolist() == [[0, 1, 2, 3]] * T
    torch.testing.assert_close(w.cpu(), torch.full((T, K), 0.25))
    logits[:, 5] = -0.0  # -0 ties with +0
    logits[:, 9] = 1.0
    assert ops.route_topk(logits, K)[1].cpu().tolist() == [[9, 0, 1, 2]] * T
    # Equal expert scores: the budget keeps the lowest ids (after the strictly better expert 9).
    r = ops.route_budget(logits, K, 6)
    assert r.kept_experts.cpu().tolist() == [0, 1, 2, 3, 4, 9]
    assert r.ids.cpu().tolist() == [[9, 0, 1, 2]] * T


@pytest.mark.parametrize("device", devices())
def test_budget_bounds_experts_and_protects_the_root(device):
    T, E, K, B = 32, 64, 8, 12
    logits = make_logits(T, E, torch.float32, device, 7)
    # The root token (0) prefers experts nobody else likes: without protection they would be dropped.
    logits[0] = -10.0
    logits[0, 56:] = 10.0
    logits[1:, 56:] = -10.0
    r = ops.route_budget(logits, K, B)
    assert r.kept_experts.numel() == B and r.ids.unique().numel() <= B
    assert not set(range(56, 64)) <= set(r.kept_experts.tolist())
    protect = torch.zeros(T, dtype=torch.bool, device=device)
    protect[0] = True
    rp = ops.route_budget(logits, K, B, protect=protect)
    assert set(range(56, 64)) <= set(rp.kept_experts.tolist())
    assert rp.ids[0].cpu().tolist() == list(range(56, 64))
    for policy in ("substitute", "truncate"):
        assert_routing_equal(ops.route_budget(logits, K, B, protect=protect, policy=policy),
                             reference.route_budget(logits, K, B, protect=protect, policy=policy))


@pytest.mark.parametrize("device", devices())
def test_truncation_drops_slots_and_renormalizes(device):
    T, E, K, B = 50, 32, 4, 6
    logits = make_logits(T, E, torch.float32, device, 3)
    r = ops.route_budget(logits, K, B, policy="truncate")
    ids, w = r.ids.cpu(), r.weights.cpu()
    assert (ids == -1).any(), "a budget of 6 of 32 experts must drop some natural slots"
    assert torch.all(w[ids == -1] == 0)
    alive = (ids >= 0).any(1)
    torch.testing.assert_close(w.sum(1)[alive], torch.ones(int(alive.sum())))
    assert torch.all(w.sum(1)[~alive] == 0)
    nat = ops.route_topk(logits, K)[1].cpu()
    assert torch.equal(torch.where(ids >= 0, nat, -1), ids), "truncation never re-picks"
    assert int(r.expert_offsets[-1]) == int((ids >= 0).sum())


@pytest.mark.parametrize("device", devices())
def test_nan_logits_count_as_minus_infinity(device):
    T, E, K = 4, 16, 3
    logits = make_logits(T, E, torch.float32, device, 11)
    logits[0, :] = float("nan")          # all NaN: zero weights, lowest ids, no NaN anywhere
    nan_pos = int(logits[1].argmax())
    logits[1, nan_pos] = float("nan")  # the best expert becomes the worst
    r = ops.route_budget(logits, K, 8)
    ref = reference.route_budget(logits, K, 8)
    assert_routing_equal(r, ref)
    assert torch.isfinite(r.weights).all()
    assert torch.all(r.weights[0] == 0)
    assert nan_pos not in ops.route_topk(logits, K)[1][1].tolist()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.route_budget(logits, K, 8, check_finite=True)


@pytest.mark.parametrize("device", devices())
def test_bias_steers_selection_not_weights(device):
    T, E, K = 9, 32, 4
    logits = make_logits(T, E, torch.float32, device, 5)
    bias = torch.zeros(E, device=device)
    bias[31] = 10.0
    w, ids = ops.route_topk(logits, K, scoring="sigmoid", bias=bias, renormalize=False)
    assert torch.all(ids[:, 0] == 31)
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 31]))


BAD = [
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=9), "top_k must be in"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=0), "top_k must be in"),
    (lambda d: dict(logits=torch.randn(4, 600, device=d), top_k=2), "number of experts"),
    (lambda d: dict(logits=torch.randn(4, 64, device=d), top_k=17), "top_k must be in"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=4, budget=3), "budget must be >= top_k"),
    (lambda d: dict(logits=torch.randn(8, device=d), top_k=2), "logits must be 2-D"),
    (lambda d: dict(logits=torch.randn(2, 4, 8, device=d), top_k=2), "logits must be 2-D"),
    (lambda d: dict(logits=torch.randint(0, 5, (4, 8), device=d), top_k=2), "logits must be float32"),
    (lambda d: dict(logits=torch.randn(8, 4, device=d).t(), top_k=2), "logits must be contiguous"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2, bias=torch.randn(7, device=d)),
     "bias must have shape"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2,
                    bias=torch.randn(8, device=d, dtype=torch.float64)), "bias must be Float"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2,
                    token_weights=torch.rand(5, device=d)), "token_weights must have shape"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2,
                    protect=torch.ones(4, device=d)), "protect must be Bool"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2, scoring="relu"), "scoring must be"),
    (lambda d: dict(logits=torch.randn(4, 8, device=d), top_k=2, policy="drop"), "policy must be"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_clear_error(device, case):
    make, message = BAD[case]
    kw = make(device)
    budget = kw.pop("budget", kw["top_k"])
    with pytest.raises(RuntimeError, match=message):
        ops.route_budget(kw.pop("logits"), kw.pop("top_k"), budget, **kw)


@pytest.mark.gpu
def test_mixed_devices_raise():
    logits = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="bias is on cpu but logits is on cuda"):
        ops.route_budget(logits, 2, 4, bias=torch.zeros(8))
    with pytest.raises(RuntimeError, match="protect is on cpu"):
        ops.route_budget(logits, 2, 4, protect=torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    logits = make_logits(13, 60, torch.bfloat16, device, 0)
    tw = torch.rand(13, device=device)
    protect = torch.zeros(13, dtype=torch.bool, device=device)
    protect[0] = True
    torch.library.opcheck(torch.ops.specmoe.route_topk.default, (logits, 4, "sigmoid", None, True))
    torch.library.opcheck(torch.ops.specmoe.route_budget.default,
                          (logits, 4, 16, "softmax", None, True, tw, protect, "truncate"))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(7, 32, device=device)
    w_gate = torch.randn(64, 32, device=device)

    def route(x):
        r = ops.route_budget(x @ w_gate.t(), 4, 16)
        return r.weights * 2, r.ids, r.sorted_pairs

    compiled = torch.compile(route, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    for got, want in zip(compiled(x), route(x)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 511, 513, 1000, 4096])
def test_cuda_matches_cpu_bitwise_ids_and_is_deterministic(T):
    """Covers the fused (T <= 512) and multi-block paths against the CPU op and the reference."""
    for E, K, B, policy in [(128, 8, 32, "substitute"), (60, 4, 16, "truncate"), (512, 16, 512, "substitute")]:
        logits = make_logits(T, E, torch.bfloat16, "cuda", T + E)
        protect = torch.zeros(T, dtype=torch.bool)
        protect[0] = True
        kw = dict(policy=policy, protect=protect)
        a = ops.route_budget(logits, K, B, **{**kw, "protect": protect.cuda()})
        b = ops.route_budget(logits, K, B, **{**kw, "protect": protect.cuda()})
        for x, y in zip(a, b):
            assert torch.equal(x, y), "run-to-run results differ"
        assert_routing_equal(a, reference.route_budget(logits, K, B, **kw))
        assert_grouping_consistent(a, T, K)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    T, E, K, B = 64, 128, 8, 32
    static_logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    tw = torch.rand(T, device="cuda")
    ops.route_budget(static_logits, K, B, token_weights=tw)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.route_budget(static_logits, K, B, token_weights=tw)
    for seed in range(3):
        fresh = make_logits(T, E, torch.bfloat16, "cuda", 100 + seed)
        static_logits.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_routing_equal(out, reference.route_budget(fresh, K, B, token_weights=tw))


def test_cuda_tensor_on_cpu_build_says_how_to_rebuild():
    import specmoe_ext
    if specmoe_ext.cuda_kernels_available() or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device with a CPU-only build")
    with pytest.raises(RuntimeError, match="Rebuild"):
        ops.route_topk(torch.randn(2, 8, device="cuda"), 2)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    logits = torch.randn(0, 16, device=device)
    r = ops.route_budget(logits, 2, 4)
    assert_routing_equal(r, reference.route_budget(logits, 2, 4))
    assert r.expert_offsets.cpu().tolist() == [0] * 5

"""specmoe::route_topk / route_budget against reference.py, plus ties, the value rules (NaN / Inf logits,
NaN bias, NaN / negative / Inf token weights, protection beyond the budget), errors on every backend
(meta included), compile, graphs.

Shape legend: T tokens, E experts, K experts per token, B budget.
"""
import itertools

import pytest
import torch

from specmoe_ext import ops, reference
from conftest import devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_MAX = torch.finfo(torch.float32).max
INF, NAN = float("inf"), float("nan")


def make_logits(T, E, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 2).to(dtype).to(device)


def assert_routing_equal(got, ref, check_weights_exact=False):
    """ids and grouping exactly, weights to float32 rounding (both sides compute in float32)."""
    got, ref = [t.cpu() for t in got], [t.cpu() for t in ref]
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


@pytest.mark.bad_input(2)  # an all-NaN row; a NaN at a row's best expert
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


def assert_budget_matches_reference(device, logits, K, B, **kw):
    got = ops.route_budget(logits, K, B, **kw)
    assert_routing_equal(got, reference.route_budget(logits, K, B, **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                                       for k, v in kw.items()}))
    assert torch.isfinite(got.weights).all()
    return got


@pytest.mark.bad_input(5)  # one +Inf logit, two, a whole row, +Inf under sigmoid, an +Inf expert under a budget
@pytest.mark.parametrize("device", devices())
def test_inf_logits_count_as_the_largest_float(device):
    """+Inf counts as the largest finite float: a softmax row's +Inf experts share its probability (before:
    inf - inf = NaN gave the token zero weights, no expert output, and dropped the expert under a budget)."""
    T, E, K = 6, 16, 3
    logits = make_logits(T, E, torch.float32, device, 21)
    logits[0, 5] = INF                      # one: weight 1 (renormalized or not)
    logits[1, [2, 9]] = INF                 # two: 1/2 each, lower id first
    logits[2, :] = INF                      # all: 1/E each, the lowest ids
    for renormalize in (True, False):
        w, ids = ops.route_topk(logits, K, renormalize=renormalize)
        rw, rids = reference.route_topk(logits, K, renormalize=renormalize)
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=2e-6)
        assert ids[0, 0] == 5 and w[0, 0] == 1.0 and torch.all(w[0, 1:] == 0)
        assert ids[1, :2].tolist() == [2, 9] and w[1, :2].tolist() == [0.5, 0.5]
        assert ids[2].tolist() == [0, 1, 2]
        torch.testing.assert_close(w[2].cpu(), torch.full((K,), 1 / K if renormalize else 1 / E))
    w, ids = ops.route_topk(logits, K, scoring="sigmoid", renormalize=False)
    assert ids[0, 0] == 5 and w[0, 0] == 1.0
    # Under a budget: tokens 0-4 share experts 0-3 (score ~1.25 each), token 5 alone has expert 15 at +Inf
    # (score 1, every other expert ~0): the budget of 5 keeps it and token 5 gets weight 1 there.
    logits = torch.zeros(T, E, device=device)
    logits[:5, :4] = 10.0
    logits[5, 15] = INF
    r = assert_budget_matches_reference(device, logits, 2, 5, policy="truncate")
    assert r.kept_experts.tolist() == [0, 1, 2, 3, 15]
    assert r.ids[5].tolist() == [15, 0] and r.weights[5].tolist() == [1.0, 0.0]


@pytest.mark.bad_input(2)  # a NaN bias entry (never chosen), with and without a budget
@pytest.mark.parametrize("device", devices())
def test_nan_bias_counts_as_minus_infinity(device):
    """A NaN bias makes that expert's selection key -inf (before: CPU sorted NaN keys arbitrarily and the
    reference first)."""
    T, E, K = 9, 32, 4
    logits = make_logits(T, E, torch.float32, device, 23)
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.1).to(device)
    best = int(reference.route_topk(logits, 1, bias=bias)[1][0, 0])
    bias[best] = NAN
    w, ids = ops.route_topk(logits, K, bias=bias)
    rw, rids = reference.route_topk(logits, K, bias=bias)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=2e-6)
    assert best not in ids.tolist()
    assert_budget_matches_reference(device, logits, K, 8, bias=bias)


@pytest.mark.bad_input(3)  # a NaN token weight, a negative one, an +Inf one
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_token_weights_count_as_clamped(device, policy):
    """A token weight counts as max(w, 0) with NaN as 0 and +Inf as the largest float (before: a NaN weight
    made every expert score NaN, a negative one kept the least likely experts)."""
    T, E, K, B = 24, 32, 2, 6
    logits = make_logits(T, E, torch.float32, device, 25)
    good = torch.rand(T, generator=torch.Generator().manual_seed(2)).to(device)
    for bad_value, counts_as in [(NAN, 0.0), (-3.0, 0.0), (INF, FLOAT_MAX)]:
        tw, clean = good.clone(), good.clone()
        tw[[1, 7]] = bad_value
        clean[[1, 7]] = counts_as
        got = assert_budget_matches_reference(device, logits, K, B, token_weights=tw, policy=policy)
        assert_routing_equal(got, ops.route_budget(logits, K, B, token_weights=clean, policy=policy),
                             check_weights_exact=True)
    # a negative weight does not vote: the same as leaving the token out of the scores
    tw = good.clone()
    tw[0] = -100.0
    zero = good.clone()
    zero[0] = 0.0
    assert torch.equal(ops.route_budget(logits, K, B, token_weights=tw).kept_experts,
                       ops.route_budget(logits, K, B, token_weights=zero).kept_experts)


@pytest.mark.bad_input(2)  # protected experts beyond the budget, under both policies
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_protection_beyond_the_budget_keeps_the_best_protected(device, policy):
    """The protected tokens' natural experts number more than Bk: the Bk best of them by score are kept
    (ties to the lower id) and the protected tokens are routed like the others (the documented rule, the
    same on CPU, CUDA and in the reference)."""
    T, E, K, B = 8, 32, 4, 6
    logits = make_logits(T, E, torch.float32, device, 27)
    protect = torch.zeros(T, dtype=torch.bool, device=device)
    protect[:3] = True                                      # 3 tokens x 4 natural experts > 6
    natural = ops.route_topk(logits, K)[1][:3].cpu()
    protected = natural.unique()
    assert protected.numel() > B
    r = assert_budget_matches_reference(device, logits, K, B, protect=protect, policy=policy)
    score = reference.expert_scores(reference.router_probs(logits.cpu(), "softmax"), None)
    order = sorted(protected.tolist(), key=lambda e: (-float(score[e]), e))
    assert r.kept_experts.cpu().tolist() == sorted(order[:B])
    # within the budget protection holds exactly: one protected token keeps its natural experts
    one = torch.zeros_like(protect)
    one[2] = True
    r1 = ops.route_budget(logits, K, B, protect=one, policy=policy)
    assert r1.ids[2].cpu().tolist() == natural[2].tolist()


@pytest.mark.bad_input(4)  # NaN logits, +Inf logits, a NaN bias, a negative token weight
def test_check_finite_refuses_what_the_rules_would_clean():
    logits = make_logits(4, 8, torch.float32, "cpu", 29)
    ops.route_budget(logits, 2, 4, bias=torch.zeros(8), token_weights=torch.rand(4), check_finite=True)
    for kw, message in [(dict(logits=logits.clone().index_fill_(1, torch.tensor([3]), NAN)), "logits contain"),
                        (dict(logits=logits.clone().index_fill_(1, torch.tensor([3]), INF)), "logits contain"),
                        (dict(bias=torch.tensor([0.0] * 7 + [NAN])), "bias contains"),
                        (dict(token_weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), "token_weights contain")]:
        kw = {"logits": logits, **kw}
        with pytest.raises(ValueError, match=message):
            ops.route_budget(kw.pop("logits"), 2, 4, check_finite=True, **kw)


@pytest.mark.bad_input(5)  # +Inf / NaN logits, NaN bias, NaN / negative / +Inf token weights, protection overflow
@pytest.mark.gpu
@pytest.mark.parametrize("T", [7, 100, 300])   # fused single-block path (T <= 128) and the multi-block path
def test_cuda_value_rules_equal_cpu(T):
    """The CUDA kernels' value rules (routing.h clean_logit / clean_key / clean_token_weight) against the CPU op."""
    E, K, B = 64, 4, 12
    g = torch.Generator().manual_seed(T)
    logits = make_logits(T, E, torch.bfloat16, "cpu", T)
    logits[0, 3] = INF
    logits[1, [4, 40]] = INF
    logits[2, :] = INF
    logits[3, 5] = NAN
    bias = torch.randn(E, generator=g) * 0.1
    bias[7] = NAN
    tw = torch.rand(T, generator=g)
    tw[[0, 4]] = NAN
    tw[5] = -2.0
    tw[6] = INF
    protect = torch.zeros(T, dtype=torch.bool)
    protect[:4] = True                                      # 15 distinct natural experts > B = 12
    for kw in [dict(), dict(bias=bias), dict(token_weights=tw, protect=protect),
               dict(bias=bias, token_weights=tw, protect=protect, policy="truncate")]:
        w_c, i_c = ops.route_topk(logits, K, bias=kw.get("bias"))
        w_g, i_g = ops.route_topk(logits.cuda(), K, bias=kw["bias"].cuda() if "bias" in kw else None)
        assert torch.equal(i_g.cpu(), i_c)
        torch.testing.assert_close(w_g.cpu(), w_c, rtol=2e-6, atol=2e-6)
        cpu = ops.route_budget(logits, K, B, **kw)
        gpu = ops.route_budget(logits.cuda(), K, B, **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert_routing_equal(gpu, cpu)
        assert torch.isfinite(gpu.weights).all()


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


@pytest.mark.bad_input
@pytest.mark.parametrize("device", devices() + ["meta"])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_clear_error(device, case):
    """The same error on every backend: the meta (fake) kernel runs the very checks of the CPU / CUDA ones."""
    make, message = BAD[case]
    kw = make(device)
    budget = kw.pop("budget", kw["top_k"])
    with pytest.raises(RuntimeError, match=message):
        ops.route_budget(kw.pop("logits"), kw.pop("top_k"), budget, **kw)


MIXED = [  # (argument on the odd device, the message); the others on the base device
    ("bias", lambda d: dict(bias=torch.zeros(8, device=d)), "bias is on {odd} but logits is on {base}"),
    ("token_weights", lambda d: dict(token_weights=torch.ones(4, device=d)),
     "token_weights is on {odd} but logits is on {base}"),
    ("protect", lambda d: dict(protect=torch.zeros(4, dtype=torch.bool, device=d)),
     "protect is on {odd} but logits is on {base}"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("op,case", [("route_topk", 0)] + [("route_budget", c) for c in range(len(MIXED))])
@pytest.mark.parametrize("base,odd", [("cpu", "meta"), ("meta", "cpu")])
def test_meta_mixed_with_cpu_raises(op, case, base, odd):
    """One argument on meta, the rest on the CPU (or the reverse): the dispatcher sends the call to the meta
    kernel, whose device checks refuse it (before: route_topk with bias on meta returned uninitialised ids)."""
    name, make, message = MIXED[case]
    logits = torch.randn(4, 8, device=base)
    with pytest.raises(RuntimeError, match=message.format(odd=odd, base=base)):
        if op == "route_topk":
            ops.route_topk(logits, 2, **make(odd))
        else:
            ops.route_budget(logits, 2, 4, **make(odd))


def test_meta_kernels_give_the_real_output_metadata():
    """Meta tensors in, meta tensors of the CPU op's shapes and dtypes out (no Python fake kernels)."""
    logits = make_logits(13, 60, torch.bfloat16, "cpu", 0)
    for real, meta in [(ops.route_topk(logits, 4), ops.route_topk(logits.to("meta"), 4)),
                       (ops.route_budget(logits, 4, 16), ops.route_budget(logits.to("meta"), 4, 16))]:
        for r, m in zip(real, meta):
            assert m.is_meta and m.shape == r.shape and m.dtype == r.dtype
    assert torch._library.simple_registry.singleton.find("specmoe::route_budget").fake_impl.kernel is None


@pytest.mark.bad_input(2)
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

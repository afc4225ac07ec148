"""Grouped top-K routing (DeepSeek-V2/V3, GLM-4.5) and the weight scale (routed_scaling_factor) of
specmoe::route_topk / route_budget: CPU (and CUDA, marked gpu) against reference.py, against the
transformers routers themselves, the rules under a budget, the value rules of group scores, bad input on
every backend (meta included), opcheck.

Shape legend: T tokens, E experts, K experts per token, B budget, G expert groups (n_group), TG groups a
token may use (topk_group).
"""
import itertools

import pytest
import torch

from specmoe_ext import ops, reference
from conftest import devices
from test_routing import assert_grouping_consistent, assert_routing_equal, make_logits

INF, NAN = float("inf"), float("nan")


def _bias(E, seed, scale=0.3):
    return torch.randn(E, generator=torch.Generator().manual_seed(seed)) * scale


def _on(device, kw):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}


# (T, E, K, G, TG): fused-path and multi-block token counts, group sizes 2 .. 64, V3's 256 / 8 / 4
CASES = [(1, 16, 2, 4, 2), (7, 64, 6, 8, 3), (33, 160, 6, 8, 3), (64, 256, 8, 8, 4), (130, 256, 8, 8, 4),
         (200, 128, 4, 32, 4), (9, 512, 16, 8, 2), (150, 64, 8, 2, 1)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T,E,K,G,TG", CASES)
def test_grouped_routing_matches_reference(device, T, E, K, G, TG):
    """Plain and budgeted routing (both policies, protected root, token weights) under grouping: ids and
    grouping exactly, weights to float32 rounding, for both group scorings and with / without a bias."""
    variants = [dict(scoring="sigmoid", bias=_bias(E, T), group_scoring="top2", renormalize=True, scale=2.5),
                dict(scoring="softmax", bias=None, group_scoring="max", renormalize=False, scale=16.0),
                dict(scoring="sigmoid", bias=None, group_scoring="top2", renormalize=False, scale=1.0),
                dict(scoring="softmax", bias=_bias(E, T + 1), group_scoring="max", renormalize=True, scale=0.5)]
    for i, kw in enumerate(variants):
        dtype = [torch.float32, torch.bfloat16, torch.float16][(i + T) % 3]
        logits = make_logits(T, E, dtype, device, seed=T * 7 + i)
        kw = dict(kw, n_group=G, topk_group=TG)
        w, ids = ops.route_topk(logits, K, **_on(device, kw))
        wr, ir = reference.route_topk(logits, K, **kw)
        assert torch.equal(ids.cpu(), ir), (i, ids, ir)
        torch.testing.assert_close(w.cpu(), wr, rtol=2e-6, atol=2e-6)
        protect = torch.zeros(T, dtype=torch.bool)
        protect[0] = True
        tw = torch.rand(T, generator=torch.Generator().manual_seed(i))
        for B, policy in ((K, "substitute"), (max(K, E // 4), "substitute"), (max(K, E // 3), "truncate"),
                          (E, "truncate")):
            extra = dict(protect=protect, token_weights=tw) if i % 2 else {}
            r = ops.route_budget(logits, K, B, policy=policy, **_on(device, dict(kw, **extra)))
            rr = reference.route_budget(logits, K, B, policy=policy, **kw, **extra)
            assert_routing_equal(r, rr)
            assert_grouping_consistent(r, T, K)


def _hf_router(family, E, K, G, TG, scale, norm, bias=None):
    """transformers' router module for the family, with its gate weight left for the caller to set."""
    import transformers as tf
    if family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG,
                                  routed_scaling_factor=scale, norm_topk_prob=norm, hidden_size=32)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as R
    elif family == "glm4_moe":
        cfg = tf.Glm4MoeConfig(n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG,
                               routed_scaling_factor=scale, norm_topk_prob=norm, hidden_size=32)
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as R
    else:
        cfg = tf.DeepseekV2Config(n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG,
                                  routed_scaling_factor=scale, topk_method="group_limited_greedy", hidden_size=32)
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as R
    r = R(cfg)
    if bias is not None:
        r.e_score_correction_bias.copy_(bias)
    return r


@pytest.mark.parametrize("family,E,K,G,TG,scale,norm", [
    ("deepseek_v3", 64, 8, 8, 4, 2.5, True), ("deepseek_v3", 32, 4, 4, 1, 1.0, False),
    ("glm4_moe", 32, 4, 4, 2, 1.5, True), ("deepseek_v2", 64, 6, 8, 3, 16.0, False)])
def test_grouped_routing_equals_transformers_routers(family, E, K, G, TG, scale, norm):
    """Our op on the router logits (computed as HF does, in float32) picks the same expert set with the
    same weights as transformers' router module (which returns them unsorted)."""
    T, h = 40, 32
    g = torch.Generator().manual_seed(E + K)
    x = torch.randn(T, h, generator=g)
    bias = None if family == "deepseek_v2" else torch.randn(E, generator=g) * 0.2
    r = _hf_router(family, E, K, G, TG, scale, norm, bias)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, h, generator=g) * 0.5)
        logits, hw, hi = r(x)
    kw = dict(n_group=G, topk_group=TG, scale=scale)
    if family == "deepseek_v2":
        w, ids = ops.route_topk(logits, K, scoring="softmax", renormalize=False, group_scoring="max", **kw)
    else:
        w, ids = ops.route_topk(logits, K, scoring="sigmoid", bias=bias, renormalize=norm, group_scoring="top2", **kw)
    o_hf, o_us = torch.sort(hi, dim=1), torch.sort(ids.long(), dim=1)
    assert torch.equal(o_hf.values, o_us.values)
    torch.testing.assert_close(hw.gather(1, o_hf.indices), w.gather(1, o_us.indices), rtol=1e-6, atol=1e-7)
    assert (ids[:, 1:] != ids[:, :1]).all()                                # distinct experts per token


def test_groups_restrict_and_substitution_prefers_the_tokens_groups():
    """Natural experts lie in the token's TG best groups (by the group scores recomputed here); a budget
    keeping every natural expert leaves the routing unchanged; a token with fewer than K kept experts in
    its groups takes those first and fills the rest with the best other kept experts."""
    T, E, K, G, TG = 24, 32, 4, 8, 2
    logits = make_logits(T, E, torch.float32, "cpu", seed=5)
    bias = _bias(E, 3)
    kw = dict(scoring="sigmoid", bias=bias, n_group=G, topk_group=TG)
    _, ids = ops.route_topk(logits, K, **kw)
    gs = E // G
    top2 = torch.sort((torch.sigmoid(logits) + bias).view(T, G, gs), dim=-1, descending=True).values[..., :2].sum(-1)
    best_groups = torch.sort(top2, dim=1, descending=True, stable=True).indices[:, :TG]
    for t in range(T):
        assert set((ids[t] // gs).tolist()) <= set(best_groups[t].tolist())
    protect = torch.ones(T, dtype=torch.bool)                    # every natural expert kept
    r = ops.route_budget(logits, K, len(set(ids.flatten().tolist())), protect=protect, **kw)
    assert torch.equal(r.ids, ids)

    # token 0 (protected) wants experts 0, 1 (group 0); token 1's best group is group 1 (experts 4..7)
    lg = torch.full((2, 16), -5.0)
    lg[0, 0], lg[0, 1] = 3.0, 2.5
    lg[1, 4], lg[1, 5], lg[1, 1], lg[1, 0] = 3.0, 2.9, 1.0, 0.5
    kw = dict(scoring="sigmoid", n_group=4, topk_group=1)
    protect = torch.tensor([True, False])
    assert ops.route_topk(lg, 2, **kw)[1].tolist() == [[0, 1], [4, 5]]
    for B, want in ((2, [[0, 1], [1, 0]]),              # no kept expert in its group: the best kept ones
                    (3, [[0, 1], [4, 1]])):             # one kept in its group (4), then the best other (1)
        r = ops.route_budget(lg, 2, B, protect=protect, **kw)
        assert r.ids.tolist() == want, (B, r.ids.tolist())
        assert_routing_equal(r, reference.route_budget(lg, 2, B, protect=protect, **kw))
        assert_grouping_consistent(r, 2, 2)


def test_scale_multiplies_the_final_weights():
    logits = make_logits(20, 16, torch.float32, "cpu", seed=2)
    for renorm in (True, False):
        w1, i1 = ops.route_topk(logits, 3, scoring="sigmoid", renormalize=renorm)
        w2, i2 = ops.route_topk(logits, 3, scoring="sigmoid", renormalize=renorm, scale=2.5)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(w2, w1 * 2.5, rtol=1e-6, atol=0)
        r = ops.route_budget(logits, 3, 6, scoring="sigmoid", renormalize=renorm, scale=2.5)
        rr = ops.route_budget(logits, 3, 6, scoring="sigmoid", renormalize=renorm)
        torch.testing.assert_close(r.weights, rr.weights * 2.5, rtol=1e-6, atol=0)
    w, _ = ops.route_topk(logits, 3, scoring="sigmoid", scale=2.5)     # renormalized, then scaled
    torch.testing.assert_close(w.sum(1), torch.full((20,), 2.5), rtol=1e-6, atol=1e-6)


@pytest.mark.bad_input(3)  # a NaN bias entry, a group whose best two are +Inf and -Inf (NaN score), -Inf groups
@pytest.mark.parametrize("device", devices())
def test_group_score_value_rules(device):
    T, E, K, G, TG = 6, 16, 2, 4, 2
    logits = make_logits(T, E, torch.float32, "cpu", seed=9)
    for bias in (torch.tensor([NAN] + [0.0] * 15),
                 torch.tensor([INF, -INF, -INF, -INF] + [0.0] * 12),
                 torch.tensor([-INF] * 8 + [0.0] * 8)):
        kw = dict(scoring="sigmoid", bias=bias, n_group=G, topk_group=TG)
        w, ids = ops.route_topk(logits.to(device), K, **_on(device, kw))
        wr, ir = reference.route_topk(logits, K, **kw)
        assert torch.equal(ids.cpu(), ir) and torch.isfinite(w).all()
        torch.testing.assert_close(w.cpu(), wr, rtol=2e-6, atol=2e-6)
        r = ops.route_budget(logits.to(device), K, 4, **_on(device, kw))
        assert_routing_equal(r, reference.route_budget(logits, K, 4, **kw))
    # group 0's two best keys are +Inf and -Inf: the NaN score counts as -inf, so group 0 is never chosen
    bias = torch.tensor([INF, -INF, -INF, -INF] + [0.0] * 12)
    _, ids = ops.route_topk(logits.to(device), K, scoring="sigmoid", bias=bias.to(device), n_group=G, topk_group=TG)
    assert (ids.cpu() >= 4).all()


BAD = [  # (kwargs, message)
    (dict(n_group=3), "n_group .3. must divide"),
    (dict(n_group=64), r"n_group must be in \[1, 32\]"),
    (dict(n_group=0), r"n_group must be in \[1, 32\]"),
    (dict(n_group=4, topk_group=0), "topk_group must be in"),
    (dict(n_group=4, topk_group=5), "topk_group must be in"),
    (dict(n_group=8, topk_group=1), "hold fewer than top_k"),
    (dict(n_group=4, topk_group=2, group_scoring="mean"), "group_scoring must be 'top2' or 'max'"),
    (dict(n_group=16, topk_group=8), "needs groups of >= 2 experts"),
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale=-1.0), "scale must be a finite number > 0"),
    (dict(scale=INF), "scale must be a finite number > 0"),
    (dict(scale=NAN), "scale must be a finite number > 0"),
]


@pytest.mark.bad_input(len(BAD) * 2)
@pytest.mark.parametrize("device", devices() + ["meta"])
def test_bad_group_arguments_raise_clear_errors(device):
    logits = torch.randn(5, 16, device=device)
    for kw, msg in BAD:
        with pytest.raises(RuntimeError, match=msg):
            ops.route_topk(logits, 3, **kw)
        with pytest.raises(RuntimeError, match=msg):
            ops.route_budget(logits, 3, 4, **kw)


def test_meta_kernels_and_opcheck():
    m = torch.empty(7, 64, device="meta")
    r = ops.route_budget(m, 6, 16, scoring="sigmoid", n_group=8, topk_group=3, scale=2.0)
    assert r.weights.shape == (7, 6) and r.kept_experts.shape == (16,) and r.sorted_pairs.shape == (42,)
    logits = make_logits(11, 64, torch.float32, "cpu", seed=1)
    bias = _bias(64, 1)
    torch.library.opcheck(torch.ops.specmoe.route_topk.default, (logits, 6, "sigmoid", bias, True, 8, 3, "top2", 2.5))
    torch.library.opcheck(torch.ops.specmoe.route_budget.default,
                          (logits, 6, 12, "softmax", None, False, None, None, "truncate", 8, 3, "max", 1.5))


# ---- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 5, 64, 128, 129, 300, 1024])
def test_cuda_grouped_routing_equals_cpu_bitwise_ids(T):
    """The kernel's group masks, natural picks and group-first substitution equal the CPU op (ids and
    grouping exactly) on the fused (T <= 128) and the multi-block path, for V3 / V2 / GLM shapes."""
    for (E, K, G, TG, gsc), dtype, (B, policy) in itertools.product(
            [(256, 8, 8, 4, "top2"), (160, 6, 8, 3, "max"), (128, 8, 1, 1, "top2"), (64, 4, 32, 8, "top2"),
             (512, 16, 16, 4, "max")],
            [torch.bfloat16, torch.float32], [(None, "substitute"), (16, "substitute"), (24, "truncate")]):
        logits = make_logits(T, E, dtype, "cpu", seed=T + E)
        bias = _bias(E, T) if gsc == "top2" else None
        protect = torch.zeros(T, dtype=torch.bool)
        protect[0] = True
        kw = dict(scoring="sigmoid" if gsc == "top2" else "softmax", bias=bias, n_group=G, topk_group=TG,
                  group_scoring=gsc, scale=2.5, protect=protect, policy=policy)
        Bv = E if B is None else max(B, K)
        cpu = ops.route_budget(logits, K, Bv, **kw)
        gpu = ops.route_budget(logits.cuda(), K, Bv, **_on("cuda", kw))
        assert_routing_equal(gpu, cpu)
        again = ops.route_budget(logits.cuda(), K, Bv, **_on("cuda", kw))
        assert all(torch.equal(a, b) for a, b in zip(gpu, again))            # deterministic
        w, ids = ops.route_topk(logits.cuda(), K, **_on("cuda", {k: v for k, v in kw.items()
                                                              if k not in ("protect", "policy")}))
        wc, ic = ops.route_topk(logits, K, **{k: v for k, v in kw.items() if k not in ("protect", "policy")})
        assert torch.equal(ids.cpu(), ic)
        torch.testing.assert_close(w.cpu(), wc, rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_cuda_grouped_routing_in_a_graph():
    T, E = 16, 256
    logits = make_logits(T, E, torch.bfloat16, "cuda", seed=3)
    bias = _bias(E, 3).cuda()
    kw = dict(scoring="sigmoid", bias=bias, n_group=8, topk_group=4, scale=2.5)
    ref = ops.route_budget(logits, 8, 32, **kw)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.route_budget(logits, 8, 32, **kw)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = ops.route_budget(logits, 8, 32, **kw)
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))

"""Every CUDA kernel of specmoe-ext once or a few times on small representative shapes, for
compute-sanitizer (the pytest suite is too slow under it). Each op's results are checked by the
suite; this only exercises the launches (every path, split and cluster configuration).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python tests/sanitizer_workload.py
    (likewise --tool racecheck)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from specmoe_ext import ops  # noqa: E402
from test_tree_attention import make_case  # noqa: E402


def with_env(name, value, fn):
    os.environ[name] = value
    try:
        fn()
    finally:
        del os.environ[name]


def routing_and_moe():
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, h, f, E, K, B in [(1, 128, 192, 60, 8, None), (3, 128, 192, 60, 4, 8), (77, 256, 128, 16, 2, 8),
                             (130, 192, 64, 8, 2, None)]:
        x = torch.randn(T, h, device="cuda", generator=g).bfloat16()
        w13 = (torch.randn(E, 2 * f, h, device="cuda", generator=g) / h ** 0.5).bfloat16()
        w2 = (torch.randn(E, h, f, device="cuda", generator=g) / f ** 0.5).bfloat16()
        r = ops.route_budget(torch.randn(T, E, device="cuda", generator=g), K, B, policy="truncate")
        for path in ("stream", "tiled"):
            with_env("SPECMOE_FUSED_MOE_PATH", path, lambda: ops.fused_moe(x, w13, w2, r))
        fs = 128
        shared = ((torch.randn(2 * fs, h, device="cuda", generator=g) / h ** 0.5).bfloat16(),
                  (torch.randn(h, fs, device="cuda", generator=g) / fs ** 0.5).bfloat16(),
                  torch.rand(T, device="cuda", generator=g))
        ops.fused_moe(x, w13, w2, r, shared)


def routing_value_rules():
    """The routing kernels' rules for non-finite values (routing.h clean_*: +Inf / NaN logits, NaN bias, NaN /
    negative / +Inf token weights) and protection beyond the budget, on the fused (T <= 128) and multi-block
    paths."""
    for T in (7, 300):
        logits = torch.randn(T, 64, device="cuda")
        logits[0, 3], logits[1], logits[2, 5] = float("inf"), float("inf"), float("nan")
        bias = torch.zeros(64, device="cuda")
        bias[7] = float("nan")
        tw = torch.rand(T, device="cuda")
        tw[0], tw[1], tw[2] = float("nan"), -1.0, float("inf")
        protect = torch.arange(T, device="cuda") < 4
        for policy in ("substitute", "truncate"):
            ops.route_budget(logits, 4, 12, bias=bias, token_weights=tw, protect=protect, policy=policy)


def grouped_routing():
    """Grouped top-K (DeepSeek-V2/V3, GLM-4.5: n_group, topk_group, top-2 / max group scores, sigmoid + bias,
    routed scaling), with and without a budget, on the fused (T <= 128) and multi-block paths."""
    g = torch.Generator(device="cuda").manual_seed(2)
    for T in (1, 7, 130):
        logits = torch.randn(T, 64, device="cuda", generator=g)
        bias = torch.randn(64, device="cuda", generator=g) * 0.1
        for gs in ("top2", "max"):
            ops.route_topk(logits, 6, scoring="sigmoid", bias=bias, n_group=8, topk_group=3, group_scoring=gs,
                           scale=2.5)
            for B, policy in ((None, "substitute"), (12, "substitute"), (12, "truncate")):
                ops.route_budget(logits, 6, B, scoring="sigmoid", bias=bias, n_group=8, topk_group=3,
                                 group_scoring=gs, policy=policy, scale=2.5)


def tree_attention():
    for T, prefix, d, rep in [(1, 1000, 128, 4), (7, [0, 127], 64, 8), (37, 300, 128, 1), (100, 1, 128, 16)]:
        q, k, v, pre, mask = make_case(2, T, 2 * rep, 2, d, prefix, torch.bfloat16, "cuda")
        ops.tree_attention(q, k, v, pre, mask)
        with_env("SPECMOE_TREE_ATTN_SPLITS", "3", lambda: ops.tree_attention(q, k, v, pre, mask))


def accept_and_compact():
    bs, T, V = 2, 5, 151936
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(bs, T, V, device="cuda", generator=g).bfloat16()
    parent = torch.tensor([[-1, 0, 1, 0, 3]] * bs, device="cuda")
    tokens = torch.randint(0, V, (bs, T), device="cuda", generator=g)
    valid = torch.ones(bs, T, dtype=torch.bool, device="cuda")
    seed, offset = torch.arange(bs, device="cuda"), torch.zeros(bs, dtype=torch.long, device="cuda")
    for cluster in ("1", "2", "4", "8"):
        def run():
            ops.tree_accept(logits, tokens, parent, valid, temperature=0.0, seed=seed, offset=offset)
            ops.tree_accept(logits, tokens, parent, valid, temperature=0.8, top_p=0.9, top_k=50,
                            seed=seed, offset=offset)
        with_env("SPECMOE_ACCEPT_CLUSTER", cluster, run)
    path, n, _ = ops.tree_accept(logits, tokens, parent, valid, temperature=1.0, seed=seed, offset=offset)
    cache = [torch.randn(bs, 2, 64, 128, device="cuda").bfloat16() for _ in range(4)]
    ops.kv_compact(cache, torch.tensor([10, 20], device="cuda"), path, n)


def philox_uniform():
    seed, offset = torch.arange(3, device="cuda") * 7 + 1, torch.tensor([0, 5, 1 << 40], device="cuda")
    for n, stream in [(1, 1), (999, 2), (4096, 17)]:
        ops.philox_uniform(seed, offset, n, stream)


def speculative_steps():
    """The whole device-resident step (drafting, verification, commit) on the tiny pair in bf16, eagerly:
    every drafter kind, greedy and both sampled rules, a budget, a batch that shrinks."""
    from specmoe_ext.models import SamplingParams, build_draft, build_preset
    from specmoe_ext.speculative import BudgetConfig, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine
    t, d = build_preset("tiny", "cuda", "bfloat16"), build_draft("tiny", "cuda", "bfloat16")
    prompts = [[5, 6, 7, 8, 5, 6, 7], [100, 200, 300], [42]]
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=1)
    for drafter, tree, sp, budget in [(ModelDrafter(d, t), "chain:4", greedy, None),
                                      (ModelDrafter(d, t), "static:2,2", sampled, BudgetConfig(4)),
                                      (SelfDrafter(t, 4), "dynamic:topk=2,depth=3,tokens=6", sampled, None),
                                      (NGramDrafter(2048, 3), "chain:3", greedy, None)]:
        SpecEngine(t, drafter, tree, budget, cuda_graph=False).generate(prompts, 10, sp, stop_ids=[14])


if __name__ == "__main__":
    routing_and_moe()
    routing_value_rules()
    grouped_routing()
    tree_attention()
    accept_and_compact()
    philox_uniform()
    speculative_steps()
    torch.cuda.synchronize()
    print("sanitizer workload done")

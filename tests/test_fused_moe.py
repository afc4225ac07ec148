"""specmoe::fused_moe against reference.py (float32), on odd shapes, budgets and edge routings.

Shape legend: T tokens, h hidden, f expert FFN, E experts, K experts per token, B budget.
"""
import contextlib
import itertools
import os

import pytest
import torch

from specmoe_ext import ops, reference
from conftest import devices

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}  # relative L2 vs float32


def make_moe(T, h, f, E, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, h, generator=g, device=device)
    w13 = torch.randn(E, 2 * f, h, generator=g, device=device) / h ** 0.5
    w2 = torch.randn(E, h, f, generator=g, device=device) / f ** 0.5
    logits = torch.randn(T, E, generator=g, device=device)
    return [t.to(dtype) for t in (x, w13, w2)] + [logits]


PATHS = ["stream", "tiled"]  # the CUDA kernel's two paths (csrc/kernels/fused_moe.h), forced by env


@contextlib.contextmanager
def forced_path(path):
    """Runs the CUDA op on one path ('auto' = the size-based choice); the CPU op ignores it."""
    old = os.environ.get("SPECMOE_FUSED_MOE_PATH")
    os.environ["SPECMOE_FUSED_MOE_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPECMOE_FUSED_MOE_PATH"]
        else:
            os.environ["SPECMOE_FUSED_MOE_PATH"] = old


def paths(device):
    return PATHS if device == "cuda" else ["auto"]


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output"
    return float((y.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))


def check(x, w13, w2, routing, dtype):
    y = ops.fused_moe(x, w13, w2, routing)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    ref = reference.fused_moe(x, w13, w2, routing)
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"
    return y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T,h,f,E,K", [(1, 64, 64, 8, 2), (3, 128, 192, 60, 4), (17, 64, 128, 8, 2)])
def test_small_shapes(device, T, h, f, E, K):
    dtypes = DTYPES + ([torch.float32] if device == "cpu" else [])
    for dtype, B in itertools.product(dtypes, [None, K, E // 2]):
        x, w13, w2, logits = make_moe(T, h, f, E, dtype, device, T * h + E)
        check(x, w13, w2, ops.route_budget(logits, K, B), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("h,f", [(64, 64), (64, 1408), (2880, 768), (2880, 1408)])
@pytest.mark.parametrize("E", [8, 60, 128])
def test_cuda_grid(h, f, E, path):
    K = 2 if E == 8 else 8
    x_all, w13, w2, logits_all = make_moe(300, h, f, E, torch.bfloat16, "cuda", h + f + E)
    with forced_path(path):
        for T, dtype in zip([1, 3, 17, 64, 300], itertools.cycle(DTYPES)):
            x, logits = x_all[:T].to(dtype), logits_all[:T]
            a13, a2 = w13.to(dtype), w2.to(dtype)
            for B, policy in [(None, "substitute"), (max(K, E // 4), "substitute"),
                              (max(K, E // 4), "truncate")]:
                check(x, a13, a2, ops.route_budget(logits, K, B, policy=policy), dtype)


@pytest.mark.gpu
def test_paths_agree_and_auto_picks_by_size():
    """Both paths compute the same function; 'auto' equals the path its size rule names (stream for
    T * K <= 32 pairs with f < 1024: kStreamMaxPairs, kStreamMaxFfn)."""
    h, E, K = 256, 16, 4
    for T, f in [(2, 128), (8, 128), (9, 128), (2, 1024)]:
        x, w13, w2, logits = make_moe(T, h, f, E, torch.bfloat16, "cuda", T)
        r = ops.route_budget(logits, K, None)
        ys = {}
        for path in PATHS + ["auto"]:
            with forced_path(path):
                ys[path] = ops.fused_moe(x, w13, w2, r)
        assert rel_err(ys["stream"], ys["tiled"].float().cpu()) < 1e-2
        assert torch.equal(ys["auto"], ys["stream" if T * K <= 32 and f < 1024 else "tiled"])


@pytest.mark.gpu
def test_bad_path_env_raises():
    x, w13, w2, logits = make_moe(4, 64, 64, 8, torch.bfloat16, "cuda", 0)
    with forced_path("fastest"), pytest.raises(RuntimeError, match="SPECMOE_FUSED_MOE_PATH"):
        ops.fused_moe(x, w13, w2, ops.route_budget(logits, 2, None))


@pytest.mark.parametrize("device", devices())
def test_all_tokens_on_one_expert_and_idle_experts(device):
    T, h, f, E, K = 77 if device == "cuda" else 9, 128, 64, 16, 2
    x, w13, w2, logits = make_moe(T, h, f, E, torch.bfloat16, device, 5)
    logits[:, 3] = 50.0
    logits[:, 11] = 40.0   # every token: experts 3 and 11; the other 14 get nothing
    r = ops.route_budget(logits, K, None)
    assert int(r.experts_loaded()) == 2
    for path in paths(device):
        with forced_path(path):
            check(x, w13, w2, r, torch.bfloat16)


@pytest.mark.parametrize("device", devices())
def test_reads_only_kept_experts(device):
    """Poisoned weights of experts the routing does not keep must not reach the output."""
    T, h, f, E, K, B = 12, 64, 64, 32, 4, 8
    x, w13, w2, logits = make_moe(T, h, f, E, torch.bfloat16, device, 9)
    r = ops.route_budget(logits, K, B)
    dropped = torch.ones(E, dtype=torch.bool)
    dropped[r.kept_experts.cpu().long()] = False
    w13[dropped.to(device)] = float("nan")
    w2[dropped.to(device)] = float("nan")
    for path in paths(device):
        with forced_path(path):
            assert torch.isfinite(ops.fused_moe(x, w13, w2, r)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_deterministic_every_element_written_and_matches_cpu(path):
    T, h, f, E, K = 300, 256, 192, 60, 8
    x, w13, w2, logits = make_moe(T, h, f, E, torch.bfloat16, "cuda", 1)
    r = ops.route_budget(logits, K, 24, policy="truncate")
    junk = torch.full((64 << 20,), float("nan"), device="cuda")  # the next allocations reuse NaN memory
    del junk
    with forced_path(path):
        a = ops.fused_moe(x, w13, w2, r)
        b = ops.fused_moe(x, w13, w2, r)
    assert torch.isfinite(a).all(), "some output element was never written"
    assert torch.equal(a, b), "run-to-run results differ"
    rc = ops.route_budget(logits.cpu(), K, 24, policy="truncate")
    assert torch.equal(rc.ids, r.ids.cpu())
    yc = ops.fused_moe(x.cpu(), w13.cpu(), w2.cpu(), rc)
    assert rel_err(a, yc.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8, 96])   # stream and tiled under the size rule (K 4, f 128)
def test_cuda_graph_capture(T):
    h, f, E, K = 128, 128, 32, 4
    x, w13, w2, logits = make_moe(T, h, f, E, torch.bfloat16, "cuda", 2)
    static_logits = logits.clone()
    run = lambda: ops.fused_moe(x, w13, w2, ops.route_budget(static_logits, K, 12))
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for seed in range(2):
        static_logits.copy_(torch.randn(T, E, device="cuda"))  # new experts, new counts: same graph
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.fused_moe(x, w13, w2, ops.route_budget(static_logits, K, 12))
        assert rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x, w13, w2, logits = make_moe(5, 64, 64, 8, torch.bfloat16, device, 4)
    r = ops.route_budget(logits, 2, 4)
    torch.library.opcheck(torch.ops.specmoe.fused_moe.default,
                          (x, w13, w2, r.weights, r.kept_experts, r.expert_counts, r.expert_offsets,
                           r.sorted_pairs))


BAD = [
    (lambda x, w13, w2: (x[:, :48].contiguous(), w13[..., :48].contiguous(), w2[:, :48].contiguous()),
     "multiple of 64"),
    (lambda x, w13, w2: (x, w13, w2[:, :, :32].contiguous()), "w2 must have shape"),
    (lambda x, w13, w2: (x.int(), w13, w2), "x must be bfloat16"),
    (lambda x, w13, w2: (x, w13.half(), w2), "expert weights must have x's dtype"),
    (lambda x, w13, w2: (x[None], w13, w2), "x must be 2-D"),
    (lambda x, w13, w2: (torch.randn(64, 4, dtype=x.dtype, device=x.device).t(), w13, w2),
     "x must be contiguous"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_clear_error(device, case):
    x, w13, w2, logits = make_moe(4, 64, 64, 8, torch.bfloat16, device, 0)
    make, msg = BAD[case]
    r = ops.route_budget(logits, 2, 4)
    with pytest.raises(RuntimeError, match=msg):
        ops.fused_moe(*make(x, w13, w2), r)


def make_shared(T, h, fs, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    w13s = (torch.randn(2 * fs, h, generator=g, device=device) / h ** 0.5).to(dtype)
    w2s = (torch.randn(h, fs, generator=g, device=device) / fs ** 0.5).to(dtype)
    ws = torch.rand(T, generator=g, device=device)
    return w13s, w2s, ws


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T,h,f,fs,E,K", [(1, 64, 64, 128, 8, 2), (7, 128, 192, 64, 60, 4),
                                          (99, 256, 64, 320, 16, 2)])
def test_shared_expert(device, T, h, f, fs, E, K):
    """Qwen2-MoE's shared expert: y += ws[t] * FFN_s(x[t]) for every token, budget or not."""
    for dtype, B in itertools.product(DTYPES, [None, K]):
        x, w13, w2, logits = make_moe(T, h, f, E, dtype, device, T + fs)
        shared = make_shared(T, h, fs, dtype, device, T)
        r = ops.route_budget(logits, K, B, policy="truncate")
        y = ops.fused_moe(x, w13, w2, r, shared)
        ref = reference.fused_moe(x, w13, w2, r, shared)
        err = rel_err(y, ref)
        assert err < TOL[dtype], f"relative error {err:.2e}"
        assert rel_err(ops.fused_moe(x, w13, w2, r), ref) > 10 * TOL[dtype]  # the shared term matters


SHARED_BAD = [
    (lambda s: (s[0], s[1], None), "go together"),
    (lambda s: (s[0][:, :32].contiguous(), s[1], s[2]), "shared_w13 must have shape"),
    (lambda s: (s[0][:96].contiguous(), s[1][:, :48].contiguous(), s[2]), "multiple of 64"),
    (lambda s: (s[0], s[1][:, :64].contiguous(), s[2]), "shared_w2 must have shape"),
    (lambda s: (s[0].half(), s[1], s[2]), "shared-expert weights must have x's dtype"),
    (lambda s: (s[0], s[1], s[2][:3]), "shared_weight must be"),
    (lambda s: (s[0], s[1], s[2].double()), "shared_weight must be"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(SHARED_BAD)))
def test_shared_expert_bad_input(device, case):
    x, w13, w2, logits = make_moe(4, 64, 64, 8, torch.bfloat16, device, 0)
    make, msg = SHARED_BAD[case]
    with pytest.raises(RuntimeError, match=msg):
        ops.fused_moe(x, w13, w2, ops.route_budget(logits, 2, None), make(make_shared(4, 64, 128, torch.bfloat16, device, 0)))

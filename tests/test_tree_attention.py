"""specmoe::tree_attention against reference.py (float32) and against causal attention along every
root-to-leaf path of random trees.

Shape legend: bs requests, T tree nodes (queries), Hq/Hk heads, d head dim, S cache capacity, P prefix.
"""
import pytest
import torch

from specmoe_ext import ops, reference
from specmoe_ext.speculative.tree import ancestor_bitmask
from conftest import devices

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}   # relative L2 vs float32


def random_parent(bs, T, kind, g):
    """[bs, T] parents: chain, star (all children of the root) or unbalanced random trees."""
    idx = torch.arange(T)
    if kind == "chain":
        par = idx - 1
    elif kind == "star":
        par = torch.where(idx == 0, -1, 0)
    else:
        par = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)])
                           for _ in range(bs)])
        return par
    return par.expand(bs, T).clone()


def make_case(bs, T, Hq, Hk, d, prefix, dtype, device, kind="random", seed=0, extra=3):
    """q, k/v caches (tree K/V at slots prefix_b + i), prefix_lens, mask. `prefix` int or list per request."""
    g = torch.Generator().manual_seed(seed)
    pre = [prefix] * bs if isinstance(prefix, int) else list(prefix)
    S = max(pre) + T + extra
    q = torch.randn(bs, T, Hq, d, generator=g)
    k = torch.randn(bs, Hk, S, d, generator=g)
    v = torch.randn(bs, Hk, S, d, generator=g)
    mask = ancestor_bitmask(random_parent(bs, T, kind, g))
    to = dict(device=device)
    return (q.to(dtype).to(**to), k.to(dtype).to(**to), v.to(dtype).to(**to),
            torch.tensor(pre, dtype=torch.long, **to), mask.to(**to))


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output"
    return float((y.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm().clamp_min(1e-12))


def check(q, k, v, pre, mask, dtype, **kw):
    out = ops.tree_attention(q, k, v, pre, mask, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = reference.tree_attention(q.float(), k.float(), v.float(), pre, mask)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T", [1, 7, 37, 100])
@pytest.mark.parametrize("prefix", [0, 1, 127])
def test_odd_shapes(device, T, prefix):
    dtypes = [torch.bfloat16, torch.float16] + ([torch.float32] if device == "cpu" else [])
    for i, dtype in enumerate(dtypes):
        Hq, Hk = [(8, 2), (4, 4), (16, 1)][i % 3]
        check(*make_case(2, T, Hq, Hk, 64, [prefix, prefix + 5], dtype, device, seed=T + prefix + i), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rep", [1, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_grid(d, rep, dtype):
    for T, prefix, kind in [(1, 4097, "chain"), (7, 127, "star"), (37, 1, "random"), (100, 0, "random"),
                            (16, 4097, "random"), (256, 300, "chain")]:
        check(*make_case(2, T, 2 * rep, 2, d, [prefix, max(prefix - 50, 0)], dtype, "cuda", kind, seed=T), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hint", [0, 1, 64, 1 << 20])
def test_cuda_splits_and_lengths(hint):
    """Requests of very different lengths in one batch; the split count (steered by kv_len_hint) never
    changes the result beyond rounding."""
    dtype = torch.bfloat16
    case = make_case(4, 16, 32, 8, 128, [0, 3, 1000, 5000], dtype, "cuda", seed=7)
    out = check(*case, dtype, kv_len_hint=hint)
    ref = ops.tree_attention(*case, kv_len_hint=1)
    assert (out.float() - ref.float()).abs().max() < 2e-2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["chain", "star", "random"])
def test_each_path_is_causal_attention(device, kind):
    """For every root-to-leaf path: the tree outputs of its nodes equal plain causal attention over the
    prefix followed by that path's K/V laid out contiguously."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    bs, T, P = 2, 23, 130
    q, k, v, pre, mask = make_case(bs, T, 8, 2, 64, P, dtype, device, kind, seed=11, extra=0)
    out = ops.tree_attention(q, k, v, pre, mask)
    anc = torch.stack([(mask.long().cpu()[..., j // 32] >> (j % 32)) & 1 for j in range(T)], -1).bool()  # [bs,T,T]
    for b in range(bs):
        kids = {int(j) for j in range(T) if anc[b, :, j].sum() > 1}        # nodes with a descendant
        for leaf in [i for i in range(T) if i not in kids]:
            path = [j for j in range(T) if anc[b, leaf, j]]                 # root .. leaf, ascending
            n = len(path)
            sl = torch.tensor([P + j for j in path], device=device)
            kp = torch.cat([k[b:b + 1, :, :P], k[b:b + 1, :, sl]], 2)
            vp = torch.cat([v[b:b + 1, :, :P], v[b:b + 1, :, sl]], 2)
            chain = ancestor_bitmask(torch.arange(n)[None] - 1).to(device)
            o = ops.tree_attention(q[b:b + 1, path], kp, vp, pre[b:b + 1], chain)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (o[0].float() - out[b, path].float()).abs().max() < tol * 4, (b, leaf, path)


@pytest.mark.gpu
def test_cuda_strided_q_and_untouched_slots():
    """q as a strided view (the model splits a fused qkv projection), NaN in every slot the call must not
    read (past prefix + T), the result equals the contiguous call bit for bit, and repeated calls agree."""
    dtype = torch.bfloat16
    q, k, v, pre, mask = make_case(3, 9, 16, 4, 128, [40, 100, 7], dtype, "cuda", seed=3, extra=70)
    for b, p in enumerate(pre.tolist()):
        k[b, :, p + 9:] = float("nan")
        v[b, :, p + 9:] = float("nan")
    wide = torch.randn(3, 9, 16 + 8, 128, device="cuda").to(dtype)
    wide[:, :, :16] = q
    qs = wide[:, :, :16]
    assert not qs.is_contiguous()
    a = ops.tree_attention(qs, k, v, pre, mask)
    b = ops.tree_attention(q, k, v, pre, mask)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.equal(b, ops.tree_attention(q, k, v, pre, mask))


@pytest.mark.gpu
def test_cuda_graph_replay_follows_lengths():
    """Captured once, replayed after the prefix lengths changed on the device: matches eager calls."""
    dtype = torch.bfloat16
    q, k, v, pre, mask = make_case(2, 16, 32, 4, 128, [1000, 10], dtype, "cuda", seed=5, extra=3000)
    S = k.shape[2]
    ops.tree_attention(q, k, v, pre, mask, kv_len_hint=S)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.tree_attention(q, k, v, pre, mask, kv_len_hint=S)
    for lens in ([1000, 10], [2500, 3000], [0, 1]):
        pre.copy_(torch.tensor(lens))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.tree_attention(q.float(), k.float(), v.float(), pre, mask)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_bad_input(device):
    q, k, v, pre, mask = make_case(2, 5, 8, 2, 64, 10, torch.bfloat16, device)
    cases = [
        ((q[0], k, v, pre, mask), "q must be 4-D"),
        ((q, k, v[:, :, :-1], pre, mask), "v_cache must have k_cache's shape"),
        ((q.float(), k, v, pre, mask), "dtype" if device == "cpu" else "bfloat16 or float16"),
        ((q[:, :, :7], k, v, pre, mask), "multiple of the KV heads"),
        ((q, k, v, pre.int(), mask), "prefix_lens must be int64"),
        ((q, k, v, pre, mask[:, :4]), "tree_mask must be int32"),
        ((q, k, v, pre[:1], mask), r"prefix_lens must be int64 \[bs\]"),
        ((q, k[:, :, :4], v[:, :, :4], pre, mask), "do not fit a cache row"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops.tree_attention(*args)
    if device == "cuda":
        q96 = torch.zeros(2, 5, 8, 96, dtype=torch.bfloat16, device=device)
        k96 = torch.zeros(2, 2, 20, 96, dtype=torch.bfloat16, device=device)
        with pytest.raises(RuntimeError, match="head dim d must be 64 or 128"):
            ops.tree_attention(q96, k96, k96, pre, mask)
        with pytest.raises(RuntimeError, match="device"):
            ops.tree_attention(q, k.cpu(), v.cpu(), pre, mask)


def test_opcheck():
    q, k, v, pre, mask = make_case(2, 7, 8, 2, 64, 10, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.specmoe.tree_attention.default, (q, k, v, pre, mask, 0.125, 0))

"""specmoe::tree_attention against reference.py (float32) and against causal attention along every
root-to-leaf path of random trees; argument errors on every backend (meta included), prefix lengths on the
CPU, and the power of the tolerance (one wrongly visible slot fails it).

Shape legend: bs requests, T tree nodes (queries), Hq/Hk heads, d head dim, S cache capacity, P prefix.

Tolerance (what the maths allows), per query row (b, t, head): max |out - ref| / |ref| over rows, with
u = 2^-p (p = 8 significant bits for bf16, 11 for fp16).
  CPU: the op computes the reference's float32 attention and rounds the output once: at most u per element,
       so per row; bound 1.25 u (bf16 4.9e-3, fp16 6.1e-4). Observed: worst row 0.63 u, whole tensor 0.44 u.
  CUDA: also rounds the probabilities P = exp(s - running max) to q's dtype for the P V tensor-core product
       (l sums the unrounded P; q.k on tensor cores is exact products in float32): a relative error <= u per
       P, about 0.44 u RMS on a row of random values. Bound 2 u (bf16 7.8e-3, fp16 9.8e-4). A CPU emulation
       of exactly that arithmetic (64-key chunks, online softmax) over the GPU grid's shapes: worst row 0.86 u.
The previous bound, 2e-2 relative L2 over the whole tensor, let one wrongly visible slot pass: at a 4097-slot
prefix it moves the whole output by at most ~0.005 relative, but its own query row by 0.013 or more.
"""
import pytest
import torch

from specmoe_ext import ops, reference
from specmoe_ext.masks import unpack_bits
from specmoe_ext.speculative.tree import ancestor_bitmask
from conftest import devices

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}    # u: rounding to q's dtype, relative
TOL = {"cpu": {**{dt: 1.25 * u for dt, u in UNIT_ROUNDOFF.items()}, torch.float32: 1e-5},   # per query row
       "cuda": {dt: 2 * u for dt, u in UNIT_ROUNDOFF.items()}}


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


def row_rel_err(y, ref):
    """max over query rows (b, t, head) of |y - ref| / |ref| (a row of ref exactly 0 must come out 0)."""
    assert torch.isfinite(y).all(), "non-finite output"
    y, ref = y.float().cpu().flatten(0, -2), ref.float().cpu().flatten(0, -2)
    norm = ref.norm(dim=-1)
    assert torch.all(y[norm == 0] == 0), "a row that must be 0 is not"
    return float(((y - ref).norm(dim=-1) / norm.clamp_min(1e-30))[norm > 0].max())


def assert_rows_close(out, ref, tol):
    err = row_rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} of a row > {tol:.1e}"


def check(q, k, v, pre, mask, dtype, **kw):
    out = ops.tree_attention(q, k, v, pre, mask, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = reference.tree_attention(q.float(), k.float(), v.float(), pre, mask)
    assert_rows_close(out, ref, TOL[q.device.type][dtype])
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
    check(*case, dtype, kv_len_hint=hint)
    check(*case, dtype, kv_len_hint=1)       # one split: within the same bound of the same reference


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
            # both within TOL of the same exact attention, so of each other within twice it
            assert row_rel_err(o[0], out[b, path]) <= 2 * TOL[device][dtype], (b, leaf, path)


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
        assert_rows_close(out, ref, TOL["cuda"][dtype])


def case_on(device, dtype=torch.bfloat16):
    """q, k, v, prefix_lens, mask of 2 requests x 5 nodes (S = 18) on `device` (meta: moved from the CPU)."""
    return [t.to(device) for t in make_case(2, 5, 8, 2, 64, 10, dtype, "cpu")]


BAD = [  # (q, k, v, prefix_lens, mask) -> bad arguments, the message (cpu / meta, then cuda if different)
    (lambda q, k, v, pre, mask: (q[0], k, v, pre, mask), "q must be 4-D"),
    (lambda q, k, v, pre, mask: (q, k, v[:, :, :-1], pre, mask), "v_cache must have k_cache's shape"),
    (lambda q, k, v, pre, mask: (q.float(), k, v, pre, mask), "must have q's dtype", "bfloat16 or float16"),
    (lambda q, k, v, pre, mask: (q[:, :, :7], k, v, pre, mask), "multiple of the KV heads"),
    (lambda q, k, v, pre, mask: (q[:, :, :0], k, v, pre, mask), "positive multiple of the KV heads Hk"),
    (lambda q, k, v, pre, mask: (q, k, v, pre.int(), mask), "prefix_lens must be int64"),
    (lambda q, k, v, pre, mask: (q, k, v, pre, mask[:, :4]), "tree_mask must be int32"),
    (lambda q, k, v, pre, mask: (q, k, v, pre[:1], mask), r"prefix_lens must be int64 \[bs\]"),
    (lambda q, k, v, pre, mask: (q, k[:, :, :4], v[:, :, :4], pre, mask), "do not fit a cache row"),
    # head dim 0: before, the default scale d ** -0.5 raised ZeroDivisionError in Python
    (lambda q, k, v, pre, mask: (q[..., :0], k[..., :0], v[..., :0], pre, mask), "head dim d = q.size.3. must be >= 1"),
    (lambda q, k, v, pre, mask: (q, k, v, pre, mask, float("nan")), "scale must be finite"),
    (lambda q, k, v, pre, mask: (q, k, v, pre, mask, float("inf")), "scale must be finite"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("device", devices() + ["meta"])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(device, case):
    """The same error on every backend: the meta (fake) kernel runs the very checks of the CPU / CUDA ones."""
    make, *messages = BAD[case]
    message = messages[-1] if device == "cuda" else messages[0]
    with pytest.raises(RuntimeError, match=message):
        ops.tree_attention(*make(*case_on(device)))


@pytest.mark.bad_input(3)
@pytest.mark.gpu
def test_cuda_only_rules_and_devices():
    q, k, v, pre, mask = case_on("cuda")
    q96 = torch.zeros(2, 5, 8, 96, dtype=torch.bfloat16, device="cuda")
    k96 = torch.zeros(2, 2, 20, 96, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="head dim d must be 64 or 128"):
        ops.tree_attention(q96, k96, k96, pre, mask)
    with pytest.raises(RuntimeError, match="device"):
        ops.tree_attention(q, k.cpu(), v.cpu(), pre, mask)
    with pytest.raises(RuntimeError, match="every argument must be on q's device cuda:0, got meta"):
        ops.tree_attention(q, k, v, pre.to("meta"), mask)


@pytest.mark.bad_input
@pytest.mark.parametrize("odd", ["k_cache", "prefix_lens", "tree_mask"])
def test_meta_mixed_with_cpu_raises(odd):
    q, k, v, pre, mask = case_on("cpu")
    args = dict(q=q, k_cache=k, v_cache=v, prefix_lens=pre, tree_mask=mask)
    args[odd] = args[odd].to("meta")
    if odd == "k_cache":
        args["v_cache"] = args["v_cache"].to("meta")
    with pytest.raises(RuntimeError, match="every argument must be on q's device cpu, got meta"):
        ops.tree_attention(*args.values())


def test_meta_kernel_gives_the_real_output_metadata():
    q, k, v, pre, mask = case_on("cpu")
    out = ops.tree_attention(*case_on("meta"))
    assert out.is_meta and out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()


@pytest.mark.bad_input
@pytest.mark.parametrize("prefix", [[-1, 10], [10, 14], [0, 1 << 40]])   # S = 18, T = 5: prefix in [0, 13]
def test_prefix_lens_outside_the_cache_raise_on_cpu(prefix):
    """The CPU op reads the prefix lengths on the host: a negative one, or one whose tree would pass the
    cache row's end, raises (before: silently clipped). CUDA never reads outside the row instead."""
    q, k, v, pre, mask = case_on("cpu")
    with pytest.raises(RuntimeError, match=r"prefix_lens\[[01]\] = .* must be in \[0, S - T\] = \[0, 13\]"):
        ops.tree_attention(q, k, v, torch.tensor(prefix), mask)
    ops.tree_attention(q, k, v, torch.tensor([0, 13]), mask)   # the extremes are fine


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("prefix", [0, 127, 4097])
def test_check_catches_one_wrongly_visible_slot(device, prefix):
    """One tree node made visible to one query it is not an ancestor of fails the per-row bound, even after a
    4097-slot prefix, where the previous whole-tensor 2e-2 bound let every such bug pass."""
    dtype = torch.bfloat16
    for seed in range(3):
        q, k, v, pre, mask = make_case(2, 16, 8, 2, 64, prefix, dtype, device, "random", seed=seed)
        ref = reference.tree_attention(q.float(), k.float(), v.float(), pre, mask)
        assert_rows_close(ops.tree_attention(q, k, v, pre, mask), ref, TOL[device][dtype])
        anc = unpack_bits(mask.cpu(), 16)
        for t in range(1, 16, 3):
            hidden = (~anc[0, t]).nonzero().flatten()
            if hidden.numel() == 0:
                continue
            wrong = mask.clone()
            wrong[0, t, 0] |= 1 << int(hidden[0])                     # node hidden[0] wrongly visible to t
            out = ops.tree_attention(q, k, v, pre, wrong)
            with pytest.raises(AssertionError, match="relative error"):
                assert_rows_close(out, ref, TOL[device][dtype])
            if prefix == 4097 and device == "cpu":                    # the old check
                assert float((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_opcheck():
    q, k, v, pre, mask = make_case(2, 7, 8, 2, 64, 10, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.specmoe.tree_attention.default, (q, k, v, pre, mask, 0.125, 0))

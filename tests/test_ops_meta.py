"""The Meta (fake) kernels of every specmoe op, across ops: one copy of the checks (C++ Meta kernels calling
the <family>_common.h checks; no Python fakes), dynamic shapes under torch.compile, the backend a fake tensor
stands for, and where the dispatcher sends CUDA tensors in a CPU-only build. Per-op error parity (the same
message on cpu / cuda / meta) and meta-mixed-with-CPU calls are tested next to each op.

Shape legend: T tokens, E experts, K experts per token, h hidden, f expert FFN; bs requests, T tree nodes,
Hq/Hk heads, d head dim, S cache capacity.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import specmoe_ext
from specmoe_ext import ops
from specmoe_ext.speculative.tree import ancestor_bitmask

OPS = ["route_topk", "route_budget", "fused_moe", "tree_attention", "tree_accept", "kv_compact", "philox_uniform"]
_ops = torch.ops.specmoe


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_meta_kernel_and_no_python_fake(name):
    qualname = f"specmoe::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")
    meta_lines = [line for line in torch._C._dispatch_dump(qualname).splitlines() if line.startswith("Meta: ")]
    assert len(meta_lines) == 1 and "/csrc/ops/" in meta_lines[0] and "_meta.cpp" in meta_lines[0]
    assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is None


def test_compile_with_dynamic_shapes_through_every_op():
    """torch.compile(dynamic=True) traces the ops with symbolic sizes: the meta kernels' checks and outputs
    work on SymInts (shapes change between calls without a recompile failing)."""
    torch._dynamo.reset()
    E, K, h, f = 16, 2, 64, 64
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * f, h, generator=g) / 8).bfloat16()
    w2 = (torch.randn(E, h, f, generator=g) / 8).bfloat16()

    def step(logits, x, q, k, v, prefix, mask, seed, offset):
        r = ops.route_budget(logits, K, 8)
        y = ops.fused_moe(x, w13, w2, r)
        a = ops.tree_attention(q, k, v, prefix, mask)
        u = ops.philox_uniform(seed, offset, 4, 1)
        return y.float().sum(-1), a.sum(), u

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, bs in [(5, 2), (9, 3), (13, 1)]:
        args = (torch.randn(T, E, generator=g), torch.randn(T, h, generator=g).bfloat16(),
                torch.randn(bs, 3, 4, 64, generator=g), torch.randn(bs, 2, 10, 64, generator=g),
                torch.randn(bs, 2, 10, 64, generator=g), torch.full((bs,), 4), ancestor_bitmask(
                    (torch.arange(3) - 1).expand(bs, 3)), torch.arange(bs), torch.zeros(bs, dtype=torch.long))
        for got, want in zip(compiled(*args), step(*args)):
            torch.testing.assert_close(got, want)


@pytest.mark.bad_input(3)  # float32 activations, float32 attention, head dim 96: refused for fake CUDA tensors
def test_fake_cuda_tensors_get_the_cuda_rules():
    """A fake CUDA tensor (torch.compile for a GPU, on any machine) is checked by the CUDA rules, a fake CPU
    tensor by the CPU rules (float32 allowed there)."""
    with FakeTensorMode():
        for device, float32_ok in [("cpu", True), ("cuda:0", False)]:
            x = torch.empty(4, 64, device=device)
            w13, w2 = torch.empty(8, 128, 64, device=device), torch.empty(8, 64, 64, device=device)
            r = _ops.route_budget(torch.empty(4, 8, device=device), 2, 4)
            args = (x, w13, w2, r[0], *r[2:])
            q = torch.empty(2, 5, 8, 96, device=device)
            kv = torch.empty(2, 2, 20, 96, device=device)
            attn = (q, kv, kv, torch.zeros(2, dtype=torch.long, device=device),
                    torch.zeros(2, 5, 1, dtype=torch.int32, device=device), 0.1, 0)
            if float32_ok:
                assert _ops.fused_moe(*args).device.type == "cpu"
                assert _ops.tree_attention(*attn).shape == q.shape
                continue
            with pytest.raises(RuntimeError, match="x must be bfloat16 or float16, got Float"):
                _ops.fused_moe(*args)
            with pytest.raises(RuntimeError, match="q must be bfloat16 or float16"):
                _ops.tree_attention(*attn)
            with pytest.raises(RuntimeError, match="head dim d must be 64 or 128 on CUDA, got 96"):
                _ops.tree_attention(*(t.bfloat16() if t.is_floating_point() else t for t in attn[:5]), 0.1, 0)


def test_cpu_only_build_sends_cuda_tensors_to_the_rebuild_error():
    """Meta kernels do not capture CUDA calls: a CPU-only build still answers the CUDA dispatch key with the
    'rebuild with CUDA' error of schemas.cpp (redispatched explicitly: there is no CUDA device here)."""
    if specmoe_ext.cuda_kernels_available():
        pytest.skip("this build has the CUDA kernels")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match="specmoe::route_topk: this specmoe_ext build has no CUDA kernels"):
        _ops.route_topk.default.redispatch(cuda, torch.randn(4, 8), 2, "softmax", None, True)
    with pytest.raises(RuntimeError, match="specmoe::philox_uniform: this specmoe_ext build has no CUDA kernels"):
        _ops.philox_uniform.default.redispatch(cuda, torch.arange(2), torch.zeros(2, dtype=torch.long), 3, 1)
    for name in OPS:
        assert "CUDA: registered at" in torch._C._dispatch_dump(f"specmoe::{name}")

"""Batch invariance on the CPU (models/invariant.py and the CPU fused-MoE op): a token's results do not depend
on how many tokens share the forward. Shapes: M rows, k in, n out; odd sizes (1, 7, 99, 123)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from specmoe_ext import ops
from specmoe_ext.models import SamplingParams, build_draft, build_preset
from specmoe_ext.models.invariant import InvariantLinear, invariant_linear, set_batch_invariant
from specmoe_ext.speculative import ModelDrafter, SpecEngine, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_invariance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_linear_rows_do_not_depend_on_the_batch(dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(123, 99, generator=g).to(dtype)
    b = torch.randn(123, generator=g).to(dtype)
    x = torch.randn(123, 99, generator=g).to(dtype)
    full = invariant_linear(x, W, b, 16)
    torch.testing.assert_close(full.float(), F.linear(x, W, b).float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    for lo, M in [(0, 1), (5, 7), (17, 99), (0, 123)]:
        assert torch.equal(invariant_linear(x[lo:lo + M], W, b, 16), full[lo:lo + M]), (lo, M)
    assert invariant_linear(x[:7].view(1, 7, 99), W, None, 16).shape == (1, 7, 123)


def test_plain_linear_is_not_invariant_here():
    """The control: without the chunking this machine's GEMM does round a row differently at M = 1 and M = 99
    (if it ever stops doing so, the invariant mode costs padding for nothing here)."""
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(256, 384, generator=g), torch.randn(99, 384, generator=g)
    assert not all(torch.equal(F.linear(x[i:i + 1], W), F.linear(x, W)[i:i + 1]) for i in range(99))


def test_set_batch_invariant_converts_and_reverts(tiny):
    model = build_preset("tiny")
    keys = set(model.state_dict())
    assert set_batch_invariant(model) == 16 and model.invariant_chunk == 16
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert lin and all(type(m) is InvariantLinear and m.chunk == 16 for m in lin)
    assert set(model.state_dict()) == keys
    assert set_batch_invariant(model, 0) == 0 and all(type(m) is nn.Linear for m in lin)
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        set_batch_invariant(model, -3)


def test_cpu_fused_moe_rows_do_not_depend_on_the_other_tokens():
    """One token's expert output is the same bits whether 0 or 40 other tokens share its experts."""
    g = torch.Generator().manual_seed(2)
    E, K, h, f = 8, 2, 64, 64
    x = torch.randn(41, h, generator=g)
    w13 = torch.randn(E, 2 * f, h, generator=g) / 8
    w2 = torch.randn(E, h, f, generator=g) / 8
    logits = torch.randn(41, E, generator=g)
    logits[:, :2] += 10                                          # everyone wants experts 0 and 1
    full = ops.fused_moe(x, w13, w2, ops.route_budget(logits, K))
    for n in (1, 7, 23):
        part = ops.fused_moe(x[:n], w13, w2, ops.route_budget(logits[:n], K))
        assert torch.equal(part, full[:n]), n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_logits_are_the_decode_logits_bit_for_bit(dtype):
    """bench_invariance's comparison on the tiny model with batch-invariant projections: every component of
    a 6-token chain forward equals the 6 decode steps, and request 0 decoded alone equals it in a batch."""
    model = build_preset("tiny", "cpu", dtype)
    set_batch_invariant(model)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 2048, (3, 11), generator=g).tolist()
    chain = torch.randint(0, 2048, (3, 6), generator=g)
    dec, names = bench_invariance.run(model, prompts, chain, one_forward=False)
    ver, _ = bench_invariance.run(model, prompts, chain, one_forward=True)
    alone, _ = bench_invariance.run(model, prompts[:1], chain[:1], one_forward=False)
    assert bench_invariance.first_difference(bench_invariance.compare(dec, ver, names)) is None
    assert bench_invariance.first_difference(bench_invariance.compare(dec, alone, names, rows_a=slice(0, 1))) is None


def test_greedy_speculation_equals_autoregressive_in_bfloat16():
    """With batch-invariant projections the bf16 verify forward rounds like the decode step, so greedy
    speculative output is the autoregressive output token for token (chain, static and dynamic trees)."""
    target, draft = build_preset("tiny", "cpu", "bfloat16"), build_draft("tiny", "cpu", "bfloat16")
    for m in (target, draft):
        set_batch_invariant(m)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [100, 200, 300], [17, 900, 17, 900, 17]]
    ref = generate(target, prompts, 32).tokens
    for tree in ("chain:4", "static:2,2,1", "dynamic:topk=3,depth=3,tokens=8"):
        res = SpecEngine(target, ModelDrafter(draft, target), tree).generate(prompts, 32, SamplingParams())
        assert res.tokens == ref, tree


def test_cli_batch_invariant_speculation_reproduces_decoding(capsys):
    """`specmoe generate --batch-invariant` in bf16: the speculative tokens are the plain decoding's."""
    import json
    from specmoe_ext.cli import main
    base = ["generate", "--device", "cpu", "--dtype", "bfloat16", "--no-progress", "--json", "--batch-invariant",
            "--max-new-tokens", "24", "--ignore-eos", "--prompt", "Return a new", "--prompt", "The default value of"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["outputs"]
    assert main([*base, "--draft", "model", "--tree", "dynamic:topk=3,depth=3,tokens=8"]) == 0
    spec = json.loads(capsys.readouterr().out)["outputs"]
    assert [o["tokens"] for o in spec] == [o["tokens"] for o in plain] and all(len(o["tokens"]) == 24 for o in plain)

"""Batch-invariant dense projections (issue 18, first part): a token's projection result does not depend on
how many other tokens share the forward.

Shape legend: M rows (tokens) of one call, C the fixed chunk of rows, k input features, n output features.

A GEMM library picks its blocking (and on CUDA its kernel and split-K) from the problem shape, so the same
row multiplied by the same weight rounds differently at M = 1 (decode) and M = bs * T (verification):
`bench/bench_invariance.py` names the q/k/v projection as the first component where the verify forward
leaves the decode step's bits, on the CPU in float32 already. Here every projection runs on chunks of
exactly C rows (zero-padded), so every call has the one shape (C, k) x (k, n) whatever M is; a row's
result is then the same in any batch and at any position of its chunk (checked in tests/test_invariant.py
on the CPU; on CUDA it holds as long as the library's choice for a shape is fixed and deterministic, which
bench_invariance.py measures there).

    set_batch_invariant(model, chunk=None)    every nn.Linear of the model (and its LM head) -> chunked;
                                              chunk None: 16 on the CPU, 128 on CUDA; 0 turns it off
Eager steps of a batch-invariant target attend the whole cache capacity (engine._Loop._bound_attention: a
dense-mask attention over a step-dependent number of slots would round differently).
Cost: M is rounded up to a multiple of C (decode: C - 1 padding rows, which memory-bound projections
barely notice), and a forward with M > C rows reads each weight ceil(M / C) times. Not yet measured on a GPU.
What stays to make the whole step invariant (measured by bench_invariance.py): attention (the tree kernel's
split count and warp layout depend on T and bs), the fused MoE (its path and per-warp split depend on the
other tokens' routing), and reductions sized by the row count.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = {"cpu": 16, "cuda": 128}


def invariant_linear(x: Tensor, weight: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
    """F.linear over [..., k] computed on chunks of exactly `chunk` rows -> [..., n], bitwise independent of
    the other rows."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    M = rows.shape[0]
    pad = (-M) % chunk
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([F.linear(rows[i:i + chunk], weight, bias) for i in range(0, rows.shape[0], chunk)])
    return out[:M].reshape(*shape[:-1], weight.shape[0])


class InvariantLinear(nn.Linear):
    """nn.Linear whose forward is `invariant_linear` (same parameters and state-dict keys)."""

    chunk: int = 16

    def forward(self, x: Tensor) -> Tensor:
        return invariant_linear(x, self.weight, self.bias, self.chunk)


def set_batch_invariant(model: nn.Module, chunk: int | None = None) -> int:
    """Make every dense projection of `model` batch-invariant (in place; chunk 0: back to nn.Linear) -> the
    chunk in use. The model's LM head (Transformer.lm_head) follows `model.invariant_chunk`."""
    if chunk is None:
        p = next(model.parameters(), None)
        chunk = DEFAULT_CHUNK.get(p.device.type if p is not None else "cpu", 128)
    if chunk < 0:
        raise ValueError(f"batch-invariant chunk must be >= 0 (0 = off), got {chunk}")
    for m in model.modules():
        if chunk and type(m) is nn.Linear:
            m.__class__ = InvariantLinear
        if isinstance(m, InvariantLinear):
            if chunk:
                m.chunk = chunk
            else:
                m.__class__ = nn.Linear
                del m.chunk
    model.invariant_chunk = chunk
    return chunk

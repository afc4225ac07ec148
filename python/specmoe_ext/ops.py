"""Typed wrappers for the specmoe::* ops, and their fake (meta) kernels for torch.compile / graphs.

Shape legend: T tokens, E experts, K experts per token, B budget, Bk = min(B, E).
The contracts here are the ones `reference.py` implements in plain PyTorch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _C
from .routing_types import Routing, SCORINGS, POLICIES

_ops = torch.ops.specmoe

REBUILD_HINT = (
    "specmoe_ext was built without CUDA kernels (CPU-only torch or no nvcc at build time). Rebuild on a "
    "machine with a CUDA build of torch and nvcc: `TORCH_CUDA_ARCH_LIST=9.0a pip install "
    "--no-build-isolation --no-deps -e .`")


def _require_kernels_for(t: Tensor) -> None:
    if t.is_cuda and not _C.WITH_CUDA:
        raise RuntimeError(REBUILD_HINT)


def route_topk(logits: Tensor, top_k: int, *, scoring: str = "softmax", bias: Tensor | None = None,
               renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Natural top-K expert routing.

    logits [T, E] (float32, bfloat16 or float16) -> (weights [T, K] float32, ids [T, K] int32).
    scoring: "softmax" over all E or elementwise "sigmoid". bias [E] float32, optional: added to the
    probabilities for *selection only* (DeepSeek-V3). renormalize: divide weights by their sum
    (norm_topk_prob). Ids are best-first; ties go to the lower expert index. NaN logits count as -inf.
    """
    _require_kernels_for(logits)
    return _ops.route_topk(logits, top_k, scoring, bias, renormalize)


def route_budget(logits: Tensor, top_k: int, budget: int | None = None, *, scoring: str = "softmax",
                 bias: Tensor | None = None, renormalize: bool = True,
                 token_weights: Tensor | None = None, protect: Tensor | None = None,
                 policy: str = "substitute", check_finite: bool = False) -> Routing:
    """Top-K routing under a per-layer expert budget (MoE-Spec), plus grouping for the expert GEMM.

    logits [T, E]; budget B >= top_k (None: B = E, plain routing). Expert scores
    s[e] = sum_t token_weights[t] * P[t, e] (token_weights [T] float32, default 1); the Bk = min(B, E)
    best experts are kept (ties to the lower index), the natural experts of tokens with
    protect[t] (bool [T]) ranked first. policy "substitute": each token re-picks its top-K among the
    kept experts; "truncate": out-of-budget slots become id -1 / weight 0. Weights are then
    renormalized when `renormalize`. With B >= E the result equals `route_topk` exactly.
    Outputs have fixed sizes (no host synchronization; CUDA-graph capturable): see `Routing`.

    NaN logits count as -inf (probability 0, chosen last). check_finite=True raises instead, at the
    cost of a host synchronization (not for graph capture).
    """
    if budget is None:
        budget = logits.shape[-1] if logits.dim() == 2 else top_k
    if check_finite and logits.is_floating_point() and not bool(torch.isfinite(logits).all()):
        raise ValueError("route_budget: logits contain NaN or Inf (check_finite=True)")
    _require_kernels_for(logits)
    return Routing(*_ops.route_budget(logits, top_k, budget, scoring, bias, renormalize,
                                      token_weights, protect, policy))


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing) -> Tensor:
    """Expert FFN of an MoE layer over the experts `routing` kept (the output of `route_budget`).

    x [T, h] (bfloat16/float16; float32 on CPU), w13 [E, 2f, h] (rows [0, f) gate = W1, [f, 2f) up =
    W3), w2 [E, h, f] -> y [T, h] in x's dtype:
        y[t] = sum_k weights[t, k] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t]),  e = ids[t, k]
    Only kept experts with at least one (token, slot) pair are read. h and f must be multiples of 64.
    The silu * up activation is rounded to x's dtype (as HF models do); accumulation is float32, in a
    fixed order (deterministic). No host synchronization on CUDA (graph capturable).
    """
    _require_kernels_for(x)
    return _ops.fused_moe(x, w13, w2, routing.weights, routing.kept_experts, routing.expert_counts,
                          routing.expert_offsets, routing.sorted_pairs)


# ---- fake kernels: output metadata only, for torch.compile, meta tensors and graph capture --------

@torch.library.register_fake("specmoe::route_topk")
def _route_topk_fake(logits, top_k, scoring="softmax", bias=None, renormalize=True):
    T = logits.shape[0]
    return (logits.new_empty((T, top_k), dtype=torch.float32),
            logits.new_empty((T, top_k), dtype=torch.int32))


@torch.library.register_fake("specmoe::route_budget")
def _route_budget_fake(logits, top_k, budget, scoring="softmax", bias=None, renormalize=True,
                       token_weights=None, protect=None, policy="substitute"):
    T, E = logits.shape
    bk = min(budget, E)
    i32 = dict(dtype=torch.int32)
    return (logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), **i32),
            logits.new_empty((bk,), **i32), logits.new_empty((bk,), **i32),
            logits.new_empty((bk + 1,), **i32), logits.new_empty((T * top_k,), **i32))


@torch.library.register_fake("specmoe::fused_moe")
def _fused_moe_fake(x, w13, w2, weights, kept_experts, expert_counts, expert_offsets, sorted_pairs):
    return x.new_empty(x.shape)


__all__ = ["route_topk", "route_budget", "fused_moe", "Routing", "SCORINGS", "POLICIES"]

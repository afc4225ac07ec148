"""Expert FFN of an MoE layer, computed from a `Routing` (the grouping `route_budget` produces).

Shape legend: N tokens (bs*T flattened), h hidden, f expert FFN, E experts, K experts per token,
Bk kept experts (min(budget, E); = E without a budget), P = N*K (token, slot) pairs.

    y[n] = sum_k weights[n, k] * W2[ids[n, k]] @ (silu(W1[e] x[n]) * W3[e] x[n])
    w13 [E, 2f, h]: rows [0, f) are W1 (gate), rows [f, 2f) are W3 (up)  -- HF's fused `gate_up_proj`
    w2  [E, h, f]                                                          -- HF's `down_proj`

This is the layout the fused-MoE CUDA kernel consumes; `moe_experts` is the single place it drops in.
Implementations (all read only the experts the routing keeps):
  "fused"   specmoe::fused_moe, the hand-written CUDA kernel (bf16/fp16, h and f multiples of 64):
            default on CUDA below FUSED_MAX_PAIRS_PER_EXPERT average (token, slot) pairs per kept
            expert (decode, trees, prefill chunks), where it beats grouped GEMM
            (bench/results/moe_*.json); no host sync, graph capturable; runs the shared expert too.
  "loop"    per kept expert, a GEMM over its group of rows (host-known offsets: one sync; the CPU
            fallback where the op's shape rule fails). On the CPU the default is "fused": the op's CPU
            implementation (C++), so the CPU step reads the device exactly as the GPU step does (never).
  "grouped" `torch._grouped_mm` / `F.grouped_mm` over the Bk groups (CUDA + bf16; CUDA-graph capturable).
  "gather"  per (token, slot) pair, gathers that expert's matrices and uses bmm (any dtype/device, no
            host sync, so CUDA-graph capturable; reads K*N expert matrices -- a fallback only).
Accumulation over the K slots is in float32, in a fixed order (no atomics): results are deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing_types import Routing

IMPLS = ("fused", "loop", "grouped", "gather")
# The fused kernel (its tiled path past a few pairs per expert) matches or beats torch._grouped_mm up to
# 32 pairs per kept expert on all four bench shapes; at 64+ the GEMMs are compute-bound and CUTLASS's
# grouped GEMM is up to 1.4x faster on the large experts (H100, bench/results/moe_*.json).
FUSED_MAX_PAIRS_PER_EXPERT = 48
_grouped_mm_fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(x: Tensor) -> bool:
    """True when the CUTLASS grouped GEMM applies: CUDA bf16 on sm_80+ (sm_90 for torch < 2.9)."""
    if _grouped_mm_fn is None or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    tv = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return major >= 8 if tv >= (2, 9) else major == 9


def _op_shapes(w13: Tensor | None) -> bool:
    return w13 is None or (w13.shape[-1] % 64 == 0 and (w13.shape[-2] // 2) % 64 == 0)


def fused_available(x: Tensor, w13: Tensor | None = None) -> bool:
    from .. import cuda_kernels_available
    return (x.is_cuda and cuda_kernels_available() and x.dtype in (torch.bfloat16, torch.float16)
            and _op_shapes(w13))


def default_impl(x: Tensor, w13: Tensor | None = None, routing_k: int | None = None,
                 num_kept: int | None = None) -> str:
    if not x.is_cuda:
        return "fused" if _op_shapes(w13) else "loop"
    if w13 is not None and fused_available(x, w13):
        K = routing_k if routing_k is not None else 1
        if x.shape[0] * K < FUSED_MAX_PAIRS_PER_EXPERT * (num_kept or w13.shape[0]):
            return "fused"
    # the CUTLASS path wants 16-byte aligned rows: h and f multiples of 8 bf16 elements
    aligned = w13 is None or (w13.shape[-1] % 8 == 0 and w13.shape[-2] % 16 == 0)
    return "grouped" if aligned and grouped_mm_available(x) else "gather"


def _combine(pair_out: Tensor, pair_index: Tensor, weights: Tensor, n_tokens: int, dtype: torch.dtype) -> Tensor:
    """pair_out [P', h] rows for the pairs `pair_index` [P'] (flat t*K+k; -1 = padding row, dropped),
    weights [N, K] float32 -> y [N, h] in dtype. Each pair lands in its own row (unique indices, so
    index_copy is deterministic), then the K slots are summed in float32 in slot order."""
    N, K = weights.shape
    h = pair_out.shape[-1]
    dummy = N * K
    idx = torch.where(pair_index >= 0, pair_index.long(), torch.full_like(pair_index, dummy, dtype=torch.long))
    buf = pair_out.new_zeros((N * K + 1, h), dtype=torch.float32)
    buf.index_copy_(0, idx, pair_out.float())
    y = (buf[:N * K].view(N, K, h) * weights.float()[..., None]).sum(dim=1)
    return y.to(dtype)


def _expert_ffn_group(xg: Tensor, w13_e: Tensor, w2_e: Tensor) -> Tensor:
    f = w2_e.shape[-1]
    gu = xg @ w13_e.t()
    return (F.silu(gu[:, :f]) * gu[:, f:]) @ w2_e.t()


def _moe_loop(x: Tensor, w13: Tensor, w2: Tensor, r: Routing) -> Tensor:
    N, K = r.ids.shape
    offsets = r.expert_offsets.tolist()  # the one host synchronization
    kept = r.kept_experts.tolist()
    n_valid = offsets[-1]
    pairs = r.sorted_pairs[:n_valid].long()
    xs = x[pairs // K]
    out = x.new_empty((n_valid, x.shape[1]))
    for j, e in enumerate(kept):
        a, b = offsets[j], offsets[j + 1]
        if b > a:
            out[a:b] = _expert_ffn_group(xs[a:b], w13[e], w2[e])
    return _combine(out, pairs, r.weights, N, x.dtype)


def _moe_grouped(x: Tensor, w13: Tensor, w2: Tensor, r: Routing) -> Tensor:
    N, K = r.ids.shape
    E, f = w13.shape[0], w2.shape[-1]
    kept_n = r.kept_experts.shape[0]
    if kept_n == E:   # no budget: kept_experts = arange(E), use the weights in place (no copy)
        a13, a2 = w13, w2
    else:             # budget: the Bk kept experts' weights (copy; the fused kernel will index instead)
        kept = r.kept_experts.long()
        a13, a2 = w13.index_select(0, kept), w2.index_select(0, kept)
    pairs = r.sorted_pairs  # [P]; entries past expert_offsets[Bk] are -1
    xs = x[(pairs.clamp_min(0) // K).long()]
    offs = r.expert_offsets[1:].to(torch.int32)  # group ends; rows past the last end are left unwritten
    gu = _grouped_mm_fn(xs, a13.transpose(-2, -1), offs=offs)
    act = F.silu(gu[:, :f]) * gu[:, f:]
    out = _grouped_mm_fn(act, a2.transpose(-2, -1), offs=offs)
    # rows past offsets[Bk] hold garbage; their pair index is -1 so _combine drops them.
    return _combine(out, pairs, r.weights, N, x.dtype)


def _moe_gather(x: Tensor, w13: Tensor, w2: Tensor, r: Routing) -> Tensor:
    N, K = r.ids.shape
    f = w2.shape[-1]
    ids = r.ids.reshape(-1).long()
    valid = ids >= 0
    e = ids.clamp_min(0)
    xs = x.repeat_interleave(K, dim=0)                                    # [P, h], pair-major
    gu = torch.bmm(w13[e], xs[:, :, None])[..., 0]                       # [P, 2f]
    act = F.silu(gu[:, :f]) * gu[:, f:]
    out = torch.bmm(w2[e], act[:, :, None])[..., 0]                      # [P, h]
    pair_index = torch.where(valid, torch.arange(N * K, device=x.device), torch.full_like(ids, -1))
    return _combine(out, pair_index, r.weights, N, x.dtype)


def moe_experts(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing, impl: str | None = None,
                shared: "tuple[Tensor, Tensor, Tensor] | None" = None) -> Tensor:
    """x [N, h], w13 [E, 2f, h], w2 [E, h, f], routing over N tokens -> y [N, h] (x.dtype).
    shared = (w13s [2fs, h], w2s [h, fs], ws [N] float32) adds ws * the shared expert's FFN (Qwen2-MoE).

    impl None: default_impl ("fused" on CUDA where it wins, else "grouped" / "gather"; "loop" on CPU).
    """
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe_experts: expected x [N, h], w13 [E, 2f, h], w2 [E, h, f]; got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    N, h = x.shape
    E, two_f, h13 = w13.shape
    if h13 != h or w2.shape != (E, h, two_f // 2) or two_f % 2:
        raise ValueError(f"moe_experts: inconsistent shapes x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} (want w13 [E, 2f, h], w2 [E, h, f])")
    if routing.ids.shape[0] != N:
        raise ValueError(f"moe_experts: routing covers {routing.ids.shape[0]} tokens, x has {N}")
    impl = impl or default_impl(x, w13, routing.ids.shape[1], routing.kept_experts.shape[0])
    in_op = impl == "fused" and shared is not None and shared[0].shape[0] % 128 == 0  # the op: fs % 64 == 0
    y = _moe_experts_by_impl(x, w13, w2, routing, impl, shared if in_op else None)
    return y if in_op else _add_shared(y, x, shared)


def _add_shared(y: Tensor, x: Tensor, shared) -> Tensor:
    if shared is None:
        return y
    w13s, w2s, ws = shared
    return y + (ws[:, None] * _expert_ffn_group(x, w13s, w2s).float()).to(y.dtype)


def _moe_experts_by_impl(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing, impl: str, op_shared=None) -> Tensor:
    if impl == "fused":
        from .. import ops
        return ops.fused_moe(x, w13, w2, routing, op_shared)
    if impl == "loop":
        return _moe_loop(x, w13, w2, routing)
    if impl == "grouped":
        if not grouped_mm_available(x):
            raise RuntimeError("moe_experts impl='grouped' needs torch grouped_mm on a CUDA bf16 tensor "
                               f"(have device={x.device}, dtype={x.dtype})")
        return _moe_grouped(x, w13, w2, routing)
    if impl == "gather":
        return _moe_gather(x, w13, w2, routing)
    raise ValueError(f"moe_experts: unknown impl {impl!r}; choose one of {IMPLS}")

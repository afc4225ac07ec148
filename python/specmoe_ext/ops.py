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


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing,
              shared: "tuple[Tensor, Tensor, Tensor] | None" = None) -> Tensor:
    """Expert FFN of an MoE layer over the experts `routing` kept (the output of `route_budget`).

    x [T, h] (bfloat16/float16; float32 on CPU), w13 [E, 2f, h] (rows [0, f) gate = W1, [f, 2f) up =
    W3), w2 [E, h, f] -> y [T, h] in x's dtype:
        y[t] = sum_k weights[t, k] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t]),  e = ids[t, k]
             (+ ws[t] * W2s (silu(W1s x[t]) * W3s x[t])  with shared = (w13s [2fs, h], w2s [h, fs], ws [T] fp32))
    The optional shared expert is Qwen2-MoE's: every token, weighted by ws (its sigmoid gate).
    Only kept experts with at least one (token, slot) pair are read. h, f and fs must be multiples of
    64. The silu * up activation is rounded to x's dtype (as HF models do); accumulation is float32,
    in a fixed order (deterministic). No host synchronization on CUDA (graph capturable).
    """
    _require_kernels_for(x)
    sw13, sw2, sw = shared if shared is not None else (None, None, None)
    return _ops.fused_moe(x, w13, w2, routing.weights, routing.kept_experts, routing.expert_counts,
                          routing.expert_offsets, routing.sorted_pairs, sw13, sw2, sw)


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_lens: Tensor, tree_mask: Tensor,
                   scale: float | None = None, kv_len_hint: int = 0) -> Tensor:
    """Attention of T query tokens per request over its cached prefix plus the tree's own entries.

    q [bs, T, Hq, d] (bfloat16/float16; float32 on CPU; d in {64, 128} on CUDA), k_cache / v_cache
    [bs, Hk, S, d] (a layer of the runtime's static cache; the tree's K/V already written at slots
    prefix_lens[b] + i), prefix_lens [bs] int64, tree_mask [bs, T, ceil(T/32)] int32 ancestor bitmask
    (bit j of row t: query t sees slot prefix + j) -> out [bs, T, Hq, d] contiguous, in q's dtype:
        out[b, t, h] = softmax(scale * q . k) v over slots j < prefix_b and prefix_b + i with bit i set.
    GQA: query head h reads KV head h // (Hq // Hk). scale defaults to d ** -0.5. Slots at or past
    min(prefix_b + T, S) are never read. kv_len_hint (the longest prefix + T expected; 0 = S) only
    steers how the CUDA kernel splits the sequence. T = 1 with tree_mask = 1 is plain decode. No host
    synchronization on CUDA (graph capturable); deterministic.
    """
    _require_kernels_for(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.tree_attention(q, k_cache, v_cache, prefix_lens, tree_mask, float(scale), int(kv_len_hint))


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
def _fused_moe_fake(x, w13, w2, weights, kept_experts, expert_counts, expert_offsets, sorted_pairs,
                    shared_w13=None, shared_w2=None, shared_weight=None):
    return x.new_empty(x.shape)


@torch.library.register_fake("specmoe::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, prefix_lens, tree_mask, scale, kv_len_hint=0):
    return q.new_empty(q.shape)


__all__ = ["route_topk", "route_budget", "fused_moe", "tree_attention", "Routing", "SCORINGS", "POLICIES"]


# ---- verify step: tree acceptance and KV compaction (csrc/kernels/tree_accept.h, kv_compact.h) -------

def tree_accept(logits: Tensor, tokens: Tensor, parent: Tensor, valid: Tensor, *, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: Tensor, offset: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Accepted path + bonus token of a verified draft tree, on the device, no host synchronization.

    logits [bs, T, V] (bf16/fp16/fp32, contiguous; target logits at every node), tokens / parent [bs, T]
    int64 (parent[:, 0] = -1, parent[i] < i), valid [bs, T] bool, seed / offset [bs] int64 (Philox key and
    counter per request; `offset` is advanced by 1 in place on every call, so CUDA-graph replays draw
    fresh numbers) -> (path [bs, T] int64 root-first node indices, -1 padded; n_accepted [bs] int64 =
    path length - 1; bonus [bs] int64).

    temperature 0: greedy, identical to spec.accept.accept_greedy. temperature > 0: the target-sampling
    rule (spec.accept.accept_target_sampling) with node i of request b drawing from its distribution
    softmax(logits / temperature) restricted by top_k (0 = off) and top_p (1.0 = off) with the uniform
    Philox4x32-10(key = seed[b], counter = (offset[b], i, 0)) word 0 >> 8 * 2^-24. Exact integer masses
    (deterministic, CPU == CUDA bit for bit); top-k / top-p keep every token tied at the boundary
    (HF keeps a prefix of a sorted order: the only difference). See `reference.tree_accept`.
    """
    _require_kernels_for(logits)
    return _ops.tree_accept(logits, tokens, parent, valid, float(temperature), float(top_p), int(top_k),
                            seed, offset)


def kv_compact(cache: "list[Tensor]", lengths: Tensor, path: Tensor, n_accepted: Tensor) -> None:
    """Moves each request's accepted path into place in every cache tensor and commits, in place.

    cache: list of N <= 256 tensors [bs, Hk, S, d] (K of every layer then V of every layer; one shape,
    dtype and device; contiguous), lengths [bs] int64 committed lengths before the step (becomes
    lengths + n_accepted + 1), path [bs, P] / n_accepted [bs] int64 as returned by `tree_accept`.
    Slot lengths[b] + path[b, j] moves to lengths[b] + j for j = 1..n (same as spec.kv.kv_compact).
    CPU: malformed paths / capacity overflow raise before any write. CUDA (no host sync, graph
    capturable): such moves are skipped instead, never written out of bounds.
    """
    if cache:
        _require_kernels_for(cache[0])
    _ops.kv_compact(list(cache), lengths, path, n_accepted)


@torch.library.register_fake("specmoe::tree_accept")
def _tree_accept_fake(logits, tokens, parent, valid, temperature, top_p, top_k, seed, offset):
    bs, T = tokens.shape
    return (tokens.new_empty((bs, T)), tokens.new_empty((bs,)), tokens.new_empty((bs,)))


@torch.library.register_fake("specmoe::kv_compact")
def _kv_compact_fake(cache, lengths, path, n_accepted):
    return None


def philox_uniform(seed: Tensor, offset: Tensor, n: int, stream: int) -> Tensor:
    """[bs, n] float32 uniforms in [0, 1) (multiples of 2^-24) from request b's Philox stream: element i is
    Philox4x32-10(key = seed[b], counter = (offset[b], i, stream)) word 0 >> 8, times 2^-24. seed / offset
    [bs] int64 (the per-request key and counter tree_accept uses; not advanced here), stream >= 1 names the
    purpose (stream 0 is tree_accept's node draws). Identical on CPU and CUDA; no host synchronization."""
    _require_kernels_for(seed)
    return _ops.philox_uniform(seed, offset, int(n), int(stream))


@torch.library.register_fake("specmoe::philox_uniform")
def _philox_uniform_fake(seed, offset, n, stream):
    return seed.new_empty((seed.shape[0], n), dtype=torch.float32)


__all__ += ["tree_accept", "kv_compact", "philox_uniform"]

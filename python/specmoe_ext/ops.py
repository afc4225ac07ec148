"""Typed wrappers for the specmoe::* ops.

Shape legend: T tokens, E experts, K experts per token, B budget, Bk = min(B, E); bs requests, T tree
nodes, Hq/Hk heads, d head dim, S cache capacity, V vocab.
The contracts here are the ones `reference.py` implements in plain PyTorch.

Bad input raises a RuntimeError naming the argument before any kernel runs or memory is allocated, on
every backend: the CPU and CUDA kernels and the Meta (fake) kernels share one copy of the checks
(csrc/ops/<family>_common.h). The Meta kernels (csrc/ops/<family>_meta.cpp; no Python fakes) serve meta
tensors, torch.compile / FakeTensor / opcheck (dynamic shapes included; a fake CUDA tensor gets the CUDA
rules, e.g. no float32 activations) and calls that mix meta with other devices, which the dispatcher sends
there and the device checks refuse. Values the devices cannot check without a host synchronization follow
documented rules instead (each op says which), identical on CPU, CUDA and in the reference.
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
               renormalize: bool = True, n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2",
               scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Natural top-K expert routing.

    logits [T, E] (float32, bfloat16 or float16) -> (weights [T, K] float32, ids [T, K] int32).
    scoring: "softmax" over all E or elementwise "sigmoid". bias [E] float32, optional: added to the
    probabilities for *selection only* (DeepSeek-V3's e_score_correction_bias). renormalize: divide
    weights by their sum (norm_topk_prob). Ids are best-first; ties go to the lower expert index.
    Grouped top-K (DeepSeek-V2/V3, GLM-4.5): with n_group G > 1 the experts form G contiguous groups of
    E/G; each token keeps its topk_group best groups and picks its top-K among their experts. A group's
    score is the sum of its two best values ("top2", V3 / GLM) or its best value ("max", V2) of
    P + bias (bias given) or P; ties go to the lower group index; a NaN score (+Inf + -Inf bias) counts
    as -inf. Needs E % G == 0, G <= 32, topk_group * E/G >= top_k. scale (> 0): the final weights are
    multiplied by it (routed_scaling_factor, after renormalization).
    Non-finite values (rules of csrc/kernels/routing.h, the same on CPU, CUDA and in the reference):
    NaN logits count as -inf (probability 0, chosen last); +Inf logits count as the largest finite
    float, so a row's +Inf experts share its probability equally (one +Inf: that expert gets weight 1)
    and rank first; a NaN bias entry makes that expert's selection key -inf (chosen last).
    """
    _require_kernels_for(logits)
    return _ops.route_topk(logits, top_k, scoring, bias, renormalize, int(n_group), int(topk_group), group_scoring,
                           float(scale))


def route_budget(logits: Tensor, top_k: int, budget: int | None = None, *, scoring: str = "softmax",
                 bias: Tensor | None = None, renormalize: bool = True,
                 token_weights: Tensor | None = None, protect: Tensor | None = None,
                 policy: str = "substitute", check_finite: bool = False, n_group: int = 1, topk_group: int = 1,
                 group_scoring: str = "top2", scale: float = 1.0) -> Routing:
    """Top-K routing under a per-layer expert budget (MoE-Spec), plus grouping for the expert GEMM.

    logits [T, E]; budget B >= top_k (None: B = E, plain routing). Expert scores
    s[e] = sum_t token_weights[t] * P[t, e] (token_weights [T] float32, default 1); the Bk = min(B, E)
    best experts are kept (ties to the lower index), the natural experts of tokens with
    protect[t] (bool [T]) ranked first. policy "substitute": each token re-picks its top-K among the
    kept experts; "truncate": out-of-budget slots become id -1 / weight 0. Weights are then
    renormalized when `renormalize` and multiplied by `scale`. With B >= E the result equals `route_topk`
    exactly. Grouped routing (n_group, topk_group, group_scoring: see `route_topk`): the natural experts
    are the group-restricted top-K; "substitute" re-picks among the kept experts of the token's own groups
    first and fills any remaining slots with the best other kept experts (a token whose natural experts
    were all kept keeps them).
    Outputs have fixed sizes (no host synchronization; CUDA-graph capturable): see `Routing`.

    Protection is guaranteed while the protected tokens' natural experts number at most Bk (e.g. one
    protected token and B >= top_k). Beyond that the Bk best of them by score are kept (ties to the
    lower index) and the protected tokens are routed like the others (substitute: re-picked among the
    kept experts; truncate: their dropped slots become -1).
    Non-finite values follow `route_topk`'s rules, and token weights count as max(w, 0) with NaN as 0
    and +Inf as the largest finite float (a NaN or negative weight's token does not vote; scores are
    never NaN). check_finite=True raises ValueError instead for NaN / Inf logits or bias and NaN / Inf /
    negative token weights, at the cost of a host synchronization (not for graph capture).
    """
    if budget is None:
        budget = logits.shape[-1] if logits.dim() == 2 else top_k
    if check_finite:
        _refuse_non_finite(logits, bias, token_weights)
    _require_kernels_for(logits)
    return Routing(*_ops.route_budget(logits, top_k, budget, scoring, bias, renormalize,
                                      token_weights, protect, policy, int(n_group), int(topk_group), group_scoring,
                                      float(scale)))


def _refuse_non_finite(logits: Tensor, bias: Tensor | None, token_weights: Tensor | None) -> None:
    """route_budget(check_finite=True): the values the routing rules would clean raise instead (one host read)."""
    bad_entries = [  # (message, bool tensor of the offending entries), for the inputs given
        ("logits contain NaN or Inf", ~torch.isfinite(logits) if logits.is_floating_point() else None),
        ("bias contains NaN or Inf", None if bias is None else ~torch.isfinite(bias)),
        ("token_weights contain NaN, Inf or negative values",
         None if token_weights is None else ~(torch.isfinite(token_weights) & (token_weights >= 0)))]
    given = [(message, bad.any()) for message, bad in bad_entries if bad is not None]
    flags = torch.stack([any_bad for _, any_bad in given]).tolist() if given else []
    for (message, _), flag in zip(given, flags):
        if flag:
            raise ValueError(f"route_budget: {message} (check_finite=True)")


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

    The grouping must be consistent (route_budget's always is): kept_experts distinct ids in [0, E),
    expert_counts >= 0, expert_offsets their exclusive scan (<= T * K), each kept expert's sorted_pairs
    segment strictly ascending pair ids t * K + k in [0, T * K), no pair in two segments, and every pair
    with a nonzero weight in one (the CUDA kernels read exactly those). The CPU op checks all of it and
    raises naming the entry. The CUDA op trusts it (checking costs a host read) unless the environment
    sets SPECMOE_CHECK_ROUTING=1: then it copies the routing to the host and runs the same check first
    (a synchronization; refused during CUDA graph capture). Inconsistent groupings give undefined output.
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
    GQA: query head h reads KV head h // (Hq // Hk). scale (finite) defaults to d ** -0.5. kv_len_hint
    (the longest prefix + T expected; 0 = S) only steers how the CUDA kernel splits the sequence. T = 1
    with tree_mask = 1 is plain decode. No host synchronization on CUDA (graph capturable); deterministic.
    prefix_lens must lie in [0, S - T] (the tree's slots inside the cache row): the CPU op raises
    otherwise; the CUDA op cannot read the values without a sync and never reads a slot outside
    [0, min(prefix_b + T, S)) instead.
    """
    _require_kernels_for(q)
    if scale is None:
        d = q.shape[-1] if q.dim() else 0
        scale = d ** -0.5 if d > 0 else 1.0  # d = 0: the op refuses q, naming it
    return _ops.tree_attention(q, k_cache, v_cache, prefix_lens, tree_mask, float(scale), int(kv_len_hint))


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
    No two cache tensors (nor lengths) may share memory: the same tensor twice raises on every backend.
    CPU: malformed paths (n outside [0, P-1], path[b, 0] != 0, path[b, j] < j, a node that moves appearing
    twice; path[b, j] == j is a slot already in place) and capacity overflow raise before any write.
    CUDA (no host sync, graph capturable): out-of-range moves are skipped instead, never written out of
    bounds; repeated nodes are plain copies (every source is read before it is overwritten).
    """
    if cache:
        _require_kernels_for(cache[0])
    _ops.kv_compact(list(cache), lengths, path, n_accepted)


def philox_uniform(seed: Tensor, offset: Tensor, n: int, stream: int) -> Tensor:
    """[bs, n] float32 uniforms in [0, 1) (multiples of 2^-24) from request b's Philox stream: element i is
    Philox4x32-10(key = seed[b], counter = (offset[b], i, stream)) word 0 >> 8, times 2^-24. seed / offset
    [bs] int64 (the per-request key and counter tree_accept uses; not advanced here), stream >= 1 names the
    purpose (stream 0 is tree_accept's node draws). Identical on CPU and CUDA; no host synchronization."""
    _require_kernels_for(seed)
    return _ops.philox_uniform(seed, offset, int(n), int(stream))


__all__ += ["tree_accept", "kv_compact", "philox_uniform"]

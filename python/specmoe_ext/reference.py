"""Plain-PyTorch ground truth for every specmoe op (float32 upcast). Tests and benchmarks only.

Shape legend: T tokens, E experts, K experts per token, B budget (Bk = min(B, E) kept experts).

These functions state the ops' semantics; the C++ CPU and CUDA implementations must agree with them
(expert ids exactly, float outputs within dtype tolerance).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .routing_types import Routing, SCORINGS, POLICIES


def _stable_desc_order(key: Tensor) -> Tensor:
    """Indices sorting `key` descending along the last dim; equal keys keep ascending index order."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def router_probs(logits: Tensor, scoring: str) -> Tensor:
    """[T, E] logits -> [T, E] float32 probabilities. NaN logits count as -inf (probability 0);
    a softmax row with no finite logit gets all-zero probabilities."""
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    s = e.sum(dim=-1, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def selection_key(logits: Tensor, probs: Tensor, bias: Tensor | None) -> Tensor:
    """What top-K ranks: the logits themselves (same order as the probabilities, and exact across
    implementations) unless a bias is given, then probability + bias (DeepSeek-V3 style: the bias
    steers selection only, the weights come from the unbiased probabilities)."""
    if bias is None:
        x = logits.float()
        return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    return probs + bias.float()


def _weights_for(probs: Tensor, ids: Tensor, renormalize: bool) -> Tensor:
    valid = ids >= 0
    w = torch.where(valid, probs.gather(1, ids.clamp_min(0).long()), torch.zeros((), dtype=probs.dtype))
    if renormalize:
        s = w.sum(dim=-1, keepdim=True)
        w = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
    return w


def route_topk(logits: Tensor, top_k: int, scoring: str = "softmax", bias: Tensor | None = None,
               renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Natural top-K routing: ([T, K] float32 weights, [T, K] int32 expert ids, best first)."""
    assert scoring in SCORINGS
    logits, bias = logits.cpu(), (None if bias is None else bias.cpu())
    probs = router_probs(logits, scoring)
    ids = _stable_desc_order(selection_key(logits, probs, bias))[:, :top_k]
    return _weights_for(probs, ids, renormalize), ids.int()


def expert_scores(probs: Tensor, token_weights: Tensor | None) -> Tensor:
    """MoE-Spec expert scores s[e] = sum_t w_t * P[t, e] (float32 [E])."""
    if token_weights is None:
        return probs.sum(dim=0)
    return (token_weights.float()[:, None] * probs).sum(dim=0)


def route_budget(logits: Tensor, top_k: int, budget: int, scoring: str = "softmax",
                 bias: Tensor | None = None, renormalize: bool = True,
                 token_weights: Tensor | None = None, protect: Tensor | None = None,
                 policy: str = "substitute") -> Routing:
    """Budgeted routing + grouping; see `specmoe_ext.ops.route_budget` for the contract."""
    assert scoring in SCORINGS and policy in POLICIES
    logits, bias, token_weights, protect = (None if t is None else t.cpu()
                                            for t in (logits, bias, token_weights, protect))
    T, E = logits.shape
    K = top_k
    Bk = min(budget, E)
    probs = router_probs(logits, scoring)
    key = selection_key(logits, probs, bias)
    natural = _stable_desc_order(key)[:, :K]

    # Kept experts: protected first, then by score, ties to the lower index.
    protected = torch.zeros(E, dtype=torch.bool)
    if protect is not None and bool(protect.any()):
        protected[natural[protect.bool()].reshape(-1)] = True
    score = expert_scores(probs, token_weights)
    order = _stable_desc_order(score)
    order = order[torch.sort(protected[order].to(torch.int8), descending=True, stable=True).indices]
    kept_mask = torch.zeros(E, dtype=torch.bool)
    kept_mask[order[:Bk]] = True
    kept = torch.nonzero(kept_mask).flatten()

    if policy == "substitute":
        o = _stable_desc_order(key)
        o = torch.gather(o, 1, torch.sort(kept_mask[o].to(torch.int8), dim=1, descending=True,
                                          stable=True).indices)
        ids = o[:, :K]
    else:  # truncate
        ids = torch.where(kept_mask[natural], natural, torch.full_like(natural, -1))
    weights = _weights_for(probs, ids, renormalize)

    # Grouping: (token, slot) pairs as flat indices t*K+k, by kept-expert position then flat index.
    slot_of = torch.full((E,), -1, dtype=torch.long)
    slot_of[kept] = torch.arange(Bk)
    flat_slot = torch.where(ids >= 0, slot_of[ids.clamp_min(0)], torch.full_like(ids, -1)).reshape(-1)
    counts = torch.bincount(flat_slot[flat_slot >= 0], minlength=Bk)
    offsets = torch.zeros(Bk + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    valid = torch.nonzero(flat_slot >= 0).flatten()
    pairs = valid[torch.sort(flat_slot[valid], stable=True).indices]
    sorted_pairs = torch.full((T * K,), -1, dtype=torch.long)
    sorted_pairs[: pairs.numel()] = pairs
    i32 = lambda t: t.to(torch.int32)
    return Routing(weights, i32(ids), i32(kept), i32(counts), i32(offsets), i32(sorted_pairs))


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing) -> Tensor:
    """y[t] = sum_k w[t, k] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t]) in float32, computed on x's device
    from the routing's ids/weights directly (independent of its grouping); returns float32 [T, h] on CPU."""
    x = x.float()
    ids, weights = routing.ids.long().to(x.device), routing.weights.float().to(x.device)
    f = w2.shape[-1]
    y = torch.zeros_like(x)
    for e in ids[ids >= 0].unique().tolist():  # upcast only the experts used (large shapes on GPU)
        t, k = torch.nonzero(ids == e, as_tuple=True)
        gu = x[t] @ w13[e].float().t()
        out = (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]) @ w2[e].float().t()
        y.index_add_(0, t, weights[t, k, None] * out)
    return y.cpu()

"""Editing a `Routing` after the router ran, and regrouping it for the expert GEMM.

Shape legend: N tokens (bs*T flattened), K experts per token, E experts, Bk kept experts, P = N*K pairs.

Used by the speculative engine: the self-assisted drafter re-points slots of non-resident experts to
resident ones (`expert_map`), and padding nodes of draft trees are dropped (`token_mask`). Plain device
ops with no host synchronization (CUDA-graph capturable); the result satisfies the `Routing` contract
that `moe_experts` and the fused kernel consume.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..routing_types import Routing


def group_routing(weights: Tensor, ids: Tensor, kept_experts: Tensor, n_experts: int) -> Routing:
    """weights [N, K] float32, ids [N, K] (expert id, -1 = no expert), kept_experts [Bk] ascending ids
    -> the `Routing` whose grouping (counts, offsets, sorted pairs) matches these ids. Every id >= 0 must
    be one of kept_experts (the caller's contract; a stray id would silently drop its pair)."""
    N, K = ids.shape
    dev = ids.device
    ids = ids.long()
    kept = kept_experts.long()
    Bk = kept.numel()
    slot_of = torch.full((n_experts,), -1, dtype=torch.long, device=dev)
    slot_of[kept] = torch.arange(Bk, device=dev)
    flat = torch.where(ids >= 0, slot_of[ids.clamp_min(0)], torch.full_like(ids, -1)).reshape(-1)  # [N*K]
    valid = flat >= 0
    counts = torch.zeros(Bk, dtype=torch.long, device=dev).scatter_add_(0, flat.clamp_min(0), valid.long())
    offsets = torch.zeros(Bk + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    P = N * K
    pair = torch.arange(P, device=dev)
    key = torch.where(valid, flat * P + pair, Bk * P + pair)        # by kept position, then flat index
    skey, order = torch.sort(key)
    sorted_pairs = torch.where(skey < Bk * P, order, torch.full_like(order, -1))
    w = torch.where(ids >= 0, weights.float(), torch.zeros((), device=dev))
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return Routing(w, i32(torch.where(ids >= 0, ids, -1)), i32(kept), i32(counts), i32(offsets), i32(sorted_pairs))


def remap_routing(r: Routing, expert_map: Tensor | None, token_mask: Tensor | None, n_experts: int) -> Routing:
    """Re-point every slot's expert through expert_map [E] (None: unchanged) and drop the tokens with
    token_mask [N] False (None: keep all); weights are kept as they are (a substituted expert inherits
    the slot's weight), kept_experts unchanged. Regrouped with `group_routing`."""
    ids, w = r.ids.long(), r.weights
    if expert_map is not None:
        ids = torch.where(ids >= 0, expert_map.to(ids.device).long()[ids.clamp_min(0)], ids)
    if token_mask is not None:
        keep = token_mask.to(ids.device).bool()[:, None] & (ids >= 0)
        ids = torch.where(keep, ids, torch.full_like(ids, -1))
        w = torch.where(keep, w, torch.zeros_like(w))
    return group_routing(w, ids, r.kept_experts, n_experts)

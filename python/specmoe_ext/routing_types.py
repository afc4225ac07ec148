"""Types shared by the routing op, its reference and its callers."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

SCORINGS = ("softmax", "sigmoid")
POLICIES = ("substitute", "truncate")


class Routing(NamedTuple):
    """Output of `route_budget`. Bk = min(budget, E); every tensor lives on the logits' device.

    weights        [T, K]   float32  routing weight per (token, slot); 0 where ids == -1
    ids            [T, K]   int32    expert id per (token, slot); -1 = dropped (truncation policy)
    kept_experts   [Bk]     int32    the kept experts, ascending ids (weights of these may be read)
    expert_counts  [Bk]     int32    (token, slot) pairs routed to kept_experts[j]
    expert_offsets [Bk + 1] int32    exclusive prefix sum of expert_counts; [Bk] = valid pairs
    sorted_pairs   [T * K]  int32    flat pair indices t*K + k grouped by kept expert (ascending
                                     flat index within an expert); -1 after expert_offsets[Bk]

    `fused_moe` relies on this grouping being consistent (distinct kept experts, counts >= 0 scanned into
    the offsets, each pair in at most one expert's segment, every pair with a nonzero weight in one): the
    CPU op checks it, the CUDA op with SPECMOE_CHECK_ROUTING=1 (see `ops.fused_moe`).
    """

    weights: Tensor
    ids: Tensor
    kept_experts: Tensor
    expert_counts: Tensor
    expert_offsets: Tensor
    sorted_pairs: Tensor

    def experts_loaded(self) -> Tensor:
        """Kept experts that received at least one pair (the weights a grouped GEMM must read)."""
        return (self.expert_counts > 0).sum()

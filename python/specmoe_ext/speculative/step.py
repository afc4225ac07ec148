"""One speculative step: draft -> verify -> commit, on the device, for every request of the batch.

Shape legend: bs requests, T tree nodes (plan.tree.max_nodes), D = plan.tree.max_depth, V vocab.

The function below is the whole step. It reads no device value on the host and builds no tensor from
Python data, so it runs the same on the CPU, eagerly on the GPU, and captured in a CUDA graph: the graph
runner (runner.py) wraps it from outside, keyed by (bs, plan). It returns the packed record (batch.py)
that the host reads once, one step late.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..models.model import Transformer
from .batch import SpecBatch
from .config import StepPlan
from .tree import DraftTree
from .verifier import verify


def _no_mark(name: str) -> None:
    pass


def speculative_step(target: Transformer, drafter, batch: SpecBatch, plan: StepPlan,
                     mark: Callable[[str], None] = _no_mark, adaptive=None) -> Tensor:
    # L_b = committed tokens of request b in the target cache; its root (last committed token) goes to slot L_b
    batch.prefix.copy_(batch.cache.lengths)
    # 1. draft: a tree of fixed shape [bs, T] per request (root only when speculation is off). A drafter
    #    first catches up on the tokens committed since it last ran, from device state. Adaptive
    #    verification then keeps the nodes whose calibrated gain pays for their predicted cost (with a
    #    verify width W: at most W per request, compacted into a W-node tree that the target verifies).
    if plan.speculates:
        tree = drafter.propose(batch, plan)
    else:
        tree = DraftTree.root_only(batch.root)
    drafted = tree.n_valid()
    predicted = None
    if plan.adaptive:
        tree, predicted = adaptive.truncate_to_width(batch, tree, plan, plan.verify_width)
    mark("draft")
    # 2. verify: node i at position L + depth_i and slot L + i sees the prefix and its ancestors; one target
    #    forward for all nodes; accept the deepest path the target agrees with (greedy), or sample
    #    losslessly (target / q-aware rule); the accepted path's K/V moves to slots L+1.., L += n + 1.
    verdict = verify(target, batch, tree, plan)
    mark("verify")
    # 3. commit: the drafter keeps its own state in step (draft cache, features, expert heat); tokens are
    #    cut at stop tokens and max_new_tokens on the device; one packed record for the host.
    if drafter is not None:
        drafter.commit(batch, plan, tree, verdict)
    if plan.adaptive:
        adaptive.observe(tree, verdict, plan)
    return batch.commit(verdict.emitted, verdict.n_accepted, verdict.bonus, tree.n_valid(), drafted, verdict.stats,
                        predicted)

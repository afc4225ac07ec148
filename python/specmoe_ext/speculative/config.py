"""The speculative settings as types: the MoE-Spec expert budget, and the plan of one step.

Shape legend: L layers, K experts per token, B expert budget, D the tree's max depth.

    BudgetConfig(budget, policy, weights, protect_root)    lossy, opt-in (shared/algorithms.md section 3)
    StepPlan(tree, rule, sampling, budget, lag, hidden_layers, mask_padding, adaptive)
        everything that fixes the shapes and the kernels of one step: the key under which the graph
        runner captures it. tree = TreeSpec.ROOT is a step without speculation (the root alone: plain
        decoding through the same verifier); lag = committed tokens the drafter has not seen yet (the
        speculation-off steps just before this one), so its catch-up is 2 + lag tokens wide.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..models.config import ModelArgs
from ..models.generate import SamplingParams
from ..routing_types import POLICIES
from .tree import TreeSpec

WEIGHTINGS = ("uniform", "path")


@dataclass(frozen=True)
class BudgetConfig:
    """MoE-Spec expert budget for the verification forward (see shared/algorithms.md section 2).

    budget        B for every MoE layer, or one entry per layer (None = no budget for that layer)
    policy        "substitute" (re-pick top-K among kept experts) | "truncate" (drop dropped slots)
    weights       "uniform" (w_t = 1, the paper) | "path" (w_t = draft probability of reaching node t)
    protect_root  the committed root token always keeps its natural top-K experts
    """

    budget: int | tuple[int | None, ...]
    policy: str = "substitute"
    weights: str = "uniform"
    protect_root: bool = True

    @staticmethod
    def parse(text: str, **kw) -> "BudgetConfig":
        """"32" or "32,32,16,16" (one per layer; "none" or "-" = no budget for that layer)."""
        parts = [p.strip().lower() for p in str(text).split(",")]
        try:
            vals = [None if p in ("-", "none") else int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--budget {text!r}: expected an integer or a comma list per layer (e.g. 32 or "
                             f"32,32,16,16; 'none' = no budget for a layer)") from None
        budget = vals[0] if len(vals) == 1 and vals[0] is not None else tuple(vals)
        return BudgetConfig(budget, **kw)

    def validate(self, args: ModelArgs) -> None:
        if not args.is_moe:
            raise ValueError(f"an expert budget needs an MoE target ({args.architecture} has no experts)")
        if self.policy not in POLICIES:
            raise ValueError(f"budget policy {self.policy!r}: choose one of {POLICIES}")
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"budget token weights {self.weights!r}: choose one of {WEIGHTINGS}")
        K = args.top_k
        per = [self.budget] * args.n_layers if isinstance(self.budget, int) else list(self.budget)
        if len(per) != args.n_layers:
            raise ValueError(f"per-layer budget has {len(per)} entries, the model has {args.n_layers} layers")
        for i, (b, moe) in enumerate(zip(per, args.moe_layers)):
            if b is not None and moe and b < K:
                raise ValueError(f"expert budget {b} < top_k {K} (layer {i}): every token needs its {K} experts")
            if b is not None and b < 1:
                raise ValueError(f"expert budget must be >= 1, got {b} (layer {i})")

    def describe(self) -> dict:
        b = self.budget if isinstance(self.budget, int) else list(self.budget)
        return {"budget": b, "policy": self.policy, "weights": self.weights, "protect_root": self.protect_root}


@dataclass(frozen=True)
class StepPlan:
    """One step's typed plan (hashable: the graph runner's key, with the batch size)."""

    tree: TreeSpec
    rule: str                              # "greedy" | "target" | "q" (resolved: verifier.resolve_rule)
    sampling: SamplingParams               # temperature / top-p / top-k (the seed is not part of a plan)
    budget: BudgetConfig | None = None
    lag: int = 0
    hidden_layers: tuple[int, ...] = ()    # target features the drafter consumes (EAGLE-3)
    mask_padding: bool = False             # invalid tree nodes skip the experts (drafters that pad, adaptive)
    adaptive: bool = False                 # truncate the tree to its cost-effective prefix (adaptive.py)
    verify_width: int | None = None        # adaptive: verify a compacted tree of this many nodes per request

    def __post_init__(self):
        if self.sampling.seed is not None:
            object.__setattr__(self, "sampling", replace(self.sampling, seed=None))

    @property
    def speculates(self) -> bool:
        return self.tree.speculates

    @property
    def depth(self) -> int:
        return self.tree.max_depth

    @property
    def sample_drafts(self) -> bool:
        """Chain / static children drawn i.i.d. from q (the q-aware rule needs them)."""
        return self.rule == "q"

    @property
    def stats(self) -> bool:
        """Expert statistics are collected on speculative steps (a root-only step skips their kernels)."""
        return self.tree.speculates

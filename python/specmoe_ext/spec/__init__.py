"""Speculative decoding engine: draft trees, drafters, tree verification, lossless acceptance, MoE-Spec
expert budget (shared/algorithms.md sections 1-3).

Shape legend (as in every module here): bs requests, T tree nodes (node 0 = root), V vocab, E experts,
K experts per token, B expert budget.

    from specmoe_ext.models import build_preset, build_draft
    from specmoe_ext.spec import SpecEngine, ModelDrafter, BudgetConfig
    target, draft = build_preset("tiny"), build_draft("tiny")
    engine = SpecEngine(target, ModelDrafter(draft, target), tree="dynamic:topk=4,depth=5,tokens=32",
                        budget=BudgetConfig(4))            # budget: optional, lossy (MoE-Spec)
    res = engine.generate([[1, 2, 3]], max_new_tokens=64)
    res.tokens, res.summary()                                # accepted length, experts touched / loaded
"""
from .accept import (Acceptance, accept, accept_greedy, accept_q_aware, accept_target_sampling, target_probs,
                     uniforms)
from .drafters import (DRAFT_FORMS, Drafter, DraftVocabError, Eagle3Drafter, ModelDrafter, NGramDrafter,
                       SelfDrafter, SpecState, check_same_vocab, expert_affinity, make_drafter)
from .eagle import Eagle3Head, load_eagle3, save_random_eagle3
from .engine import BudgetConfig, SpecEngine, SpecResult, StepStats, speculative_generate
from .kv import kv_compact
from .tree import DraftTree, TreeSpec, TreeSpecError, ancestor_bitmask, build_tree

__all__ = [
    "Acceptance", "accept", "accept_greedy", "accept_q_aware", "accept_target_sampling", "target_probs",
    "uniforms", "DRAFT_FORMS", "Drafter", "DraftVocabError", "Eagle3Drafter", "ModelDrafter", "NGramDrafter",
    "SelfDrafter", "SpecState", "check_same_vocab", "expert_affinity", "make_drafter", "Eagle3Head",
    "load_eagle3", "save_random_eagle3", "BudgetConfig", "SpecEngine", "SpecResult", "StepStats",
    "speculative_generate", "kv_compact", "DraftTree", "TreeSpec", "TreeSpecError", "ancestor_bitmask",
    "build_tree",
]

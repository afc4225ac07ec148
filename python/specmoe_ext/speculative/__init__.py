"""Speculative decoding: draft trees, drafters, the one verifier, the device-resident step, the generation
loop (plain decoding is its root-only case), the Cascade controller, the MoESD performance model
(shared/algorithms.md).

Shape legend (as in every module here): bs requests, T tree nodes (node 0 = root), V vocab, E experts,
K experts per token, B expert budget.

    from specmoe_ext.models import build_preset, build_draft
    from specmoe_ext.speculative import SpecEngine, ModelDrafter, BudgetConfig, generate
    target, draft = build_preset("tiny"), build_draft("tiny")
    engine = SpecEngine(target, ModelDrafter(draft, target), tree="dynamic:topk=4,depth=5,tokens=32",
                        budget=BudgetConfig(4))            # budget: optional, lossy (MoE-Spec)
    res = engine.generate([[1, 2, 3]], max_new_tokens=64)
    res.tokens, res.summary()                                # accepted length, experts touched / loaded
    plain = generate(target, [[1, 2, 3]], 64)                # autoregressive, same loop
"""
from .batch import Record, SpecBatch
from .config import BudgetConfig, StepPlan
from .drafters import (DRAFT_FORMS, Drafter, DraftVocabError, Eagle3Drafter, ModelDrafter, NGramDrafter,
                       SelfDrafter, check_same_vocab, expert_affinity, make_drafter)
from .eagle import Eagle3Head, load_eagle3, save_random_eagle3
from .engine import SpecEngine, SpecResult, StepStats, generate, speculative_generate
from .mtp import MTPDrafter, NoMTPLayerError
from .runner import StepRunner
from .step import speculative_step
from .tree import DraftTree, TreeSpec, TreeSpecError, ancestor_bitmask, build_tree
from .verifier import RULES, Verdict, accept, accept_q_aware, resolve_rule, target_probs, verify

__all__ = [
    "Record", "SpecBatch", "BudgetConfig", "StepPlan", "DRAFT_FORMS", "Drafter", "DraftVocabError",
    "Eagle3Drafter", "ModelDrafter", "NGramDrafter", "SelfDrafter", "check_same_vocab", "expert_affinity",
    "make_drafter", "MTPDrafter", "NoMTPLayerError", "Eagle3Head", "load_eagle3", "save_random_eagle3", "SpecEngine", "SpecResult", "StepStats",
    "generate", "speculative_generate", "StepRunner", "speculative_step", "DraftTree", "TreeSpec",
    "TreeSpecError", "ancestor_bitmask", "build_tree", "RULES", "Verdict", "accept", "accept_q_aware",
    "resolve_rule", "target_probs", "verify",
]

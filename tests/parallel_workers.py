"""Worker side of tests/test_parallel.py: each function runs in one of N processes (gloo over a file
store, one CPU thread each) and returns what the parent compares; `spawn` runs one for every rank.

Shape legend: N ranks, bs prompts, T prompt tokens, V vocab.
"""
from __future__ import annotations

import datetime
import os
import pickle
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, out: str, fn, kwargs) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = fn(rank=rank, world=world, **kwargs)
    except Exception as e:   # noqa: BLE001 - the parent reports it
        res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn, world: int, **kwargs) -> list:
    """Run fn(rank=, world=, **kwargs) on `world` processes -> every rank's result (picklable)."""
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        mp.start_processes(_entry, args=(world, store, d, fn, kwargs), nprocs=world, join=True,
                           start_method="spawn")
        out = []
        for r in range(world):
            with open(os.path.join(d, f"{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
    errors = [r["error"] + "\n" + r["trace"] for r in out if isinstance(r, dict) and "error" in r]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return out


# ---- workers ----------------------------------------------------------------------------------------

def _cfg(mode: str, world: int, balance: str = "global"):
    from specmoe_ext.models.parallel import ParallelConfig
    return ParallelConfig(**{mode: world}, budget_balance=balance)


def logits_and_greedy(rank, world, mode, paths, prompts, new_tokens):
    """Per family checkpoint: batched logits of the prompts (different lengths) and greedy tokens."""
    from specmoe_ext.models import load_model
    from specmoe_ext.speculative import generate
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_models import _batched_logits
    out = {}
    for fam, path in paths.items():
        m = load_model(path, "cpu", "float32", parallel=_cfg(mode, world))
        out[fam] = {"logits": [x.clone() for x in _batched_logits(m, prompts)],
                    "greedy": generate(m, prompts, new_tokens).tokens}
    return out


def speculative(rank, world, mode, path, draft_path, prompts, new_tokens, cases, balance="global"):
    """Greedy speculative tokens of each (drafter, tree, budget) case on the parallel tiny target, and
    per case the most experts any rank ran in one MoE layer of one forward."""
    from specmoe_ext.models import load_model
    from specmoe_ext.speculative import generate
    from specmoe_ext.models.parallel import split_range
    from specmoe_ext.speculative import BudgetConfig, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine
    t = load_model(path, "cpu", "float32", parallel=_cfg(mode, world, balance))
    d = load_model(draft_path, "cpu", "float32")
    E = t.args.n_experts
    out = {"ar": generate(t, prompts, new_tokens).tokens}
    for kind, tree, budget in cases:
        drafter = {"model": lambda: ModelDrafter(d, t), "self": lambda: SelfDrafter(t, 4, refresh=3),
                   "ngram": lambda: NGramDrafter(t.args.vocab_size, max_n=3)}[kind]()
        eng = SpecEngine(t, drafter, tree, BudgetConfig(budget) if budget else None)
        res = eng.generate(prompts, new_tokens)
        per_rank = None
        if budget is not None:   # experts each rank's share of the budgeted routing keeps, per step
            loaded = [s.loaded for s in res.steps]
            per_rank = max(max(x) for x in loaded) if loaded else 0
        out[(kind, tree, budget)] = {"tokens": res.tokens, "max_loaded": per_rank}
    if mode == "ep":
        out["ranges"] = [split_range(E, world, r) for r in range(world)]
    return out


def balanced_caps(rank, world, path, budget, policy):
    """Experts each rank runs under a rank-balanced budget (one verify-sized forward) -> per rank count."""
    from specmoe_ext.models import load_model
    from specmoe_ext.models.model import ExpertStats, MoEControl
    from specmoe_ext.models.parallel import split_range
    t = load_model(path, "cpu", "float32", parallel=_cfg("ep", world, "rank"))
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, t.args.vocab_size, (2, 12), generator=g)
    stats = ExpertStats()
    t(toks, torch.arange(12).expand(2, 12), None, MoEControl(budget=budget, policy=policy, stats=stats))
    routed = stats.routed()                                          # [L, E] pairs per expert
    E = t.args.n_experts
    per = [[int((routed[l, slice(*split_range(E, world, r))] > 0).sum()) for r in range(world)]
           for l in range(routed.shape[0])]
    natural = int(stats.touched().max())
    return {"per_rank": per, "natural_max": natural}

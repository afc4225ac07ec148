#!/usr/bin/env python3
"""Speculative decoding on the embedded `tiny` pair: acceptance, experts touched vs loaded, tokens/s.

Shape legend: bs requests per batch, N new tokens per request, E experts (8), K experts per token (2),
B expert budget, L_moe MoE layers (4), T draft-tree nodes.

Rows, greedy, the same prompts for every row, per batch size:
  autoregressive        `generate` (on CUDA: the CUDA-graph decode, and an eager row)
  <drafter> <tree>      SpecEngine with drafter in {model (the bundled 2-layer dense draft), self (the target
                        with E/2 resident experts per layer), ngram (prompt lookup)} x tree in {chain:4,
                        dynamic:topk=4,depth=4,tokens=16}, without and with each expert budget B of --budgets
                        (default 4 and 6 of the 8 experts)
Columns: tokens/s end to end (prefill + decode, median of --repeats runs after a warm-up), accepted draft
tokens per request-step, tokens per step, mean tree nodes, experts touched (distinct experts the tree
batch's natural routing wanted) and loaded (read) per MoE layer and step, and agreement with the
autoregressive output (lossless rows must be identical; budget rows: tokens before the first divergence).

    python bench/bench_spec_tiny.py --threads 1             # CPU or GPU (auto); ~3 min on 2 CPU cores
    python bench/bench_spec_tiny.py --device cuda --batch-sizes 1,4,16
Writes bench/results/spec_tiny_<device>_<date>.json (common.write_results).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

from specmoe_ext.models import build_draft, build_preset, load_tokenizer  # noqa: E402
from specmoe_ext.models.presets import TINY_DIR  # noqa: E402
from specmoe_ext.speculative import BudgetConfig, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine, generate  # noqa: E402

PROMPTS = ["Return a new", 'def parse(text):\n    """Parse the', "The default value of the",
           "Raise ValueError if the", "Return True if the object is", "This module provides",
           "Create a new instance of the", "If the file does not exist,"]


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats: int, dev: str):
    """(result of the last call, median seconds) after one warm-up call."""
    fn()
    times, res = [], None
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        res = fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return res, statistics.median(times)


def agreement(tokens, ref) -> tuple[bool, float]:
    same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
               for x, y in zip(tokens, ref))
    return tokens == ref, same / sum(len(y) for y in ref)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 keeps greedy comparisons exact (default)")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budgets", default="4,6", help="expert budgets to run besides no budget")
    ap.add_argument("--drafters", default="model,self,ngram")
    ap.add_argument("--trees", default="chain:4;dynamic:topk=4,depth=4,tokens=16", help="';'-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    target, draft = build_preset("tiny", dev, a.dtype), build_draft("tiny", dev, a.dtype)
    tok = load_tokenizer(TINY_DIR / "target")
    args = target.args
    N = a.max_new_tokens
    rows: list[dict] = []
    budgets = [int(x) for x in a.budgets.split(",") if x.strip()]
    print(f"tiny pair on {dev} {a.dtype}: {args.n_layers} layers, E={args.n_experts}, K={args.top_k}; "
          f"{N} new tokens per request, greedy, budgets {budgets}", file=sys.stderr)
    hdr = (f"{'bs':>3} {'run':44s} {'tok/s':>8} {'acc/step':>8} {'tok/step':>8} {'nodes':>6} "
           f"{'touched per layer':>24} {'loaded per layer':>24} {'=AR':>6}")
    print(hdr)
    for bs in [int(x) for x in a.batch_sizes.split(",")]:
        ids = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(bs)]
        graph_modes = [True, False] if dev.startswith("cuda") else [False]
        ref = None
        for g in graph_modes:
            res, sec = timed(lambda: generate(target, ids, N, cuda_graph=g), a.repeats, dev)
            ref = ref or res.tokens
            row = {"bs": bs, "run": "autoregressive" + (" (CUDA graph)" if g else ""), "drafter": None, "tree": None,
                   "budget": None, "tokens_per_s": round(res.n_generated / sec, 2), "seconds": round(sec, 4),
                   "generated_tokens": res.n_generated}
            rows.append(row)
            print(f"{bs:>3} {row['run']:44s} {row['tokens_per_s']:8.1f}")
        for name in a.drafters.split(","):
            for tree in a.trees.split(";"):
                for budget in [None, *budgets]:
                    def mk():
                        d = {"model": lambda: ModelDrafter(draft, target), "self": lambda: SelfDrafter(target),
                             "ngram": lambda: NGramDrafter(args.vocab_size)}[name]()
                        return SpecEngine(target, d, tree, BudgetConfig(budget) if budget else None)
                    eng = mk()
                    res, sec = timed(lambda: eng.generate(ids, N), a.repeats, dev)
                    s = res.summary()
                    same, frac = agreement(res.tokens, ref)
                    label = f"{name} {tree}" + (f" B={budget}" if budget else "")
                    row = {"bs": bs, "run": label, "drafter": name, "tree": tree, "budget": budget,
                           "tokens_per_s": round(res.n_generated / sec, 2), "seconds": round(sec, 4),
                           "generated_tokens": res.n_generated, "accepted_per_step": s["accepted_per_step"],
                           "tokens_per_step": s["tokens_per_step"], "steps": s["steps"],
                           "tree_nodes_mean": s["tree_nodes_mean"],
                           "experts_touched_per_layer": s["experts_touched_per_layer"],
                           "experts_loaded_per_layer": s["experts_loaded_per_layer"],
                           "acceptance_histogram": s["acceptance_histogram"],
                           "draft_ms_per_step": s["draft_ms_per_step"], "verify_ms_per_step": s["verify_ms_per_step"],
                           "accept_ms_per_step": s["accept_ms_per_step"],
                           "matches_autoregressive": same, "fraction_before_divergence": round(frac, 4)}
                    rows.append(row)
                    tch = " ".join(f"{x:.2f}" for x in s["experts_touched_per_layer"])
                    ld = " ".join(f"{x:.2f}" for x in s["experts_loaded_per_layer"])
                    print(f"{bs:>3} {label:44s} {row['tokens_per_s']:8.1f} {s['accepted_per_step']:8.3f} "
                          f"{s['tokens_per_step']:8.3f} {s['tree_nodes_mean']:6.1f} {tch:>24} {ld:>24} "
                          f"{'yes' if same else f'{frac:.2f}':>6}")
    path = write_results("spec_tiny", rows, {"dtype": a.dtype, "max_new_tokens": N, "budgets": budgets,
                                             "threads": torch.get_num_threads(), "prompts": PROMPTS,
                                             "experts": args.n_experts, "top_k": args.top_k})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The real pair (issue 21): an MoE target and its distilled dense draft trained on real text
(scripts/train_pair.py on scripts/make_corpus.py's corpus), measured on the corpus's HELD-OUT subsystems.

Shape legend: bs requests per batch, P prompt tokens, N new tokens per request, E experts, K experts per token,
B expert budget per MoE layer (MoE-Spec), T tree nodes, V vocab.

Sections (rows carry "section"; JSON written after every cell, so a run cut short keeps what it measured):
  ppl       held-out perplexity of target and draft, per kind (code = C / Python sources, prose = reST / text
            documentation), over non-overlapping windows of --ppl-seq tokens (up to --ppl-tokens per kind); plus
            the draft's top-1 agreement with the target on the same tokens (a proxy of its acceptance)
  ar        autoregressive decoding (`speculative.generate`) per kind x temperature: the speed baseline and, at
            temperature 0, the reference output
  accept    SpecEngine per kind x temperature (--temperatures, default 0 and 1) x drafter (model = the trained
            draft, self = the target with E/2 resident experts, ngram = prompt lookup) x tree (--trees: chain,
            static, dynamic): accepted draft tokens and acceptance length (tokens per request-step), the
            acceptance histogram, alpha_hat, decode tokens/s and speedup over AR; greedy rows also say whether
            the output equals AR's (bf16 on the GPU may round differently between tree shapes)
  budget    the model drafter on --budget-tree (default the 16-node dynamic tree), temperature 0, per kind x
            policy (substitute, truncate) x B in --budgets (default K, 1.5K, 2K, 3K, 4K, E/4, E/2, 3E/4): acceptance
            length and its ratio to the unbudgeted run, agreement with the unbudgeted greedy output (token level:
            share of positions equal; first divergence: mean index and share of tokens before it), decode
            tokens/s and speedup over unbudgeted speculation and AR, experts loaded / touched per layer; run at
            --budget-bs requests per batch (default 1: the MoE-Spec setting, a batch-wide budget per tree)
  adaptive  the budget tree with adaptive verification (SpecEngine(..., verify="adaptive", profile=PerfProfile):
            --profile, or measured first by `specmoe plan`'s routine, bench_e2e.cost_profile), alone and with each
            --adaptive-budgets B: nodes drafted vs verified per step, acceptance, speedup over full verification
            and over AR
summary   the issue's targets: acceptance length on held-out code with the 16-node dynamic tree (>= 2.5), and
          per policy / kind the quality loss beside the speed gain of every B, the smallest B that keeps >= 99% of
          the unbudgeted acceptance length (BudgetConfig's defaults otherwise: uniform token weights, root protected)
Size: the default grid is 2 ppl + 6 AR + 36 accept + 30 budget + 6 adaptive cells (+ the cost profile's ~20 timed
points); on an H200 that is ESTIMATED at 4-5 minutes (not measured yet: graph captures dominate the short cells).
Prompts: --prompts per kind from distinct held-out documents (a seeded choice), P tokens starting at a line start,
no stop tokens (every request makes N tokens). Order under --time-limit: ppl, then per kind AR and the main cell,
budget grid, adaptive, the rest of the accept grid; cells past the limit are recorded as skipped.

    python bench/bench_real_pair.py --target runs/realpair/target --draft runs/realpair/draft \
        --corpus corpus/realpair --time-limit 280                   # the GPU run (scripts/h200_run.sh realpair)
    python bench/bench_real_pair.py --smoke --target T --draft D --corpus C     # CPU smoke (tests)
Writes bench/results/realpair_<device>_<date>.json (common.write_results; --out-dir elsewhere) and, with
matplotlib, <same stem>_budget.png: quality vs B beside speed vs B.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "scripts"))
import common  # noqa: E402
from common import write_results  # noqa: E402

from specmoe_ext.models import SamplingParams, load_model  # noqa: E402
from specmoe_ext.speculative import (BudgetConfig, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine,  # noqa: E402
                                     TreeSpec, generate)
from specmoe_ext.speculative.engine import SpecResult  # noqa: E402

MAIN_TREE = "dynamic:topk=4,depth=5,tokens=16"


def log(msg: str) -> None:
    print(f"[bench_real_pair {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free(dev: torch.device) -> None:
    """Drop the last cell's engine (its caches and captured graphs) before the next one allocates."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- data ------------------------------------------------------------------------------------------------

def heldout_docs(corpus: Path) -> list[dict]:
    from make_corpus import read_jsonl_xz
    return list(read_jsonl_xz(corpus / "heldout.jsonl.xz"))


def make_prompts(docs: list[dict], tok, kind: str, n: int, P: int, N: int, seed: int) -> list[dict]:
    """n prompts of P tokens from distinct held-out documents of `kind` that have P + N tokens past a line start."""
    import random
    rng = random.Random(seed)
    cands = sorted((d for d in docs if d["kind"] == kind), key=lambda d: d["path"])
    rng.shuffle(cands)
    tok.encode_special_tokens = True
    out = []
    for d in cands:
        text = d["text"]
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
        s = starts[rng.randrange(len(starts))] if len(starts) > 1 else 0
        ids = tok.encode(text[s:], add_special_tokens=False).ids
        if len(ids) < P + N:
            ids = tok.encode(text, add_special_tokens=False).ids
            s = 0
        if len(ids) >= P + N:
            out.append({"path": d["path"], "subsystem": d["subsystem"], "char_start": s, "ids": ids[:P],
                        "continuation": ids[P:P + N]})
        if len(out) == n:
            break
    tok.encode_special_tokens = False
    return out


# ---- perplexity ---------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(target, draft, ids: torch.Tensor, seq: int, max_tokens: int, batch: int) -> dict:
    """Non-overlapping windows of seq + 1 tokens: mean CE (nats) of both models and draft/target top-1 agreement."""
    dev = target.tok_embeddings.weight.device
    n_win = min((ids.numel() - 1) // seq, max(1, max_tokens // seq))
    tot = {"target": 0.0, "draft": 0.0}
    agree, count = 0, 0
    for i in range(0, n_win, batch):
        w = torch.stack([ids[j * seq:j * seq + seq + 1] for j in range(i, min(n_win, i + batch))]).to(dev).long()
        x, y = w[:, :-1], w[:, 1:]
        pos = torch.arange(seq, device=dev).expand(x.shape[0], seq)
        argmax = {}
        for name, m in (("target", target), ("draft", draft)):
            logits = m(x, pos)[0].float()
            tot[name] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            argmax[name] = logits.argmax(-1)
        agree += int((argmax["target"] == argmax["draft"]).sum())
        count += y.numel()
    out = {"tokens": count, "windows": n_win, "seq": seq}
    for name, v in tot.items():
        out[f"{name}_ce"] = round(v / max(1, count), 4)
        out[f"{name}_ppl"] = round(math.exp(v / max(1, count)), 3)
    out["draft_target_top1_agreement"] = round(agree / max(1, count), 4)
    return out


# ---- generation cells ------------------------------------------------------------------------------------

def merged(results: list[SpecResult]) -> SpecResult:
    return SpecResult(tokens=[t for r in results for t in r.tokens],
                      finish_reasons=[f for r in results for f in r.finish_reasons],
                      prompt_lens=[p for r in results for p in r.prompt_lens],
                      prefill_s=sum(r.prefill_s for r in results), decode_s=sum(r.decode_s for r in results),
                      decode_steps=sum(r.decode_steps for r in results),
                      cuda_graph=any(r.cuda_graph for r in results), steps=[s for r in results for s in r.steps],
                      config=results[0].config if results else {})


def run_batches(gen, prompts: list[list[int]], N: int, bs: int, sampling: SamplingParams, warmup: int):
    """gen(prompts, n, sampling) over batches of bs prompts (one untimed warm-up call first) -> merged result."""
    if warmup > 0:
        gen(prompts[:bs], min(N, warmup), sampling)
    res = []
    for i in range(0, len(prompts), bs):
        s = sampling if sampling.seed is None else SamplingParams(sampling.temperature, sampling.top_p,
                                                                   sampling.top_k, sampling.seed + i)
        res.append(gen(prompts[i:i + bs], N, s))
    return merged(res)


def decode_rate(res, n_requests: int) -> float | None:
    return round((res.n_generated - n_requests) / res.decode_s, 2) if res.decode_s > 0 else None


def alpha_hat(hist: dict, depth: int) -> float | None:
    succ = sum(int(a) * n for a, n in hist.items())
    trials = succ + sum(n for a, n in hist.items() if int(a) < depth)
    return round(succ / trials, 4) if trials else None


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    """Token-level agreement and first divergence of each request's output against the reference."""
    firsts, same, total, ident = [], 0, 0, 0
    for x, y in zip(tokens, ref):
        n = min(len(x), len(y))
        first = next((i for i in range(n) if x[i] != y[i]), n)
        firsts.append(first)
        same += sum(a == b for a, b in zip(x, y))
        total += len(y)
        ident += x == y
    return {"token_agreement": round(same / max(1, total), 4),
            "first_divergence_mean": round(sum(firsts) / max(1, len(firsts)), 2),
            "fraction_before_divergence": round(sum(firsts) / max(1, total), 4),
            "identical_requests": round(ident / max(1, len(tokens)), 4)}


def spec_stats(res: SpecResult, tree: str) -> dict:
    s = res.summary()
    depth = TreeSpec.parse(tree).max_depth
    return {"accepted_per_step": s["accepted_per_step"], "acceptance_length": s["tokens_per_step"],
            "acceptance_histogram": s["acceptance_histogram"], "alpha_hat": alpha_hat(s["acceptance_histogram"], depth),
            "tree_nodes_mean": s["tree_nodes_mean"], "nodes_drafted_per_step": s["nodes_drafted_per_step"],
            "nodes_verified_per_step": s["nodes_verified_per_step"],
            "experts_loaded_mean": _mean(s["experts_loaded_per_layer"]),
            "experts_touched_mean": _mean(s["experts_touched_per_layer"]),
            "draft_ms_per_step": s["draft_ms_per_step"], "verify_ms_per_step": s["verify_ms_per_step"],
            "accept_ms_per_step": s["accept_ms_per_step"], "step_ms_device": s["step_ms_device"],
            "steps": s["steps"], "replayed_steps": s["replayed_steps"]}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


# ---- plot ------------------------------------------------------------------------------------------------

def plot(rows: list[dict], stem: str, title: str, E: int) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot")
        return None
    bud = [r for r in rows if r.get("section") == "budget" and r.get("acceptance_length") is not None]
    if not bud:
        return None
    fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(12, 4.6))
    kinds = sorted({r["kind"] for r in bud})
    for ci, kind in enumerate(kinds):
        for li, pol in enumerate(("substitute", "truncate")):
            sel = sorted(((r["budget"] or E), r) for r in bud if r["kind"] == kind and r.get("policy") in (pol, None))
            if len(sel) < 2:
                continue
            xs = [x for x, _ in sel]
            ls = "-" if pol == "substitute" else "--"
            c = f"C{ci}"
            ax_q.plot(xs, [r["acceptance_ratio"] for _, r in sel], ls=ls, marker="o", ms=3, color=c,
                      label=f"{kind} {pol}: acceptance length / unbudgeted")
            ax_q.plot(xs, [r["token_agreement"] for _, r in sel], ls=ls, marker="x", ms=4, color=c, alpha=0.55,
                      label=f"{kind} {pol}: token agreement with unbudgeted greedy")
            ax_q.plot(xs, [r.get("fraction_before_divergence", 1.0) for _, r in sel], ls=ls, marker="^", ms=3,
                      color=c, alpha=0.3, label=f"{kind} {pol}: share of tokens before the first divergence")
            ax_s.plot(xs, [r.get("speedup_vs_unbudgeted") for _, r in sel], ls=ls, marker="o", ms=3, color=c,
                      label=f"{kind} {pol}")
    ax_q.axhline(0.99, color="k", lw=0.7, ls=":")
    ax_s.axhline(1.0, color="k", lw=0.7)
    for ax in (ax_q, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"expert budget B per MoE layer (unbudgeted plotted at B = E = {E})")
        ax.grid(alpha=0.3)
    ax_q.set_ylabel("quality (1 = unbudgeted)")
    ax_s.set_ylabel("decode speed / unbudgeted speculation")
    ax_q.legend(fontsize=6)
    ax_s.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = f"{stem}_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "runs" / "realpair" / "target"))
    ap.add_argument("--draft", default=str(ROOT / "runs" / "realpair" / "draft"))
    ap.add_argument("--corpus", default=str(ROOT / "corpus" / "realpair"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--smoke", action="store_true", help="a few tiny cells of every section (CPU CI)")
    ap.add_argument("--kinds", default="code,prose")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per kind (default 8; smoke 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="P (default 192; smoke 24)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="N (default 128; smoke 8)")
    ap.add_argument("--batch", type=int, default=None, help="requests per batch in ar / accept (default: all prompts)")
    ap.add_argument("--trees", default=f"chain:4;static:3,2,1;{MAIN_TREE}", help="';'-separated tree specs")
    ap.add_argument("--drafters", default="model,self,ngram")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--budget-tree", default=MAIN_TREE)
    ap.add_argument("--budgets", default=None,
                    help="B grid (default K, 1.5K, 2K, 3K, 4K, E/4, E/2, 3E/4 within [K, E))")
    ap.add_argument("--policies", default="substitute,truncate")
    ap.add_argument("--budget-bs", type=int, default=1)
    ap.add_argument("--adaptive-budgets", default=None, help="B values with adaptive verification (default: 2K, E/4)")
    ap.add_argument("--profile", default=None, help="a `specmoe plan` profile JSON (default: measured first)")
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens per kind (default 1M; smoke 256)")
    ap.add_argument("--ppl-seq", type=int, default=None, help="window length (default 512; smoke 32)")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; later cells are skipped (0 = none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def default_budgets(E: int, K: int) -> list[int]:
    cands = [K, int(1.5 * K), 2 * K, 3 * K, 4 * K, E // 4, E // 2, 3 * E // 4]
    return sorted({b for b in cands if K <= b < E})


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    dev = torch.device(a.device)
    if dev.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    elif dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    sm = a.smoke
    n_prompts = a.prompts or (2 if sm else 8)
    P = a.prompt_len or (24 if sm else 192)
    N = a.max_new_tokens or (8 if sm else 128)
    ppl_tokens = a.ppl_tokens or (256 if sm else 1 << 20)
    ppl_seq = a.ppl_seq or (32 if sm else 512)
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
        common.RESULTS_DIR = os.path.abspath(a.out_dir)
    dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    target = load_model(a.target, dev, dtype)
    draft = load_model(a.draft, dev, dtype)
    from train_pair import corpus_tokenizer, tokenize_docs
    corpus = Path(a.corpus)
    tok, bos, eos = corpus_tokenizer(corpus)
    args = target.args
    E, K = args.n_experts, args.top_k
    kinds = [k for k in a.kinds.split(",") if k]
    temps = [float(t) for t in a.temperatures.split(",") if t.strip()]
    trees = [str(TreeSpec.parse(t)) for t in a.trees.split(";") if t.strip()]
    budget_tree = str(TreeSpec.parse(a.budget_tree))
    drafters = [d for d in a.drafters.split(",") if d]
    policies = [p for p in a.policies.split(",") if p]
    budgets = [int(b) for b in a.budgets.split(",")] if a.budgets else default_budgets(E, K)
    ad_budgets = ([int(b) for b in a.adaptive_budgets.split(",") if b.strip()] if a.adaptive_budgets is not None
                  else sorted({b for b in (2 * K, E // 4) if K <= b < E}))
    if sm:                                 # every section and drafter, one budget
        budgets, ad_budgets = budgets[:1], ad_budgets[:1]
    log(f"target {target.num_parameters() / 1e6:.1f}M (E={E}, K={K}), draft {draft.num_parameters() / 1e6:.1f}M, "
        f"{dtype} on {dev}; P={P} N={N}, {n_prompts} prompts per kind {kinds}")
    docs = heldout_docs(corpus)
    prompts = {k: make_prompts(docs, tok, k, n_prompts, P, N, a.seed) for k in kinds}
    for k in kinds:
        if not prompts[k]:
            raise SystemExit(f"bench_real_pair: no held-out {k} document has {P + N} tokens")
    rows: list[dict] = []
    extra = {"target": a.target, "draft": a.draft, "corpus": a.corpus, "dtype": dtype, "experts": E, "top_k": K,
             "target_parameters": target.num_parameters(), "draft_parameters": draft.num_parameters(),
             "prompt_len": P, "max_new_tokens": N, "prompts": {k: [{"path": p["path"], "char_start": p["char_start"]}
                                                                  for p in v] for k, v in prompts.items()},
             "trees": trees, "budget_tree": budget_tree, "budgets": budgets, "policies": policies,
             "budget_bs": a.budget_bs, "temperatures": temps, "drafters": drafters, "smoke": sm}

    def over_time() -> bool:
        return a.time_limit > 0 and time.time() - t_start > a.time_limit

    def save(partial=True):
        return write_results("realpair", rows, {**extra, "partial": partial,
                                                "elapsed_s": round(time.time() - t_start, 1)})

    def add(row: dict) -> dict:
        rows.append(row)
        save()
        return row

    # 1. held-out perplexity
    for k in kinds:
        if over_time():
            add({"section": "ppl", "kind": k, "skipped": "time limit"})
            continue
        texts = [d["text"] for d in docs if d["kind"] == k]
        ids = torch.from_numpy(tokenize_docs(tok, texts, bos, eos))
        r = add({"section": "ppl", "kind": k, **perplexity(target, draft, ids, ppl_seq, ppl_tokens, 8 if sm else 32)})
        log(f"ppl {k}: target {r['target_ppl']} draft {r['draft_ppl']} "
            f"top-1 agreement {r['draft_target_top1_agreement']}")

    bs_all = {k: a.batch or len(prompts[k]) for k in kinds}
    ref: dict = {}          # (kind, temp) -> AR result
    spec_ref: dict = {}     # kind -> unbudgeted budget-tree result (tokens, acceptance, rate)

    def sampling(t: float) -> SamplingParams:
        return SamplingParams(temperature=t, seed=a.seed if t > 0 else None)

    def ar_cell(k: str, t: float, bs: int) -> dict | None:
        row = {"section": "ar", "kind": k, "temperature": t, "bs": bs}
        if over_time():
            add({**row, "skipped": "time limit"})
            return None
        ids = [p["ids"] for p in prompts[k]]
        res = run_batches(lambda p, n, s: generate(target, p, n, s), ids, N, bs, sampling(t), a.warmup_tokens)
        ref[(k, t, bs)] = res
        add({**row, "decode_tokens_per_s": decode_rate(res, len(ids)), "step_ms": round(res.decode_step_ms, 4),
             "cuda_graph": res.cuda_graph, "generated_tokens": res.n_generated,
             **({"continuation_agreement": agreement(res.tokens, [p["continuation"] for p in prompts[k]])}
                if t == 0 else {})})
        log(f"ar {k} T={t} bs={bs}: {rows[-1]['decode_tokens_per_s']} tok/s")
        return rows[-1]

    def make_drafter(name: str):
        if name == "model":
            return ModelDrafter(draft, target)
        if name == "self":
            return SelfDrafter(target)
        if name == "ngram":
            return NGramDrafter(args.vocab_size)
        raise ValueError(f"unknown drafter {name!r}")

    def spec_cell(section: str, k: str, t: float, dname: str, tree: str, bs: int, budget: int | None = None,
                  policy: str | None = None, adaptive: bool = False, profile=None):
        """-> (row, merged result), or None when skipped / failed (the row is recorded then)."""
        row = {"section": section, "kind": k, "temperature": t, "drafter": dname, "tree": tree, "bs": bs,
               "budget": budget, "policy": policy, "adaptive": adaptive}
        if over_time():
            add({**row, "skipped": "time limit"})
            return None
        try:
            bcfg = BudgetConfig(budget, policy or "substitute") if budget is not None else None
            eng = SpecEngine(target, make_drafter(dname), tree, bcfg,
                             **({"verify": "adaptive", "profile": profile} if adaptive else {}))
            ids = [p["ids"] for p in prompts[k]]
            res = run_batches(lambda p, n, s: eng.generate(p, n, s), ids, N, bs, sampling(t), a.warmup_tokens)
        except Exception as e:               # keep going: the other cells are still worth having
            add({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            log(f"{section} {k} {dname} {tree} B={budget} failed: {rows[-1]['error']}")
            eng = None
            free(dev)
            return None
        eng = None
        free(dev)
        rate = decode_rate(res, len(ids))
        row.update(spec_stats(res, tree), decode_tokens_per_s=rate, generated_tokens=res.n_generated)
        ar = ref.get((k, t, bs))
        if ar is not None:
            ar_rate = decode_rate(ar, len(ids))
            row["speedup_vs_ar"] = round(rate / ar_rate, 4) if rate and ar_rate else None
            if t == 0:
                row["vs_ar"] = agreement(res.tokens, ar.tokens)
                row["matches_autoregressive"] = res.tokens == ar.tokens
        return row, res

    # 2-3. per kind: AR baselines, the main cell
    for k in kinds:
        for t in temps:
            ar_cell(k, t, bs_all[k])
        if a.budget_bs != bs_all[k]:
            ar_cell(k, 0.0, a.budget_bs)
        out = spec_cell("accept", k, 0.0, "model", budget_tree, bs_all[k])
        if out:
            add(out[0])
            log(f"accept {k} model {budget_tree}: acceptance length {out[0]['acceptance_length']}")

    # 4. budget grid (unbudgeted reference at budget_bs first)
    for k in kinds:
        out = spec_cell("budget", k, 0.0, "model", budget_tree, a.budget_bs)
        if out is None:
            continue
        row, res = out
        row.update(agreement(res.tokens, res.tokens), acceptance_ratio=1.0, speedup_vs_unbudgeted=1.0)
        spec_ref[k] = (res, row)
        add(row)
        for pol in policies:
            for b in budgets:
                o = spec_cell("budget", k, 0.0, "model", budget_tree, a.budget_bs, b, pol)
                if o is None:
                    continue
                r, rs = o
                base_res, base = spec_ref[k]
                r.update(agreement(rs.tokens, base_res.tokens))
                r["acceptance_ratio"] = (round(r["acceptance_length"] / base["acceptance_length"], 4)
                                         if r["acceptance_length"] and base["acceptance_length"] else None)
                r["speedup_vs_unbudgeted"] = (round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 4)
                                              if r["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)
                add(r)
                log(f"budget {k} {pol} B={b}: acc {r['acceptance_length']} (x{r['acceptance_ratio']}), agreement "
                    f"{r['token_agreement']}, first div {r['first_divergence_mean']}, "
                    f"speed x{r['speedup_vs_unbudgeted']}")

    # 5. adaptive verification
    if not a.no_adaptive and not over_time():
        profile, prof_info = None, {}
        try:
            from bench_e2e import cost_profile
            t0 = time.time()
            profile = cost_profile(types.SimpleNamespace(profile=a.profile, seed=a.seed), target, draft,
                                   [max(bs_all.values()), a.budget_bs], budgets[:1], dev)
            prof_info = {"profile_s": round(time.time() - t0, 1), "profile_source": a.profile or "measured here"}
        except Exception as e:
            add({"section": "adaptive", "error": f"cost profile: {type(e).__name__}: {e}"})
        if profile is not None:
            extra["cost_profile"] = prof_info
            for k in kinds:
                full = spec_ref.get(k)
                for b in [None] + ad_budgets:
                    o = spec_cell("adaptive", k, 0.0, "model", budget_tree, a.budget_bs, b, "substitute" if b else None,
                                  adaptive=True, profile=profile)
                    if o is None:
                        continue
                    r, rs = o
                    if full is not None:
                        base_res, base = full
                        rate, full_rate = r["decode_tokens_per_s"], base["decode_tokens_per_s"]
                        r["speedup_vs_full_verification"] = round(rate / full_rate, 4) if rate and full_rate else None
                        r["vs_full_verification"] = agreement(rs.tokens, base_res.tokens)
                    add(r)
                    log(f"adaptive {k} B={b}: verified {r['nodes_verified_per_step']} of {r['nodes_drafted_per_step']} "
                        f"nodes, acc {r['acceptance_length']}, x{r.get('speedup_vs_full_verification')} vs full")

    # 6. the rest of the accept grid
    for t in temps:
        for k in kinds:
            for dname in drafters:
                for tree in trees:
                    if (t, dname, tree) == (0.0, "model", budget_tree):
                        continue        # measured first
                    out = spec_cell("accept", k, t, dname, tree, bs_all[k])
                    if out:
                        add(out[0])
                        log(f"accept {k} T={t} {dname} {tree}: acceptance length {out[0]['acceptance_length']}, "
                            f"x{out[0].get('speedup_vs_ar')}")

    # summary
    summary: dict = {"total_s": round(time.time() - t_start, 1)}
    main_tree = str(TreeSpec.parse(MAIN_TREE))
    main_code = next((r for r in rows if r.get("section") == "accept" and r.get("kind") == "code" and
                      r.get("drafter") == "model" and r.get("tree") == main_tree and r.get("temperature") == 0.0
                      and "acceptance_length" in r), None)
    if main_code is not None:       # the target: >= 2.5 tokens per step on held-out code, 16-node tree
        summary["acceptance_length_code_dynamic16"] = main_code["acceptance_length"]
        summary["target_acceptance_length_ge_2_5"] = main_code["acceptance_length"] >= 2.5
    per: dict = {}
    for r in rows:
        if r.get("section") == "budget" and r.get("budget") is not None and r.get("acceptance_ratio") is not None:
            key = f"{r['kind']}/{r['policy']}"
            per.setdefault(key, []).append({"B": r["budget"], "quality_loss": round(1 - r["acceptance_ratio"], 4),
                                            "token_agreement": r["token_agreement"],
                                            "speed_gain": (round(r["speedup_vs_unbudgeted"] - 1, 4)
                                                           if r.get("speedup_vs_unbudgeted") else None)})
    for key, lst in per.items():
        lst.sort(key=lambda x: x["B"])
        ok = [x["B"] for x in lst if x["quality_loss"] <= 0.01]
        summary[f"budget {key}"] = {"grid": lst, "smallest_B_keeping_99pct_acceptance": min(ok) if ok else None}
    extra["summary"] = summary
    path = save(partial=False)
    log(f"wrote {path}")
    for key, v in summary.items():
        log(f"summary {key}: {v}")
    if not a.no_plot:
        title = (f"real pair: {Path(a.target).name} E={E} K={K} ({dtype}) on {common.device_name()}, "
                 f"{budget_tree}, bs={a.budget_bs}, P={P}, N={N}, greedy")
        p = plot(rows, os.path.splitext(path)[0], title, E)
        if p:
            log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

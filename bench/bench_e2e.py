#!/usr/bin/env python3
"""End to end: autoregressive vs speculative vs speculative + MoE-Spec budget vs the adaptive controller.

Shape legend: bs requests per batch, P prompt tokens per request, N new tokens per request, E experts, K experts
per token, B expert budget per MoE layer, V vocab, T draft-tree nodes, gamma chain length, alpha per-token
acceptance rate of the controlled drafter.

Per batch size (default 1, 2, 4, 8, 16, 32, 64), greedy, no stop tokens (every request makes N tokens):
  AR            `models.generate`: prefill + the runtime's decode step (replayed from a CUDA graph on CUDA)
  chain:g       SpecEngine, chains of the --chains lengths, no budget
  <tree>        SpecEngine with --tree (default dynamic:topk=4,depth=5,tokens=32), no budget
  ... B=b       the largest chain and the tree with each MoE-Spec budget of --budgets (lossy)
  <tree> adaptive [B=b | W=w]  the tree with adaptive verification (speculative/adaptive.py: each step verifies only
                the cost-effective prefix of each tree; cost profile from --profile or measured first by
                `specmoe plan`'s routine), alone, with each budget (truncation + MoE-Spec budget), and compacted
                to each --adaptive-widths W (at most W nodes per request, verified as a W-node tree)
  auto[...]     SpecEngine + CascadeController (`--spec auto`), one cell per '|'-separated --auto-candidates set
                (default: chain lengths k=0,1,2,4 without budget (lossless), and k=0,2,4 x budget none,B (lossy));
                a fresh controller per run (one request: it pays its own test phases); --auto-long-lived adds
                'auto[...] long-lived' cells whose one controller serves all of the cell's runs
Drafters:
  controlled    (random-weight presets, e.g. qwen3-30b-a3b) CONTROLLED ACCEPTANCE: bench/controlled.py ControlledDrafter
                proposes the target's own greedy continuation (recorded from the AR run over the same prompts,
                a few tokens longer, then made to follow each cell's own output: follow_output, --follow-runs)
                kept with probability alpha per token (--alphas, default 0.6,0.8,0.9), else a random token; its COST is a real dense draft model's forward per tree level: a random-weight
                Qwen3-0.6B-shaped model (h=1024, 28 layers; --draft-layers) with its own KV cache, whose logits
                are discarded. Random weights make real drafting meaningless, so acceptance is set, not earned.
                Lossy cells (budgets, auto with budget candidates) run at --budget-alphas only (default 0.8):
                the drafter proposes the UNBUDGETED target's continuation, so once a budgeted verifier picks a
                different token the request's drafts turn random and acceptance collapses (random-weight routers
                are also far more sensitive to expert substitution than trained ones). Their step cost is still
                measured faithfully: speedup_if_acceptance_kept = unbudgeted cell's speedup x its step time / the
                budget cell's step time. Budget effects on acceptance: see the tiny pair.
  model         (tiny) the shipped trained dense draft: real acceptance.
Metrics per cell: decode tokens/s ((generated - bs) / decode time: the first token comes from the prefill,
common to every setting) and end-to-end tokens/s (prefill included), speedup = decode tokens/s over AR's,
accepted draft tokens and tokens per request-step, alpha_hat (per-token acceptance estimated from the
acceptance histogram of chain/tree cells: accepted / (accepted + rejections)), experts touched / loaded per MoE
layer and step (StepStats, mean over layers), draft / verify / accept ms per step, AR step ms, verify_over_ar
= verify ms / AR step ms, target_efficiency = AR step / verify step (MoESD's T_T(bs,1) / T_T(bs,gamma)).
Correctness: every lossless cell's greedy output must equal the AR output token for token (the target
verifies); budget cells are lossy and report the fraction of tokens before the first divergence. Exit status 1
if a lossless cell differs (after writing everything), 0 otherwise.

    python bench/bench_e2e.py                                        # qwen3-30b-a3b on the GPU, full grid, < 8 min
    python bench/bench_e2e.py --preset tiny                          # the trained tiny pair (GPU: < 2 min)
    python bench/bench_e2e.py --quick                                # a couple of cells
    python bench/bench_e2e.py --device cpu --preset tiny             # CPU, ~20 s (default grid there: bs 1,2,4,8, N=32)
    python bench/bench_e2e.py --device cpu --preset olmoe-1b-7b --layers 1 --draft-layers 1 --quick
        --max-new-tokens 12 --prompt-len 16 --dtype float32           (one line: CPU smoke test of the random path)
Cells that would start after --time-limit seconds (default 460) are skipped and recorded as such.
Writes bench/results/e2e_<preset>_<device>_<date>.json (common.write_results; --out-dir elsewhere) and, with
matplotlib, <same stem>_speedup_vs_bs.png and <same stem>_budget.png next to it. Progress bar on stderr.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import print_table, write_results  # noqa: E402

from specmoe_ext.models import build_draft, build_preset, get_preset, load_tokenizer  # noqa: E402
from specmoe_ext.models.config import ModelArgs  # noqa: E402
from specmoe_ext.models.loader import check_device_memory, empty_model, param_bytes, resolve_dtype  # noqa: E402
from specmoe_ext.models.presets import TINY_DIR  # noqa: E402
from specmoe_ext.speculative import BudgetConfig, ModelDrafter, SpecEngine, TreeSpec, generate  # noqa: E402
from specmoe_ext.speculative.controller import CascadeController, parse_candidates  # noqa: E402
from controlled import ControlledDrafter  # noqa: E402

# The draft model whose forward passes the controlled drafter pays for: Qwen3-0.6B's published shape (same
# tokenizer family as Qwen3-30B-A3B); vocab_size is set to the target's. Random weights (seeded).
QWEN3_0_6B_SHAPE = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "torch_dtype": "bfloat16",
}

TINY_PROMPTS = ["Return a new", 'def parse(text):\n    """Parse the', "The default value of the",
                "Raise ValueError if the", "Return True if the object is", "This module provides",
                "Create a new instance of the", "If the file does not exist,", "Return the number of",
                "Set the value of the", "Read the contents of", "Remove all items from the",
                "Convert the given string to", "Open the file and return", "Add a new entry to the",
                "Return a list of all"]

# per-preset defaults (anything else: random-weight defaults with budgets E/8 and E/4)
PRESET_DEFAULTS = {
    "tiny": dict(dtype="float32", drafter="model", budgets="4,6", auto="k=0,1,2,4|k=0,2,4;budget=none,6"),
    "qwen3-30b-a3b": dict(dtype="bfloat16", drafter="controlled", budgets="16,32",
                          auto="k=0,1,2,4|k=0,2,4;budget=none,32"),
}
CONTROLLED_LABEL = "controlled acceptance"


def log(bar, msg: str) -> None:
    (bar.write if bar is not None else print)(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- models and prompts ---------------------------------------------------------------------------------

def build_random_draft(target, dev, dtype, layers: int, seed: int):
    cfg = dict(QWEN3_0_6B_SHAPE, vocab_size=target.args.vocab_size, num_hidden_layers=layers,
               max_window_layers=layers)
    args = ModelArgs.from_hf_config(cfg)
    check_device_memory(param_bytes(args, dtype), dev, "random Qwen3 draft model")
    # std 0.02 like the preset; a different seed from the target's
    return empty_model(args, dev, dtype).init_random(std=0.02, seed=seed + 7919), cfg


def make_prompts(preset: str, n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    if preset == "tiny":
        tok = load_tokenizer(TINY_DIR / "target")
        return [tok.encode(TINY_PROMPTS[i % len(TINY_PROMPTS)]) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, prompt_len), generator=g).tolist()


def cost_profile(a, target, draft, bss: list[int], budgets: list[int], dev):
    """The adaptive cells' cost profile: --profile, or `specmoe plan`'s measurement and fit on this model."""
    from specmoe_ext.speculative import plan as planlib
    from specmoe_ext.speculative.perf_model import PerfProfile
    if a.profile:
        return PerfProfile.from_json(a.profile)
    max_bs = 1 << (max(bss) - 1).bit_length()
    rp = planlib.DEFAULT_RP["cuda" if dev.type == "cuda" else "cpu"]
    t0 = time.time()
    res = planlib.plan(target, draft, max_bs, (1, 4, 16), [None] + budgets[:1], rp, repeats=5 if dev.type == "cuda" else 3,
                       seed=a.seed)
    log(None, f"cost profile: {len(res.points)} points in {time.time() - t0:.1f} s, held-out MAPE "
        f"{res.mape_held_out if res.mape_held_out is None else round(res.mape_held_out, 2)}%")
    return res.profile


# ---- the grid -----------------------------------------------------------------------------------------

class Cell:
    """One speculative setting: label, tree (str), budget (int | None), auto (controller candidates or None),
    adaptive (verify the tree's cost-effective prefix: speculative/adaptive.py)."""

    def __init__(self, label: str, tree: str, budget: int | None = None, auto: str | None = None,
                 adaptive: bool = False, long_lived: bool = False, width: int | None = None):
        self.label, self.tree, self.budget, self.auto, self.adaptive = label, tree, budget, auto, adaptive
        self.width = width                   # adaptive: verify a compacted tree of this many nodes
        self.long_lived = long_lived         # auto: one controller for every run of the cell

    @property
    def lossless(self) -> bool:
        if self.auto is not None:
            return all(c.budget is None for c in parse_candidates(self.auto))
        return self.budget is None

    def base(self) -> str:
        return self.tree if self.auto is None else "auto"


def make_cells(chains: list[int], tree: str | None, budgets: list[int], autos: list[str],
               adaptive: bool = False, long_lived: bool = False, widths: tuple[int, ...] = ()) -> list[Cell]:
    """chains, the tree, each budget on the longest chain and the tree (MoE-Spec alone), the tree with
    adaptive verification alone and with each budget (truncation + budget), the controller cells."""
    cells = [Cell(f"chain:{g}", f"chain:{g}") for g in chains]
    if tree:
        cells.append(Cell(tree, tree))
    budget_bases = ([f"chain:{max(chains)}"] if chains else []) + ([tree] if tree else [])
    for base in budget_bases:
        for b in budgets:
            cells.append(Cell(f"{base} B={b}", base, b))
    if tree and adaptive:
        cells.append(Cell(f"{tree} adaptive", tree, None, None, True))
        cells += [Cell(f"{tree} adaptive B={b}", tree, b, None, True) for b in budgets]
        cells += [Cell(f"{tree} adaptive W={w}", tree, None, None, True, width=w) for w in widths]
    for auto in autos:
        cells.append(Cell(f"auto[{auto}]", "", None, auto))
        if long_lived:
            cells.append(Cell(f"auto[{auto}] long-lived", "", None, auto, long_lived=True))
    return cells


def engine_for(cell: Cell, target, drafter, policy: str, test_steps: int, profile=None):
    """(engine, controller factory or None)."""
    if cell.auto is not None:
        cands = parse_candidates(cell.auto)
        kmax = max(c.k for c in cands)
        if kmax < 1:
            raise ValueError(f"--auto-candidates {cell.auto!r}: needs some k >= 1")
        for c in cands:
            if c.budget is not None:
                BudgetConfig(c.budget).validate(target.args)
        eng = SpecEngine(target, drafter, f"chain:{kmax}")
        if cell.long_lived:        # the cell's earlier runs are the earlier requests this controller served
            ctl = CascadeController(cands, test_steps=test_steps)
            return eng, (lambda: ctl)
        return eng, (lambda: CascadeController(cands, test_steps=test_steps))
    budget = BudgetConfig(cell.budget, policy) if cell.budget is not None else None
    if cell.adaptive:
        return SpecEngine(target, drafter, cell.tree, budget, verify="adaptive", profile=profile,
                          verify_width=cell.width), None
    return SpecEngine(target, drafter, cell.tree, budget), None


def alpha_hat(hist: dict, depth: int) -> float | None:
    """Per-token acceptance from a histogram of accepted lengths (max `depth`): successes / trials, where a step
    that accepted a < depth tokens made a + 1 trials (a successes and one rejection)."""
    succ = sum(int(a) * n for a, n in hist.items())
    trials = succ + sum(n for a, n in hist.items() if int(a) < depth)
    return round(succ / trials, 4) if trials else None


def divergence(tokens, ref) -> tuple[bool, float]:
    same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
               for x, y in zip(tokens, ref))
    return tokens == ref, round(same / max(1, sum(len(y) for y in ref)), 4)


def follow_output(run, drafter, prompts, references, n: int, iters: int) -> int:
    """Controlled acceptance made honest: the reference the drafter proposes from becomes the cell's own
    committed output. The AR reference goes stale where this cell's verification rounds differently from
    the AR decode step (bf16: a different batch of tokens per forward) and picks another token; from there
    on the request's drafts would be random. So run the cell, and where its output left the reference,
    make that output the reference and run again (the same seed gives the same drafts up to the first
    change, so the first divergence only moves later) until a run follows its reference, at most `iters`
    runs. Returns the runs made (the first is also the cell's warm-up and graph capture)."""
    for i in range(1, iters + 1):
        drafter.set_references(references)
        out = run().tokens
        new = [list(p) + list(o) + list(r[len(p) + len(o):]) for p, o, r in zip(prompts, out, references)]
        if new == references:
            return i
        references = new
    drafter.set_references(references)
    return iters


def reference_followed(res, drafter, prompts) -> float:
    """Fraction of this run's committed tokens before its first departure from the drafter's reference."""
    refs = [r[len(p):len(p) + len(o)] for p, o, r in zip(prompts, res.tokens, drafter.refs)]
    return divergence(res.tokens, refs)[1]


def timed_runs(fn, repeats: int, dev: torch.device):
    """Run fn `repeats` times -> (result with the median decode time, list of decode seconds)."""
    res = []
    for _ in range(repeats):
        sync(dev)
        res.append(fn())
    res.sort(key=lambda r: r.decode_s)
    return res[len(res) // 2], [r.decode_s for r in res]


def rates(res, bs: int) -> dict:
    dec = res.n_generated - bs
    return {"decode_tokens_per_s": round(dec / res.decode_s, 2) if res.decode_s > 0 else None,
            "tokens_per_s": round(res.tokens_per_s, 2), "prefill_ms": round(1e3 * res.prefill_s, 3),
            "decode_ms": round(1e3 * res.decode_s, 3), "generated_tokens": res.n_generated,
            "decode_steps": res.decode_steps}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def project_budget_speedups(rows: list[dict]) -> None:
    """Controlled drafter, budget cells: the drafter proposes the UNBUDGETED target's continuation, so once a
    budgeted verifier's greedy choice departs from it the request's drafts are random (acceptance collapses;
    random-weight routers are also far more sensitive to expert substitution than trained ones). The measured
    step cost stays meaningful, so add speedup_if_acceptance_kept = speedup of the same tree without budget x
    its step time / this cell's step time (the budget's cost effect at the controlled acceptance)."""
    ref = {(r["bs"], r["alpha"], r["base"]): r for r in rows
           if r.get("budget") is None and r.get("speedup") and r.get("step_ms") and r.get("setting") != "AR"}
    for r in rows:
        u = ref.get((r["bs"], r["alpha"], r.get("base")))
        if r.get("budget") is not None and r.get("step_ms") and u is not None:
            r["speedup_if_acceptance_kept"] = round(u["speedup"] * u["step_ms"] / r["step_ms"], 4)


# ---- plots --------------------------------------------------------------------------------------------

def plot(rows: list[dict], stem: str, title: str, n_experts: int) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    ok = [r for r in rows if r.get("speedup") is not None and r["setting"] != "AR"]
    if not ok:
        return []
    alphas = sorted({r["alpha"] for r in ok}, key=lambda a: -1 if a is None else a)
    out = []
    # 1. speedup vs batch size, one line per setting, one panel per alpha
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4.4), squeeze=False, sharey=True)
    color = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(r["setting"] for r in ok))}
    for ax, a in zip(axes[0], alphas):
        settings = list(dict.fromkeys(r["setting"] for r in ok if r["alpha"] == a))
        for s in settings:
            pts = sorted((r["bs"], r["speedup"]) for r in ok if r["alpha"] == a and r["setting"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    ls="--" if "B=" in s else ("-." if s.startswith("auto") else "-"), label=s, color=color[s])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"alpha = {a} ({CONTROLLED_LABEL})" if a is not None else "real acceptance (trained draft)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup vs AR (decode tokens/s)")
    busiest = max(axes[0], key=lambda ax: len(ax.get_lines()))
    busiest.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = f"{stem}_speedup_vs_bs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    # 2. speedup and accepted length vs budget (no budget plotted at B = E), per base shape and batch size
    bud = [r for r in ok if r.get("base") not in (None, "auto") and
           any(q["base"] == r["base"] and q["budget"] is not None for q in ok)]
    if bud:
        alphas = [al for al in alphas if any(r["alpha"] == al and r["budget"] is not None for r in bud)]
        fig, axes = plt.subplots(2, len(alphas), figsize=(max(9.0, 6.5 * len(alphas)), 7), squeeze=False, sharex=True)
        bss = sorted({r["bs"] for r in bud})
        bases = list(dict.fromkeys(r["base"] for r in bud))
        for j, a in enumerate(alphas):
            for bi, base in enumerate(bases):
                for ci, bs in enumerate(bss):
                    sel = sorted((((r["budget"] or n_experts), r) for r in bud
                                  if r["alpha"] == a and r["base"] == base and r["bs"] == bs), key=lambda x: x[0])
                    if not sel:
                        continue
                    xs = [x for x, _ in sel]
                    kw = dict(marker="o", ms=3, color=f"C{ci % 10}", ls=["-", "--", ":", "-."][bi % 4],
                              label=f"{base} bs={bs}")
                    axes[0][j].plot(xs, [r["speedup"] for _, r in sel], **kw)
                    proj = [(x, r.get("speedup_if_acceptance_kept", r["speedup"] if r["budget"] is None else None))
                            for x, r in sel]
                    proj = [(x, y) for x, y in proj if y is not None]
                    if a is not None and len(proj) > 1:
                        axes[0][j].plot([p[0] for p in proj], [p[1] for p in proj], color=kw["color"], ls=":",
                                        marker="x", ms=3, lw=0.8)
                    axes[1][j].plot(xs, [r["accepted_per_step"] for _, r in sel], **kw)
            axes[0][j].axhline(1.0, color="k", lw=0.8)
            axes[0][j].set_title(f"alpha = {a} ({CONTROLLED_LABEL})" if a is not None else "real acceptance",
                                 fontsize=9)
            axes[1][j].set_xlabel(f"expert budget B per layer (no budget plotted at E={n_experts})")
            for ax in axes[:, j]:
                ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("speedup vs AR" + (" (dotted x: if acceptance were kept)"
                                                 if any(a is not None for a in alphas) else ""))
        axes[1][0].set_ylabel("accepted draft tokens per step")
        axes[0][-1].legend(fontsize=5, loc="best", ncol=2)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = f"{stem}_budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


# ---- main ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", help="qwen3-30b-a3b (default) | tiny | any random preset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 for tiny (exact greedy), bfloat16 otherwise")
    ap.add_argument("--quick", action="store_true", help="a couple of cells: bs 1,4; chain:4, chain:4 with the first "
                    "budget, auto; one alpha; 32 new tokens")
    ap.add_argument("--batch-sizes", default=None, help="default 1,2,4,8,16,32,64 (CPU: 1,2,4,8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="N (default 64; CPU 32)")
    ap.add_argument("--prompt-len", type=int, default=128, help="random-weight presets: prompt tokens (tiny: text)")
    ap.add_argument("--drafter", choices=["controlled", "model"], default=None,
                    help="controlled (default for random presets) | model (tiny's trained draft; default for tiny)")
    ap.add_argument("--alphas", default="0.6,0.8,0.9", help="controlled drafter: per-token acceptance rates")
    ap.add_argument("--draft-layers", type=int, default=28,
                    help="random presets: layers of the Qwen3-0.6B-shaped draft model (its cost; default 28 = 0.6B)")
    ap.add_argument("--chains", default="2,4", help="chain lengths gamma (no budget)")
    ap.add_argument("--tree", default="dynamic:topk=4,depth=5,tokens=32", help="tree spec ('none' to skip)")
    ap.add_argument("--profile", default=None, help="cost profile for the adaptive-verification cells (a "
                    "`specmoe plan` JSON); default: measured here first (about 20 points)")
    ap.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-verification cells")
    ap.add_argument("--adaptive-widths", default="8",
                    help="verify widths W of the '<tree> adaptive W=w' cells (comma list; '' = none): the truncated "
                         "tree compacted to W nodes per request before verification")
    ap.add_argument("--budgets", default=None, help="budgets B for the longest chain and the tree "
                    "(default: qwen3 16,32; tiny 4,6; else E/8,E/4)")
    ap.add_argument("--budget-policy", default="substitute", choices=["substitute", "truncate"])
    ap.add_argument("--auto-candidates", default=None,
                    help="--spec auto candidate sets, '|'-separated, one auto cell each (default: qwen3 "
                         "'k=0,1,2,4|k=0,2,4;budget=none,32', tiny 'k=0,1,2,4|k=0,2,4;budget=none,6'; 'none' to skip)")
    ap.add_argument("--budget-alphas", default="0.8",
                    help="controlled drafter: alphas at which the lossy cells (budgets, auto with budget candidates) "
                         "run ('all' = every alpha). Their step cost hardly depends on alpha, and their acceptance "
                         "is not controlled (see the module docstring)")
    ap.add_argument("--auto-test-steps", type=int, default=2, help="controller test steps per candidate")
    ap.add_argument("--auto-long-lived", action="store_true",
                    help="also an 'auto[...] long-lived' cell per candidate set: one controller serves every run "
                         "of the cell, as consecutive requests of a server, so its test phases are charged "
                         "across requests (the timed run follows the warm-up / reference-following runs)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median decode time)")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="short untimed run per (bs, setting); 0 = none "
                    "(controlled drafter: the reference-following runs are the warm-up)")
    ap.add_argument("--follow-runs", type=int, default=4,
                    help="controlled drafter: untimed runs per cell that make the reference follow the cell's own "
                         "output (honest acceptance under bf16 rounding; 0 = the AR reference as is)")
    ap.add_argument("--time-limit", type=float, default=460.0,
                    help="seconds; cells that would start later are skipped and recorded (0 = no limit)")
    ap.add_argument("--layers", type=int, default=None, help="random presets: override the target depth (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1)")
    ap.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    dev = torch.device(a.device)
    if a.threads or dev.type == "cpu":      # tiny models: one thread is as fast and immune to OpenMP spinning
        torch.set_num_threads(a.threads or 1)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cpu = dev.type == "cpu"
    preset = get_preset(a.preset)
    pd = PRESET_DEFAULTS.get(a.preset, {})
    dtype = resolve_dtype(a.dtype or pd.get("dtype", "bfloat16"), dev)
    drafter_kind = a.drafter or pd.get("drafter", "controlled")
    if drafter_kind == "model" and preset.draft_path is None:
        raise SystemExit(f"bench_e2e: preset {a.preset!r} has no trained draft model: use --drafter controlled")
    N = a.max_new_tokens or (32 if (a.quick or cpu) else 64)
    bss = [int(x) for x in (a.batch_sizes or ("1,4" if a.quick else "1,2,4,8" if cpu else "1,2,4,8,16,32,64")).split(",")]
    alphas: list[float | None] = [float(x) for x in a.alphas.split(",")] if drafter_kind == "controlled" else [None]
    if a.quick and drafter_kind == "controlled":
        alphas = [0.8 if 0.8 in alphas else alphas[0]]
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
        common.RESULTS_DIR = os.path.abspath(a.out_dir)

    # models
    bar = None
    log(bar, f"building {a.preset} ({dtype}) on {dev}")
    t = time.time()
    target = build_preset(a.preset, dev, dtype, seed=a.seed, n_layers=a.layers)
    targs = target.args
    E, K = targs.n_experts, targs.top_k
    if drafter_kind == "model" or not preset.random:
        draft, draft_cfg = build_draft(a.preset, dev, dtype), {"source": str(preset.draft_path)}
    else:
        draft, draft_cfg = build_random_draft(target, dev, dtype, a.draft_layers, a.seed)
    sync(dev)
    build_s = time.time() - t
    log(bar, f"target {target.num_parameters() / 1e9:.3f} B params (E={E}, K={K}), draft "
        f"{draft.num_parameters() / 1e9:.3f} B params, built in {build_s:.1f} s")

    budgets = [int(x) for x in (a.budgets or pd.get("budgets") or f"{max(K, E // 8)},{max(K, E // 4)}").split(",")
               if x.strip()] if E else []
    budgets = list(dict.fromkeys(budgets))
    chains = [int(x) for x in a.chains.split(",") if x.strip()]
    tree = None if a.tree.lower() == "none" else str(TreeSpec.parse(a.tree))
    auto = a.auto_candidates or pd.get("auto") or (f"k=0,1,2,4|k=0,2,4;budget=none,{budgets[-1]}" if budgets
                                                    else "k=0,1,2,4")
    autos = [] if auto.lower() == "none" else [x.strip() for x in auto.split("|") if x.strip()]
    if a.quick:
        chains, tree, budgets, autos = [max(chains)], None, budgets[:1], autos[:1]
    widths = tuple(int(w) for w in a.adaptive_widths.split(",") if w.strip()) if a.adaptive_widths else ()
    cells = make_cells(chains, tree, budgets, autos, adaptive=not a.no_adaptive, long_lived=a.auto_long_lived,
                       widths=widths)
    profile = None
    if any(c.adaptive for c in cells):
        profile = cost_profile(a, target, draft, bss, budgets, dev)
    if drafter_kind == "controlled" and a.budget_alphas.strip().lower() != "all":
        budget_alphas = {float(x) for x in a.budget_alphas.split(",") if x.strip()}
        if not budget_alphas & set(alphas):
            budget_alphas = {alphas[len(alphas) // 2]}
    else:
        budget_alphas = set(alphas)
    plan = [(al, c) for al in alphas for c in cells if c.lossless or al in budget_alphas]
    max_depth = max([TreeSpec.parse(c.tree).max_depth for c in cells if c.auto is None] +
                    [max(s.k for s in parse_candidates(c.auto)) for c in cells if c.auto is not None] + [1])
    extra = max_depth + 1                  # reference tokens past N (the controlled drafter looks ahead)

    prompts_all = make_prompts(a.preset, max(bss), a.prompt_len, targs.vocab_size, a.seed)
    n_cells = len(bss) * (1 + len(plan))
    rows: list[dict] = []
    mismatches: list[str] = []
    from tqdm import tqdm
    bar = tqdm(total=n_cells, desc="e2e", unit="cell", file=sys.stderr, disable=a.no_progress, leave=False,
               mininterval=2.0)
    log(bar, f"grid: bs {bss}, N={N}, {len(alphas)} alpha(s) {alphas}, settings: AR + "
        f"{', '.join(c.label for c in cells)} ({n_cells} cells); drafter {drafter_kind}"
        + (f" ({CONTROLLED_LABEL})" if drafter_kind == "controlled" else ""))

    def over_time() -> bool:
        return a.time_limit > 0 and time.time() - t_start > a.time_limit

    for bs in bss:
        prompts = prompts_all[:bs]
        P = max(len(p) for p in prompts)
        ar_row = {"bs": bs, "alpha": None, "setting": "AR", "base": None, "budget": None, "drafter": None,
                  "prompt_len": P, "speedup": 1.0}
        bar.set_postfix_str(f"bs={bs} AR")
        if over_time():
            ar_row.update(speedup=None, skipped="time limit")
            rows.append(ar_row)
            for al, c in plan:
                rows.append({"bs": bs, "alpha": al, "setting": c.label, "base": c.base(), "budget": c.budget,
                             "skipped": "time limit"})
            bar.update(1 + len(plan))
            continue
        try:
            ref = generate(target, prompts, N + extra)          # reference + warm-up + graph capture (kept)
            ar, ar_times = timed_runs(lambda: generate(target, prompts, N), a.repeats, dev)
            ref_tokens = [r[:N] for r in ref.tokens]
            ar_row.update(rates(ar, bs), cuda_graph=ar.cuda_graph,
                          step_ms=round(1e3 * ar.decode_s / max(1, ar.decode_steps), 4),
                          decode_ms_runs=[round(1e3 * x, 3) for x in ar_times],
                          matches_reference_run=ar.tokens == ref_tokens)
            references = [list(p) + list(o) for p, o in zip(prompts, ref.tokens)]
            free(dev)
        except Exception as e:                       # keep going: other batch sizes are still worth having
            ar_row.update(speedup=None, error=f"{type(e).__name__}: {e}")
            rows.append(ar_row)
            log(bar, f"bs={bs} AR failed: {ar_row['error']}")
            bar.update(1 + len(plan))
            free(dev)
            continue
        rows.append(ar_row)
        bar.update(1)
        log(bar, f"bs={bs:>3} AR: {ar_row['decode_tokens_per_s']:.1f} tok/s, step {ar_row['step_ms']:.3f} ms"
            f"{' (CUDA graph)' if ar.cuda_graph else ''}")
        ar_tps, ar_step = ar_row["decode_tokens_per_s"], ar_row["step_ms"]
        warmed: set[str] = set()
        drafters: dict = {}
        for al, c in plan:
            if al not in drafters:
                drafters[al] = (ControlledDrafter(draft, target, references, al, seed=a.seed)
                                if drafter_kind == "controlled" else ModelDrafter(draft, target))
            drafter = drafters[al]
            row = {"bs": bs, "alpha": al, "setting": c.label, "base": c.base(), "budget": c.budget,
                   "drafter": drafter_kind, "acceptance": CONTROLLED_LABEL if al is not None else "real",
                   "lossless": c.lossless, "prompt_len": P}
            bar.set_postfix_str(f"bs={bs} alpha={al} {c.label}")
            if over_time():
                row["skipped"] = "time limit"
                rows.append(row)
                bar.update(1)
                continue
            try:
                eng, ctl_factory = engine_for(c, target, drafter, a.budget_policy, a.auto_test_steps, profile)

                # a fresh target cache per run (allocated before the engine's clock starts): finished
                # requests leave the batch by shrinking the cache's rows
                def run(n=N, eng=eng, ctl_factory=ctl_factory):
                    return eng.generate(prompts, n, controller=ctl_factory() if ctl_factory else None,
                                        budget_style=BudgetConfig(0, a.budget_policy))
                ref_runs = None
                if drafter_kind == "controlled" and a.follow_runs > 0:
                    ref_runs = follow_output(run, drafter, prompts, references, N, a.follow_runs)
                elif a.warmup_tokens > 0 and c.label not in warmed:
                    run(min(N, a.warmup_tokens))
                    warmed.add(c.label)
                res, times = timed_runs(run, a.repeats, dev)
                if drafter_kind == "controlled":
                    row.update(reference_runs=ref_runs, reference_followed=reference_followed(res, drafter, prompts))
                    drafter.set_references(references)
                s = res.summary()
                same, frac = divergence(res.tokens, ref_tokens)
                row.update(rates(res, bs))
                sp = row["decode_tokens_per_s"] / ar_tps if row["decode_tokens_per_s"] and ar_tps else None
                vms = s["verify_ms_per_step"]
                depth = TreeSpec.parse(c.tree).max_depth if c.auto is None else None
                row.update(
                    speedup=round(sp, 4) if sp else None,
                    accepted_per_step=s["accepted_per_step"], tokens_per_step=s["tokens_per_step"],
                    alpha_hat=alpha_hat(s["acceptance_histogram"], depth) if depth else None,
                    acceptance_histogram=s["acceptance_histogram"], tree_nodes_mean=s["tree_nodes_mean"],
                    nodes_drafted_per_step=s["nodes_drafted_per_step"],
                    nodes_verified_per_step=s["nodes_verified_per_step"],
                    predicted_over_measured_step=s["predicted_over_measured_step"], adaptive=c.adaptive,
                    experts_loaded_mean=mean(s["experts_loaded_per_layer"]),
                    experts_touched_mean=mean(s["experts_touched_per_layer"]),
                    experts_loaded_per_layer=s["experts_loaded_per_layer"],
                    experts_touched_per_layer=s["experts_touched_per_layer"],
                    draft_ms_per_step=s["draft_ms_per_step"], verify_ms_per_step=vms,
                    accept_ms_per_step=s["accept_ms_per_step"],
                    step_ms=round(1e3 * res.decode_s / max(1, res.decode_steps), 4),
                    device_step_ms=s["step_ms_device"],
                    ar_step_ms=ar_step, verify_over_ar=round(vms / ar_step, 4) if vms and ar_step else None,
                    target_efficiency=round(ar_step / vms, 4) if vms and ar_step else None,
                    decode_ms_runs=[round(1e3 * x, 3) for x in times],
                    matches_autoregressive=same, fraction_before_divergence=frac)
                if c.adaptive and row["alpha_hat"] is not None:
                    # a path that ends at a leaf the truncation kept counts as a rejection in alpha_hat's
                    # trials, so for truncated trees it is only a lower bound of the per-token acceptance
                    row["alpha_hat_lower_bound"], row["alpha_hat"] = row["alpha_hat"], None
                if row["device_step_ms"]:     # wall time the host adds per step (0 when the GPU is the bottleneck)
                    row["host_overhead_ms_per_step"] = round(row["step_ms"] - row["device_step_ms"], 4)
                    row["draft_share"] = round((s["draft_ms_per_step"] or 0) / row["device_step_ms"], 4)
                if c.auto is not None:
                    row["controller"] = res.config.get("controller")
                if c.lossless and not same:
                    mismatches.append(f"bs={bs} alpha={al} {c.label} (agree {frac:.3f})")
                log(bar, f"bs={bs:>3} a={al} {c.label:40s} {row['decode_tokens_per_s']:9.1f} tok/s "
                    f"x{row['speedup'] or 0:.3f} acc {s['accepted_per_step']:.2f} a_hat {row['alpha_hat']} "
                    f"ref {row.get('reference_followed')} ({row.get('reference_runs')} runs) "
                    f"step {row['step_ms']} ms (draft {s['draft_ms_per_step']}) "
                    f"loaded {row['experts_loaded_mean']} verify {vms} ms"
                    f"{'' if same else ' DIFFERS from AR' + (' (lossy)' if not c.lossless else '')}")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(bar, f"bs={bs} alpha={al} {c.label} failed: {row['error']}")
                free(dev)
            rows.append(row)
            bar.update(1)
            # what is measured so far survives a run cut short (rewritten complete at the end)
            write_results(f"e2e_{a.preset}", rows, {"partial": True, "preset": a.preset, "max_new_tokens": N})
        free(dev)
    bar.close()
    if drafter_kind == "controlled":
        project_budget_speedups(rows)

    total_s = round(time.time() - t_start, 1)
    cost = (f"Qwen3-shaped {draft.args.n_layers}-layer random draft's cost" if preset.random
            else "the bundled draft's cost")
    title = (f"{a.preset} ({str(dtype).replace('torch.', '')}) on {common.device_name()}, P={P if bss else '-'}, "
             f"N={N}, greedy; drafter {drafter_kind}"
             + (f" ({CONTROLLED_LABEL}, {cost})" if drafter_kind == "controlled" else " (trained, real acceptance)"))
    extra_doc = {
        "preset": a.preset, "dtype": str(dtype).replace("torch.", ""), "max_new_tokens": N,
        "prompt_len": a.prompt_len if a.preset != "tiny" else "text prompts", "batch_sizes": bss,
        "drafter": drafter_kind, "acceptance": CONTROLLED_LABEL if drafter_kind == "controlled" else "real",
        "alphas": alphas, "draft_model": {"parameters": draft.num_parameters(), "layers": draft.args.n_layers,
                                          "hidden": draft.args.hidden_size, **draft_cfg},
        "target_parameters": target.num_parameters(), "experts": E, "top_k": K, "chains": chains, "tree": tree,
        "budgets": budgets, "budget_policy": a.budget_policy, "auto_candidates": auto,
        "auto_test_steps": a.auto_test_steps, "repeats": a.repeats, "warmup_tokens": a.warmup_tokens,
        "follow_runs": a.follow_runs,
        "quick": a.quick, "build_s": round(build_s, 1), "total_s": total_s, "time_limit_s": a.time_limit,
        "threads": torch.get_num_threads(), "lossless_mismatches": mismatches,
        "notes": ("speedup = decode tokens/s / AR decode tokens/s (prefill excluded; tokens_per_s includes it); "
                  "verify_over_ar = verify ms per step / AR step ms; target_efficiency = its inverse (MoESD)"
                  + ("; CONTROLLED ACCEPTANCE: draft tokens are the target's recorded greedy continuation kept with "
                     "probability alpha, the draft model only supplies the cost" if drafter_kind == "controlled" else "")),
    }
    path = write_results(f"e2e_{a.preset}", rows, extra_doc)

    cols = [("bs", "bs", "d"), ("alpha", "alpha", ""), ("setting", "setting", ""),
            ("decode_tokens_per_s", "dec tok/s", ".1f"), ("speedup", "speedup", ".3f"),
            ("speedup_if_acceptance_kept", "sp@alpha", ".3f"), ("accepted_per_step", "acc/step", ".2f"), ("alpha_hat", "a_hat", ".2f"),
            ("reference_followed", "ref", ".2f"),
            ("experts_loaded_mean", "loaded/L", ".1f"), ("experts_touched_mean", "touched/L", ".1f"),
            ("nodes_drafted_per_step", "drafted", ".1f"), ("nodes_verified_per_step", "verified", ".1f"),
            ("draft_ms_per_step", "draft ms", ".2f"), ("verify_ms_per_step", "verify ms", ".2f"),
            ("step_ms", "step ms", ".2f"), ("verify_over_ar", "ver/AR", ".2f"), ("matches_autoregressive", "=AR", "")]
    print(f"\nEnd to end, {title}")
    width = max([len(r["setting"]) for r in rows] + [8])
    shown = [{**r, "setting": r["setting"].ljust(width), "alpha": "-" if r.get("alpha") is None else r["alpha"],
              "matches_autoregressive": ("-" if "matches_autoregressive" not in r else
                                         "yes" if r["matches_autoregressive"] else
                                         f"{r['fraction_before_divergence']:.2f}"),
              **({"decode_tokens_per_s": None} if "skipped" in r or "error" in r else {})} for r in rows]
    print_table(shown, cols)
    for r in rows:
        for k in ("skipped", "error"):
            if k in r:
                print(f"  bs={r['bs']} alpha={r.get('alpha')} {r['setting']}: {k}: {r[k]}")
    log(None, f"wrote {path} (total {total_s} s)")
    if not a.no_plot:
        stem = os.path.splitext(path)[0]
        for p in plot(rows, stem, title, E or 1):
            log(None, f"wrote {p}")
    if mismatches:
        log(None, f"CORRECTNESS: {len(mismatches)} lossless cell(s) differ from autoregressive greedy output: "
            + "; ".join(mismatches))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

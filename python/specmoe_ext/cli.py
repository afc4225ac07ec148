"""The `specmoe` command.

Shape legend: bs prompts in one batch (one per --prompt), N generated tokens per prompt (<= --max-new-tokens).

    specmoe generate [--model DIR | --preset NAME] [--prompt TEXT ...] [--max-new-tokens N]
                     [--temperature T] [--top-p P] [--top-k K] [--seed S] [--dtype D] [--device DEV]
                     [--no-cuda-graph] [--json] [--no-progress]
                     [--draft model|model:DIR|self[:N]|ngram[:N]|eagle:DIR] [--tree SPEC] [--accept RULE]
                     [--budget B[,B...]] [--budget-policy substitute|truncate] [--budget-weights uniform|path]
                     [--no-protect-root] [--spec fixed|auto] [--spec-candidates 'k=0,1,2,4;budget=none,32']
                     [--spec-test-steps N] [--profile profile.json] [--profile-alpha A]
    specmoe plan     [--model DIR | --preset NAME] [--draft-model DIR] [--device DEV] [--dtype D] [--max-bs N]
                     [--n-toks 1,4,8] [--budgets none,B,...] [--ctx N] [--repeats R] [--ridge-point RP]
                     [--out profile.json] [--plot plan.png] [--json]
    specmoe demo     autoregressive vs speculative vs speculative + expert budget on the embedded `tiny` pair
    specmoe models   list the presets and the supported checkpoint architectures

With no --model/--preset, `generate` runs the embedded `tiny` MoE model (CPU is fine). Several --prompt
flags make one batch. Random-weight presets have no tokenizer: their prompt is encoded with the tiny
model's tokenizer (its ids are valid in every preset's vocabulary) and only token ids are reported.
--draft turns on speculative decoding (speculative/engine.py); `--draft model` means the preset's bundled draft
model (the `tiny` preset has one), `model:DIR` any checkpoint folder sharing the target's vocabulary.

`--spec auto` (with --draft): a Cascade controller (speculative/controller.py) picks every step's chain length K
(0 = a plain autoregressive step through the same engine and cache; greedy output stays autoregressive) and
expert budget from --spec-candidates, by measured step throughput; --json reports the settings over time and
the per-candidate utilities. `specmoe plan` measures ~20 points of the MoESD performance model
(speculative/perf_model.py) on the real model, fits it, and saves the profile that `--profile` warm-starts from.

Structure: each subcommand is an (add_arguments, run) pair in COMMANDS; later features add flags to a
subparser through `build_parser()` (e.g. --draft/--tree/--budget on generate) or add subcommands.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

EXIT_USAGE = 2


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder")
    src.add_argument("--preset", metavar="NAME", help="named model (see `specmoe models`; default: tiny)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; repeat for a batch (default: 'Return a new')")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step and the speculative verify step eagerly on CUDA")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    _add_spec_args(p, draft_default=None)


def _add_spec_args(p: argparse.ArgumentParser, draft_default: str | None, budget_default: str | None = None) -> None:
    g = p.add_argument_group("speculative decoding" + (" (on when --draft is given)" if draft_default is None else ""))
    g.add_argument("--draft", metavar="SPEC", default=draft_default,
                   help="drafter: 'model' = the preset's bundled draft model (tiny has one); 'model:DIR' = a "
                        "checkpoint folder sharing the target's vocabulary; 'self' or 'self:N' = the target itself "
                        "with N resident experts per MoE layer (default E/2; SpecMoE); 'ngram' or 'ngram:N' = "
                        "prompt lookup of the longest recent suffix (up to N=4 tokens); 'eagle:DIR' = an EAGLE-3 "
                        "head folder (published layout)" + (f" (default: {draft_default})" if draft_default else ""))
    g.add_argument("--tree", metavar="SPEC", default="chain:4",
                   help="draft tree: 'chain:G' (G tokens in a line), 'static:b1,b2,...' (b_d children per node at "
                        "depth d), 'dynamic:topk=K,depth=D,tokens=M' (EAGLE-2: expand the K best nodes per level, "
                        "keep the M best overall) (default: chain:4)")
    g.add_argument("--accept", default="auto", choices=["auto", "target", "q"],
                   help="acceptance at temperature > 0: 'target' (exact for any tree), 'q' (q-aware, for sampled "
                        "chain/static drafts), auto = q for chain/static, target for dynamic (default); "
                        "temperature 0 is always greedy")
    g.add_argument("--budget", metavar="B", default=budget_default,
                   help="MoE-Spec expert budget in the verifier: at most B experts per MoE layer for the whole "
                        "batch of draft trees (one number, or one per layer: 32,32,16,16; 'none' = no budget for a "
                        "layer); "
                        "lossy" + (f" (default: {budget_default})" if budget_default else "; off by default"))
    g.add_argument("--budget-policy", default="substitute", choices=["substitute", "truncate"],
                   help="tokens whose experts were cut: re-pick top-K among the kept experts (substitute, "
                        "default) or drop those slots (truncate)")
    g.add_argument("--budget-weights", default="uniform", choices=["uniform", "path"],
                   help="token weights of the expert scores: uniform (default) or the draft path probability")
    g.add_argument("--no-protect-root", action="store_true",
                   help="let the budget cut the committed root token's own experts (protected by default)")
    if draft_default is None:           # generate only
        g.add_argument("--spec", default="fixed", choices=["fixed", "auto"],
                       help="fixed: every step uses --tree/--budget (default); auto: a Cascade controller picks "
                            "each step's chain length K (0 = plain autoregressive step) and expert budget from "
                            "--spec-candidates by measured throughput (--budget-policy/--budget-weights apply)")
        g.add_argument("--spec-candidates", metavar="SPEC", default=DEFAULT_CANDIDATES,
                       help="--spec auto candidates: 'k=K1,K2,...[;budget=B1,...]' ('none' = no budget; k=0 "
                            f"always included) (default: {DEFAULT_CANDIDATES})")
        g.add_argument("--spec-test-steps", type=int, default=4, metavar="N",
                       help="--spec auto: steps each candidate runs per test phase (default 4)")
        g.add_argument("--profile", metavar="FILE",
                       help="--spec auto: a `specmoe plan` profile JSON: candidates predicted below 0.9x "
                            "autoregressive are pruned, the rest tested best-first")
        g.add_argument("--profile-alpha", type=float, default=0.7, metavar="A",
                       help="--profile: per-token acceptance rate assumed by the warm start (default 0.7)")


DEFAULT_CANDIDATES = "k=0,1,2,4"


DEFAULT_PROMPT = "Return a new"


def _resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"specmoe: --device {name} requested but CUDA is not available")
    return name


def _load_target(a: argparse.Namespace, device: str, dtype, cmd: str):
    """-> (name, target, tokenizer, has_text, target_dir, bundled_draft_dir)."""
    from .models import load_tokenizer
    from .models.loader import CheckpointError, load_model
    from .models.presets import DEFAULT_PRESET, TINY_DIR, build_preset, get_preset
    try:
        if getattr(a, "model", None):
            return a.model, load_model(a.model, device, dtype), load_tokenizer(a.model), True, a.model, None
        name = getattr(a, "preset", None) or DEFAULT_PRESET
        preset = get_preset(name)
        tok = load_tokenizer(preset.path if not preset.random else TINY_DIR / "target")
        model = build_preset(name, device, dtype, seed=a.seed)
        return name, model, tok, not preset.random, preset.path, preset.draft_path
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"specmoe {cmd}: {e}")


def _spec_engine(a: argparse.Namespace, target, target_dir, draft_dir, dtype, cmd: str, budget: str | None = None):
    """The SpecEngine the --draft/--tree/--budget flags describe; every flag is checked before loading."""
    from .models.loader import CheckpointError
    from .speculative import BudgetConfig, SpecEngine, TreeSpec, make_drafter
    try:
        spec = TreeSpec.parse(a.tree)
        bcfg = None
        if budget:
            bcfg = BudgetConfig.parse(budget, policy=a.budget_policy, weights=a.budget_weights,
                                      protect_root=not a.no_protect_root)
            bcfg.validate(target.args)
        drafter = make_drafter(a.draft, target, default_draft_dir=draft_dir, target_dir=target_dir, dtype=dtype)
        return SpecEngine(target, drafter, spec, bcfg, a.accept, cuda_graph=not getattr(a, "no_cuda_graph", False))
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"specmoe {cmd}: {e}")


def _spec_controller(a: argparse.Namespace, target, target_dir, draft_dir, dtype, bs: int):
    """--spec auto: (engine over the longest candidate chain, CascadeController, budget style)."""
    from .speculative import BudgetConfig
    from .speculative.controller import CascadeController, parse_candidates
    from .speculative.perf_model import PerfProfile
    if a.tree != "chain:4":
        raise SystemExit("specmoe generate: --tree is chosen by --spec auto (chains of the --spec-candidates "
                         "lengths): drop --tree")
    if a.budget:
        raise SystemExit("specmoe generate: with --spec auto give budgets as candidates, e.g. "
                         "--spec-candidates 'k=0,2,4;budget=none,32', not --budget")
    if a.spec_test_steps < 1:
        raise SystemExit("specmoe generate: --spec-test-steps must be >= 1")
    try:
        cands = parse_candidates(a.spec_candidates)
        for c in cands:
            if c.budget is not None:
                BudgetConfig(c.budget).validate(target.args)
    except ValueError as e:
        raise SystemExit(f"specmoe generate: {e}")
    kmax = max(c.k for c in cands)
    if kmax == 0:
        raise SystemExit("specmoe generate: --spec-candidates needs some k >= 1")
    a.tree = f"chain:{kmax}"
    engine = _spec_engine(a, target, target_dir, draft_dir, dtype, "generate", None)
    ctl = CascadeController(cands, test_steps=a.spec_test_steps)
    if a.profile:
        try:
            prof = PerfProfile.from_json(a.profile)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"specmoe generate: --profile {a.profile}: {e}")
        if not 0.0 <= a.profile_alpha <= 1.0:
            raise SystemExit("specmoe generate: --profile-alpha must be in [0, 1]")
        ctl.warm_start(prof, bs=bs, alpha=a.profile_alpha)
    style = BudgetConfig(0, a.budget_policy, a.budget_weights, not a.no_protect_root)
    return engine, ctl, style


def _spec_json(res) -> dict:
    return {"spec": "auto" if "controller" in res.config else "fixed", **res.config, **res.summary()}


def _run_generate(a: argparse.Namespace) -> int:
    from .models import SamplingParams
    from .speculative import generate
    from .models.loader import resolve_dtype

    try:
        sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"specmoe generate: {e}")
    if a.max_new_tokens < 1:
        raise SystemExit("specmoe generate: --max-new-tokens must be >= 1")
    speculative = a.draft is not None
    if not speculative:
        used = [f for f, v in (("--budget", a.budget), ("--no-protect-root", a.no_protect_root),
                               ("--profile", a.profile)) if v]
        used += [f for f, v, d in (("--tree", a.tree, "chain:4"), ("--accept", a.accept, "auto"),
                                    ("--spec", a.spec, "fixed"), ("--spec-candidates", a.spec_candidates,
                                                                  DEFAULT_CANDIDATES),
                                    ("--budget-policy", a.budget_policy, "substitute"),
                                    ("--budget-weights", a.budget_weights, "uniform")) if v != d]
        if used:
            raise SystemExit(f"specmoe generate: {', '.join(used)} apply to speculative decoding: add --draft")
    device = _resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    prompts = a.prompt or [DEFAULT_PROMPT]

    if a.spec == "fixed":
        ignored = [f for f, v in (("--profile", a.profile), ("--spec-candidates", a.spec_candidates != DEFAULT_CANDIDATES),
                                  ("--spec-test-steps", a.spec_test_steps != 4)) if v]
        if ignored:
            raise SystemExit(f"specmoe generate: {', '.join(ignored)} apply to --spec auto")

    t0 = time.perf_counter()
    name, model, tok, has_text, target_dir, draft_dir = _load_target(a, device, dtype, "generate")
    ctl = style = None
    if speculative and a.spec == "auto":
        engine, ctl, style = _spec_controller(a, model, target_dir, draft_dir, dtype, len(prompts))
    else:
        engine = _spec_engine(a, model, target_dir, draft_dir, dtype, "generate", a.budget) if speculative else None
    load_s = time.perf_counter() - t0

    ids = [tok.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise SystemExit("specmoe generate: a prompt encodes to zero tokens")
    stop = () if a.ignore_eos or not has_text else tuple(sorted(tok.eos_token_ids))

    bar = None
    if not a.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=a.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False,
                   disable=None)
        bar.update(1)                                  # the first token comes from the prefill
    # the bar follows the request that is furthest along (one update per step, from the step's record)
    progress = (lambda st, toks: bar.update(max(map(len, toks), default=0))) if bar is not None else None
    if engine is not None:
        try:
            res = engine.generate(ids, a.max_new_tokens, sampling, stop, controller=ctl, budget_style=style,
                                  on_step=progress)
        except ValueError as e:
            raise SystemExit(f"specmoe generate: {e}")
    else:
        res = generate(model, ids, a.max_new_tokens, sampling, stop,
                       cuda_graph=False if a.no_cuda_graph else None, on_step=progress)
    if bar is not None:
        bar.close()

    outputs = []
    for p, t, r in zip(prompts, res.tokens, res.finish_reasons):
        outputs.append({"prompt": p, "text": tok.decode(t) if has_text else None, "tokens": t,
                        "finish_reason": r})
    stats = {
        "generated_tokens": res.n_generated, "tokens_per_s": round(res.tokens_per_s, 2),
        "prefill_ms": round(1e3 * res.prefill_s, 3), "decode_steps": res.decode_steps,
        "decode_step_ms": round(res.decode_step_ms, 3),
        "decode_tokens_per_s": round(len(ids) / (res.decode_step_ms / 1e3), 2) if res.decode_steps else None,
        "cuda_graph": res.cuda_graph, "graph_capture_ms": round(1e3 * res.extra.get("capture_s", 0.0), 1),
        "load_s": round(load_s, 3),
    }
    spec = None
    if engine is not None:
        spec = _spec_json(res)
        stats["decode_tokens_per_s"] = round((res.n_generated - len(ids)) / res.decode_s, 2) if res.decode_s else None
        stats["accepted_per_step"] = spec["accepted_per_step"]
        stats["tokens_per_step"] = spec["tokens_per_step"]
    dt = str(dtype).replace("torch.", "")
    if a.json:
        doc = {"model": name, "architecture": model.args.architecture, "device": str(device),
               "dtype": dt, "parameters": model.num_parameters(),
               "sampling": {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "seed": a.seed},
               "max_new_tokens": a.max_new_tokens, "outputs": outputs, "stats": stats}
        if spec is not None:
            doc["speculative"] = spec
        print(json.dumps(doc, indent=2))
        return 0
    for o in outputs:
        if has_text:
            print(o["prompt"] + o["text"])
        else:
            print(f"[random-weight preset {name}: token ids] {o['tokens']}")
        print("-" * 72)
    how = (f"decode {res.decode_step_ms:.2f} ms/step x {res.decode_steps}" if spec is None else
           f"{res.decode_steps} speculative steps, {spec['tokens_per_step']} tokens/step, drafter {spec['drafter']}, "
           f"tree {spec['tree']}" + (f", budget {spec['budget']['budget']}" if spec["budget"] else ""))
    print(f"{res.n_generated} tokens in {res.prefill_s + res.decode_s:.2f} s: {res.tokens_per_s:.1f} tokens/s "
          f"(prefill {1e3 * res.prefill_s:.1f} ms, {how}, batch {len(ids)}, {model.args.architecture} on "
          f"{device} {dt}{', CUDA graph' if res.cuda_graph else ''})", file=sys.stderr)
    if spec is not None and "controller" in spec:
        runs = " ".join(f"k={k}{'' if b is None else f',B={b}'}x{n}" for k, b, n in spec["controller"]["settings_over_time"])
        util = " ".join(f"{c}:{u:g}" for c, u in spec["controller"]["utilities"].items())
        print(f"--spec auto settings over time (setting x steps): {runs}; last utilities: {util}", file=sys.stderr)
    if spec is not None and spec["experts_touched_per_layer"]:
        pairs = " ".join(f"{t:g}->{l:g}" for t, l in zip(spec["experts_touched_per_layer"],
                                                         spec["experts_loaded_per_layer"]))
        print(f"experts per MoE layer and step, touched -> loaded: {pairs}", file=sys.stderr)
    return 0


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; repeat for a batch (default: 'Return a new')")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")
    p.add_argument("--no-progress", action="store_true", help="(accepted for symmetry with generate)")
    p.add_argument("--repeats", type=int, default=5, metavar="R",
                   help="timed runs per mode after one warm-up run; tokens/s is their median (default 5)")
    _add_spec_args(p, draft_default="model")


def _run_demo(a: argparse.Namespace) -> int:
    """The embedded tiny pair, greedy: autoregressive, speculative, speculative + expert budget, --spec auto;
    each timed --repeats times after a warm-up (median tokens/s), with a verdict on whether speculation pays."""
    import statistics
    from .speculative import generate
    from .speculative.controller import CascadeController, parse_candidates
    from .models.loader import resolve_dtype

    if a.max_new_tokens < 1:
        raise SystemExit("specmoe demo: --max-new-tokens must be >= 1")
    if a.repeats < 1:
        raise SystemExit("specmoe demo: --repeats must be >= 1")
    device = _resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    a.model, a.preset = None, "tiny"
    name, model, tok, _, target_dir, draft_dir = _load_target(a, device, dtype, "demo")
    E = model.args.n_experts
    budget = a.budget or str(max(model.args.top_k, E // 2))
    spec_engine = _spec_engine(a, model, target_dir, draft_dir, dtype, "demo", None)
    budget_engine = _spec_engine(a, model, target_dir, draft_dir, dtype, "demo", budget)
    cands = parse_candidates(DEFAULT_CANDIDATES)
    tree = a.tree
    a.tree = f"chain:{max(c.k for c in cands)}"
    auto_engine = _spec_engine(a, model, target_dir, draft_dir, dtype, "demo", None)
    a.tree = tree
    prompts = a.prompt or [DEFAULT_PROMPT]
    ids = [tok.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise SystemExit("specmoe demo: a prompt encodes to zero tokens")
    N = a.max_new_tokens
    modes = [("autoregressive", lambda: generate(model, ids, N)),
             ("speculative", lambda: spec_engine.generate(ids, N)),
             (f"speculative + budget B={budget}", lambda: budget_engine.generate(ids, N)),
             ("speculative, --spec auto", lambda: auto_engine.generate(
                 ids, N, controller=CascadeController(cands, test_steps=2)))]
    results = {}
    for label, run in modes:                          # greedy, no stop tokens; warm-up, then the timed runs
        run()
        timed = sorted((run() for _ in range(a.repeats)), key=lambda r: r.tokens_per_s)
        results[label] = (timed[len(timed) // 2], [r.tokens_per_s for r in timed])
    ar = results["autoregressive"][0]

    def agreement(res) -> dict:
        tot = sum(len(t) for t in ar.tokens)
        same = 0
        first = None
        for x, y in zip(res.tokens, ar.tokens):
            k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            same += k
            if k < len(y) and (first is None or k < first):
                first = k
        return {"matches_autoregressive": res.tokens == ar.tokens, "tokens_before_divergence": same,
                "tokens": tot, "first_divergence": first}

    rows = []
    for label, (res, tps) in results.items():
        row = {"run": label, "tokens_per_s": round(statistics.median(tps), 2),
               "tokens_per_s_runs": [round(x, 2) for x in tps], "generated_tokens": res.n_generated,
               "seconds": round(res.prefill_s + res.decode_s, 4)}
        if label != "autoregressive":
            spec = _spec_json(res)
            row.update({"tokens_per_step": spec["tokens_per_step"], "accepted_per_step": spec["accepted_per_step"],
                        "experts_touched_per_layer": spec["experts_touched_per_layer"],
                        "experts_loaded_per_layer": spec["experts_loaded_per_layer"], **agreement(res),
                        "config": {k: spec[k] for k in ("drafter", "tree", "rule", "budget")}})
            if "controller" in spec:
                row["settings_over_time"] = spec["controller"]["settings_over_time"]
        rows.append(row)
    ar_tps, spec_tps = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    auto_row = rows[-1]
    picked: dict = {}
    for k, b, n in auto_row.get("settings_over_time", []):
        key = f"k={k}" + (f",B={b}" if b is not None else "")
        picked[key] = picked.get(key, 0) + n
    verdict = {"speculative_over_autoregressive": round(spec_tps / ar_tps, 3) if ar_tps else None,
               "speculation_pays": spec_tps > ar_tps, "auto_over_autoregressive":
                   round(auto_row["tokens_per_s"] / ar_tps, 3) if ar_tps else None,
               "auto_steps_per_setting": picked}
    a_ = model.args
    head = {"model": name, "architecture": a_.architecture, "layers": a_.n_layers, "experts": E,
            "top_k": a_.top_k, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "prompts": prompts, "max_new_tokens": N, "draft": a.draft, "tree": a.tree, "repeats": a.repeats}
    if a.json:
        print(json.dumps({**head, "runs": rows, "verdict": verdict, "text": [tok.decode(t) for t in ar.tokens]},
                         indent=2))
        return 0
    print(f"specmoe demo: {name} ({a_.architecture}, {a_.n_layers} layers, {E} experts top-{a_.top_k}) on "
          f"{device} {head['dtype']}; draft {a.draft}, tree {a.tree}; {len(ids)} prompt(s) x {N} new tokens, greedy; "
          f"median of {a.repeats} runs")
    print(f"text (autoregressive): {(prompts[0] + tok.decode(ar.tokens[0]))!r}")
    print()
    print(f"{'run':34s} {'tokens/s':>9s} {'min-max':>15s} {'tok/step':>9s} {'accepted/step':>14s}  {'same as AR':>12s}")
    for r in rows:
        same = "-"
        if "matches_autoregressive" in r:
            same = "yes" if r["matches_autoregressive"] else f"no ({r['tokens_before_divergence']}/{r['tokens']})"
        span = f"{min(r['tokens_per_s_runs']):.0f}-{max(r['tokens_per_s_runs']):.0f}"
        print(f"{r['run']:34s} {r['tokens_per_s']:9.1f} {span:>15s} {r.get('tokens_per_step') or 1.0:9.2f} "
              f"{r.get('accepted_per_step') if r.get('accepted_per_step') is not None else '-':>14}  {same:>12s}")
    print()
    print("experts per MoE layer and verification step, touched (the tree's natural routing) -> loaded (read):")
    for r in rows[1:3]:
        pairs = "  ".join(f"L{i}: {t:.2f}->{l:.2f}" for i, (t, l) in
                          enumerate(zip(r["experts_touched_per_layer"], r["experts_loaded_per_layer"])))
        print(f"  {r['run']:32s} {pairs}")
    print("(the budget is lossy: 'same as AR' counts the tokens before the first divergence)")
    steps = ", ".join(f"{k} x{n}" for k, n in picked.items())
    if verdict["speculation_pays"]:
        print(f"speculation pays here: {verdict['speculative_over_autoregressive']:.2f}x autoregressive tokens/s; "
              f"--spec auto ran {steps} ({verdict['auto_over_autoregressive']:.2f}x)")
    else:
        print(f"speculation does NOT pay here: {verdict['speculative_over_autoregressive']:.2f}x autoregressive "
              f"tokens/s (the tiny draft costs a large share of the tiny target's step on this device); "
              f"--spec auto ran {steps} ({verdict['auto_over_autoregressive']:.2f}x)")
    return 0


def _int_list(text: str, what: str, none_ok: bool = False) -> list:
    try:
        return [None if none_ok and v.strip().lower() == "none" else int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"specmoe plan: {what} {text!r}: expected a comma list of integers"
                         + (" ('none' = no budget)" if none_ok else "")) from None


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder")
    src.add_argument("--preset", metavar="NAME", help="named model (see `specmoe models`; default: tiny)")
    p.add_argument("--draft-model", metavar="DIR",
                   help="draft checkpoint for the draft points (default: the preset's bundled draft; none: skipped)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bs", type=int, default=None, metavar="N",
                   help="largest batch size, a power of two (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--n-toks", default="1,4,8", metavar="N,N,...",
                   help="tokens per request of the target forwards (default 1,4,8)")
    p.add_argument("--budgets", default="none", metavar="B,B,...",
                   help="expert budgets measured besides none (e.g. none,32; default none)")
    p.add_argument("--ctx", type=int, default=16, help="committed tokens in the cache before each forward (16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point, median (default 20 CUDA, 5 CPU)")
    p.add_argument("--ridge-point", type=float, default=None, metavar="RP",
                   help="peak FLOP/s / peak bytes/s of the device (default 295 on CUDA = H100 bf16, 10 on CPU)")
    p.add_argument("--out", metavar="FILE", default="profile.json", help="profile JSON (default profile.json)")
    p.add_argument("--plot", metavar="PNG", help="predicted vs measured plot (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")


def _run_plan(a: argparse.Namespace) -> int:
    """Measure ~20 points of the MoESD model on the real model, fit, print, save the profile."""
    from .models.loader import CheckpointError, load_model, resolve_dtype
    from .models.presets import get_preset
    from .speculative import plan as planlib

    device = _resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    max_bs = a.max_bs if a.max_bs is not None else (64 if dev_type == "cuda" else 16)
    if max_bs < 1 or max_bs & (max_bs - 1):
        raise SystemExit(f"specmoe plan: --max-bs {max_bs} must be a power of two")
    n_toks = _int_list(a.n_toks, "--n-toks")
    budgets = _int_list(a.budgets, "--budgets", none_ok=True)
    if any(n < 1 for n in n_toks) or a.ctx < 1:
        raise SystemExit("specmoe plan: --n-toks and --ctx must be >= 1")
    repeats = a.repeats if a.repeats is not None else (20 if dev_type == "cuda" else 5)
    if repeats < 1:
        raise SystemExit("specmoe plan: --repeats must be >= 1")
    RP = a.ridge_point if a.ridge_point is not None else planlib.DEFAULT_RP[dev_type]
    name, model, _, _, _, draft_dir = _load_target(a, device, dtype, "plan")
    if not model.args.is_moe:
        raise SystemExit(f"specmoe plan: the performance model is for MoE targets ({model.args.architecture} "
                         f"has no experts)")
    for B in budgets:
        if B is not None and not model.args.top_k <= B <= model.args.n_experts:
            raise SystemExit(f"specmoe plan: budget {B} outside [top_k {model.args.top_k}, E {model.args.n_experts}]")
    draft = None
    try:
        if a.draft_model:
            draft = load_model(a.draft_model, device, dtype)
        elif draft_dir is not None:
            draft = load_model(draft_dir, device, dtype)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"specmoe plan: {e}")
    t0 = time.perf_counter()
    meta = {"model": name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "gpu": __import__("torch").cuda.get_device_name(device) if dev_type == "cuda" else None}
    try:
        res = planlib.plan(model, draft, max_bs, n_toks, budgets, RP, a.ctx, repeats=repeats, seed=a.seed, meta=meta)
    except ImportError as e:
        raise SystemExit(f"specmoe plan: {e}")
    secs = time.perf_counter() - t0
    res.profile.to_json(a.out)
    plotted = planlib.plot(res, a.plot) if a.plot else None
    rows = res.rows()
    if a.json:
        print(json.dumps({"model": name, "device": device, "profile": a.out, "points": rows,
                          "mape_train_pct": round(res.mape_train, 3),
                          "mape_held_out_pct": None if res.mape_held_out is None else round(res.mape_held_out, 3),
                          "skipped": res.skipped, "plot": a.plot if plotted else None, "seconds": round(secs, 2),
                          "params": res.profile.params}, indent=2))
        return 0
    print(f"specmoe plan: {name} on {device} ({len(rows)} points, median of {repeats}, RP {RP:g})")
    print(f"{'kind':7s} {'bs':>4s} {'n_tok':>5s} {'budget':>6s} {'measured ms':>12s} {'predicted ms':>13s} "
          f"{'err %':>7s}  set")
    for r in rows:
        print(f"{r['kind']:7s} {r['bs']:4d} {r['n_tok']:5d} {str(r['budget'] or '-'):>6s} {r['measured_ms']:12.4f} "
              f"{r['predicted_ms']:13.4f} {r['error_pct']:7.2f}  {'held-out' if r['held_out'] else 'fit'}")
    ho = f"{res.mape_held_out:.2f}%" if res.mape_held_out is not None else "n/a"
    print(f"MAPE: fit points {res.mape_train:.2f}%, held-out points {ho}")
    for s_ in res.skipped:
        print(f"skipped: {s_}")
    print(f"profile (refitted on all points) -> {a.out}")
    if a.plot:
        print(f"plot -> {a.plot}" if plotted else "plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


def _add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _run_models(a: argparse.Namespace) -> int:
    from .models.config import SUPPORTED_ARCHITECTURES
    from .models.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        args = p.args()
        rows.append({"name": name, "architecture": args.architecture, "layers": args.n_layers,
                     "hidden": args.hidden_size, "experts": args.n_experts, "top_k": args.top_k,
                     "random_weights": p.random, "description": p.description})
    if a.json:
        print(json.dumps({"presets": rows, "architectures": list(SUPPORTED_ARCHITECTURES)}, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:16s} {r['architecture']:22s} L={r['layers']:<3d} h={r['hidden']:<5d} "
              f"E={r['experts']:<4d} K={r['top_k']:<2d} {r['description']}")
    print("checkpoint architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return 0


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate text with an MoE model (autoregressive, or speculative with --draft)",
                 _add_generate_args, _run_generate),
    "demo": ("autoregressive vs speculative vs speculative + expert budget on the embedded tiny pair",
             _add_demo_args, _run_demo),
    "plan": ("measure and fit the MoESD performance model (profile JSON for `generate --spec auto --profile`)",
             _add_plan_args, _run_plan),
    "models": ("list presets and supported checkpoint architectures", _add_models_args, _run_models),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="specmoe", description="Speculative decoding for MoE LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}
    for name, (help_, add, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(_run=run)
        subs[name] = sp
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return a._run(a)


if __name__ == "__main__":
    sys.exit(main())

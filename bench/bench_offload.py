#!/usr/bin/env python3
"""Expert offloading end to end: experts in host memory, N resident per MoE layer, AR vs speculative vs
speculative + budget, tokens/s and PCIe bytes per token against the transfer floor, and transformers +
accelerate `device_map` offload on the same weights.

Shape legend: bs requests, P prompt tokens, N new tokens per request (--max-new-tokens), E experts, K experts
per token, R resident experts per MoE layer (fraction x E, at least K), B expert budget, L_moe MoE layers.

Per preset (default qwen3-30b-a3b and mixtral-8x7b, random bf16 weights) and resident fraction (default 10%,
25%, 50% of E): the model is built once with every expert in page-locked host memory (models/offload.py), the
cache resized per fraction (it starts empty; the first, untimed run of each cell warms it and captures the
CUDA graphs). Cells, greedy, no stop tokens:
  AR            plain decoding (the root-only step; misses fetched on demand, next layer prefetched)
  self          SpecMoE self drafter (drafts with the cache's resident experts only; verification fetches
                what the tree needs once per step)
  dense         a dense draft model (random presets: a random 2-layer Qwen3-shaped model, --draft-layers)
  ... B=b       the same with the MoE-Spec budget (at most b experts fetched per layer and step; lossy)
  self B=b aware  residency-aware budget (--aware): resident experts preferred among near-equal scores
  resident AR   (--resident-baseline) plain decoding with every expert on the device, when it fits
  hf accelerate transformers' generate with accelerate's device_map offload: the first fraction x L_moe
                layers' experts on the GPU, the others' on the CPU, streamed to the GPU by accelerate's hooks
                on every forward (what a user of `device_map="auto"` + max_memory gets); --no-hf skips it
Drafters on random-weight presets use CONTROLLED ACCEPTANCE (bench/controlled.py): proposals follow the
target's recorded greedy continuation with probability --alpha per token, at the real cost of the drafter's
forwards (the self drafter: resident-only target forwards; the dense drafter: its own model). On `tiny` the
real drafters run with their real acceptance.
Metrics: decode tokens/s ((generated - bs) / decode time), tokens per step, step ms, cache hit rate, bytes
moved host -> device per decode step and per token, the PCIe floor (bytes per token / the pinned
host-to-device bandwidth measured in the same run, copy engine, 1 GiB), measured time per token over that
floor, fetch share of decode time (measured only where fetches are eager: CPU, --no-cuda-graph), speedup over
the offloaded AR cell, and whether a lossless cell's greedy output equals AR's (bf16 verify and decode
kernels may round differently; reported, not enforced).

    python bench/bench_offload.py                                   # H200: both presets, 3 fractions
    python bench/bench_offload.py --presets qwen3-30b-a3b --fractions 0.25 --no-hf
    python bench/bench_offload.py --device cpu --presets tiny --fractions 0.25,0.5      # CPU, seconds
    python bench/bench_offload.py --device cpu --presets qwen3-30b-a3b --layers 1 --max-new-tokens 6
        --prompt-len 8 --fractions 0.1 --no-hf                      (one line: CPU smoke of the random path)
Writes bench/results/offload_<device>_<date>.json (common.write_results; --out-dir elsewhere) after every
preset; cells that would start after --time-limit seconds are skipped and recorded as such.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import print_table, write_results  # noqa: E402

from specmoe_ext.models import build_draft, get_preset, load_tokenizer  # noqa: E402
from specmoe_ext.models.loader import resolve_device, resolve_dtype  # noqa: E402
from specmoe_ext.models.offload import OffloadConfig, build_offloaded_preset, expert_offload  # noqa: E402
from specmoe_ext.models.presets import TINY_DIR, build_preset  # noqa: E402
from specmoe_ext.speculative import BudgetConfig, ModelDrafter, SelfDrafter, SpecEngine  # noqa: E402
from controlled import ControlledDrafter  # noqa: E402
from bench_e2e import TINY_PROMPTS, build_random_draft  # noqa: E402

BENCH_ALPHA_LABEL = "controlled acceptance"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- the controlled self drafter -----------------------------------------------------------------------------

class ControlledSelfDrafter(SelfDrafter):
    """CONTROLLED ACCEPTANCE at the self drafter's cost: every draft forward of SelfDrafter runs (resident-only
    target forwards, so the drafting cost and the cache's residency are real), its logits are replaced by
    ControlledDrafter's proposals (the reference's next token with probability alpha). Benchmark use only."""

    name = "controlled-self"
    set_references = ControlledDrafter.set_references
    _unif = ControlledDrafter._unif
    _window = ControlledDrafter._window
    _proposals = ControlledDrafter._proposals

    def __init__(self, target, references, alpha: float, seed: int = 0):
        super().__init__(target)
        self.alpha, self.seed, self.V = float(alpha), int(seed), target.args.vocab_size
        self.set_references(references)
        self._ref_full = None

    _load_references = ControlledDrafter._load_references
    _keep_references = ControlledDrafter._keep_references

    def prefill(self, batch, spec, hidden, stats) -> None:
        super().prefill(batch, spec, hidden, stats)
        self._load_references(batch, spec)

    def keep(self, rows) -> None:
        super().keep(rows)
        self._keep_references(rows)

    def propose(self, batch, plan):
        self._level, self._spec = 0, plan.tree
        self._win = self._window(batch, max(self.depth_window, plan.tree.max_depth))
        tree = super().propose(batch, plan)
        self.offsets.add_(1)
        return tree

    def root_logits(self):
        super().root_logits()                                  # the self drafter's forward: cost only
        bs, dev = self._win.shape[0], self._win.device
        return self._proposals(torch.ones(bs, 1, dtype=torch.bool, device=dev),
                               torch.zeros(bs, 1, dtype=torch.long, device=dev))[:, 0]

    def expand(self, nodes, tree, fed):
        super().expand(nodes, tree, fed)
        D = self._win.shape[1]
        ref_tok = torch.gather(self._win, 1, (tree.depth - 1).clamp(0, D - 1))
        match = (tree.tokens == ref_tok) & (tree.depth <= D)
        match[:, 0] = True
        on_ref = (~tree.anc | match[:, None, :]).all(-1)
        return self._proposals(tree.gather(on_ref, nodes), tree.gather(tree.depth, nodes))

    def describe(self) -> dict:
        return {**super().describe(), "drafter": "controlled-self", "acceptance": BENCH_ALPHA_LABEL,
                "alpha": self.alpha}


# ---- measurements ------------------------------------------------------------------------------------------------

def h2d_bandwidth(dev: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Host -> device bytes/s: page-locked source, copy engine (CUDA); a memcpy between CPU tensors on the CPU."""
    if dev.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        return nbytes / sorted(ts)[len(ts) // 2]
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / sorted(ts)[len(ts) // 2]


def resident_count(fraction: float, E: int, K: int) -> int:
    return max(K, min(E, round(fraction * E)))


def make_prompts(preset: str, bs: int, P: int, vocab: int, seed: int) -> list[list[int]]:
    if preset == "tiny":
        tok = load_tokenizer(TINY_DIR / "target")
        return [tok.encode(TINY_PROMPTS[i % len(TINY_PROMPTS)]) for i in range(bs)]
    g = torch.Generator().manual_seed(seed + bs)
    return torch.randint(0, vocab, (bs, P), generator=g).tolist()


def run_cell(eng: SpecEngine, off, prompts, n: int, dev) -> tuple:
    """Warm-up (cache, graph capture), then the timed run with fresh offload counters -> (result, report)."""
    eng.generate(prompts, n)
    sync(dev)
    off.reset_stats()
    res = eng.generate(prompts, n)
    sync(dev)
    return res, off.report(steps=res.decode_steps, tokens=res.n_generated - len(prompts), decode_s=res.decode_s)


def row_of(res, rep, bs: int, bw: float) -> dict:
    st = rep["steps"]
    dec = res.n_generated - bs
    tps = dec / res.decode_s if res.decode_s > 0 else None
    bpt = st.get("bytes_per_token")
    floor_ms = 1e3 * bpt / bw if bpt is not None else None
    meas_ms = 1e3 * res.decode_s / dec if dec > 0 else None
    summ = res.summary() if hasattr(res, "summary") else {}
    return {"decode_tokens_per_s": round(tps, 3) if tps else None, "decode_steps": res.decode_steps,
            "tokens_per_step": summ.get("tokens_per_step") or 1.0, "accepted_per_step": summ.get("accepted_per_step"),
            "step_ms": round(1e3 * res.decode_s / max(1, res.decode_steps), 3), "hit_rate": st["hit_rate"],
            "bytes_per_step": st.get("bytes_per_step"), "bytes_per_token": bpt,
            "pcie_floor_ms_per_token": round(floor_ms, 4) if floor_ms is not None else None,
            "measured_ms_per_token": round(meas_ms, 4) if meas_ms is not None else None,
            "x_floor": round(meas_ms / floor_ms, 3) if floor_ms and meas_ms else None,
            "fetch_share_of_decode": st.get("fetch_share_of_decode"),
            "staged_per_step": round(sum(st["staged_per_layer"]) / max(1, res.decode_steps), 3),
            "prefetch_hits": sum(st["prefetch_hits_per_layer"]), "prefetched": sum(st["prefetched_per_layer"]),
            "replayed_steps": sum(s.replayed for s in getattr(res, "steps", [])),
            "residency_aware_budget": st.get("residency_aware_budget")}


# ---- transformers + accelerate baseline ---------------------------------------------------------------------------

def bench_hf_offload(model, hf_config: dict, fraction: float, prompts, n: int, dev) -> dict:
    """transformers' generate on the same weights with accelerate's device_map offload: the experts of the
    first round(fraction x L_moe) MoE layers copied to the GPU, the rest left in (page-locked) host memory
    and moved to the GPU by accelerate's hooks at every forward."""
    import accelerate
    from accelerate import dispatch_model
    from bench_decode import build_hf_sharing
    hf = build_hf_sharing(model, hf_config, dev)
    moe = [i for i, m in enumerate(model.args.moe_layers) if m]
    on_gpu = set(moe[:round(fraction * len(moe))])
    dmap = {"": 0}
    for i in moe:
        name = f"model.layers.{i}.mlp.experts"
        dict(hf.named_modules())[name]                           # the fused experts module must exist
        dmap[name] = 0 if i in on_gpu else "cpu"
    for i in on_gpu:                                             # those experts now live on the GPU (a copy)
        mod = dict(hf.named_modules())[f"model.layers.{i}.mlp.experts"]
        for pname, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, torch.nn.Parameter(p.detach().to(dev), requires_grad=False))
    hf = dispatch_model(hf, device_map=dmap, main_device=0)
    from transformers import GenerationConfig
    ids = torch.tensor(prompts, device=dev)
    def gen(k: int):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=k, eos_token_id=None, pad_token_id=0))
    with torch.no_grad():
        gen(2)                                                    # warm-up
        sync(dev)
        t0 = time.perf_counter()
        gen(1)
        sync(dev)
        t1 = time.perf_counter()
        out = gen(n)
        sync(dev)
        t2 = time.perf_counter()
    dec = (t2 - t1) - (t1 - t0)                                   # n tokens minus the prefill + first token
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_tokens_per_s": round(len(prompts) * (n - 1) / dec, 3) if dec > 0 else None,
            "hf_experts_on_gpu_layers": len(on_gpu), "accelerate": accelerate.__version__,
            "generated": int(out.shape[1] - ids.shape[1])}


# ---- the grid -----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--fractions", default="0.1,0.25,0.5", help="resident experts per MoE layer, fractions of E")
    ap.add_argument("--layers", type=int, default=None, help="override the depth (smoke tests)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA (random presets), float32 for tiny")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tree", default="chain:4")
    ap.add_argument("--alpha", type=float, default=0.8, help="controlled acceptance of the random presets' drafters")
    ap.add_argument("--budget", default="auto", help="expert budget B of the budget cells (auto: max(2K, E/8))")
    ap.add_argument("--draft-layers", type=int, default=2, help="layers of the random dense draft (random presets)")
    ap.add_argument("--eviction", default="lru", choices=["lru", "heat"])
    ap.add_argument("--prefetch", default="router", choices=["router", "heat", "none"])
    ap.add_argument("--aware", action="store_true", help="also a residency-aware budget cell (self drafter)")
    ap.add_argument("--resident-baseline", action="store_true",
                    help="also plain decoding with every expert on the device (when it fits)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers + accelerate")
    ap.add_argument("--hf-tokens", type=int, default=8, help="new tokens of the transformers baseline")
    ap.add_argument("--no-cuda-graph", action="store_true", help="eager steps (fetch time measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=560.0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    t_start = time.time()
    dev = resolve_device(a.device)
    if a.out_dir:
        common.RESULTS_DIR = a.out_dir
    fractions = [float(x) for x in a.fractions.split(",")]
    bss = [int(x) for x in a.batch_sizes.split(",")]
    bw = h2d_bandwidth(dev)
    log(f"host -> device bandwidth {bw / 1e9:.2f} GB/s ({'pinned, copy engine' if dev.type == 'cuda' else 'CPU memcpy'})")
    rows: list[dict] = []
    extra = {"h2d_bytes_per_s": bw, "h2d_note": "page-locked source, copy engine, 1 GiB" if dev.type == "cuda"
             else "CPU memcpy (the host store and the cache are both CPU memory)", "args": vars(a)}
    for preset in a.presets.split(","):
        p = get_preset(preset)
        args = p.args()
        E, K = args.n_experts, args.top_k
        dtype = resolve_dtype(None if a.dtype == "auto" and preset != "tiny" else
                              ("float32" if a.dtype == "auto" else a.dtype), dev)
        B = max(2 * K, E // 8) if a.budget == "auto" else int(a.budget)
        B = min(B, E)
        cfg = OffloadConfig(resident_experts=resident_count(fractions[0], E, K), eviction=a.eviction, prefetch=a.prefetch)
        log(f"{preset}: building (experts -> host memory, {resident_count(fractions[0], E, K)}/{E} resident)")
        t0 = time.time()
        try:
            model = build_offloaded_preset(preset, dev, dtype, cfg, seed=a.seed, n_layers=a.layers)
        except ValueError as e:
            log(f"{preset}: skipped: {e}")
            rows.append({"preset": preset, "skipped": str(e)})
            continue
        off = expert_offload(model)
        log(f"{preset}: built in {time.time() - t0:.1f} s; host store {off.plan.host_bytes / 2**30:.1f} GiB, "
            f"copy backend {off.backend}")
        draft = None
        if preset == "tiny":
            draft = build_draft("tiny", dev, dtype)
        else:
            draft = build_random_draft(model, dev, dtype, a.draft_layers, a.seed)[0]
        graphs = not a.no_cuda_graph
        if a.resident_baseline:
            try:
                ref_model = build_preset(preset, dev, dtype, seed=a.seed, n_layers=a.layers)
                eng = SpecEngine(ref_model, None, cuda_graph=graphs)
                for bs in bss:
                    prompts = make_prompts(preset, bs, a.prompt_len, args.vocab_size, a.seed)
                    eng.generate(prompts, a.max_new_tokens)
                    res = eng.generate(prompts, a.max_new_tokens)
                    rows.append({"preset": preset, "fraction": 1.0, "resident": E, "bs": bs, "setting": "resident AR",
                                 "decode_tokens_per_s": round((res.n_generated - bs) / res.decode_s, 3)})
                    log(f"  resident AR bs={bs}: {rows[-1]['decode_tokens_per_s']} tok/s")
                del ref_model, eng
            except ValueError as e:
                rows.append({"preset": preset, "setting": "resident AR", "skipped": str(e)})
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for fi, frac in enumerate(fractions):
            N = resident_count(frac, E, K)
            if fi > 0:
                off.resize(replace(cfg, resident_experts=N))
            for bs in bss:
                if time.time() - t_start > a.time_limit:
                    rows.append({"preset": preset, "fraction": frac, "resident": N, "bs": bs, "setting": "AR",
                                 "skipped": "time limit"})
                    continue
                prompts = make_prompts(preset, bs, a.prompt_len, args.vocab_size, a.seed)
                base = {"preset": preset, "fraction": frac, "resident": N, "experts": E, "bs": bs, "tree": a.tree,
                        "dtype": str(dtype).replace("torch.", ""), "layers": args.n_layers if a.layers is None else a.layers}
                ar_eng = SpecEngine(model, None, cuda_graph=graphs)
                ar_res, rep = run_cell(ar_eng, off, prompts, a.max_new_tokens + 4, dev)   # + 4: the references
                ar_tokens = [t[:a.max_new_tokens] for t in ar_res.tokens]
                refs = [list(pr) + list(t) for pr, t in zip(prompts, ar_res.tokens)]
                ar_res, rep = run_cell(ar_eng, off, prompts, a.max_new_tokens, dev)
                ar_row = {**base, "setting": "AR", "drafter": None, "budget": None, **row_of(ar_res, rep, bs, bw)}
                rows.append(ar_row)
                write_results("offload", rows, extra)
                log(f"  R={N}/{E} bs={bs} AR: {ar_row['decode_tokens_per_s']} tok/s, hit {ar_row['hit_rate']}, "
                    f"{(ar_row['bytes_per_token'] or 0) / 2**20:.1f} MiB/token, x floor {ar_row['x_floor']}")
                controlled = preset != "tiny"

                def drafter(kind):
                    if kind == "self":
                        return ControlledSelfDrafter(model, refs, a.alpha, a.seed) if controlled else SelfDrafter(model)
                    return ControlledDrafter(draft, model, refs, a.alpha, a.seed) if controlled else ModelDrafter(draft, model)
                cells = [("self", None), ("dense", None), ("self", B), ("dense", B)]
                if a.aware:
                    cells.append(("self", "aware"))
                for kind, budget in cells:
                    label = kind + ("" if budget is None else f" B={B}" + (" aware" if budget == "aware" else ""))
                    if time.time() - t_start > a.time_limit:
                        rows.append({**base, "setting": label, "skipped": "time limit"})
                        continue
                    if budget == "aware":
                        off.resize(replace(cfg, resident_experts=N, residency_aware_budget=True))
                    bcfg = None if budget is None else BudgetConfig(B)
                    eng = SpecEngine(model, drafter(kind), a.tree, bcfg, cuda_graph=graphs)
                    res, rep = run_cell(eng, off, prompts, a.max_new_tokens, dev)
                    r = {**base, "setting": label, "drafter": kind, "budget": None if budget is None else B,
                         "alpha": a.alpha if controlled else None, **row_of(res, rep, bs, bw)}
                    r["speedup_vs_ar"] = (round(r["decode_tokens_per_s"] / ar_row["decode_tokens_per_s"], 3)
                                          if r["decode_tokens_per_s"] and ar_row["decode_tokens_per_s"] else None)
                    r["matches_ar"] = res.tokens == ar_tokens
                    rows.append(r)
                    write_results("offload", rows, extra)        # after every cell: a cut-short run keeps its rows
                    log(f"  R={N}/{E} bs={bs} {label}: {r['decode_tokens_per_s']} tok/s ({r['speedup_vs_ar']}x AR), "
                        f"{r['tokens_per_step']} tok/step, hit {r['hit_rate']}, "
                        f"{(r['bytes_per_token'] or 0) / 2**20:.1f} MiB/token, same as AR {r['matches_ar']}")
                    if budget == "aware":
                        off.resize(replace(cfg, resident_experts=N))
                    del eng
            if not a.no_hf and dev.type == "cuda" and preset != "tiny" and time.time() - t_start < a.time_limit:
                try:
                    hf_row = bench_hf_offload(model, p.hf_config if a.layers is None else
                                              {**p.hf_config, "num_hidden_layers": a.layers}, frac,
                                              make_prompts(preset, 1, a.prompt_len, args.vocab_size, a.seed),
                                              a.hf_tokens, dev)
                    rows.append({"preset": preset, "fraction": frac, "resident": N, "bs": 1,
                                 "setting": "hf accelerate", **hf_row})
                    log(f"  hf accelerate ({frac:.0%} of layers' experts on the GPU): {hf_row['decode_tokens_per_s']} tok/s")
                except Exception as e:                  # optional baseline: record why it did not run
                    rows.append({"preset": preset, "fraction": frac, "setting": "hf accelerate",
                                 "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    log(f"  hf accelerate failed: {rows[-1]['error']}")
        del model, off, draft
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        path = write_results("offload", rows, extra)
        log(f"wrote {path}")
    print_table([r for r in rows if "skipped" not in r and "error" not in r],
                [("preset", "preset", "s"), ("resident", "R", "d"), ("bs", "bs", "d"), ("setting", "setting", "s"),
                 ("decode_tokens_per_s", "tok/s", ".2f"), ("speedup_vs_ar", "vs AR", ".3f"),
                 ("tokens_per_step", "tok/step", ".2f"), ("hit_rate", "hit", ".3f"),
                 ("bytes_per_token", "B/token", ".3g"), ("x_floor", "x floor", ".2f"), ("matches_ar", "=AR", "")])
    path = write_results("offload", rows, extra)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

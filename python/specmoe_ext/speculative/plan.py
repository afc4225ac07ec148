"""`specmoe plan`: measure the MoESD performance model's points on a real model, fit, report, save.

Shape legend: bs requests in a forward, n tokens per request in one target forward (1 = autoregressive step,
G = a chain verify), ctx committed tokens already in the cache (fixed, `ctx`), V vocab, E experts.

    specs   = perf_model.default_plan(max_bs, n_toks, budgets)      ~20 (kind, bs, n_tok, budget) tuples
    measure = median over `repeats` timed runs (after `warmup` runs) of
              target  one target forward of bs x n tokens past ctx committed ones (optional expert budget)
              draft   one draft-model forward of bs x 1 token past ctx (skipped without a draft model)
              reject  greedy acceptance + KV compaction of a chain:4 tree with random logits at batch bs
    fit     = perf_model.fit on the points not held out (every `holdout_every`-th point is held out), MAPE
              reported on both sets; the saved profile is refitted on every point.
    noisy   = the points whose repeated runs disagree: spread = (max - min) / median > NOISY_SPREAD, the
              fastest and the slowest run left out from 5 runs on (one stray run is common even on a quiet
              machine). Over NOISY_SHARE of the points noisy (a busy machine, oversubscribed threads: MAPE
              then reaches 30-60% on the tiny model instead of 2-6%) -> PlanResult.unreliable: a warning.
Times are host wall-clock (time.perf_counter) around a device synchronize: this is a measurement tool, not
the decode loop. Needs scipy (fit).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models.generate import prefill
from ..models.kv_cache import KVCache
from ..models.model import MoEControl, Transformer
from . import perf_model as pm

# ridge point (peak FLOP/s / peak bytes/s) used when --ridge-point is not given: H100 bf16 dense
# (989 TFLOP/s / 3.35 TB/s) on CUDA, a rough 2-core-class CPU figure otherwise
DEFAULT_RP = {"cuda": 295.0, "cpu": 10.0}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# repeated runs of one point disagreeing by more than this (spread) make the point "noisy"; more than
# NOISY_SHARE of the points noisy make the whole measurement unreliable
NOISY_SPREAD = 0.3
NOISY_SHARE = 0.25


def _time_runs(fn: Callable[[], None], dev: torch.device, warmup: int, repeats: int,
               graphs: bool = True) -> tuple[list[float], bool]:
    """Seconds of each of `repeats` timed runs of fn (after `warmup` untimed ones), sorted, and whether they
    were CUDA-graph replays. On CUDA (graphs=True) fn is captured once and its replays are timed with CUDA
    events: the engine replays its steps from graphs, so eager timings (host-bound: every kernel launched
    from Python) would overstate them several-fold. A fn that cannot be captured is timed eagerly."""
    for _ in range(max(1, warmup)):
        fn()
    if graphs and dev.type == "cuda":
        try:
            _sync(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                fn()
            graph.replay()
            ts = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            return sorted(ts), True
        except Exception:            # not capturable: eager timings below
            _sync(dev)
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return sorted(ts), False


def median(ts: Sequence[float]) -> float:
    """The median of sorted run times (the upper one of an even count), at least 1 ns."""
    return max(ts[len(ts) // 2], 1e-9)


def spread(ts: Sequence[float]) -> float:
    """(max - min) / median of sorted run times, without the fastest and the slowest from 5 runs on; 0 for
    a single run."""
    inner = ts[1:-1] if len(ts) >= 5 else ts
    return (inner[-1] - inner[0]) / median(ts)


class _Bench:
    """One prefilled cache per (model, bs), reused across the points of that batch size."""

    def __init__(self, ctx: int, max_n: int, seed: int = 0):
        self.ctx, self.max_n = ctx, max_n
        self.gen = torch.Generator().manual_seed(seed)
        self.caches: dict[tuple[int, int], KVCache] = {}

    def cache(self, model: Transformer, bs: int) -> KVCache:
        key = (id(model), bs)
        if key not in self.caches:
            c = KVCache.for_model(model, bs, self.ctx + self.max_n + 1)
            toks = torch.randint(0, model.args.vocab_size, (bs, self.ctx), generator=self.gen).tolist()
            prefill(model, toks, c)
            self.caches[key] = c
        return self.caches[key]

    def forward_fn(self, model: Transformer, bs: int, n: int, budget: int | None) -> Callable[[], None]:
        c = self.cache(model, bs)
        dev = c.device
        c.set_lengths([self.ctx] * bs)
        geo = c.append(n)
        toks = torch.randint(0, model.args.vocab_size, (bs, n), generator=self.gen).to(dev)
        moe = MoEControl()
        if budget is not None:
            moe = MoEControl(budget=budget, token_weights=torch.ones(bs * n, dtype=torch.float32, device=dev))

        @torch.no_grad()
        def fn():
            model(toks, geo, c, moe)                     # writes past ctx only: the committed prefix is untouched
        return fn

    @torch.no_grad()
    def activation_rate(self, model: Transformer, bs: int, n: int) -> float:
        """rho_eff of one forward of bs x n tokens: the per-token expert activation rate that explains the
        distinct experts it touched per layer, N = E (1 - (1 - rho)^t) with t = bs * n, solved per layer and
        averaged in log(1 - N/E) (what adaptive verification estimates online, and warm-starts from)."""
        from ..models.model import ExpertStats
        c = self.cache(model, bs)
        c.set_lengths([self.ctx] * bs)
        toks = torch.randint(0, model.args.vocab_size, (bs, n), generator=self.gen).to(c.device)
        stats = ExpertStats()
        model(toks, c.append(n), c, MoEControl(stats=stats))
        E, t = model.args.n_experts, bs * n
        frac = (stats.touched().double() / E).clamp(max=1 - 1e-9)
        return float(1 - torch.exp(torch.log1p(-frac).mean() / t))

    def reject_fn(self, model: Transformer, bs: int, G: int = 4) -> Callable[[], None]:
        """Greedy acceptance + KV compaction of a chain:G tree (the verifier's ops) at batch bs."""
        from .. import ops
        c = self.cache(model, bs)
        dev = c.device
        V = model.args.vocab_size
        logits = torch.randn(bs, G + 1, V, generator=self.gen).to(dev).to(model.tok_embeddings.weight.dtype)
        toks = logits.argmax(-1)                         # drafts = the target's choices: the whole chain is accepted
        toks = torch.cat([toks[:, :1], toks[:, :-1]], 1).contiguous()
        parent = torch.arange(-1, G, device=dev).expand(bs, G + 1).contiguous()
        valid = torch.ones(bs, G + 1, dtype=torch.bool, device=dev)
        seed = torch.zeros(bs, dtype=torch.long, device=dev)
        offset = torch.zeros_like(seed)
        lengths = torch.full((bs,), self.ctx, dtype=torch.long, device=dev)

        @torch.no_grad()
        def fn():
            path, n, _ = ops.tree_accept(logits, toks, parent, valid, seed=seed, offset=offset)
            ops.kv_compact(c.k + c.v, lengths.clone(), path, n)
        return fn


@dataclass
class PlanResult:
    points: list[pm.Point]
    held_out: list[bool]
    fit_train: pm.FitResult
    profile: pm.PerfProfile                  # refitted on every point
    mape_train: float
    mape_held_out: float | None
    skipped: list[str]
    noisy: list[str]                         # "kind bs=.. n=..: spread %" of the points over NOISY_SPREAD

    @property
    def unreliable(self) -> bool:
        """More than NOISY_SHARE of the points are noisy: the machine was busy (or threads oversubscribed)."""
        return len(self.noisy) > NOISY_SHARE * len(self.points)

    def rows(self) -> list[dict]:
        pred = self.fit_train.profile.predict_points(self.points)
        return [{"kind": p.kind, "bs": p.bs, "n_tok": p.n_tok, "budget": p.budget,
                 "measured_ms": round(1e3 * p.time_s, 4), "predicted_ms": round(1e3 * float(q), 4),
                 "error_pct": round(100.0 * (float(q) - p.time_s) / p.time_s, 2), "held_out": h}
                for p, q, h in zip(self.points, pred, self.held_out)]


def measure_points(target: Transformer, draft: Transformer | None, specs: Sequence[tuple], ctx: int = 16,
                   warmup: int = 2, repeats: int = 5,
                   seed: int = 0) -> tuple[list[pm.Point], list[str], list[str]]:
    """Time every (kind, bs, n_tok, budget) spec -> (points (median times), skipped descriptions, noisy
    descriptions: the points whose runs spread over NOISY_SPREAD)."""
    dev = target.tok_embeddings.weight.device
    bench = _Bench(ctx, max(max(n for _, _, n, _ in specs), 5), seed)
    points, skipped, noisy = [], [], []
    eager: list[str] = []
    for kind, bs, n, budget in specs:
        if kind == "target":
            fn = bench.forward_fn(target, bs, n, budget)
        elif kind == "draft":
            if draft is None:
                skipped.append(f"draft bs={bs} (no draft model)")
                continue
            fn = bench.forward_fn(draft, bs, 1, None)
        elif kind == "reject":
            fn = bench.reject_fn(target, bs)
        else:
            raise ValueError(f"plan point kind {kind!r} is not measured here")
        ts, replayed = _time_runs(fn, dev, warmup, repeats)
        if dev.type == "cuda" and not replayed:
            eager.append(f"{kind} bs={bs} n={n}")
        points.append(pm.Point(kind, int(bs), median(ts), int(n), budget))
        if spread(ts) > NOISY_SPREAD:
            noisy.append(f"{kind} bs={bs} n={n}{'' if budget is None else f' B={budget}'}: {100 * spread(ts):.0f}%")
    if eager:
        warnings.warn(f"specmoe plan: {len(eager)} point(s) could not be captured in a CUDA graph and were timed "
                      f"eagerly (host-bound): {', '.join(eager[:4])}")
    return points, skipped, noisy


def plan(target: Transformer, draft: Transformer | None, max_bs: int, n_toks: Sequence[int] = (1, 4, 8),
         budgets: Sequence[int | None] = (None,), RP: float = 10.0, ctx: int = 16, warmup: int = 2,
         repeats: int = 5, holdout_every: int = 4, seed: int = 0, meta: dict | None = None) -> PlanResult:
    """Measure default_plan(max_bs, n_toks, budgets), fit on the points not held out, refit on all."""
    specs = pm.default_plan(max_bs, n_toks, budgets)
    points, skipped, noisy = measure_points(target, draft, specs, ctx, warmup, repeats, seed)
    n_rho = min(4, max(n_toks))          # a small forward: the rate is best identified before N(t) saturates
    rho = _Bench(ctx, n_rho, seed).activation_rate(target, 1, n_rho) if target.args.n_experts else None
    held = [holdout_every > 1 and i % holdout_every == holdout_every - 1 for i in range(len(points))]
    train = [p for p, h in zip(points, held) if not h]
    test = [p for p, h in zip(points, held) if h]
    E, K = target.args.n_experts, target.args.top_k
    if not E:
        raise ValueError(f"`specmoe plan` models an MoE target ({target.args.architecture} has no experts)")
    ft = pm.fit(train, E, K, RP)
    mt = pm.mape(ft.profile.predict_points(test), [p.time_s for p in test]) if test else None
    meta = dict(meta or {}, timing="cuda_graph" if target.tok_embeddings.weight.is_cuda else "wall", held_out_mape_pct=mt, train_mape_pct=ft.mape_pct, ctx=ctx, repeats=repeats,
                rho_eff=round(rho, 6), rho_uniform=K / E, rho_tokens=n_rho,
                points=[{"kind": p.kind, "bs": p.bs, "n_tok": p.n_tok, "budget": p.budget, "time_s": p.time_s}
                        for p in points])
    full = pm.fit(points, E, K, RP, meta=meta)
    return PlanResult(points, held, ft, full.profile, ft.mape_pct, mt, skipped, noisy)


def plot(res: PlanResult, path: str) -> bool:
    """Predicted vs measured times (log-log, held-out points marked) -> PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = res.rows()
    fig, ax = plt.subplots(figsize=(5, 5))
    for kind, mk in (("target", "o"), ("draft", "s"), ("reject", "^")):
        for h, face in ((False, None), (True, "none")):
            sel = [r for r in rows if r["kind"] == kind and r["held_out"] == h]
            if sel:
                ax.scatter([r["measured_ms"] for r in sel], [r["predicted_ms"] for r in sel], marker=mk,
                           facecolors=face, edgecolors="C0" if not h else "C3",
                           label=f"{kind}{' (held out)' if h else ''}")
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows)
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ho = f"{res.mape_held_out:.1f}%" if res.mape_held_out is not None else "n/a"
    ax.set_title(f"MoESD fit: MAPE train {res.mape_train:.1f}%, held-out {ho}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""The generation loop, for speculative and plain decoding alike: prefill, then pipelined device-resident steps.

Shape legend: bs active requests, T tree nodes, D the tree's max depth, V vocab, S cache capacity, P longest
prompt, E experts, L_moe MoE layers.

    start    prefill every prompt into the target cache (one forward), draw each request's first token
             from the prefill logits with the acceptance op (root-only tree: the request's Philox stream,
             counter 0), fill the device batch (batch.py), let the drafter prefill
    loop     plan step i (the fixed tree, or the Cascade controller's choice; TreeSpec.ROOT = speculation
             off), enqueue it through the graph runner (step.py's speculative_step, captured per (bs, plan)),
             enqueue step i+1, then read step i's packed record: the one host read per step, one step late.
             Stop tokens and max_new_tokens are applied on the device; finished requests ride along frozen
             until half the batch is done (with CUDA graphs; at once without), then leave (keep_rows).
    plain decoding (`generate`) is this loop with no drafter: every step is the root-only step.
Greedy output equals greedy autoregressive decoding token for token (lossless); at temperature > 0 the
emitted tokens are distributed as autoregressive sampling, from one Philox stream per request seeded from
`seed`, the same on the CPU, eagerly on the GPU and in CUDA graphs. The expert budget is lossy, off by default.

Buffers (target cache, device batch, drafter caches) and captured graphs persist in the engine between
generate() calls of the same batch size and capacity, so a second call replays from its first step.
"""
from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..models.generate import GenerationResult, SamplingParams, check_prompts, prefill
from ..models.kv_cache import CacheCapacityError, KVCache
from ..models.model import ExpertStats, MoEControl, Transformer
from .batch import Record, SpecBatch
from .config import WEIGHTINGS, BudgetConfig, StepPlan  # noqa: F401  (WEIGHTINGS re-exported)
from .drafters import Drafter
from .runner import StepRunner
from .step import speculative_step
from .tree import TreeSpec
from .verifier import RULES, resolve_rule

VERIFY_MODES = ("full", "adaptive")


@dataclass
class StepStats:
    batch: int                   # requests still generating at the start of this step
    tree_nodes: int              # T (the spec's fixed tree size; 1 = speculation off)
    valid_nodes: list[int]       # real nodes per request
    accepted: list[int]          # accepted draft tokens per request (a step emits accepted + 1, before the cut)
    emitted: list[int]           # tokens each request committed this step
    touched: list[int]           # per MoE layer: distinct experts the tree's natural routing wanted
    loaded: list[int]            # per MoE layer: experts read (kept experts with >= 1 pair)
    step_s: float                # device time of the whole step (CUDA events; wall-clock on the CPU)
    draft_s: float | None = None
    verify_s: float | None = None
    accept_s: float | None = None   # acceptance, KV compaction, drafter commit, stop tokens
    replayed: bool = False       # ran as a CUDA graph replay
    drafted_nodes: list[int] = field(default_factory=list)   # valid nodes proposed per request (>= valid_nodes)
    predicted_s: float | None = None   # adaptive verification's predicted step time


@dataclass
class SpecResult(GenerationResult):
    steps: list[StepStats] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Acceptance and expert statistics over all steps (per request-step for acceptance)."""
        acc = [a for s in self.steps for a in s.accepted]
        hist: dict[int, int] = {}
        for a in acc:
            hist[a] = hist.get(a, 0) + 1
        with_stats = [s for s in self.steps if s.touched]         # speculation-off steps carry no expert stats
        L = len(with_stats[0].touched) if with_stats else 0

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return round(sum(xs) / len(xs), 4) if xs else None

        ms = lambda xs: mean(None if x is None else 1e3 * x for x in xs)  # noqa: E731
        return {
            "steps": len(self.steps),
            "accepted_per_step": mean(acc),                       # draft tokens accepted per request-step
            "tokens_per_step": mean(a + 1 for a in acc),          # tokens committed per request-step
            "acceptance_histogram": {str(k): hist[k] for k in sorted(hist)},
            "tree_nodes_mean": mean(s.tree_nodes for s in self.steps),
            "experts_touched_per_layer": [mean(s.touched[l] for s in with_stats) for l in range(L)],
            "experts_loaded_per_layer": [mean(s.loaded[l] for s in with_stats) for l in range(L)],
            "step_ms_device": ms(s.step_s for s in self.steps),
            "nodes_drafted_per_step": mean(n for s in self.steps for n in s.drafted_nodes),
            "nodes_verified_per_step": mean(n for s in self.steps for n in s.valid_nodes),
            "predicted_over_measured_step": mean(s.predicted_s / s.step_s for s in self.steps
                                                 if s.predicted_s is not None and s.step_s > 0),
            "draft_ms_per_step": ms(s.draft_s for s in self.steps),
            "verify_ms_per_step": ms(s.verify_s for s in self.steps),
            "accept_ms_per_step": ms(s.accept_s for s in self.steps),
            "replayed_steps": sum(s.replayed for s in self.steps),
        }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class _Workspace:
    batch: SpecBatch
    runner: StepRunner
    owned: bool                  # the engine allocated the cache (False: the caller's)
    drafter_buffers: int = -1    # the drafter's buffer generation its captured graphs read


class SpecEngine:
    """Speculative decoding of `target` with `drafter` over trees of shape `tree`.

    drafter None: plain autoregressive decoding through the same loop (root-only steps). budget: None
    (lossless verification) or a BudgetConfig (MoE-Spec). rule: "auto" | "target" | "q" (verifier.py; auto
    = greedy at temperature 0, else q-aware with sampled drafts for chain / static trees and the target
    rule for dynamic ones). cuda_graph: on the GPU every step (drafting included) is captured per key and
    replayed; False runs eagerly. verify: "full" (every drafted node) or "adaptive" (adaptive.py: each step
    keeps the cost-effective prefix of each tree; needs `profile`, a perf_model.PerfProfile from
    `specmoe plan`); verify_width W (adaptive only): at most W nodes per request are kept and verified as a
    W-node tree, so the verify forward costs bs * W tokens whatever the drafted tree's size. Every argument
    is checked here, before any work."""

    def __init__(self, target: Transformer, drafter: Drafter | None, tree: str | TreeSpec = "chain:4",
                 budget: BudgetConfig | None = None, rule: str = "auto", cuda_graph: bool = True,
                 verify: str = "full", profile=None, verify_width: int | None = None):
        self.target, self.drafter = target, drafter
        self.spec = TreeSpec.parse(tree) if drafter is not None else TreeSpec.ROOT
        if budget is not None:
            budget.validate(target.args)
        if rule not in RULES:
            raise ValueError(f"acceptance rule {rule!r}: choose one of {RULES}")
        if rule == "q" and self.spec.kind == "dynamic":
            raise ValueError("acceptance rule 'q' needs sampled drafts: use a chain or static tree, or rule 'target'")
        self.budget, self.rule = budget, rule
        self.cuda_graph = cuda_graph
        self.adaptive = self._adaptive(verify, profile)
        if verify_width is not None:
            if self.adaptive is None:
                raise ValueError("verify_width compacts the adaptively truncated tree: it needs verify='adaptive'")
            lo = self.spec.max_depth + 1          # room for the deepest path (the record's fixed width)
            if not lo <= int(verify_width) <= self.spec.max_nodes:
                raise ValueError(f"verify_width must be in [{lo}, {self.spec.max_nodes}] (the tree {self.spec} has "
                                 f"depth {self.spec.max_depth} and {self.spec.max_nodes} nodes), got {verify_width}")
            verify_width = None if int(verify_width) == self.spec.max_nodes else int(verify_width)
        self.verify_width = verify_width
        self._ws: _Workspace | None = None

    def _adaptive(self, verify: str, profile):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify {verify!r}: choose one of {VERIFY_MODES}")
        if verify == "full":
            return None
        if self.drafter is None:
            raise ValueError("adaptive verification truncates draft trees: it needs a drafter")
        if profile is None:
            raise ValueError("adaptive verification needs a cost profile (perf_model.PerfProfile): run "
                             "`specmoe plan` and pass its profile")
        a = self.target.args
        if (profile.E, profile.K) != (a.n_experts, a.top_k):
            raise ValueError(f"the cost profile is for E={profile.E}, K={profile.K}; this target has "
                             f"E={a.n_experts}, K={a.top_k}")
        from .adaptive import AdaptiveVerifier
        return AdaptiveVerifier(profile, self.target.tok_embeddings.weight.device)

    # ---- sizes -----------------------------------------------------------------------------------
    def slots_per_step(self) -> int:
        """Target-cache slots one step may write from a request's root slot on."""
        d = self.drafter.target_slots(self.spec) if self.drafter is not None else 0
        return max(self.spec.max_nodes, d)

    def capacity_for(self, max_prompt: int, max_new_tokens: int) -> int:
        """Slots per request: the prompt, every token it may commit (a step can overshoot max_new_tokens by
        its depth before the cut), and the nodes the last step writes past its root."""
        return max_prompt + max_new_tokens + self.spec.max_depth + self.slots_per_step()

    def _check_cache(self, cache: KVCache | None, bs: int, max_prompt: int, max_new_tokens: int) -> int:
        """-> the slots a batch needs; a caller's cache that cannot hold them is refused (nothing written)."""
        need = self.capacity_for(max_prompt, max_new_tokens)
        if cache is not None and (cache.full_batch_size != bs or cache.capacity < need):
            raise CacheCapacityError(
                f"generate: cache has batch {cache.full_batch_size} / capacity {cache.capacity}, need batch "
                f"{bs} / capacity {need} (longest prompt {max_prompt} + {max_new_tokens} new + "
                f"{need - max_prompt - max_new_tokens} slots for the tree {self.spec})")
        return need

    # ---- plans -----------------------------------------------------------------------------------
    def plan(self, sampling: SamplingParams, spec: TreeSpec | None = None, budget: BudgetConfig | None | str = "engine",
             lag: int = 0) -> StepPlan:
        """The typed plan of one step (spec None = the engine's tree; TreeSpec.ROOT = speculation off)."""
        spec = self.spec if spec is None else spec
        budget = self.budget if isinstance(budget, str) else budget
        d = self.drafter
        if not spec.speculates:
            budget = None
        adaptive = self.adaptive is not None and spec.speculates
        width = self.verify_width if adaptive else None
        if width is not None and not spec.max_depth + 1 <= width < spec.max_nodes:
            width = None                                # this plan's tree (a controller's) fits it whole
        return StepPlan(spec, resolve_rule(self.rule, spec, sampling.greedy), sampling, budget,
                        lag if (d is not None and spec.speculates and d.catches_up) else 0,
                        d.hidden_layers if d is not None else (),
                        bool(d is not None and (d.pads or adaptive) and spec.speculates), adaptive, width)

    def _controller_plans(self, controller, budget_style: BudgetConfig | None) -> dict:
        """Setting -> (spec, budget) for every candidate; raises ValueError before any work. A setting's k is
        the number of draft nodes: a chain of k (the engine's tree a chain of at least k), a dynamic tree of
        the engine's shape keeping k + 1 nodes (k < its `tokens`), or the engine's static tree (k = its
        nodes - 1); k = 0 is speculation off."""
        if self.drafter is None:
            raise ValueError("a speculation controller needs a drafter")
        base = budget_style or self.budget or BudgetConfig(0)
        out = {}
        for s in controller.all_candidates:
            bcfg = None
            if s.budget is not None:
                bcfg = BudgetConfig(s.budget, base.policy, base.weights, base.protect_root)
                bcfg.validate(self.target.args)
            out[s] = (self._candidate_tree(s.k), bcfg)
        return out

    def _candidate_tree(self, k: int) -> TreeSpec:
        spec = self.spec
        if k == 0:
            return TreeSpec.ROOT
        if spec.kind == "chain":
            if k > len(spec.branching):
                raise ValueError(f"controller candidate k={k} exceeds the engine's chain length {len(spec.branching)}")
            return TreeSpec("chain", (1,) * k)
        if spec.kind == "dynamic":
            if k >= spec.tokens:
                raise ValueError(f"controller candidate k={k}: the engine's tree {spec} keeps at most "
                                 f"{spec.tokens - 1} draft nodes")
            return TreeSpec("dynamic", top_k=spec.top_k, depth=spec.depth, tokens=k + 1)
        if k != spec.max_nodes - 1:
            raise ValueError(f"controller candidate k={k}: a static tree ({spec}) is on (k={spec.max_nodes - 1}) "
                             f"or off (k=0)")
        return spec

    # ---- buffers ---------------------------------------------------------------------------------
    def _workspace(self, bs: int, need: int, cache: KVCache | None, n_stop: int) -> _Workspace:
        """The buffers of a batch of bs requests (the caller's cache, or one of `need` slots), reused from
        the last call when they fit: then its captured graphs replay."""
        ws = self._ws
        dev = self.target.tok_embeddings.weight.device
        if cache is not None:
            if ws is None or not ws.batch.fits(cache, n_stop):
                ws = _Workspace(SpecBatch(cache, max(8, n_stop), self.drafter is not None),
                                StepRunner(dev, self.cuda_graph), False)
        elif (ws is None or not ws.owned or ws.batch.full_size != bs or ws.batch.cache.capacity < need
              or n_stop > ws.batch.stop.numel()):
            # capacity rounded up (to a multiple of 128, or a power of two when smaller) so that runs of
            # similar lengths share buffers and graphs
            cap = min(-(-need // 128) * 128, 1 << (need - 1).bit_length())
            cap = cap if self._fits_context(cap) else need
            ws = _Workspace(SpecBatch(KVCache.for_model(self.target, bs, cap), max(8, n_stop), self.drafter is not None),
                            StepRunner(dev, self.cuda_graph), True)
        self._ws = ws
        return ws

    def _fits_context(self, capacity: int) -> bool:
        try:
            self.target.args.check_context(capacity)
            if self.drafter is not None:
                self.drafter.check(capacity, self.spec)
        except ValueError:
            return False
        return True

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, max_new_tokens: int,
              stop_ids: Sequence[int] = (), cache: KVCache | None = None) -> SpecBatch:
        """Prefill the prompts (the cache is reset first), draw every request's first token, fill the device
        batch, let the drafter prefill -> the batch. Host work (before the loop). A cache too small for
        capacity_for(P, max_new_tokens) is refused before anything is written."""
        from .. import ops
        plist = [list(p) for p in prompts]
        bs = len(plist)
        need = self._check_cache(cache, bs, max(map(len, plist)), max_new_tokens)
        ws = self._workspace(bs, need, cache, len(stop_ids))
        batch, dev = ws.batch, ws.batch.device
        seed = sampling.seed if sampling.seed is not None else int(torch.seed())
        batch.reset([seed * 1_000_003 + b for b in range(bs)])
        batch.cache.set_attend_limit(None)             # the loop bounds it per eager step (_Loop._bound_attention)
        lens = [len(p) for p in plist]
        P = max(lens)
        real = (torch.arange(P)[None, :] < torch.tensor(lens)[:, None]).reshape(-1).to(dev)
        stats = ExpertStats(mask=real)
        hidden_layers = self.drafter.hidden_layers if self.drafter is not None else ()
        logits, hidden = prefill(self.target, plist, batch.cache, MoEControl(stats=stats), hidden_layers)
        ones = torch.ones(bs, 1, dtype=torch.bool, device=dev)
        t = 0.0 if sampling.greedy else sampling.temperature
        _, _, first = ops.tree_accept(logits[:, None].contiguous(), torch.zeros(bs, 1, dtype=torch.long, device=dev),
                                      torch.full((bs, 1), -1, dtype=torch.long, device=dev), ones,
                                      temperature=t, top_p=sampling.top_p, top_k=sampling.top_k,
                                      seed=batch.seed, offset=batch.offset)
        batch.start(plist, first, max_new_tokens, stop_ids)
        if self.drafter is not None:
            self.drafter.prefill(batch, self.spec, hidden, stats.natural() if stats.layers else None)
            self.drafter.attend_limit(None, self.spec)
            if self.drafter.buffers != ws.drafter_buffers:     # new drafter buffers: graphs read the old ones
                ws.runner.reset()
                ws.drafter_buffers = self.drafter.buffers
        return batch

    # ---- one step (manual driving: tests, tools) ---------------------------------------------------
    @torch.no_grad()
    def step(self, batch: SpecBatch, plan: StepPlan | None = None, sampling: SamplingParams = SamplingParams()) -> Record:
        """Run one step on `batch` now (enqueue and read) -> its record. The generation loop does the same
        pipelined; this is for tests and tools."""
        plan = plan or self.plan(sampling)
        runner = self._ws.runner
        launch = runner.launch((batch.bs, plan), lambda mark: speculative_step(self.target, self.drafter, batch, plan,
                                                                              mark, self.adaptive))
        if self.drafter is not None:
            self.drafter.after_step()
        values, _ = runner.wait(launch)
        rec = Record.parse(values, batch.bs, plan.depth, self._n_moe() if plan.stats else 0)
        batch.observe(rec)
        return rec

    def _n_moe(self) -> int:
        return sum(self.target.args.moe_layers)

    # ---- the whole generation --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), *,
                 cache: KVCache | None = None,
                 on_step: Callable[[StepStats, list[list[int]]], None] | None = None,
                 controller=None, budget_style: BudgetConfig | None = None) -> SpecResult:
        """Generate up to max_new_tokens per prompt. Every check (prompts, vocabulary, capacity, context
        limit) happens before any device work; `cache` (optional) must hold capacity_for(P, N) slots.

        on_step(stats, tokens): after each step's record is read (one step late), with the tokens each
        active request committed. controller: an optional controller.CascadeController choosing each
        step's Setting(k, budget): k = 0 a speculation-off step, else a chain of k drafts (k <= the
        engine's chain length), budget None = no expert budget, B = BudgetConfig(B) with budget_style's (else
        the engine budget's, else the default) policy / weights / protect_root. It observes the device time
        of each replayed step and the tokens the batch emitted."""
        plans = self._controller_plans(controller, budget_style) if controller is not None else None
        plist = check_prompts(prompts, self.target.args.vocab_size, max_new_tokens)
        bs, lens = len(plist), [len(p) for p in plist]
        need = self.capacity_for(max(lens), max_new_tokens)
        self.target.args.check_context(need)
        self._check_cache(cache, bs, max(lens), max_new_tokens)
        if self.drafter is not None:
            self.drafter.check(need, self.spec)
        stop = sorted(set(int(s) for s in stop_ids))
        dev = self.target.tok_embeddings.weight.device
        _sync(dev)
        t0 = time.perf_counter()
        batch = self.start(plist, sampling, max_new_tokens, stop, cache)
        runner = self._ws.runner
        capture0 = runner.capture_s
        firsts = batch.root.tolist()
        out = [[t] for t in firsts]
        done = [max_new_tokens <= 1 or t in stop for t in firsts]
        reasons = ["stop" if t in stop else "length" for t in firsts]
        _sync(dev)
        t1 = time.perf_counter()
        loop = _Loop(self, batch, runner, sampling, plans, controller, max_new_tokens, out, done, reasons, set(stop),
                     on_step)
        loop.run()
        _sync(dev)
        t2 = time.perf_counter()
        setup = runner.capture_s - capture0
        cfg = {"tree": str(self.spec), "rule": self.rule,
               **(self.drafter.describe() if self.drafter is not None else {"drafter": None}),
               "budget": self.budget.describe() if self.budget is not None else None,
               "verify": "adaptive" if self.adaptive is not None else "full"}
        if self.adaptive is not None:
            cfg["calibration"] = self.adaptive.table()             # one read, after the loop
        if controller is not None:
            cfg["controller"] = controller_report(controller, loop.chosen)
        return SpecResult(tokens=out, finish_reasons=reasons, prompt_lens=lens, prefill_s=t1 - t0,
                          decode_s=t2 - t1 - setup, decode_steps=len(loop.steps),
                          cuda_graph=any(s.replayed for s in loop.steps), steps=loop.steps, config=cfg,
                          extra={"capture_s": setup})


class _Loop:
    """The host side of one generation: plans, pipelined launches, the one read per step, batch shrinking."""

    DEPTH = 2     # steps enqueued ahead of the one being read

    def __init__(self, eng: SpecEngine, batch: SpecBatch, runner: StepRunner, sampling, plans, controller,
                 max_new: int, out, done, reasons, stop: set, on_step):
        self.eng, self.batch, self.runner, self.sampling = eng, batch, runner, sampling
        self.plans, self.controller, self.max_new = plans, controller, max_new
        self.out, self.done, self.reasons, self.stop, self.on_step = out, done, reasons, stop, on_step
        self.steps: list[StepStats] = []
        self.chosen: list[list] = []                 # controller: [k, budget, steps] run-length
        self.inflight: deque = deque()
        self.lag = 0
        self.n_moe = eng._n_moe()
        self.shrink_at_half = runner.use_graphs

    def _next_plan(self):
        eng = self.eng
        if self.controller is None:
            return eng.plan(self.sampling), None
        setting = self.controller.next_setting()
        spec, budget = self.plans[setting]
        plan = eng.plan(self.sampling, spec, budget, self.lag)
        self.lag = 0 if spec.speculates else self.lag + 1
        if self.chosen and self.chosen[-1][:2] == [setting.k, setting.budget]:
            self.chosen[-1][2] += 1
        else:
            self.chosen.append([setting.k, setting.budget, 1])
        return plan, setting

    def _may_need_more(self) -> bool:
        ahead = sum(p.depth + 1 for _, p, _ in self.inflight)
        return any(not self.done[r] and len(self.out[r]) + ahead < self.max_new for r in self.batch.rows)

    def _bound_attention(self, plan) -> None:
        """Eager steps (CPU, or graphs off): their dense-mask attention covers only the slots this step can
        touch (committed length as last read + what the steps in flight may add + the tree), not the
        capacity. Graph replays keep the full capacity (fixed shapes), and so does a batch-invariant target
        (models/invariant.py): attention over a step-dependent number of slots rounds differently."""
        if self.runner.use_graphs or getattr(self.eng.target, "invariant_chunk", 0):
            return
        ahead = sum(p.depth + 1 for _, p, _ in self.inflight)
        limit = max(self.batch.cache.host_lengths()) + ahead + self.eng.slots_per_step() + plan.lag + 2
        self.batch.cache.set_attend_limit(limit)
        if self.eng.drafter is not None:
            self.eng.drafter.attend_limit(limit, self.eng.spec)

    def _launch(self) -> None:
        eng, batch = self.eng, self.batch
        plan, setting = self._next_plan()
        self._bound_attention(plan)
        launch = self.runner.launch((batch.bs, plan), lambda mark: speculative_step(eng.target, eng.drafter, batch,
                                                                                   plan, mark, eng.adaptive))
        if eng.drafter is not None:
            eng.drafter.after_step()
        self.inflight.append((launch, plan, setting))

    def _read(self) -> None:
        launch, plan, setting = self.inflight.popleft()
        values, times = self.runner.wait(launch)                        # the one host read of this step
        batch = self.batch
        rec = Record.parse(values, batch.bs, plan.depth, self.n_moe if plan.stats else 0)
        batch.observe(rec)
        emitted, live = [], []
        for b, r in enumerate(batch.rows):
            toks = rec.tokens(b)
            emitted.append(toks)
            if self.done[r]:
                continue
            live.append(b)
            self.out[r].extend(toks)
            if rec.finished[b]:
                self.done[r] = True
                self.reasons[r] = "stop" if toks and toks[-1] in self.stop else "length"
        replayed = launch.done is not None and launch.replayed
        st = StepStats(len(live), plan.tree.max_nodes, [rec.valid[b] for b in live], [rec.accepted[b] for b in live],
                       [rec.count[b] for b in live], rec.touched, rec.loaded, times["step_s"], times.get("draft_s"),
                       times.get("verify_s"), times.get("accept_s"), replayed, [rec.drafted[b] for b in live],
                       rec.predicted_s)
        self.steps.append(st)
        if self.controller is not None and (replayed or not self.runner.use_graphs):
            step_s = max(st.step_s, 1e-9)
            par = getattr(self.eng.target, "parallel", None)
            if par is not None:             # several ranks: decide on the slowest rank's time, all alike
                step_s = par.comm.agree_max(step_s)
            self.controller.observe(setting, step_s, sum(st.emitted))
        if self.on_step is not None:
            self.on_step(st, [emitted[b] for b in live])

    def _shrink(self) -> None:
        """Finished requests leave the batch (after the steps in flight were read)."""
        batch = self.batch
        keep = [b for b, r in enumerate(batch.rows) if not self.done[r]]
        if not keep or len(keep) == batch.bs:
            return
        if self.shrink_at_half and 2 * (batch.bs - len(keep)) < batch.bs:
            return
        while self.inflight:
            self._read()
        keep = [b for b, r in enumerate(batch.rows) if not self.done[r]]
        if not keep:
            return
        batch.keep(keep)
        if self.eng.drafter is not None:
            self.eng.drafter.keep(keep)

    def run(self) -> None:
        while True:
            while len(self.inflight) < self.DEPTH and self._may_need_more():
                self._launch()
            if not self.inflight:
                return
            self._read()
            if all(self.done[r] for r in self.batch.rows):
                while self.inflight:                   # steps enqueued past the end: wait, ignore their tokens
                    self._read()
                return
            self._shrink()


def controller_report(controller, chosen: list[list]) -> dict:
    """JSON-able view of a CascadeController after a run: candidates, the settings chosen over time
    (run-length [k, budget, steps]) and every phase with its measured utilities."""
    def name(s) -> str:
        return f"k={s.k}" + (f",budget={s.budget}" if s.budget is not None else "")
    return {
        "candidates": [name(s) for s in controller.all_candidates],
        "pruned": [name(s) for s in controller.pruned],
        "predicted_utility": {name(s): round(u, 4) for s, u in controller.predicted_u.items()},
        "settings_over_time": chosen,
        "phases": [{"phase": ph, "setting": name(s), "steps": n, "utilities": {name(c): round(u, 4) for c, u in u_.items()}}
                   for ph, s, n, u_ in controller.history],
        "utilities": {name(s): round(u, 4) for s, u in controller.utilities().items()},
    }


def speculative_generate(target: Transformer, drafter: Drafter, prompts, max_new_tokens: int,
                         sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), *,
                         tree: str | TreeSpec = "chain:4", budget: BudgetConfig | None = None,
                         rule: str = "auto", cache: KVCache | None = None) -> SpecResult:
    """Functional form of SpecEngine(target, drafter, tree, budget, rule).generate(...)."""
    return SpecEngine(target, drafter, tree, budget, rule).generate(prompts, max_new_tokens, sampling, stop_ids,
                                                                    cache=cache)


_PLAIN: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def generate(model: Transformer, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), *,
             cache: KVCache | None = None, cuda_graph: bool | None = None,
             on_step: Callable[[StepStats, list[list[int]]], None] | None = None) -> SpecResult:
    """Plain autoregressive generation: the speculative loop with no drafter (every step verifies the root
    alone, one token per request). prompts: lists of ids (any lengths) or a [bs, P] tensor. cuda_graph:
    None = on when the model is on CUDA. The engine (buffers, captured graphs) is kept per model, so
    repeated calls of one batch size replay. Every check happens before any device work."""
    if cuda_graph and model.tok_embeddings.weight.device.type != "cuda":
        raise ValueError("generate: cuda_graph=True needs the model on a CUDA device")
    use = cuda_graph if cuda_graph is not None else True
    engines = _PLAIN.setdefault(model, {})
    eng = engines.get(use)
    if eng is None:
        eng = engines[use] = SpecEngine(model, None, cuda_graph=use)
    return eng.generate(prompts, max_new_tokens, sampling, stop_ids, cache=cache, on_step=on_step)

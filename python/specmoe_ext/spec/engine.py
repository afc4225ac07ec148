"""The speculative decoding loop, gpt-fast style: draft -> verify -> accept -> compact -> stats.

Shape legend: bs active requests, T tree nodes (node 0 = root = last committed token), V vocab, S cache
capacity, P longest prompt, E experts, L_moe MoE layers, h hidden.

    start    prefill every prompt into the target cache (one forward), sample the first token: it becomes
             the root of the first tree (committed, but its K/V is not in the cache yet)
    step     1. host capacity check: max(tree nodes, slots the drafter writes in the target cache) past
                every prefix; raises CacheCapacityError before anything is written
             2. tree = drafter.draft(spec)                                          DraftTree [bs, T]
             3. ONE target forward over all nodes of all requests: node i of request b at position
                prefix_b + depth, slot prefix_b + i, seeing the prefix and its ancestors (tree_mask);
                optional MoE-Spec expert budget (MoEControl) and expert statistics
             4. accept (greedy / target-sampling / q-aware)      -> path, accepted count, bonus token
             5. kv_compact: the accepted path's K/V moves right after the prefix; commit prefix + n + 1
             6. append accepted tokens + bonus, apply stop tokens / max_new_tokens, feed the drafter,
                and drop finished requests from the batch (KV rows, drafter state)
Optionally (generate(controller=...), `specmoe generate --spec auto`) a Cascade controller picks each step's
chain length (0 = a root-only step, i.e. plain autoregressive decoding in the same cache) and expert budget.
Greedy output equals greedy autoregressive decoding token for token (lossless); at temperature > 0 the
emitted tokens are distributed as autoregressive sampling (one Philox-free torch.Generator per request,
seeded from `seed`, so runs are reproducible). The expert budget is lossy and off by default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..models.config import ModelArgs
from ..models.generate import GenerationResult, SamplingParams, check_prompts
from ..models.kv_cache import CacheCapacityError, KVCache
from ..models.model import ExpertStats, MoEControl, PrefixTreeMask, Transformer, causal_mask
from ..routing_types import POLICIES
from .accept import RULES, Acceptance, _sample_rows, accept, resolve_rule, target_probs
from .drafters import Drafter, SpecState, StepOutcome
from .kv import kv_compact
from .tree import DraftTree, TreeSpec
from .verify_graph import verify_control, verify_step_for

WEIGHTINGS = ("uniform", "path")


@dataclass(frozen=True)
class BudgetConfig:
    """MoE-Spec expert budget for the verification forward (see shared/algorithms.md section 2).

    budget        B for every MoE layer, or one entry per layer (None = no budget for that layer)
    policy        "substitute" (re-pick top-K among kept experts) | "truncate" (drop dropped slots)
    weights       "uniform" (w_t = 1, the paper) | "path" (w_t = draft probability of reaching node t)
    protect_root  the committed root token always keeps its natural top-K experts
    """

    budget: int | tuple[int | None, ...]
    policy: str = "substitute"
    weights: str = "uniform"
    protect_root: bool = True

    @staticmethod
    def parse(text: str, **kw) -> "BudgetConfig":
        """"32" or "32,32,16,16" (one per layer; "none" or "-" = no budget for that layer)."""
        parts = [p.strip().lower() for p in str(text).split(",")]
        try:
            vals = [None if p in ("-", "none") else int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--budget {text!r}: expected an integer or a comma list per layer (e.g. 32 or "
                             f"32,32,16,16; 'none' = no budget for a layer)") from None
        budget = vals[0] if len(vals) == 1 and vals[0] is not None else tuple(vals)
        return BudgetConfig(budget, **kw)

    def validate(self, args: ModelArgs) -> None:
        if not args.is_moe:
            raise ValueError(f"an expert budget needs an MoE target ({args.architecture} has no experts)")
        if self.policy not in POLICIES:
            raise ValueError(f"budget policy {self.policy!r}: choose one of {POLICIES}")
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"budget token weights {self.weights!r}: choose one of {WEIGHTINGS}")
        K = args.top_k
        per = [self.budget] * args.n_layers if isinstance(self.budget, int) else list(self.budget)
        if len(per) != args.n_layers:
            raise ValueError(f"per-layer budget has {len(per)} entries, the model has {args.n_layers} layers")
        for i, (b, moe) in enumerate(zip(per, args.moe_layers)):
            if b is not None and moe and b < K:
                raise ValueError(f"expert budget {b} < top_k {K} (layer {i}): every token needs its {K} experts")
            if b is not None and b < 1:
                raise ValueError(f"expert budget must be >= 1, got {b} (layer {i})")

    def describe(self) -> dict:
        b = self.budget if isinstance(self.budget, int) else list(self.budget)
        return {"budget": b, "policy": self.policy, "weights": self.weights, "protect_root": self.protect_root}


@dataclass
class StepStats:
    batch: int                   # active requests in this step
    tree_nodes: int              # T (padded to the largest tree of the batch)
    valid_nodes: list[int]       # real nodes per request
    accepted: list[int]          # accepted draft tokens per request (a step emits accepted + 1)
    touched: list[int]           # per MoE layer: distinct experts the tree's natural routing wanted
    loaded: list[int]            # per MoE layer: experts read (kept experts with >= 1 pair)
    draft_s: float
    verify_s: float
    accept_s: float


@dataclass
class SpecResult(GenerationResult):
    steps: list[StepStats] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Acceptance and expert statistics over all steps (per request-step for acceptance)."""
        acc = [a for s in self.steps for a in s.accepted]
        n_steps = len(self.steps)
        hist: dict[int, int] = {}
        for a in acc:
            hist[a] = hist.get(a, 0) + 1
        with_stats = [s for s in self.steps if s.touched]         # plain decode steps carry no expert stats
        L = len(with_stats[0].touched) if with_stats else 0

        def mean(xs):
            xs = list(xs)
            return round(sum(xs) / len(xs), 4) if xs else None

        return {
            "steps": n_steps,
            "accepted_per_step": mean(acc),                       # draft tokens accepted per request-step
            "tokens_per_step": mean(a + 1 for a in acc),          # tokens committed per request-step
            "acceptance_histogram": {str(k): hist[k] for k in sorted(hist)},
            "tree_nodes_mean": mean(s.tree_nodes for s in self.steps),
            "experts_touched_per_layer": [mean(s.touched[l] for s in with_stats) for l in range(L)],
            "experts_loaded_per_layer": [mean(s.loaded[l] for s in with_stats) for l in range(L)],
            "draft_ms_per_step": mean(1e3 * s.draft_s for s in self.steps),
            "verify_ms_per_step": mean(1e3 * s.verify_s for s in self.steps),
            "accept_ms_per_step": mean(1e3 * s.accept_s for s in self.steps),
        }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class SpecEngine:
    """Speculative decoding of `target` with `drafter` over trees of shape `tree`.

    budget: None (lossless verification) or a BudgetConfig (MoE-Spec). rule: "auto" | "target" | "q" (see
    accept.resolve_rule; at temperature > 0, chain / static trees are drafted by sampling unless rule is
    "target"). cuda_graph: on the GPU (CUDA kernels built), verification + acceptance + KV compaction of a
    step run as one CUDA graph per (batch, tree size, budget, sampling) (spec/verify_graph.py) whenever the
    acceptance rule is greedy or 'target'; False keeps the eager path. Every argument is checked here,
    before any work."""

    def __init__(self, target: Transformer, drafter: Drafter, tree: str | TreeSpec = "chain:4",
                 budget: BudgetConfig | None = None, rule: str = "auto", cuda_graph: bool = True):
        self.target, self.drafter = target, drafter
        self.spec = TreeSpec.parse(tree)
        if budget is not None:
            budget.validate(target.args)
        if rule not in RULES:
            raise ValueError(f"acceptance rule {rule!r}: choose one of {RULES}")
        if rule == "q" and self.spec.kind == "dynamic":
            raise ValueError("acceptance rule 'q' needs sampled drafts: use a chain or static tree, or rule 'target'")
        self.budget, self.rule = budget, rule
        self.cuda_graph = cuda_graph

    # ---- sizes -----------------------------------------------------------------------------------
    def slots_per_step(self) -> int:
        """Target-cache slots one step may write past a request's committed prefix."""
        return max(self.spec.max_nodes, self.drafter.target_slots(self.spec))

    def capacity_for(self, max_prompt: int, max_new_tokens: int) -> int:
        return max_prompt + max_new_tokens + self.slots_per_step()

    def _sample_drafts(self, sampling: SamplingParams) -> bool:
        return not sampling.greedy and self.rule != "target" and self.spec.kind != "dynamic"

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, prompts: list[list[int]], sampling: SamplingParams, cache: KVCache) -> SpecState:
        """Prefill the prompts (cache reset first), sample each request's first token, start the drafter."""
        dev, bs = cache.device, len(prompts)
        gens = None
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else torch.seed()
            gens = [torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b) for b in range(bs)]
        cache.reset()
        lens = [len(p) for p in prompts]
        P = max(lens)
        slots = cache.reserve(P)
        toks = torch.zeros(bs, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            toks[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        toks = toks.to(dev)
        real = (torch.arange(P, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]).reshape(-1)
        stats = ExpertStats(mask=real)
        hidden: list[Tensor] | None = [] if self.drafter.hidden_layers else None
        last = torch.tensor(lens, device=dev)[:, None] - 1
        logits = self.target(toks, slots, cache, slots, causal_mask(slots, cache.capacity), MoEControl(stats=stats),
                             logits_index=last, hidden_layers=self.drafter.hidden_layers, hidden_out=hidden)[:, 0]
        cache.advance(lens)
        if sampling.greedy:
            first = logits.argmax(-1)
        else:
            u = torch.stack([torch.rand((), generator=g, device=dev) for g in gens])
            first = _sample_rows(target_probs(logits[:, None], sampling)[:, 0], u)
        ctx = [list(p) + [int(t)] for p, t in zip(prompts, first.tolist())]
        state = SpecState(self.target, cache, ctx, list(range(bs)), gens, sampling,
                          out=[[] for _ in range(bs)], done=[False] * bs, reasons=["length"] * bs)
        if not sampling.greedy:   # Philox streams of the graph-captured acceptance, one per request
            state.philox = (torch.tensor([(seed * 1_000_003 + b) % (1 << 63) for b in range(bs)], dtype=torch.long, device=dev),
                            torch.zeros(bs, dtype=torch.long, device=dev))
        if stats.layers:
            self.drafter.observe(stats.natural())
        self.drafter.start(state, self.spec, hidden)
        return state

    # ---- one speculative step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, state: SpecState, spec: TreeSpec | None = None,
             budget: BudgetConfig | None | str = "engine") -> tuple[StepStats, list[list[int]]]:
        """One draft / verify / accept / compact round for every active request -> (stats, tokens committed
        per active request). Raises before any write if a tree cannot fit in the cache.

        spec / budget override the engine's tree and expert budget for this step only (the Cascade
        controller of `generate`); spec None = the engine's tree, "off" = no draft at all: the target runs
        over the root alone, i.e. a plain autoregressive step through the same cache (0 accepted + bonus token,
        drawn from the target by the 'target' rule at temperature > 0)."""
        spec = self.spec if spec is None else spec
        budget = self.budget if isinstance(budget, str) and budget == "engine" else budget
        cache, dev = state.cache, state.device
        if isinstance(spec, str) and spec == "off" and self._fast_off(state):
            return self._ar_step(state)
        need = self.slots_per_step()
        try:
            cache.check_append(need)
        except CacheCapacityError as e:
            raise CacheCapacityError(f"speculative step: tree {self.spec} needs {need} cache slots past the "
                                     f"committed prefix: {e}") from None
        prefix = cache.host_lengths()
        sampling = state.sampling
        _sync(dev)
        t0 = time.perf_counter()
        off = isinstance(spec, str) and spec == "off"
        if off:
            roots = torch.tensor([[c[-1]] for c in state.ctx], dtype=torch.long, device=dev)
            tree = DraftTree.from_parents(roots, torch.full_like(roots, -1))
        else:
            tree = self.drafter.draft(spec, sample=self._sample_drafts(sampling), sampling=sampling,
                                      generators=state.generators)
        if tree.T > need:
            raise AssertionError(f"drafter produced {tree.T} nodes, more than the {need} checked for")
        _sync(dev)
        t1 = time.perf_counter()
        rule = "target" if off else self.rule                  # root only: sample p
        setup = 0.0
        padded = not bool(tree.valid.all())
        if self._graph_verify(dev, tree, sampling, rule):
            vs = verify_step_for(self.target, cache, state.bs, tree.T, budget, sampling, self.drafter.hidden_layers,
                                 padded)
            seed, offset = getattr(state, "philox", None) or (None, None)
            vo = vs.run(tree, seed, offset)
            n = vo.n_host
            cache.note_device_advance([p + k + 1 for p, k in zip(prefix, n)])
            acc, hidden = vo.acceptance, vo.hidden
            natural, routed = vo.natural, vo.routed
            t2 = time.perf_counter()
            setup = vo.setup_s                                  # graph capture: reported apart
            state.setup_s = getattr(state, "setup_s", 0.0) + setup
        else:
            L = torch.tensor(prefix, device=dev)
            slots = tree.slots(L)
            mask = PrefixTreeMask(L, tree.anc, kv_len_hint=max(prefix) + tree.T)
            moe, stats = verify_control(tree.valid, tree.logp, budget, padded)
            hidden = [] if self.drafter.hidden_layers else None
            logits = self.target(tree.tokens, tree.positions(L), cache, slots, mask, moe,
                                 hidden_layers=self.drafter.hidden_layers, hidden_out=hidden)
            _sync(dev)
            t2 = time.perf_counter()
            acc = accept(tree, logits, sampling, rule, state.generators)
            n = acc.n_accepted.tolist()
            kv_compact(cache, prefix, acc.path, n)
            natural = stats.natural() if stats.layers else None
            routed = stats.routed() if stats.layers else None
        emitted = acc.emitted(tree)
        for c, em in zip(state.ctx, emitted):
            c.extend(em)
        touched = (natural > 0).sum(1).tolist() if natural is not None else []
        loaded = (routed > 0).sum(1).tolist() if routed is not None else []
        if natural is not None:
            self.drafter.observe(natural)
        self.drafter.commit(StepOutcome(prefix, acc, emitted, torch.cat(hidden, -1) if hidden else None))
        _sync(dev)
        t3 = time.perf_counter()
        return StepStats(state.bs, tree.T, tree.n_valid().tolist(), n, touched, loaded, t1 - t0, t2 - t1 - setup,
                         t3 - t2), emitted

    def _fast_off(self, state: SpecState) -> bool:
        """A speculation-off step can run as the runtime's CUDA-graph decode step (what plain autoregressive
        decoding runs): greedy, on the GPU with graphs on, and no drafter that needs target features."""
        return (self.cuda_graph and state.device.type == "cuda" and state.sampling.greedy
                and not self.drafter.hidden_layers)

    def _ar_step(self, state: SpecState) -> tuple[StepStats, list[list[int]]]:
        """One plain autoregressive step of every request through the decode graph of the runtime (captured on
        first use per cache and batch; the capture is reported apart, like the verify graphs)."""
        from ..models.generate import _graph_for
        cache, dev, bs = state.cache, state.device, state.bs
        try:
            cache.check_append(1)
        except CacheCapacityError as e:
            raise CacheCapacityError(f"speculative step (speculation off): {e}") from None
        prefix = cache.host_lengths()
        t_s = time.perf_counter()
        n_graphs = len(cache.graphs)
        graph = _graph_for(self.target, cache, None)
        if len(cache.graphs) != n_graphs:
            _sync(dev)
            state.setup_s = getattr(state, "setup_s", 0.0) + time.perf_counter() - t_s
        _sync(dev)
        t0 = time.perf_counter()
        roots = torch.tensor([[c[-1]] for c in state.ctx], dtype=torch.long, device=dev)
        tok = graph(roots).argmax(-1)                                        # [bs]
        cache.advance(1)
        emitted = [[t] for t in tok.tolist()]
        for c, em in zip(state.ctx, emitted):
            c.extend(em)
        zeros = torch.zeros(bs, dtype=torch.long, device=dev)
        acc = Acceptance(zeros[:, None].clone(), zeros, tok)
        self.drafter.commit(StepOutcome(prefix, acc, emitted, None))
        t1 = time.perf_counter()
        return StepStats(bs, 1, [1] * bs, [0] * bs, [], [], 0.0, t1 - t0, 0.0), emitted

    def _ride_along(self, state: SpecState, keep: list[int]) -> bool:
        """With captured verify graphs, finished requests stay in the batch (their tokens are ignored) until
        half the batch has finished or one of them has no room for another step: every change of batch size
        costs an eager step and a new capture, which a few wasted rows cost less than."""
        if not self.cuda_graph or state.device.type != "cuda":
            return False
        kept = set(keep)
        done = [i for i in range(state.bs) if i not in kept]
        if 2 * len(done) >= state.bs:
            return False
        lens, need, cap = state.cache.host_lengths(), self.slots_per_step(), state.cache.capacity
        return all(lens[i] + need <= cap for i in done)

    def _graph_verify(self, dev: torch.device, tree: DraftTree, sampling: SamplingParams, rule: str) -> bool:
        """True when this step's verification runs as a captured graph (see spec/verify_graph.py)."""
        if not self.cuda_graph or dev.type != "cuda":
            return False
        from .. import cuda_kernels_available
        if not cuda_kernels_available():
            return False
        return resolve_rule(rule, tree, sampling.greedy) in ("greedy", "target")

    def _controller_settings(self, controller, budget_style: BudgetConfig | None = None) -> dict:
        """Setting -> (spec, budget) step arguments for every candidate; raises ValueError before any work."""
        if self.spec.kind != "chain":
            raise ValueError(f"a speculation controller chooses chain lengths: the engine's tree must be a chain "
                             f"(its longest), got {self.spec}")
        kmax = len(self.spec.branching)
        base = budget_style or self.budget or BudgetConfig(0)
        out = {}
        for s in controller.all_candidates:
            if s.k > kmax:
                raise ValueError(f"controller candidate k={s.k} exceeds the engine's chain length {kmax}")
            bcfg = None
            if s.budget is not None:
                bcfg = BudgetConfig(s.budget, base.policy, base.weights, base.protect_root)
                bcfg.validate(self.target.args)
            out[s] = ("off", None) if s.k == 0 else (TreeSpec("chain", (1,) * s.k), bcfg)
        return out

    def _leave(self, state: SpecState) -> None:
        """Drop finished requests from the batch (target cache rows, drafter state, generators)."""
        keep = [i for i, r in enumerate(state.rows) if not state.done[r]]
        if not keep or len(keep) == state.bs:
            return
        if self._ride_along(state, keep):
            return
        state.cache.keep_rows(keep)
        self.drafter.keep(keep)
        state.ctx = [state.ctx[i] for i in keep]
        state.rows = [state.rows[i] for i in keep]
        if state.generators is not None:
            state.generators = [state.generators[i] for i in keep]
        if getattr(state, "philox", None) is not None:
            idx = torch.tensor(keep, device=state.philox[0].device)
            state.philox = (state.philox[0][idx], state.philox[1][idx])

    # ---- the whole generation --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), *,
                 cache: KVCache | None = None,
                 on_step: Callable[[StepStats, list[list[int]]], None] | None = None,
                 controller=None, budget_style: BudgetConfig | None = None) -> SpecResult:
        """Generate up to max_new_tokens per prompt. Every check (prompts, vocabulary, capacity, context
        limit) happens before any device work; `cache` (optional) must hold capacity_for(P, N) slots.

        controller: an optional controller.CascadeController choosing each step's Setting(k, budget): k = 0
        a plain autoregressive step, else a chain of k drafts (k <= the engine's chain length, which sizes
        the cache), budget None = no expert budget, B = BudgetConfig(B) with budget_style's (else the
        engine budget's, else the default) policy / weights / protect_root. Step time fed back =
        draft_s + verify_s + accept_s (measured after the step's existing host syncs, none added), tokens =
        emitted over the batch."""
        step_args = self._controller_settings(controller, budget_style) if controller is not None else None
        plist = check_prompts(prompts, self.target.args.vocab_size, max_new_tokens)
        bs = len(plist)
        lens = [len(p) for p in plist]
        need = self.capacity_for(max(lens), max_new_tokens)
        self.target.args.check_context(need)
        if cache is None:
            cap = need
            if self.cuda_graph and self.target.tok_embeddings.weight.is_cuda:
                cap = need + 4 * self.slots_per_step()   # room for finished requests to ride along (_ride_along)
                mc = self.target.args.max_context
                cap = cap if mc is None else min(cap, max(mc, need))
            cache = KVCache.for_model(self.target, bs, cap)
        elif cache.batch_size != bs or cache.capacity < need:
            raise CacheCapacityError(
                f"speculative generate: cache has batch {cache.batch_size} / capacity {cache.capacity}, need batch "
                f"{bs} / capacity {need} (longest prompt {max(lens)} + {max_new_tokens} new + {self.slots_per_step()} "
                f"slots for the tree {self.spec})")
        self.drafter.check(cache.capacity, self.spec)
        stop = set(int(s) for s in stop_ids)
        dev = cache.device
        _sync(dev)
        t0 = time.perf_counter()
        state = self.start(plist, sampling, cache)

        def record(rows: list[int], toks: list[list[int]]) -> None:
            for r, em in zip(rows, toks):
                for t in em:
                    if state.done[r]:
                        break
                    state.out[r].append(t)
                    if t in stop:
                        state.done[r], state.reasons[r] = True, "stop"
                    elif len(state.out[r]) >= max_new_tokens:
                        state.done[r] = True

        record(state.rows, [[c[-1]] for c in state.ctx])
        self._leave(state)
        _sync(dev)
        t1 = time.perf_counter()
        steps: list[StepStats] = []
        chosen: list[list] = []                                # [k, budget, steps] run-length
        while not all(state.done):
            if controller is None:
                st, emitted = self.step(state)
            else:
                setting = controller.next_setting()
                st, emitted = self.step(state, *step_args[setting])
                controller.observe(setting, max(st.draft_s + st.verify_s + st.accept_s, 1e-9),
                                   sum(a + 1 for a in st.accepted))
                if chosen and chosen[-1][:2] == [setting.k, setting.budget]:
                    chosen[-1][2] += 1
                else:
                    chosen.append([setting.k, setting.budget, 1])
            steps.append(st)
            record(state.rows, emitted)
            if on_step is not None:
                on_step(st, emitted)
            self._leave(state)
        _sync(dev)
        t2 = time.perf_counter()
        cfg = {"tree": str(self.spec), "rule": self.rule, **self.drafter.describe(),
               "budget": self.budget.describe() if self.budget is not None else None}
        if controller is not None:
            cfg["controller"] = controller_report(controller, chosen)
        setup = getattr(state, "setup_s", 0.0)   # verify-graph warm-up + capture, outside decode_s (as for AR)
        return SpecResult(tokens=state.out, finish_reasons=state.reasons, prompt_lens=lens, prefill_s=t1 - t0,
                          decode_s=t2 - t1 - setup, decode_steps=len(steps), cuda_graph=setup > 0, steps=steps,
                          config=cfg, extra={"capture_s": setup})


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

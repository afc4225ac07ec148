"""Batched autoregressive generation (gpt-fast style): prefill, then one decode step per token.

Shape legend: bs requests, P longest prompt, S cache capacity (= P + max_new_tokens), V vocab.

    prefill   prompts right-padded to [bs, P]; request b's tokens sit in slots 0..len_b-1 of its cache row
              (pad tokens write slots >= len_b, which its later tokens overwrite before anything attends
              them); logits taken at len_b - 1 for each request.
    decode    tokens [bs, 1] at position = slot = cache.lengths[b]: no padding, no per-request masks
              to rebuild; every request advances one slot per step (finished ones are ignored).
On CUDA the decode step (the model forward, not the sampling) is captured in a CUDA graph per batch
size and cache, and replayed; on CPU, or with cuda_graph=False, it runs eagerly. Sampling runs outside
the graph on [bs, V] logits (cheap), and the host reads the new tokens each step (stop tokens).

Sampling follows transformers' order: temperature, then top-k, then top-p; temperature 0 is greedy.
Draws use the exponential-race trick (argmax p / Exp(1)) from one torch.Generator seeded with `seed`:
the same seed, prompts and batch give the same tokens.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .kv_cache import KVCache
from .model import MoEControl, Transformer, causal_mask


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0         # nucleus mass in (0, 1]
    top_k: int = 0             # 0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """logits [bs, V] -> float32 logits after temperature / top-k / top-p (removed tokens = -inf)."""
    x = logits.float()
    if p.temperature != 1.0:
        x = x / p.temperature
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p, keep >= 1 token
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - p.top_p)
        remove[:, -1] = False
        x = x.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return x


def sample(logits: Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """logits [bs, V] -> tokens [bs] (int64)."""
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, p).softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / q).argmax(dim=-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]            # generated ids per request (a stop token, if hit, is included)
    finish_reasons: list[str]          # "stop" | "length"
    prompt_lens: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    cuda_graph: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n_generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.n_generated / t if t > 0 else 0.0

    @property
    def decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


class DecodeGraph:
    """The model's decode step captured in a CUDA graph for one (cache, batch size).

    Static input: `tokens` [bs, 1]; positions, slots and the mask come from cache.lengths (a device
    tensor updated in place), so replays follow the cache. Output: `logits` [bs, V], overwritten by
    each replay. Capture needs every request's length < capacity (the warm-up writes at slot `length`)."""

    def __init__(self, model: Transformer, cache: KVCache, moe: MoEControl | None = None, warmup: int = 2):
        if any(l >= cache.capacity for l in cache.host_lengths()):
            raise RuntimeError("DecodeGraph: capture needs a free slot in every request of the cache")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        s = torch.cuda.Stream(device=cache.device)
        s.wait_stream(torch.cuda.current_stream())
        with torch.no_grad():
            with torch.cuda.stream(s):  # warm-up (library handles, allocator) outside the capture
                for _ in range(warmup):
                    model.decode_step(self.tokens, cache, moe)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model.decode_step(self.tokens, cache, moe)

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def _graph_for(model: Transformer, cache: KVCache, moe: MoEControl | None) -> DecodeGraph:
    """The decode graph for (model, cache, routing settings), captured on first use and kept on the cache.
    A graph bakes in the MoE budget / policy; per-token tensors or a routing record cannot be replayed."""
    if moe is not None and moe.per_call:
        raise ValueError("generate: a MoEControl with token_weights / protect / record / token_mask / stats "
                         "cannot run in a CUDA graph; pass cuda_graph=False")
    key: tuple = (id(model),)
    if moe is not None:
        b = moe.budget
        key += (b if b is None or isinstance(b, int) else tuple(b), moe.policy, moe.impl,
                id(moe.expert_map) if moe.expert_map is not None else None)
    g = cache.graphs.get(key)
    if g is None or g.model is not model:
        g = cache.graphs[key] = DecodeGraph(model, cache, moe)
    return g


def _to_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must be [bs, P], got {tuple(prompts.shape)}")
        return [list(map(int, r)) for r in prompts.tolist()]
    out = [list(map(int, p)) for p in prompts]
    if not out:
        raise ValueError("generate: no prompts")
    return out


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache,
            moe: MoEControl | None = None) -> Tensor:
    """Write every prompt's K/V into its (empty) cache row and commit it; -> last-token logits [bs, V]."""
    dev = cache.device
    lens = [len(p) for p in prompts]
    P = max(lens)
    slots = cache.reserve(P)                 # capacity checked for the padded width, before any write
    toks = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    toks = toks.to(dev)
    last = torch.tensor(lens, device=dev)[:, None] - 1
    logits = model(toks, slots, cache, slots, causal_mask(slots, cache.capacity), moe, logits_index=last)
    cache.advance(lens)
    return logits[:, 0]


def check_prompts(prompts: Sequence[Sequence[int]] | Tensor, vocab_size: int,
                  max_new_tokens: int) -> list[list[int]]:
    """Prompts as lists of ids, after the checks every generation loop makes before any device work."""
    plist = _to_lists(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in plist):
        raise ValueError("generate: every prompt needs at least one token")
    bad = [t for p in plist for t in p if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"generate: token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return plist


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (), *,
             cache: KVCache | None = None, cuda_graph: bool | None = None, moe: MoEControl | None = None,
             on_token: Callable[[int, Tensor], None] | None = None) -> GenerationResult:
    """Generate up to max_new_tokens per prompt. prompts: lists of ids (any lengths) or [bs, P] tensor.

    cache: reuse a cache (and the CUDA graphs captured on it) across calls; it is reset here and must
    have batch_size == len(prompts) and capacity >= max prompt length + max_new_tokens.
    cuda_graph: None = on when the model is on CUDA. on_token(step, tokens [bs]) is called per step.
    Every check (lengths, vocabulary, capacity, context limit) happens before any device work."""
    plist = check_prompts(prompts, model.args.vocab_size, max_new_tokens)
    bs = len(plist)
    lens = [len(p) for p in plist]
    need = max(lens) + max_new_tokens
    model.args.check_context(need)
    if cache is None:
        cache = KVCache.for_model(model, bs, need)
    elif cache.batch_size != bs or cache.capacity < need:
        raise ValueError(f"generate: cache has batch {cache.batch_size} / capacity {cache.capacity}, need "
                         f"batch {bs} / capacity {need} (longest prompt {max(lens)} + {max_new_tokens} new)")
    dev = cache.device
    per_call = moe is not None and moe.per_call
    use_graph = (dev.type == "cuda" and not per_call) if cuda_graph is None else bool(cuda_graph)
    if use_graph and dev.type != "cuda":
        raise ValueError("generate: cuda_graph=True needs the model on a CUDA device")
    gen = None
    if not sampling.greedy:
        gen = torch.Generator(device=dev)
        gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    stop = set(int(s) for s in stop_ids)

    cache.reset()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits = prefill(model, plist, cache, moe)
    tok = sample(logits, sampling, gen)
    out: list[list[int]] = [[] for _ in range(bs)]
    done = [False] * bs
    reasons = ["length"] * bs

    def record(step: int, t: Tensor) -> None:
        for b, v in enumerate(t.tolist()):       # the one host sync per step
            if not done[b]:
                out[b].append(v)
                if v in stop:
                    done[b], reasons[b] = True, "stop"
                elif len(out[b]) >= max_new_tokens:
                    done[b] = True
        if on_token is not None:
            on_token(step, t)

    record(0, tok)
    t1 = time.perf_counter()
    step_fn = model.decode_step
    extra: dict = {}
    if use_graph and not all(done):
        try:
            graph = _graph_for(model, cache, moe)
            step_fn = lambda t, c, m: graph(t)   # noqa: E731
        except RuntimeError as e:  # e.g. an op that synchronizes: say so, run eagerly
            if cuda_graph:          # explicitly requested: do not hide it
                raise
            warnings.warn(f"CUDA graph capture of the decode step failed, running eagerly: {e}")
            use_graph, extra["cuda_graph_error"] = False, str(e)
    t_dec = time.perf_counter()
    steps = 0
    while not all(done):
        cache.check_append(1)                     # host-side capacity check (cannot fail by construction)
        logits = step_fn(tok[:, None], cache, moe)
        cache.advance(1)
        tok = sample(logits, sampling, gen)
        steps += 1
        record(steps, tok)
    sync()
    t2 = time.perf_counter()
    return GenerationResult(tokens=out, finish_reasons=reasons, prompt_lens=lens, prefill_s=t1 - t0,
                            decode_s=t2 - t_dec, decode_steps=steps, cuda_graph=use_graph,
                            extra={"capture_s": t_dec - t1, **extra})

"""Generation building blocks of the model runtime: sampling parameters, logit processing, the prefill,
prompt checks and the result record. The generation loop itself (plain decoding = a root-only speculative
step, one loop and one graph runner for both) is `specmoe_ext.speculative.generate`.

Shape legend: bs requests, P longest prompt, S cache capacity, V vocab, h hidden.

    prefill   prompts right-padded to [bs, P]; request b's tokens go to the slots after its committed
              tokens (pad tokens write slots past its own, which its later tokens overwrite before anything
              attends them); logits taken at each prompt's last token.
Sampling follows transformers' order: temperature, then top-k, then top-p; temperature 0 is greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .kv_cache import KVCache
from .model import MoEControl, Transformer


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0         # nucleus mass in (0, 1]
    top_k: int = 0             # 0: off
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
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
def prefill(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, moe: MoEControl | None = None,
            hidden_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
    """Write every prompt's K/V after its request's committed tokens and commit them: the one "pad, append,
    forward, advance" of the runtime. -> (logits at each prompt's last token [bs, V], the hidden states
    entering `hidden_layers`, [bs, P, h] each). Capacity is checked before anything is written."""
    dev = cache.device
    lens = [len(p) for p in prompts]
    geo = cache.append(max(lens))
    toks = torch.zeros(len(prompts), max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    last = torch.tensor(lens, device=dev)[:, None] - 1
    logits, hidden = model(toks.to(dev), geo, cache, moe, logits_index=last, hidden_layers=hidden_layers)
    cache.advance(lens)
    return logits[:, 0], hidden


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

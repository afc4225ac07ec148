"""MoE-layer variants of the 2026 families: the router's float32 correction bias (DeepSeek-V3, GLM-4.5) and
GPT-OSS's experts (clamped SwiGLU with alpha, biases, the checkpoint's interleaved gate/up layout).

Shape legend: N tokens (bs*T flattened), h hidden, f expert FFN, E experts, K experts per token, P = N*K
(token, slot) pairs, Bk kept experts.

GPT-OSS expert e on a row x [h] (transformers' GptOssExperts):
    gu  = x @ w13[e] + b13[e]                 w13 [E, h, 2f], b13 [E, 2f]; gate = gu[0::2], up = gu[1::2]
    act = (clamp(up, -l, l) + 1) * g * sigmoid(1.702 g),  g = clamp(gate, max=l)     l = swiglu_limit (7)
    y   = act @ w2[e] + b2[e]                 w2 [E, f, h], b2 [E, h]
    out[n] = sum_k weights[n, k] * y_{ids[n, k]}(x[n])       (float32 sum in slot order)
Implementations, all without a host synchronization (graph capturable, no host read inside a step):
    "grouped"  CUDA bf16: torch grouped GEMM over the routing's pairs grouped by kept expert (reads only the
               kept experts), biases gathered per row
    "gather"   per (token, slot) pair: that expert's matrices gathered and bmm'd (any device; few tokens)
    "dense"    every expert over every token, weights 0 where not routed (any device; many tokens on the CPU)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..routing_types import Routing
from .config import ModelArgs
from .model import MoEControl, MoEFeedForward
from .moe import _combine, _grouped_mm_fn, grouped_mm_available

GPT_OSS_ALPHA = 1.702
GPT_OSS_IMPLS = ("grouped", "gather", "dense")


class Float32Param(nn.Module):
    """One parameter that stays float32 whatever dtype the model is cast to (`weight`; transformers keeps
    e_score_correction_bias in float32 too: in bf16 the bias would move expert selection)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))

    def _apply(self, fn, recurse=True):
        w = self.weight
        new = fn(w.data)                                  # the caller's device (and emptiness) ...
        if new.is_floating_point() and new.dtype != torch.float32:   # ... but never its dtype
            new = new.float() if w.device.type == "meta" or new.device.type == "meta" else \
                w.data.float().to(new.device)
        self.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        return self


def clamped_swiglu(gu: Tensor, limit: float) -> Tensor:
    """[..., 2f] interleaved gate / up -> [..., f] (transformers' GptOssExperts._apply_gate)."""
    gate, up = gu[..., ::2].clamp(max=limit), gu[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))


def default_gpt_oss_impl(x: Tensor, n_pairs: int, n_experts: int) -> str:
    if x.is_cuda and grouped_mm_available(x):
        return "grouped"
    return "gather" if n_pairs <= 4 * n_experts else "dense"


def gpt_oss_experts(x: Tensor, w13: Tensor, b13: Tensor, w2: Tensor, b2: Tensor, r: Routing, limit: float,
                    impl: str | None = None) -> Tensor:
    """x [N, h] -> [N, h] in x's dtype (module docstring); impl None: default_gpt_oss_impl."""
    N, K = r.ids.shape
    E = w13.shape[0]
    impl = impl or default_gpt_oss_impl(x, N * K, E)
    if impl == "dense":
        gu = torch.einsum("nh,ehf->enf", x, w13) + b13[:, None]                      # [E, N, 2f]
        y = torch.einsum("enf,efh->enh", clamped_swiglu(gu, limit), w2) + b2[:, None]  # [E, N, h]
        ids = r.ids.long()
        wt = torch.zeros(N, E, dtype=torch.float32, device=x.device).scatter_add_(
            1, ids.clamp_min(0), torch.where(ids >= 0, r.weights.float(), torch.zeros_like(r.weights)))
        return torch.einsum("ne,enh->nh", wt, y.float()).to(x.dtype)
    if impl == "gather":
        ids = r.ids.reshape(-1).long()
        e = ids.clamp_min(0)
        xs = x.repeat_interleave(K, dim=0)                                            # [P, h]
        gu = torch.bmm(xs[:, None, :], w13[e])[:, 0] + b13[e]                         # [P, 2f]
        y = torch.bmm(clamped_swiglu(gu, limit)[:, None, :], w2[e])[:, 0] + b2[e]   # [P, h]
        pair = torch.where(ids >= 0, torch.arange(N * K, device=x.device), torch.full_like(ids, -1))
        return _combine(y, pair, r.weights, N, x.dtype)
    if impl == "grouped":
        if not grouped_mm_available(x):
            raise RuntimeError(f"gpt_oss_experts impl='grouped' needs torch grouped_mm on a CUDA bf16 tensor "
                               f"(have device={x.device}, dtype={x.dtype})")
        kept = r.kept_experts.long()
        Bk = kept.numel()
        if Bk == E:
            a13, c13, a2, c2 = w13, b13, w2, b2
        else:
            a13, c13, a2, c2 = (t.index_select(0, kept) for t in (w13, b13, w2, b2))
        pairs = r.sorted_pairs                                                         # [P]; -1 past the valid ones
        xs = x[(pairs.clamp_min(0) // K).long()]
        offs = r.expert_offsets[1:].to(torch.int32)
        row = torch.arange(pairs.numel(), device=x.device)
        grp = torch.searchsorted(offs, row.to(torch.int32), right=True).clamp(max=Bk - 1)   # row -> kept position
        gu = _grouped_mm_fn(xs, a13, offs=offs) + c13[grp]
        y = _grouped_mm_fn(clamped_swiglu(gu, limit).to(x.dtype), a2, offs=offs) + c2[grp]
        return _combine(y, pairs, r.weights, N, x.dtype)
    raise ValueError(f"gpt_oss_experts: unknown impl {impl!r}; choose one of {GPT_OSS_IMPLS}")


class GptOssMoE(MoEFeedForward):
    """GPT-OSS's MoE block: the router (with its bias) routes as the other families through the routing op
    (softmax over the top-K logits = softmax, top-K, renormalize), the experts are gpt_oss_experts. Parameters
    in the checkpoint's layout: w13 [E, h, 2f], b13 [E, 2f], w2 [E, f, h], b2 [E, h]."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        E, h, f = args.n_experts, args.hidden_size, args.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, h, 2 * f))
        self.b13 = nn.Parameter(torch.empty(E, 2 * f))
        self.w2 = nn.Parameter(torch.empty(E, f, h))
        self.b2 = nn.Parameter(torch.empty(E, h))
        self.limit = args.swiglu_limit

    def run_experts(self, xf: Tensor, routing, moe: MoEControl) -> Tensor:
        if self.offload is not None:
            raise NotImplementedError("expert offloading does not cover GPT-OSS's experts")
        impl = moe.impl if moe.impl in GPT_OSS_IMPLS else None
        return gpt_oss_experts(xf, self.w13, self.b13, self.w2, self.b2, routing, self.limit, impl)

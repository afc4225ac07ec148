"""A compact decoder (gpt-fast style) covering Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Qwen2, Qwen3, and
DeepSeek-V2/V3, GLM-4.5, GPT-OSS (their attention and MoE variants: mla.py, attention_variants.py,
moe_variants.py, mtp_layer.py; config and weight layout: families.py).

Shape legend: bs requests, T tokens per request in this forward, S KV-cache capacity (slots per request),
h hidden, V vocab, Hq/Hk query/key-value heads, d head dim, E experts, K experts per token, f expert FFN,
N = bs*T tokens flattened (what the router and the experts see).

One entry point serves prefill, 1-token decode, drafting and verification of T tree tokens:

    logits, hidden = model(tokens [bs, T], geo, cache, moe, logits_index, hidden_layers)

  geo        a `Geometry` from the cache (`cache.append(width)` for a prefill, `cache.tree_geometry(...)`
             for decode / tree nodes): positions [bs, T] (RoPE ids; tree tokens: prefix_len + depth), slots
             [bs, T] (where each token's K/V is written in its request's cache row) and the mask: bool
             [bs, T, S'] (True = may attend that slot; S' <= S, the slots attended) or a `PrefixTreeMask`
             (prefix lengths + ancestor
             bitmask), which on the GPU runs the tree-attention kernel (ops.tree_attention) and elsewhere is
             expanded once per forward to a dense mask over the cache's attend_limit slots (the current
             length, when the caller sets it: cost follows the length, not the capacity). Every query must
             see at least its own slot.
             Without a cache, `geo` is just the positions [bs, T]: K/V are the T tokens themselves, causal
             (the training / plain reference path).
  moe        optional `MoEControl`: per-layer expert budget + policy (MoE-Spec verification), routing record,
             expert remapping (self-assisted drafting), token mask (padding tree nodes), expert statistics.
  logits_index  optional [bs, n]: logits only at these token indices ([bs, n, V]).
  hidden_layers the hidden states entering the listed layers (index n_layers = the final pre-norm hidden
             state) come back in `hidden`, in the listed order ([bs, T, h] each): the target features an
             EAGLE-3 draft head consumes. `hidden` is [] when none are asked for.

Parameter layout (what the loader fills): attention wqkv [(Hq+2Hk)d, h] = rows of HF q_proj, k_proj,
v_proj; MoE w13 [E, 2f, h] = HF gate_proj rows then up_proj rows per expert; w2 [E, h, f] = HF down_proj.
The forward follows transformers 5.17 operation by operation (RMSNorm in float32 then cast, RoPE cos/sin
cast to the activation dtype, router softmax in float32) so logits match within dtype tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..masks import PrefixTreeMask, causal_mask, pack_bits, tree_mask, unpack_bits  # noqa: F401
from ..routing_types import Routing
from .config import ModelArgs
from .kv_cache import Geometry  # noqa: F401  (the forward's `geo`)
from .moe import moe_experts
from .routing_edit import remap_routing
from .rope import apply_rope, inv_freq_and_scale, rope_cos_sin


def _route_budget():
    # Imported lazily so that building a model (e.g. on the meta device to count parameters) does not
    # need the compiled extension; the forward does.
    from ..ops import route_budget
    return route_budget


def _route_topk():
    from ..ops import route_topk
    return route_topk


@dataclass
class ExpertStats:
    """Expert statistics of one forward, filled by every MoE layer when passed as `MoEControl.stats`.

    mask    optional [N] bool: only these tokens are counted (e.g. the valid nodes of padded draft trees).
    layers  one entry per MoE layer, in layer order: (layer, natural ids [N, K], routed ids [N, K]), the
            experts each (token, slot) pair wanted under the natural top-K routing and the experts of the
            routing that actually ran (after budget, expert map and token mask; -1 = dropped). A layer
            adds no kernel: the counts are made at the end in one scatter over all layers.
    Everything stays on the device: `counts()` -> (natural, routed) [L_moe, E] int64 pairs per expert,
    `touched()` / `loaded()` -> [L_moe] distinct experts wanted / read.
    """

    mask: Tensor | None = None
    layers: list = field(default_factory=list)
    n_experts: int = 0
    _counts: tuple | None = field(default=None, repr=False)

    def add(self, layer: int, natural_ids: Tensor, routed_ids: Tensor, n_experts: int) -> None:
        self.layers.append((layer, natural_ids, routed_ids))
        self.n_experts = n_experts
        self._counts = None

    def _count(self, ids: list[Tensor]) -> Tensor:
        L, E = len(ids), self.n_experts
        flat = torch.stack(ids).long()                                          # [L, N, K]
        ok = flat >= 0
        if self.mask is not None:
            ok = ok & self.mask.to(flat.device)[None, :, None]
        idx = (flat.clamp_min(0) + E * torch.arange(L, device=flat.device)[:, None, None]).flatten()
        out = torch.zeros(L * E, dtype=torch.long, device=flat.device)
        return out.scatter_add_(0, idx, ok.long().flatten()).view(L, E)

    def counts(self) -> tuple[Tensor, Tensor]:
        """(natural, routed) [L_moe, E] int64: (token, slot) pairs per expert."""
        if self._counts is None:
            natural = self._count([n for _, n, _ in self.layers])
            same = all(r is n for _, n, r in self.layers)
            self._counts = (natural, natural if same else self._count([r for _, _, r in self.layers]))
        return self._counts

    def natural(self) -> Tensor:
        """[L_moe, E] natural (token, slot) pairs per expert."""
        return self.counts()[0]

    def routed(self) -> Tensor:
        """[L_moe, E] pairs per expert in the routing that ran."""
        return self.counts()[1]

    def touched(self) -> Tensor:
        """[L_moe] distinct experts the natural routing of the counted tokens wanted."""
        return (self.natural() > 0).sum(dim=1)

    def loaded(self) -> Tensor:
        """[L_moe] experts whose weights the routing that ran read (>= 1 pair)."""
        return (self.routed() > 0).sum(dim=1)


@dataclass
class MoEControl:
    """Per-forward knobs for the MoE layers. Default: plain top-K routing, nothing recorded.

    budget         None (plain routing), one int for every MoE layer, or a per-layer sequence indexed by
                   layer number (None entries = plain routing for that layer). B >= K.
    policy         "substitute" | "truncate" (see `specmoe_ext.ops.route_budget`).
    token_weights  [N] float32 weights of the flattened bs*T tokens in the expert scores (default 1).
    protect        [N] bool: tokens whose natural top-K experts are always kept (e.g. the tree root).
    record         when a list, each MoE layer appends (layer_index, Routing) -- for stats/benchmarks
                   (keeps references to device tensors; do not use inside CUDA graph capture).
    impl           `moe_experts` implementation override ("fused" | "loop" | "grouped" | "gather").
    router         routing function override with `ops.route_budget`'s signature (default: that op), e.g.
                   `reference.route_budget`, which is differentiable in the logits (used for training).
    expert_map     None, or per layer (indexed by layer number) None or an [E] int64 tensor: every slot
                   routed to expert e runs expert_map[e] instead, with the slot's weight unchanged (the
                   self-assisted drafter sends non-resident experts to their most similar resident one).
                   The map must point into the kept experts (always true without a budget).
    token_mask     [N] bool: tokens with False skip the experts (MoE output 0; shared expert still runs).
                   For padding nodes of draft trees, so they neither load experts nor skew statistics.
                   Without an expert_map, a masked token is routed as its donor token (token_donor[i], a
                   token that runs anyway; default token 0) with weight 0: it adds no expert to load and
                   costs 2 element-wise ops per layer, not a regrouping (~20 kernels, a sort among them).
                   Under a budget, masked tokens must not vote: give them token weight 0 (verify_control
                   does). With an expert_map the routing is regrouped without the masked tokens' pairs.
    token_donor    [N] int64 or None: see token_mask (verify_control: each token's tree root).
    stats          an `ExpertStats` to fill (natural vs routed expert counts per layer).
    resident_only  offloaded experts (models/offload.py): run only the experts in the device cache, fetch
                   nothing (the self drafter, whose expert_map points into the cache's resident set).
    The budget applies to all N tokens of the forward together: the expert weights read per layer are
    shared by the whole batch, so a batch-wide budget is what bounds the traffic.
    """

    budget: int | Sequence[int | None] | None = None
    policy: str = "substitute"
    token_weights: Tensor | None = None
    protect: Tensor | None = None
    record: list | None = None
    impl: str | None = None
    router: Callable[..., Routing] | None = None
    expert_map: Sequence[Tensor | None] | None = None
    token_mask: Tensor | None = None
    token_donor: Tensor | None = None
    stats: ExpertStats | None = None
    resident_only: bool = False

    def budget_for(self, layer: int) -> int | None:
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        return self.budget[layer]

    def expert_map_for(self, layer: int) -> Tensor | None:
        return None if self.expert_map is None else self.expert_map[layer]

    @property
    def per_call(self) -> bool:
        """True when this control carries per-forward tensors or recorders (no CUDA-graph replay)."""
        return any(x is not None for x in (self.token_weights, self.protect, self.record, self.token_mask,
                                           self.stats))


_PLAIN = MoEControl()


def _use_tree_kernel(x: Tensor, head_dim: int) -> bool:
    """The tree-attention kernel takes activations x: CUDA, bf16/fp16, d in {64, 128}, kernels built."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128):
        return False
    from .. import cuda_kernels_available
    return cuda_kernels_available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.eps, self.weight_fp32 = eps, weight_fp32   # weight_fp32: scale before the cast (GPT-OSS)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(dtype) if self.weight_fp32 else self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.q_size, args.kv_size
        self.wqkv = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.qk_norm, self.clip_qkv = args.qk_norm, args.clip_qkv
        if args.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        elif args.qk_norm == "full":
            self.q_norm = RMSNorm(self.q_size, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, args.rms_norm_eps)
        # GPT-OSS: a learned logit per query head joins every softmax (attention_variants.sink_attention)
        self.sinks = nn.Parameter(torch.zeros(args.n_heads)) if args.attn_sinks else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache, slots: Tensor | None, mask: Tensor) -> Tensor:
        bs, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":  # OLMoE normalizes over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(bs, T, self.n_heads, self.head_dim)
        k = k.view(bs, T, self.n_kv_heads, self.head_dim)
        v = v.view(bs, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3 normalizes each head over d
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.shape[-1] == self.head_dim:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:                                      # partial rotary (GLM-4.5): the first rotary_dim dims
            from .attention_variants import apply_partial_rope
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            cache.write(self.layer, k, v, slots)
            keys, values = cache.k[self.layer], cache.v[self.layer]        # [bs, Hk, S, d]
            if isinstance(mask, PrefixTreeMask):   # Transformer.forward left it compact: the kernel runs
                from ..ops import tree_attention
                out = tree_attention(q, keys, values, mask.prefix_lens.contiguous(), mask.bits.contiguous(),
                                     self.head_dim ** -0.5, mask.kv_len_hint)   # [bs, T, Hq, d] (bits may be expanded)
                return self.wo(out.reshape(bs, T, self.q_size))
            S = mask.shape[-1]                     # a dense mask may cover only the first S' slots
            keys, values = keys[:, :, :S], values[:, :, :S]
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)            # [bs, Hk, T, d]
        if self.sinks is not None:
            from .attention_variants import sink_attention
            out = sink_attention(q.transpose(1, 2), keys, values, mask, self.sinks, self.head_dim ** -0.5)
        else:
            out = attention(q.transpose(1, 2), keys, values, mask)          # [bs, Hq, T, d]
        return self.wo(out.transpose(1, 2).reshape(bs, T, self.q_size))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Masked GQA attention (reference, SDPA). q [bs, Hq, T, d], k/v [bs, Hk, S, d] (v may have its own
    width dv: MLA), mask bool [bs, T, S] -> [bs, Hq, T, dv]; scale default d ** -0.5. The Hq/Hk query heads
    sharing a KV head are folded into the query length, so the KV cache is read as is (no
    repeat_interleave copy of S x d per head)."""
    bs, Hq, T, d = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = Hq // Hk
    if rep > 1:
        q = q.reshape(bs, Hk, rep * T, d)
        m = mask[:, None, None].expand(bs, 1, rep, T, S).reshape(bs, 1, rep * T, S)
    else:
        m = mask[:, None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    return o.reshape(bs, Hq, T, o.shape[-1])


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate/up fused: w13 [2f, h] (gate rows, then up rows), w2 [h, f]."""

    def __init__(self, h: int, f: int, bias: bool = False):
        super().__init__()
        self.f = f
        self.w13 = nn.Linear(h, 2 * f, bias=bias)
        self.w2 = nn.Linear(f, h, bias=bias)

    def forward(self, x: Tensor, moe: MoEControl = _PLAIN, layer: int = 0) -> Tensor:
        gu = self.w13(x)
        return self.w2(F.silu(gu[..., :self.f]) * gu[..., self.f:])


class MoEFeedForward(nn.Module):
    """Router + experts (+ Qwen2-MoE's sigmoid-gated shared expert)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, h, f = args.n_experts, args.hidden_size, args.moe_intermediate_size
        self.n_experts, self.top_k, self.renormalize = E, args.top_k, args.norm_topk_prob
        self.router_args = args.router                # scoring, groups, scale (families.py)
        self.gate = nn.Linear(h, E, bias=args.router.linear_bias)
        if args.router.correction_bias:               # DeepSeek-V3 / GLM-4.5: selection-only bias, kept float32
            from .moe_variants import Float32Param
            self.correction = Float32Param(E)
        else:
            self.correction = None
        self.w13 = nn.Parameter(torch.empty(E, 2 * f, h))
        self.w2 = nn.Parameter(torch.empty(E, h, f))
        fs = args.shared_expert_intermediate_size
        self.shared = DenseMLP(h, fs) if fs else None
        self.shared_gate = nn.Linear(h, 1, bias=False) if fs and args.shared_expert_gate else None
        self.offload = None            # offload.LayerExperts when w13 / w2 live in host memory

    def forward(self, x: Tensor, moe: MoEControl = _PLAIN, layer: int = 0) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])                                  # [N, h]
        ra = self.router_args
        if ra.fp32_logits:                                             # DeepSeek / GLM: float32 router logits
            chunk = getattr(self.gate, "chunk", 0)
            if chunk:                  # batch-invariant mode (invariant.py: an InvariantLinear gate)
                from .invariant import invariant_linear
                logits = invariant_linear(xf.float(), self.gate.weight.float(), None, chunk)
            else:
                logits = F.linear(xf.float(), self.gate.weight.float())
        else:
            logits = self.gate(xf)                                     # [N, E] in the activation dtype, as HF
        emap = moe.expert_map_for(layer)
        donor = moe.token_mask is not None and emap is None
        if donor:                      # masked tokens route as their donor (loaded anyway); weight 0 below
            src = moe.token_donor if moe.token_donor is not None else torch.zeros_like(moe.token_mask, dtype=torch.long)
            logits = torch.where(moe.token_mask[:, None], logits, logits.index_select(0, src))
        rkw = dict(ra.op_kwargs(), bias=None if self.correction is None else self.correction.weight)
        budget = moe.budget_for(layer)
        if budget is not None and budget < self.top_k:
            raise ValueError(f"layer {layer}: expert budget {budget} < top_k {self.top_k}")
        route = moe.router or _route_budget()
        if self.offload is not None:   # marks the forward; the residency-aware budget router if configured
            route = self.offload.route(route, budget, moe)
        routing = route(logits, self.top_k, self.n_experts if budget is None else budget, renormalize=self.renormalize,
                        token_weights=moe.token_weights, protect=moe.protect, policy=moe.policy, **rkw)
        natural_ids = None
        if moe.stats is not None:  # what the tokens wanted, before budget / expert map / token mask
            natural_ids = (routing.ids if budget is None else
                           _route_topk()(logits, self.top_k, renormalize=self.renormalize, **rkw)[1])
        if donor:
            routing = routing._replace(weights=routing.weights * moe.token_mask[:, None])
        elif emap is not None or moe.token_mask is not None:
            routing = remap_routing(routing, emap, moe.token_mask, self.n_experts)
        if moe.record is not None:
            moe.record.append((layer, routing))
        if moe.stats is not None:
            moe.stats.add(layer, natural_ids, routing.ids, self.n_experts)
        return self.run_experts(xf, routing, moe).view(shape)

    def shared_expert(self, xf: Tensor) -> "tuple[Tensor, Tensor, Tensor] | None":
        """Qwen2-MoE: (w13s, w2s, ws = sigmoid(x . g)) for the expert op to add; DeepSeek / GLM: ungated,
        ws = 1; None without one."""
        if self.shared is None:
            return None
        if self.shared_gate is None:
            ws = torch.ones(xf.shape[0], dtype=torch.float32, device=xf.device)
        else:
            ws = torch.sigmoid(self.shared_gate(xf).float())[:, 0]
        return self.shared.w13.weight, self.shared.w2.weight, ws

    def run_experts(self, xf: Tensor, routing, moe: MoEControl) -> Tensor:
        """xf [N, h] and the routing that runs -> [N, h]: the experts (+ the shared expert)."""
        w13, w2 = self.w13, self.w2
        if self.offload is not None:   # fetch the missing experts; the routing over the cache's rows
            w13, w2, routing = self.offload.experts(xf, routing, moe.resident_only)
        return moe_experts(xf, w13, w2, routing, impl=moe.impl, shared=self.shared_expert(xf))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        if args.mla is not None:                      # DeepSeek-V2/V3: latent attention (mla.py)
            from .mla import MLAttention
            self.attention = MLAttention(args, layer)
        else:
            self.attention = Attention(args, layer)
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_weight_fp32)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_weight_fp32)
        if args.moe_layers[layer] and args.expert_act == "gpt_oss":   # clamped SwiGLU experts (moe_variants.py)
            from .moe_variants import GptOssMoE
            self.ffn = GptOssMoE(args)
        elif args.moe_layers[layer]:
            self.ffn = MoEFeedForward(args)
        else:
            self.ffn = DenseMLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)

    def forward(self, x, cos, sin, cache, slots, mask, moe: MoEControl) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, slots, mask)
        return h + self.ffn(self.ffn_norm(h), moe, self.layer)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_weight_fp32)
        # Tied embeddings: no separate output matrix (the embedding is used), so meta-device construction,
        # to_empty() and state dicts never have to re-tie anything.
        self.output = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        inv, self.rope_scale = inv_freq_and_scale(args.rope, args.rotary_dim or args.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        if args.n_mtp_layers:                          # DeepSeek-V3 / GLM-4.5 MTP layers (speculative/mtp.py drafts)
            from .mtp_layer import MTPLayer
            self.mtp = nn.ModuleList(MTPLayer(args) for _ in range(args.n_mtp_layers))

    # ---- construction helpers ------------------------------------------------------------------
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after `to_empty()` from the meta device)."""
        inv, self.rope_scale = inv_freq_and_scale(self.args.rope, self.args.rotary_dim or self.args.head_dim)
        self.inv_freq = inv.to(self.tok_embeddings.weight.device)

    @torch.no_grad()
    def init_random(self, std: float = 0.02, seed: int = 0) -> "Transformer":
        """Seeded random weights, in place on the parameters' device (HF-style: normal(0, std) matrices,
        ones for norms, zeros for biases). Cheap on the GPU: no host tensor, no extra copy."""
        dev = self.tok_embeddings.weight.device
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
        return self

    def output_weight(self) -> Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def lm_head(self, x: Tensor) -> Tensor:
        """[..., h] final-norm states -> [..., V] logits (models/parallel.py: vocab-parallel + gather)."""
        chunk = getattr(self, "invariant_chunk", 0)
        if chunk:                      # batch-invariant mode (invariant.py)
            from .invariant import invariant_linear
            return invariant_linear(x, self.output_weight(), None, chunk)
        return F.linear(x, self.output_weight())

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, geo: "Geometry | Tensor", cache=None, moe: MoEControl | None = None,
                logits_index: Tensor | None = None, hidden_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """tokens [bs, T], geo (a cache `Geometry`, or positions [bs, T] without a cache) -> (logits
        [bs, T, V] (or [bs, n, V] for logits_index [bs, n]) in the model dtype, hidden: the states entering
        `hidden_layers`, [bs, T, h] each). See the module docstring."""
        bs, T = tokens.shape
        n_layers = len(self.layers)
        bad = [i for i in hidden_layers if not 0 <= i <= n_layers]
        if bad:
            raise ValueError(f"hidden_layers must lie in [0, {n_layers}], got {list(hidden_layers)}")
        if cache is not None:
            if isinstance(geo, Tensor):
                raise ValueError("a forward with a cache needs a Geometry (cache.append(n) or cache.tree_geometry(...))")
            positions, slots, mask = geo
        else:
            positions = geo.positions if not isinstance(geo, Tensor) else geo
            slots, mask = None, causal_mask(torch.arange(T, device=tokens.device).expand(bs, T), T)
        moe = moe or _PLAIN
        x = self.tok_embeddings(tokens)
        if isinstance(mask, PrefixTreeMask) and not (self.args.tree_kernel_ok and _use_tree_kernel(x, self.args.head_dim)):
            mask = mask.dense(cache.attend_limit)                               # once, not per layer
        masks = {None: mask}                          # sliding-window layers: their own mask, once per window
        if any(self.args.layer_windows):
            from .attention_variants import window_mask
            for w in set(self.args.layer_windows) - {None}:
                masks[w] = window_mask(mask, positions, slots, w)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        captured: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in hidden_layers:
                captured[i] = x
            x = layer(x, cos, sin, cache, slots, masks[self.args.window_of(i)], moe)
        captured[n_layers] = x
        hidden = [captured[i] for i in hidden_layers]
        if logits_index is not None:
            x = torch.gather(x, 1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        return self.lm_head(x), hidden

    # ---- accounting -------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

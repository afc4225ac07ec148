"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU), one process per rank.

Shape legend: N ranks (world size), r this rank, h hidden, V vocab (V_r = ceil(V / N) LM-head rows per rank
under TP, the last rank's padded), Hq / Hk query / KV heads (Hq / N and max(1, Hk / N) per rank), d head
dim, f FFN width (f / N per rank under TP), E experts (a contiguous range of E_r per rank under EP; the
first E mod N ranks hold one more), T tokens of a forward.

SPMD: every rank runs the same program (CLI, engine, drafter, verifier) on the same inputs, and every
result a decision depends on is identical on every rank: hidden states leave each layer through a
collective whose result is the same bitwise everywhere, logits are gathered whole, the drafter runs on
every rank (replicated: it is small), acceptance uses the same Philox streams, and host-side decisions
that use timings (`--spec auto`) take the slowest rank's time (`Comm.agree_max`). So the ranks commit the
same tokens and call the same collectives in the same order; the captured CUDA step works per rank.

TP (`tp=N`): Megatron layout. q/k/v column-parallel by heads (KV heads replicated when Hk < N, as vLLM
does; each rank's KV cache holds its heads), o row-parallel + all-reduce; dense FFN and the shared expert
split along f (gate/up columns, down rows + all-reduce); MoE experts split along f, every rank routing
every token identically (the router is replicated) and one all-reduce after the expert op; OLMoE's
whole-projection q/k norm reduces its sum of squares across ranks; the LM head vocab-parallel, its
logits all-gathered (acceptance and sampling need whole rows: a distributed argmax would save that
gather for greedy plain decoding only, left out). Embeddings and norms are replicated.

EP (`ep=N`): experts partitioned across ranks; attention, dense layers, router, shared expert and LM head
replicated (decode-sized batches: the expert weights are what does not fit; replicated attention costs no
collective, and every rank already holds every token, so dispatch is free). Each rank runs its own
experts over the tokens routed to them; the partial outputs are all-gathered and summed in rank order
(deterministic, equal on every rank). The expert budget is global (the routing op's, identical on every
rank) or balanced (`budget_balance="rank"`): each rank keeps at most ceil(B / N) of its experts by the
op's score, so the slowest rank loads no more than its share.

Loading (`loader.load_model(..., parallel=...)`): each rank reads only its slices of the checkpoint
(safetensors get_slice on the memory-mapped file): `shard_rules` says, per local parameter, which ranges
of the full tensor it holds, and the loader intersects every checkpoint piece with them. `shard_model`
applies the same rules to an in-memory full model (random presets, tests).

Failure: `init_from_env` starts a watchdog: a rank that raises posts its message in the process group's
store (`report_failure`), and every rank's watchdog prints it and exits; collectives have timeouts.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelArgs
from .model import _PLAIN, Attention, DenseMLP, MoEControl, MoEFeedForward, RMSNorm, Transformer
from .moe import moe_experts
from .routing_edit import group_routing

BALANCES = ("global", "rank")


@dataclass(frozen=True)
class ParallelConfig:
    """tp or ep ranks (one of them 1); budget_balance: "global" (the routing op's batch-wide budget) or
    "rank" (at most ceil(B / N) experts per rank, EP); timeout_s bounds every collective."""
    tp: int = 1
    ep: int = 1
    budget_balance: str = "global"
    timeout_s: float = 120.0

    def __post_init__(self):
        for name in ("tp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel: {name} must be an integer >= 1, got {v!r}")
        if self.tp > 1 and self.ep > 1:
            raise ValueError(f"parallel: tp={self.tp} and ep={self.ep} together are not supported: give one")
        if self.budget_balance not in BALANCES:
            raise ValueError(f"parallel: budget_balance must be one of {BALANCES}, got {self.budget_balance!r}")
        if self.budget_balance == "rank" and self.ep == 1:
            raise ValueError("parallel: budget_balance='rank' balances experts across EP ranks: it needs ep > 1")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel: timeout_s must be > 0, got {self.timeout_s}")

    @property
    def world(self) -> int:
        return self.tp * self.ep

    @property
    def mode(self) -> str:
        return "tp" if self.tp > 1 else "ep" if self.ep > 1 else "none"

    def describe(self) -> dict:
        return {"tp": self.tp, "ep": self.ep, "budget_balance": self.budget_balance}


# ---- the communicator ----------------------------------------------------------------------------------

class Comm:
    """The collectives the parallel modules use, over one process group (every rank of it). Results of
    each are identical on every rank."""

    def __init__(self, rank: int, world: int, group=None):
        self.rank, self.world, self.group = rank, world, group

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum over ranks (in place when possible) -> x."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's x (equal shapes) -> [x_0, ..., x_{N-1}]."""
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        return out

    def gather_cat(self, x: Tensor, dim: int, total: int) -> Tensor:
        """Concatenate every rank's x along dim, then keep the first `total` entries (trims padding)."""
        return torch.cat(self.gather(x), dim=dim).narrow(dim, 0, total)

    def sum_in_rank_order(self, x: Tensor) -> Tensor:
        """Sum of every rank's x, added in rank order in float32: deterministic and equal on every rank."""
        parts = self.gather(x)
        acc = parts[0].float()
        for p in parts[1:]:
            acc = acc + p.float()
        return acc.to(x.dtype)

    def agree_max(self, value: float) -> float:
        """The largest value any rank holds (host decisions on timings: the slowest rank's)."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, end) of n items for `rank`: the first n mod world ranks hold one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ---- configurations --------------------------------------------------------------------------------------

def check_config(args: ModelArgs, cfg: ParallelConfig) -> None:
    """Refuse what cannot be split (the same message on every rank, before anything is allocated)."""
    N = cfg.world
    if getattr(args, "expert_act", None) == "gpt_oss" and N > 1:
        raise ValueError("tensor / expert parallelism: GPT-OSS's clamped-SwiGLU experts are not split yet")
    if cfg.tp > 1 and (getattr(args, "mla", None) is not None or getattr(args, "attn_sinks", False)):
        raise ValueError(f"tensor parallelism: {args.architecture}'s attention (latent attention / sinks) is not "
                         f"split yet: use --ep (attention replicated)")
    if cfg.tp > 1:
        bad = []
        if args.n_heads % N:
            bad.append(f"{args.n_heads} attention heads")
        if args.n_kv_heads % N and N % args.n_kv_heads:
            bad.append(f"{args.n_kv_heads} KV heads (neither a multiple nor a divisor of {N})")
        if not all(args.moe_layers) and args.intermediate_size % N:
            bad.append(f"dense FFN width {args.intermediate_size}")
        if args.is_moe and args.moe_intermediate_size % N:
            bad.append(f"expert FFN width {args.moe_intermediate_size}")
        if args.shared_expert_intermediate_size % N:
            bad.append(f"shared-expert width {args.shared_expert_intermediate_size}")
        if bad:
            raise ValueError(f"tensor parallelism: tp={N} does not divide the model's {', '.join(bad)}")
    if cfg.ep > 1:
        if not args.is_moe:
            raise ValueError(f"expert parallelism: {args.architecture} has no experts (use tp)")
        if N > args.n_experts:
            raise ValueError(f"expert parallelism: ep={N} exceeds the {args.n_experts} experts per layer "
                             f"(every rank needs at least one)")


def local_args(args: ModelArgs, cfg: ParallelConfig) -> ModelArgs:
    """The shapes this rank's modules are built with (TP splits heads and widths; EP keeps them)."""
    if cfg.tp == 1:
        return args
    N = cfg.tp
    return args.replace(n_heads=args.n_heads // N, n_kv_heads=max(1, args.n_kv_heads // N),
                        intermediate_size=args.intermediate_size // N if not all(args.moe_layers) else
                        args.intermediate_size,
                        moe_intermediate_size=args.moe_intermediate_size // N,
                        shared_expert_intermediate_size=args.shared_expert_intermediate_size // N)


# ---- which part of each full tensor a rank holds ---------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """local[..., o:o+(b-a) on dim, ...] = full[..., a:b on dim, ...] for each (a, b, o) in segments;
    the other dims whole. segments None: the whole tensor (replicated); () : none of it (zeros)."""
    dim: int = 0
    segments: tuple | None = None

    @property
    def whole(self) -> bool:
        return self.segments is None


WHOLE, ZERO = Rule(), Rule(0, ())


def shard_rules(args: ModelArgs, cfg: ParallelConfig, rank: int) -> dict[str, Rule]:
    """Local parameter name -> Rule, for every parameter not held whole."""
    rules: dict[str, Rule] = {}
    N = cfg.world
    if cfg.tp > 1:
        d, hq, hk = args.head_dim, args.n_heads // N, max(1, args.n_kv_heads // N)
        q, kv = args.q_size, args.kv_size
        qa = rank * hq * d
        kh = rank * hk if args.n_kv_heads >= N else (rank * hq) // (args.n_heads // args.n_kv_heads)
        ka = kh * d
        ql, kvl = hq * d, hk * d
        qkv = Rule(0, ((qa, qa + ql, 0), (q + ka, q + ka + kvl, ql), (q + kv + ka, q + kv + ka + kvl, ql + kvl)))

        def ffn(prefix: str, f: int, bias: bool, expert_dim: int = 0) -> None:
            fl, fa = f // N, rank * (f // N)
            rules[prefix + "w13" + (".weight" if not expert_dim else "")] = Rule(expert_dim, (
                (fa, fa + fl, 0), (f + fa, f + fa + fl, fl)))
            rules[prefix + "w2" + (".weight" if not expert_dim else "")] = Rule(expert_dim + 1, ((fa, fa + fl, 0),))
            if bias:
                rules[prefix + "w13.bias"] = Rule(0, ((fa, fa + fl, 0), (f + fa, f + fa + fl, fl)))
                rules[prefix + "w2.bias"] = WHOLE if rank == 0 else ZERO

        for i in range(args.n_layers):
            A, M = f"layers.{i}.attention.", f"layers.{i}.ffn."
            rules[A + "wqkv.weight"] = qkv
            if args.qkv_bias:
                rules[A + "wqkv.bias"] = qkv
            rules[A + "wo.weight"] = Rule(1, ((qa, qa + ql, 0),))
            if args.o_bias:
                rules[A + "wo.bias"] = WHOLE if rank == 0 else ZERO
            if args.qk_norm == "full":
                rules[A + "q_norm.weight"] = Rule(0, ((qa, qa + ql, 0),))
                rules[A + "k_norm.weight"] = Rule(0, ((ka, ka + kvl, 0),))
            if args.moe_layers[i]:
                ffn(M, args.moe_intermediate_size, False, expert_dim=1)
                if args.shared_expert_intermediate_size:
                    ffn(M + "shared.", args.shared_expert_intermediate_size, False)
            else:
                ffn(M, args.intermediate_size, args.mlp_bias)
        if not args.tie_word_embeddings:
            V = args.vocab_size
            vl = math.ceil(V / N)
            rules["output.weight"] = Rule(0, ((rank * vl, min(V, (rank + 1) * vl), 0),)
                                          if rank * vl < V else ())
    elif cfg.ep > 1:
        a, b = split_range(args.n_experts, N, rank)
        for i in range(args.n_layers):
            if args.moe_layers[i]:
                rules[f"layers.{i}.ffn.w13"] = rules[f"layers.{i}.ffn.w2"] = Rule(0, ((a, b, 0),))
    return rules


def rule_numel(rule: Rule, full_shape: Sequence[int]) -> int:
    """Elements of the local tensor the rule fills."""
    n = math.prod(full_shape)
    if rule.whole:
        return n
    return sum((b - a) * (n // full_shape[rule.dim]) for a, b, _ in rule.segments)


def map_piece(index: tuple, piece_shape: Sequence[int], rule: Rule) -> list[tuple[tuple, tuple]]:
    """A checkpoint piece written at full[index] (ints / slices on leading dims) -> [(src, dst)]: read
    piece[src] (slices over the checkpoint tensor's dims) into local[dst]. Empty when the rank holds none
    of it."""
    if rule.whole:
        return [((), index)]
    d, m = rule.dim, len(index)
    out = []
    if d < m and isinstance(index[d], int):
        e = index[d]
        for a, b, o in rule.segments:
            if a <= e < b:
                out.append(((), index[:d] + (e - a + o,) + index[d + 1:]))
        return out
    if d < m:                                   # a slice of the full dim
        s0, s1 = index[d].start or 0, index[d].stop
        pos = sum(1 for x in index[:d] if not isinstance(x, int))
        for a, b, o in rule.segments:
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                src = (slice(None),) * pos + (slice(lo - s0, hi - s0),)
                out.append((src, index[:d] + (slice(lo - a + o, hi - a + o),) + index[d + 1:]))
        return out
    pos = sum(1 for x in index if not isinstance(x, int)) + (d - m)  # the piece spans the whole dim
    for a, b, o in rule.segments:
        out.append(((slice(None),) * pos + (slice(a, b),),
                    index + (slice(None),) * (d - m) + (slice(o, o + b - a),)))
    return out


# ---- the parallel modules ---------------------------------------------------------------------------------

class TPAttention(Attention):
    """This rank's heads; the output projection's partial sums all-reduced."""

    def __init__(self, args: ModelArgs, layer: int, comm: Comm):
        super().__init__(args, layer)
        self.comm = comm

    def forward(self, *a, **k) -> Tensor:
        return self.comm.all_reduce(super().forward(*a, **k))


class TPNorm(RMSNorm):
    """RMSNorm over a projection split across ranks (OLMoE's q/k norm): the sum of squares all-reduced."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, comm: Comm):
        super().__init__(local_dim, eps)
        self.full_dim, self.comm = full_dim, comm

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        ss = self.comm.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        return self.weight * (xf * torch.rsqrt(ss / self.full_dim + self.eps)).to(x.dtype)


class TPDenseMLP(DenseMLP):
    def __init__(self, h: int, f: int, bias: bool, comm: Comm):
        super().__init__(h, f, bias)
        self.comm = comm

    def forward(self, *a, **k) -> Tensor:
        return self.comm.all_reduce(super().forward(*a, **k))


class TPMoE(MoEFeedForward):
    """Every expert's f / N slice (and the shared expert's): the same routing on every rank, one
    all-reduce of the op's output."""

    def __init__(self, args: ModelArgs, comm: Comm):
        super().__init__(args)
        self.comm = comm

    def run_experts(self, xf: Tensor, routing, moe: MoEControl) -> Tensor:
        return self.comm.all_reduce(super().run_experts(xf, routing, moe))

    @torch.no_grad()
    def expert_affinity(self, device) -> Tensor:
        """The whole experts' cosine affinity: the Gram matrix is a sum over weight columns, so the
        slices' Gram matrices all-reduced are the whole one."""
        from ..speculative.drafters import cosine_from_gram
        E = self.n_experts
        G = torch.zeros(E, E, dtype=torch.float32, device=device)
        for W in (self.w13.reshape(E, -1), self.w2.reshape(E, -1)):
            c = W.to(device).float()
            G += c @ c.t()
        return cosine_from_gram(self.comm.all_reduce(G))


class EPMoE(MoEFeedForward):
    """Experts [start, end) of the E; the router, the shared expert and the routing are whole."""

    def __init__(self, args: ModelArgs, start: int, end: int, comm: Comm, balance: str = "global",
                 world: int = 1):
        super().__init__(args)
        f, h = args.moe_intermediate_size, args.hidden_size
        self.start, self.end, self.comm = start, end, comm
        self.balance, self.world = balance, world
        self.w13 = nn.Parameter(torch.empty(end - start, 2 * f, h))
        self.w2 = nn.Parameter(torch.empty(end - start, h, f))

    def forward(self, x: Tensor, moe: MoEControl = _PLAIN, layer: int = 0) -> Tensor:
        if self.balance == "rank" and moe.budget_for(layer) is not None:
            from .model import _route_budget
            moe = replace(moe, router=balanced_router(moe.router or _route_budget(), self.n_experts, self.world))
        return super().forward(x, moe, layer)

    def run_experts(self, xf: Tensor, routing, moe: MoEControl) -> Tensor:
        E_r = self.end - self.start
        ids = routing.ids.long()
        mine = (ids >= self.start) & (ids < self.end)
        local_ids = torch.where(mine, ids - self.start, torch.full_like(ids, -1))
        local = group_routing(routing.weights, local_ids, torch.arange(E_r, device=ids.device), E_r)
        y = self.comm.sum_in_rank_order(moe_experts(xf, self.w13, self.w2, local, impl=moe.impl))
        shared = self.shared_expert(xf)                 # replicated: added once, after the combine
        if shared is not None:
            y = y + (shared[2][:, None] * self.shared(xf).float()).to(y.dtype)
        return y

    @torch.no_grad()
    def expert_affinity(self, device, chunk: int = 1 << 20) -> Tensor:
        """The whole layer's expert affinity from every rank's experts: column chunks of the flattened
        weights are gathered ([E, c], ranks' rows padded to the largest share) and their Gram matrices
        summed, identically on every rank; memory beyond the weights: E x c per chunk."""
        from ..speculative.drafters import cosine_from_gram
        E, N, rank = self.n_experts, self.world, self.comm.rank
        shares = [split_range(E, N, r) for r in range(N)]
        Em = max(b - a for a, b in shares)
        G = torch.zeros(E, E, dtype=torch.float32, device=device)
        for W in (self.w13.reshape(self.end - self.start, -1), self.w2.reshape(self.end - self.start, -1)):
            for a in range(0, W.shape[1], chunk):
                c = W[:, a:a + chunk].to(device).float()
                pad = torch.zeros(Em, c.shape[1], dtype=c.dtype, device=device)
                pad[:c.shape[0]] = c
                parts = self.comm.gather(pad)
                X = torch.cat([p[:b - s] for p, (s, b) in zip(parts, shares)])      # [E, c]
                G += X @ X.t()
        return cosine_from_gram(G)


def balanced_router(route, E: int, N: int):
    """A router with route_budget's signature whose budget B is balanced across N expert ranks: each
    rank's contiguous experts (split_range) keep at most ceil(B / N) of them, by the op's expert score
    s[e] = sum_t w_t P[t, e] (the protected tokens' natural experts first); tokens are then routed over
    the kept union: "substitute" re-picks each token's best kept experts (the op over logits with the
    other experts masked, weights rescaled to the whole softmax when not renormalized), "truncate" keeps
    the natural top-K and drops the slots of experts not kept. Device ops only (capturable)."""
    def router(logits, top_k, budget, scoring="softmax", renormalize=True, token_weights=None,
               protect=None, policy="substitute", **kw):
        if budget is None or budget >= E:
            return route(logits, top_k, budget, scoring=scoring, renormalize=renormalize,
                         token_weights=token_weights, protect=protect, policy=policy, **kw)
        cap = math.ceil(budget / N)
        p = torch.softmax(logits.float(), -1)                                   # [T, E]
        w = (torch.ones(p.shape[0], device=p.device) if token_weights is None else
             torch.nan_to_num(token_weights.float(), nan=0.0, posinf=3.4e38).clamp_min(0))
        score = (w[:, None] * p).sum(0)
        natural = route(logits, top_k, E, scoring=scoring, renormalize=renormalize, token_weights=token_weights,
                        policy=policy, **kw)
        nat = natural.ids.long()                                                # [T, K]
        if protect is not None:
            hit = torch.zeros(E, device=p.device).scatter_add_(
                0, nat.clamp_min(0).reshape(-1), protect.bool()[:, None].expand_as(nat).float().reshape(-1))
            score = torch.where(hit > 0, score + score.max() + 1.0, score)
        keep = torch.zeros(E, dtype=torch.bool, device=p.device)
        for r in range(N):
            a, b = split_range(E, N, r)
            order = torch.sort(score[a:b], descending=True, stable=True).indices[:min(cap, b - a)]
            keep[a + order] = True
        every = torch.arange(E, device=p.device)
        if policy == "truncate":
            ids = torch.where(keep[nat.clamp_min(0)] & (nat >= 0), nat, torch.full_like(nat, -1))
            wts = torch.where(ids >= 0, p.gather(1, nat.clamp_min(0)), torch.zeros_like(natural.weights))
            if renormalize:
                wts = wts / wts.sum(-1, keepdim=True).clamp_min(1e-30)
            return group_routing(wts, ids, every, E)
        out = route(logits.masked_fill(~keep, float("-inf")), top_k, E, scoring=scoring, renormalize=renormalize,
                    token_weights=token_weights, policy="substitute", **kw)
        if not renormalize:             # the op normalized over the kept experts' softmax: back to the whole
            out = out._replace(weights=out.weights * (p * keep).sum(-1, keepdim=True))
        return out
    return router


def _lm_head_gather(model: Transformer, comm: Comm, V: int):
    """Vocab-parallel LM head: this rank's rows, logits gathered whole (padding trimmed)."""
    def lm_head(x: Tensor) -> Tensor:
        return comm.gather_cat(F.linear(x, model.output.weight), -1, V)
    return lm_head


# ---- building, loading, sharding ----------------------------------------------------------------------------

@dataclass
class ParallelState:
    """What a parallel model carries: its config and communicator (`model.parallel`)."""
    cfg: ParallelConfig
    comm: Comm
    rules: dict = field(default_factory=dict)


def resolve_comm(cfg: ParallelConfig, comm: Comm | None, device) -> Comm:
    """The communicator of an initialized default group, or torchrun's (init_from_env)."""
    if comm is not None:
        return comm
    if dist.is_initialized():
        if dist.get_world_size() != cfg.world:
            raise ValueError(f"--{cfg.mode} {cfg.world} needs {cfg.world} processes, got a process group of "
                             f"{dist.get_world_size()}")
        return Comm(dist.get_rank(), dist.get_world_size())
    return init_from_env(cfg, str(device))


def local_meta_model(args: ModelArgs, cfg: ParallelConfig, comm: Comm) -> Transformer:
    """This rank's modules on the meta device (shapes only)."""
    check_config(args, cfg)
    la = local_args(args, cfg)
    with torch.device("meta"):
        model = Transformer(la)
        for i, block in enumerate(model.layers):
            if cfg.tp > 1:
                block.attention = TPAttention(la, i, comm)
                if args.qk_norm == "full":
                    block.attention.q_norm = TPNorm(la.q_size, args.q_size, args.rms_norm_eps, comm)
                    block.attention.k_norm = TPNorm(la.kv_size, args.kv_size, args.rms_norm_eps, comm)
                block.ffn = (TPMoE(la, comm) if args.moe_layers[i] else
                             TPDenseMLP(la.hidden_size, la.intermediate_size, args.mlp_bias, comm))
            elif cfg.ep > 1 and args.moe_layers[i]:
                a, b = split_range(args.n_experts, cfg.ep, comm.rank)
                block.ffn = EPMoE(args, a, b, comm, cfg.budget_balance, cfg.ep)
        if cfg.tp > 1 and not args.tie_word_embeddings:
            model.output = nn.Linear(args.hidden_size, math.ceil(args.vocab_size / cfg.tp), bias=False)
    return model


def empty_local_model(args: ModelArgs, cfg: ParallelConfig, comm: Comm, device, dtype) -> Transformer:
    """This rank's modules, allocated once on `device` (built on meta first: no full-size allocation),
    zero-filled (ZERO rules and LM-head padding rows stay zero)."""
    model = local_meta_model(args, cfg, comm).to(dtype).to_empty(device=device)
    model.reset_buffers()
    for p in model.parameters():
        p.data.zero_()
    if cfg.tp > 1 and not args.tie_word_embeddings:
        model.lm_head = _lm_head_gather(model, comm, args.vocab_size)
    model.parallel = ParallelState(cfg, comm, shard_rules(args, cfg, comm.rank))
    model.full_args = args
    return model.eval().requires_grad_(False)


@torch.no_grad()
def shard_model(full: Transformer, cfg: ParallelConfig, comm: Comm) -> Transformer:
    """This rank's shard of an in-memory full model (random presets, tests), by the loader's rules."""
    args = full.args
    local = empty_local_model(args, cfg, comm, full.tok_embeddings.weight.device, full.tok_embeddings.weight.dtype)
    rules = local.parallel.rules
    fp = dict(full.named_parameters())
    for name, p in local.named_parameters():
        src = fp[name]
        rule = rules.get(name, WHOLE)
        for s_idx, d_idx in map_piece((), tuple(src.shape), rule):
            p[d_idx].copy_(src[s_idx])
    return local


def is_parallel(model) -> bool:
    return getattr(model, "parallel", None) is not None


# ---- processes --------------------------------------------------------------------------------------------

_WATCH: dict = {}


def init_from_env(cfg: ParallelConfig, device: str = "cpu") -> Comm:
    """torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) -> the default process group (gloo on
    CPU, NCCL on CUDA; collectives time out after cfg.timeout_s) and a failure watchdog. Refuses a world
    size that is not cfg.world, on every rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp/--ep {cfg.world} runs one process per rank: launch with "
                         f"`torchrun --nproc-per-node {cfg.world} -m specmoe_ext ...`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != cfg.world:
        raise ValueError(f"--{cfg.mode} {cfg.world} needs {cfg.world} processes, got WORLD_SIZE={world}")
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    start_watchdog(rank)
    return Comm(rank, world)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:           # noqa: BLE001 - no store (e.g. a group without one): no watchdog
        return None


def report_failure(rank: int, message: str) -> None:
    """Post this rank's error for every rank's watchdog (best effort)."""
    st = _store()
    if st is not None:
        try:
            st.set("specmoe/failed", f"rank {rank}: {message}")
        except Exception:       # noqa: BLE001
            pass


def start_watchdog(rank: int, interval_s: float = 0.2) -> None:
    """A daemon thread that ends this process with the failing rank's message as soon as one is posted
    (a rank blocked in a collective would otherwise wait for the timeout)."""
    st = _store()
    if st is None or _WATCH.get("thread") is not None:
        return

    def watch():
        import time
        while not _WATCH.get("stop"):
            try:
                if st.check(["specmoe/failed"]):
                    msg = st.get("specmoe/failed").decode()
                    if not msg.startswith(f"rank {rank}:"):
                        sys.stderr.write(f"specmoe [rank {rank}]: stopping: {msg}\n")
                        sys.stderr.flush()
                    os._exit(1)
            except Exception:   # noqa: BLE001 - the store went away: the group is ending
                return
            time.sleep(interval_s)
    t = threading.Thread(target=watch, name="specmoe-watchdog", daemon=True)
    _WATCH["thread"] = t
    t.start()


def stop_watchdog() -> None:
    """Stop the watchdog and wait for it: its store calls must not race the process group's teardown (a
    thread inside a TCPStore call while the store is destroyed aborts the process)."""
    _WATCH["stop"] = True
    t = _WATCH.get("thread")
    if t is not None and t.is_alive():
        t.join(timeout=5.0)

"""Expert offloading: every expert in host memory, an N-slot expert cache per MoE layer on the device.

Shape legend: E experts per MoE layer, K experts per token, N cache slots per MoE layer (resident experts),
S = E - N staging slots (shared by the layers of a group), G MoE layers per group, R = G*N + S rows of a
group buffer, V_j = (G - j)*N + S rows of the view of the group's j-th layer, Nt tokens of one forward
(bs*T flattened), M = min(E, Nt*K) demand-fetch lanes, W prefetch lanes, L_moe MoE layers, h hidden,
f expert FFN.

Storage (`ExpertOffload`, attached to a `Transformer` as `model.expert_offload`):
    host store   each MoE layer's `ffn.w13` [E, 2f, h] / `ffn.w2` [E, h, f] stay Parameters, but in host
                 memory: page-locked (cudaHostRegister, exact size) when the device is CUDA, plain CPU
                 memory otherwise. The loader copies safetensors straight into them (never a device copy).
    group buffer per group of G consecutive MoE layers, one device tensor of R rows per weight: rows
                 [j*N, (j+1)*N) are layer j's N cache slots, rows [G*N, G*N + S) the group's staging.
    layer view   layer j computes from group[j*N:] (V_j rows): its own slots are rows 0..N-1, the staging
                 rows V_j - S.. : one tensor for the fused-MoE op (which indexes rows, <= MAX_EXPERTS), no copy.
    slot table   on the device: expert_of [N] (-1 = empty slot), slot_of [E] (-1 = not resident),
                 last_used [N] (a forward clock), heat [E] (decayed pair counts), prefetched [N] flags.
Why staging: a verification forward (a tree for every request) can need D > N distinct experts of a
layer; the N + S = E rows of the view always hold them. Misses go to cache slots first (by priority), the
overflow to staging, which the next layer of the group reuses (it is not resident after the forward).

One MoE layer's forward (`LayerExperts.experts`, after routing / budget / expert map, before the FFN), fixed
shapes and device tensors only (no host read, capturable in a CUDA graph):
    needed[e]   = the routing's pairs for expert e > 0 (with a budget B: at most B experts)
    miss        = needed & not resident; hits = needed & resident
    evictable   = cache slots holding no needed expert, ordered by the eviction policy
                    lru:  least recently used first (last_used, the clock of the forward that last used it)
                    heat: coldest expert first (heat[e] = decay * heat[e] + pairs this forward)
                  empty slots first, ties to the lower slot
    admission   misses ranked by pairs this forward (ties: lower id); the first n_evictable take the
                evictable slots in order (evicting their experts), the rest go to staging slots
    fetch       one copy of every missing expert's w13 / w2 rows, host store -> view rows (lanes of M
                experts, masked: only misses move bytes); on CUDA on a copy stream the compute waits for
    prefetch    (not while drafting) the NEXT MoE layer's likely experts into its evictable cache slots,
                on the copy stream, overlapped with this layer's FFN and the next attention:
                    router: the next layer's router applied to this layer's MoE input, top-K per token,
                            experts ranked by predicted pairs (Pre-gated MoE style)
                    heat:   the next layer's hottest experts by recent-step heat
                at most W = prefetch_experts (default K) per forward, never into staging
    local map   a bijection experts -> the layer's E local rows (resident -> its slot, staged -> its
                staging row, every other expert a free row, unread since it has no pair); the routing's
                kept_experts (and ids) are mapped through it. Counts, offsets and pair grouping are
                unchanged, so every FFN implementation computes exactly what the all-resident model
                computes, in the same order (fp32 outputs are bitwise equal; tested).
Drafting (`MoEControl.resident_only`, the self drafter): no fetch, no prefetch, no policy update: the
expert map points into the cache's resident set (read from slot_of on the device, `resident_mask`); a pair
routed to a non-resident expert anyway would get weight 0.

Copy backends ("copy"): "index" (CPU: index_copy from the host store, the same code as the GPU's), "triton"
(CUDA: a Triton kernel reading the page-locked host store through its mapped device address, masked per
lane, capturable; checked once at construction against a copy-engine copy), "eager" (CUDA without Triton,
or when that check fails: nonzero + per-row copies, which synchronize: the step then cannot be captured
and the graph runner runs it eagerly, with a warning; the CLI passes --no-cuda-graph itself). NOT YET RUN
ON A GPU: the CUDA path (Triton zero-copy, copy stream, capture of fetching steps) is written to the
design above and has GPU tests (tests/test_offload.py, marked gpu), but no GPU was available when it was
written; everything else is tested on the CPU.
Cost: the bookkeeping is about 120 small tensor ops per MoE layer and fetching forward (a fused kernel
would make it one); on the CPU's tiny model it is most of the offload overhead.

Residency-aware budget (`OffloadConfig.residency_aware_budget`): with an expert budget B, the kept set is the
top-B by s[e] + margin * max(s) * resident[e] (s = MoE-Spec scores, protected root experts first), so a
resident expert wins over a non-resident one whose score is within `margin` of the top score. Substitution
/ truncation then follow the budget policy. Reported per layer: routing score mass kept by the plain and the
residency-aware sets, and the non-resident experts each set holds (what it would fetch).

Statistics (device counters, read once by `report()`): per layer and bucket (0 = the first fetching forward
after `reset_stats()`, a generate call's prefill; 1 = every later forward: decode / verification steps):
forwards, experts needed, hits, misses (fetched on demand), staged, prefetched, prefetch hits, the most
experts fetched by one forward; bytes = (misses + prefetched) * expert bytes. Fetch time is measured where
the fetch is eager (CPU wall clock; CUDA events outside graph capture); in replayed CUDA graphs it is not.
"""
from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..routing_types import POLICIES, Routing
from .config import MAX_EXPERTS, ModelArgs

EVICTION_POLICIES = ("lru", "heat")
PREFETCH_POLICIES = ("router", "heat", "none")
COPY_BACKENDS = ("auto", "index", "triton", "eager")
MAX_VIEW_ROWS = MAX_EXPERTS          # the fused-MoE op's expert-row limit (fused_moe.h kMaxExperts)
GiB = 2 ** 30
_STAT_FIELDS = ("forwards", "needed", "hits", "misses", "staged", "prefetched", "prefetch_hits", "max_fetch")
_BUDGET_FIELDS = ("mass_plain", "mass_aware", "nonresident_plain", "nonresident_aware", "budget_forwards")


class OffloadError(ValueError):
    """An offload setting cannot be honoured; the message names the argument (raised before allocating)."""


@dataclass(frozen=True)
class OffloadConfig:
    """What to offload and how (one object for the Python API; the CLI's --offload-experts flags build it).

    resident_experts  N cache slots per MoE layer (top_k <= N <= E); or
    gpu_memory_gb     device memory for the whole run (non-expert weights + cache + reserve): N derived
    eviction          "lru" | "heat"
    prefetch          "router" | "heat" | "none"
    prefetch_experts  W, at most this many experts prefetched per layer and forward (default top_k)
    heat_decay        heat[e] <- decay * heat[e] + pairs per forward (eviction "heat", prefetch "heat")
    residency_aware_budget, residency_margin   see the module docstring (needs an expert budget to act)
    pin_memory        page-lock the host store (default: when the device is CUDA)
    copy              "auto" | "index" | "triton" | "eager" (module docstring)
    """

    resident_experts: int | None = None
    gpu_memory_gb: float | None = None
    eviction: str = "lru"
    prefetch: str = "router"
    prefetch_experts: int | None = None
    heat_decay: float = 0.8
    residency_aware_budget: bool = False
    residency_margin: float = 0.05
    pin_memory: bool | None = None
    copy: str = "auto"

    def check(self) -> None:
        if (self.resident_experts is None) == (self.gpu_memory_gb is None):
            raise OffloadError("expert offload: give exactly one of resident_experts (--resident-experts N) and "
                               "gpu_memory_gb (--gpu-memory GB)")
        if self.eviction not in EVICTION_POLICIES:
            raise OffloadError(f"expert offload: eviction {self.eviction!r}: choose one of {EVICTION_POLICIES}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise OffloadError(f"expert offload: prefetch {self.prefetch!r}: choose one of {PREFETCH_POLICIES}")
        if self.copy not in COPY_BACKENDS:
            raise OffloadError(f"expert offload: copy {self.copy!r}: choose one of {COPY_BACKENDS}")
        if self.prefetch_experts is not None and self.prefetch_experts < 1:
            raise OffloadError(f"expert offload: prefetch_experts must be >= 1, got {self.prefetch_experts}")
        if not 0.0 <= self.heat_decay <= 1.0:
            raise OffloadError(f"expert offload: heat_decay must be in [0, 1], got {self.heat_decay}")
        if not (math.isfinite(self.residency_margin) and self.residency_margin >= 0):
            raise OffloadError(f"expert offload: residency_margin must be finite and >= 0, got {self.residency_margin}")
        if self.gpu_memory_gb is not None and not (math.isfinite(self.gpu_memory_gb) and self.gpu_memory_gb > 0):
            raise OffloadError(f"expert offload: gpu_memory_gb (--gpu-memory) must be a positive number of GiB, "
                               f"got {self.gpu_memory_gb}")


@dataclass(frozen=True)
class OffloadPlan:
    """The sizes an OffloadConfig resolves to for one model (no allocation): see the module docstring."""

    n_experts: int              # E
    top_k: int                  # K
    n_moe: int                  # L_moe
    resident: int               # N
    staging: int                # S = E - N
    layers_per_group: int       # G
    groups: int
    expert_bytes: int           # one expert's w13 + w2
    non_expert_bytes: int       # every parameter that stays on the device
    reserve_bytes: int = 0      # what the caller also needs on the device (KV caches, drafts), --gpu-memory only

    @property
    def cache_rows(self) -> int:
        return self.n_moe * self.resident + self.groups * self.staging

    @property
    def device_bytes(self) -> int:
        """Non-expert weights + every group buffer (cache slots and staging)."""
        return self.non_expert_bytes + self.cache_rows * self.expert_bytes

    @property
    def host_bytes(self) -> int:
        return self.n_moe * self.n_experts * self.expert_bytes

    def describe(self) -> dict:
        return {"resident_experts": self.resident, "experts": self.n_experts, "staging_slots": self.staging,
                "layers_per_group": self.layers_per_group, "groups": self.groups, "expert_bytes": self.expert_bytes,
                "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
                "non_expert_bytes": self.non_expert_bytes}


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / 2**20:.2f} MiB"


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layout(n_moe: int, N: int, E: int) -> tuple[int, int, int]:
    """(S, G, groups): groups of G consecutive MoE layers whose views fit MAX_VIEW_ROWS rows."""
    S = E - N
    g_max = max(1, (MAX_VIEW_ROWS - S) // N)
    groups = -(-n_moe // g_max)
    return S, -(-n_moe // groups), groups


def plan_offload(args: ModelArgs, dtype: torch.dtype, cfg: OffloadConfig, reserve_bytes: int = 0) -> OffloadPlan:
    """Resolve `cfg` for a model of `args` in `dtype`: N (given, or the most that fits gpu_memory_gb with
    `reserve_bytes` besides), staging and groups. OffloadError naming the argument for N < top_k, N > E, or
    a memory budget that cannot hold the non-expert weights (+ reserve) and top_k experts per layer."""
    cfg.check()
    if not args.is_moe:
        raise OffloadError(f"expert offload needs an MoE model ({args.architecture} has no experts)")
    E, K = args.n_experts, args.top_k
    act = getattr(args, "expert_act", "silu")
    if act != "silu":
        raise OffloadError(f"expert offload supports SwiGLU experts (w13 / w2); {args.architecture} uses {act!r} experts")
    router = getattr(args, "router", None)
    if cfg.residency_aware_budget and router is not None and (
            router.scoring != "softmax" or router.correction_bias or router.n_group > 1):
        raise OffloadError(f"residency_aware_budget (--residency-aware-budget) supports softmax routers without "
                           f"selection bias or expert groups; {args.architecture}'s router is {router}")
    n_moe = sum(args.moe_layers)
    elem = _elem(dtype)
    expert_bytes = 3 * args.moe_intermediate_size * args.hidden_size * elem
    with torch.device("meta"):
        from .model import Transformer
        total = Transformer(args).num_parameters() * elem
    non_expert = total - n_moe * E * expert_bytes

    def make(N: int) -> OffloadPlan:
        S, G, groups = _layout(n_moe, N, E)
        return OffloadPlan(E, K, n_moe, N, S, G, groups, expert_bytes, non_expert, reserve_bytes)

    if cfg.resident_experts is not None:
        N = int(cfg.resident_experts)
        if N < K:
            raise OffloadError(f"resident_experts (--resident-experts) = {N} < top_k = {K}: every token needs its "
                               f"{K} experts on the device at once")
        if N > E:
            raise OffloadError(f"resident_experts (--resident-experts) = {N} > the {E} experts per MoE layer")
        return make(N)
    budget = int(cfg.gpu_memory_gb * GiB)
    if budget < non_expert + reserve_bytes:
        extra = f" + {_size(reserve_bytes)} of KV caches / drafts" if reserve_bytes else ""
        raise OffloadError(f"gpu_memory_gb (--gpu-memory) = {cfg.gpu_memory_gb:g} GiB cannot hold the non-expert "
                           f"weights ({_size(non_expert)}{extra}, {str(dtype).replace('torch.', '')})")
    for N in range(E, K - 1, -1):
        p = make(N)
        if p.device_bytes + reserve_bytes <= budget:
            return p
    need = make(K).device_bytes + reserve_bytes
    raise OffloadError(f"gpu_memory_gb (--gpu-memory) = {cfg.gpu_memory_gb:g} GiB leaves room for fewer than top_k = "
                       f"{K} cached experts per MoE layer (non-expert weights {_size(non_expert)}; the "
                       f"smallest cache needs {_size(need)} in all)")


# ---- policies (pure functions on device tensors; unit-tested) ----------------------------------------------

def eviction_order(policy: str, expert_of: Tensor, last_used: Tensor, heat: Tensor, holds_needed: Tensor) -> Tensor:
    """[N] slot indices, first to be evicted first: empty slots, then by policy ("lru": smallest last_used;
    "heat": coldest heat[expert]), slots holding a needed expert last; ties to the lower slot."""
    occupied = expert_of >= 0
    if policy == "lru":
        key = last_used.double()
    elif policy == "heat":
        key = heat.double()[expert_of.clamp_min(0)]
    else:
        raise ValueError(f"eviction policy {policy!r}: choose one of {EVICTION_POLICIES}")
    key = torch.where(occupied, key, torch.full_like(key, float("-inf")))
    key = torch.where(holds_needed, torch.full_like(key, float("inf")), key)
    return torch.sort(key, stable=True).indices


def predict_router(x: Tensor, next_gate: Tensor, top_k: int, next_bias: Tensor | None = None) -> Tensor:
    """Prefetch policy "router": x [Nt, h] (this layer's MoE input), next_gate [E, h] (+ bias [E]: the next
    MoE layer's router) -> [E] float32 predicted pairs per expert of the next layer (top-K per token)."""
    ids = torch.topk(F.linear(x, next_gate.to(x.dtype), next_bias).float(), top_k, dim=-1).indices
    return torch.zeros(next_gate.shape[0], dtype=torch.float32, device=x.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.float32, device=x.device))


def predict_heat(heat: Tensor) -> Tensor:
    """Prefetch policy "heat": the next layer's decayed pair counts of recent forwards, [E] float32."""
    return heat.float()


def prefetch_candidates(score: Tensor, width: int) -> Tensor:
    """[E] bool: the `width` best experts by predicted score (> 0 only; ties to the lower id)."""
    order = torch.sort(score, descending=True, stable=True).indices[:width]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(0, order, score[order] > 0)


# ---- copy backends -------------------------------------------------------------------------------------------

_triton_kernel = None


def _triton_copy_kernel():
    """A masked row copy: program (lane, chunk) copies BLOCK elements of row src_rows[lane] to row
    dst_rows[lane] when valid[lane]; the source may be page-locked host memory (read over PCIe)."""
    global _triton_kernel
    if _triton_kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def copy_rows(src, dst, src_rows, dst_rows, valid, row_elems, BLOCK: tl.constexpr):
            lane = tl.program_id(0)
            chunk = tl.program_id(1)
            ok = tl.load(valid + lane) != 0
            s = tl.load(src_rows + lane).to(tl.int64)
            d = tl.load(dst_rows + lane).to(tl.int64)
            offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = (offs < row_elems) & ok
            v = tl.load(src + s * row_elems + offs, mask=m)
            tl.store(dst + d * row_elems + offs, v, mask=m)

        _triton_kernel = copy_rows
    return _triton_kernel


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _device_alias(host: Tensor) -> Tensor:
    """A CUDA tensor aliasing page-locked host memory (its mapped address; unified addressing)."""
    class _Cai:
        pass
    raw = host.view(torch.int16) if host.element_size() == 2 else host.view(torch.int32)
    obj = _Cai()
    obj.__cuda_array_interface__ = {"shape": tuple(raw.shape), "typestr": "<i2" if host.element_size() == 2 else "<i4",
                                    "data": (raw.data_ptr(), False), "version": 2, "strides": None}
    return torch.as_tensor(obj, device=torch.device("cuda", torch.cuda.current_device())).view(host.dtype)


def pin_host_tensor(t: Tensor) -> Tensor:
    """Page-lock t's memory in place (cudaHostRegister, mapped + portable: exactly its size, unlike the
    caching pinned allocator's power-of-two blocks); unregistered when t is freed."""
    cudart = torch.cuda.cudart()
    nbytes = t.numel() * t.element_size()
    err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 3)     # cudaHostRegisterPortable | cudaHostRegisterMapped
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / GiB:.2f} GiB of expert weights failed (error {int(err)})")
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


# ---- one MoE layer -------------------------------------------------------------------------------------------

@dataclass
class _Group:
    w13: Tensor                  # [R, 2f, h]
    w2: Tensor                   # [R, h, f]
    n_layers: int                # G of this group


class LayerExperts:
    """The cache of one MoE layer: view rows, slot table, policy state, statistics (module docstring)."""

    def __init__(self, owner: "ExpertOffload", layer: int, moe_index: int, ffn, group: _Group, j: int):
        p = owner.plan
        self.owner, self.layer, self.moe_index, self.ffn = owner, layer, moe_index, ffn
        self.E, self.N, self.S, self.K = p.n_experts, p.resident, p.staging, p.top_k
        dev = group.w13.device
        self.view13 = group.w13[j * self.N:]                       # [V_j, 2f, h]
        self.view2 = group.w2[j * self.N:]
        self.stage_base = (group.n_layers - j) * self.N            # first staging row of the view
        self.next: LayerExperts | None = None
        z = lambda n, dtype=torch.long: torch.zeros(n, dtype=dtype, device=dev)  # noqa: E731
        self.expert_of = torch.full((self.N + 1,), -1, dtype=torch.long, device=dev)   # [N] + a dummy entry
        self.slot_of = torch.full((self.E + 1,), -1, dtype=torch.long, device=dev)     # [E] + a dummy entry
        self.last_used = z(self.N + 1)
        self.prefetched = z(self.N + 1, torch.bool)
        self.heat = z(self.E, torch.float32)
        self.stats = z((2, len(_STAT_FIELDS)))
        self.budget_stats = z((2, len(_BUDGET_FIELDS)), torch.float64)
        # copy lanes (persistent: the copy stream reads them after this layer's compute moved on)
        self.lanes = {kind: (z(self.E), z(self.E), z(self.E, torch.int32)) for kind in ("demand", "prefetch")}

    # -- state ---------------------------------------------------------------------------------------------
    def resident(self) -> Tensor:
        """[E] bool: experts in a cache slot now."""
        return self.slot_of[:self.E] >= 0

    def reset(self) -> None:
        self.expert_of.fill_(-1)
        self.slot_of.fill_(-1)
        self.last_used.zero_()
        self.prefetched.zero_()
        self.heat.zero_()

    def load_resident(self, experts: list[int]) -> None:
        """Host side (setup, tests): put these experts in slots 0.. now (copies from the host store)."""
        if len(experts) > self.N or len(set(experts)) != len(experts):
            raise ValueError(f"layer {self.layer}: {len(experts)} experts for {self.N} slots (distinct ids needed)")
        self.reset()
        dev = self.slot_of.device
        ids = torch.tensor(experts, dtype=torch.long, device=dev)
        slots = torch.arange(len(experts), device=dev)
        self.expert_of[:len(experts)] = ids
        self.slot_of[ids] = slots
        self.owner._copy(self, "demand", ids, slots, torch.ones(len(experts), dtype=torch.bool, device=dev))
        self.owner._join()

    # -- admission (shared by demand fetches and prefetches) ----------------------------------------------
    def _admit(self, needed: Tensor, priority: Tensor, lanes: int, staging: bool, kind: str):
        """Fetch the needed experts that are not resident: the first n_evictable misses by priority into
        the evictable slots (eviction order), the rest into staging (when `staging`, else not fetched).
        -> (misses [E] bool, candidates [M], to_cache [M], to_stage [M], staging rows [M])."""
        E, N = self.E, self.N
        own = self.owner
        slot_of, expert_of = self.slot_of[:E], self.expert_of[:N]
        resident = slot_of >= 0
        miss = needed & ~resident
        holds_needed = (expert_of >= 0) & needed[expert_of.clamp_min(0)]
        slot_order = eviction_order(own.cfg.eviction, expert_of, self.last_used[:N], self.heat, holds_needed)
        n_evictable = (~holds_needed).sum()
        order = torch.sort(priority, descending=True, stable=True).indices
        order = order[torch.sort(miss[order].to(torch.int8), descending=True, stable=True).indices]
        cand = order[:lanes]                                                       # misses first
        j = torch.arange(cand.shape[0], device=cand.device)
        valid = miss[cand]
        to_cache = valid & (j < n_evictable)
        to_stage = valid & ~to_cache if staging else torch.zeros_like(valid)
        slot = slot_order[j.clamp(max=N - 1)]
        old = expert_of[slot]
        self.slot_of.scatter_(0, torch.where(to_cache & (old >= 0), old, E), -1)       # evicted
        self.slot_of.scatter_(0, torch.where(to_cache, cand, E), slot)
        self.expert_of.scatter_(0, torch.where(to_cache, slot, N), cand)
        dummy_slot = torch.where(to_cache, slot, N)
        self.last_used.scatter_(0, dummy_slot, own.clock.expand_as(slot))
        self.prefetched.scatter_(0, dummy_slot, torch.full_like(to_cache, kind == "prefetch"))
        stage_rows = self.stage_base + (j - n_evictable).clamp(0, max(self.S - 1, 0))
        rows = torch.where(to_cache, slot, stage_rows)
        own._copy(self, kind, cand, rows, to_cache | to_stage)
        return miss, cand, to_cache, to_stage, stage_rows

    def _local_rows(self, cand: Tensor | None, to_stage: Tensor | None, stage_rows: Tensor | None) -> Tensor:
        """[E] view row of every expert: a bijection onto the layer's E local rows (module docstring)."""
        E, N = self.E, self.N
        s = self.slot_of[:E]
        assigned = torch.cat([torch.where(s >= 0, s, -1), s.new_full((1,), -1)])       # compact local index
        if cand is not None:
            staged_c = N + (stage_rows - self.stage_base)
            assigned.scatter_(0, torch.where(to_stage, cand, E), torch.where(to_stage, staged_c, -1))
        assigned = assigned[:E]
        taken = torch.zeros(E + 1, dtype=torch.bool, device=s.device).scatter_(
            0, torch.where(assigned >= 0, assigned, E), True)[:E]
        free = torch.sort(taken.to(torch.int8), stable=True).indices                   # free locals, ascending
        unassigned = assigned < 0
        rank = torch.cumsum(unassigned.long(), 0) - 1
        local = torch.where(unassigned, free[rank.clamp_min(0)], assigned)
        return torch.where(local < N, local, self.stage_base + local - N)

    # -- the forward hooks ------------------------------------------------------------------------------------
    def route(self, route_fn: Callable[..., Routing], budget: int | None, moe) -> Callable[..., Routing]:
        """MoEFeedForward calls this first: it marks the start of a fetching forward (statistics buckets)
        and returns the routing function: the residency-aware budget router when configured, a budget
        B < E applies and no router override was given; else `route_fn`."""
        own = self.owner
        if self.moe_index == 0 and not moe.resident_only:
            own._forwards += 1
        if (own.cfg.residency_aware_budget and budget is not None and budget < self.E and moe.router is None
                and not moe.resident_only):
            return self.aware_route
        return route_fn

    def experts(self, x: Tensor, routing: Routing, resident_only: bool) -> tuple[Tensor, Tensor, Routing]:
        """x [Nt, h] (the MoE input), routing over expert ids -> (w13 view [V, 2f, h], w2 view [V, h, f],
        the routing over view rows). Fetches (and prefetches the next layer) unless resident_only."""
        E = self.E
        own = self.owner
        pairs = torch.zeros(E, dtype=torch.long, device=x.device).index_copy_(
            0, routing.kept_experts.long(), routing.expert_counts.long())          # [E] pairs per expert
        needed = pairs > 0
        if resident_only:
            rows = self._local_rows(None, None, None)
            res = self.resident()
            ids = routing.ids.long()
            ok = (ids >= 0) & res[ids.clamp_min(0)]
            routing = routing._replace(weights=torch.where(ok, routing.weights, torch.zeros_like(routing.weights)))
        else:
            bucket = own._bucket()
            own.clock.add_(1)
            hits_before = needed & self.resident()
            pf_hit = hits_before & self.prefetched[self.slot_of[:E].clamp_min(0)]
            lanes = min(E, x.shape[0] * self.K)
            miss, cand, to_cache, to_stage, stage_rows = self._admit(needed, pairs, lanes, True, "demand")
            own._join()
            s = self.slot_of[:E]
            touch = torch.where(needed & (s >= 0), s, self.N)
            self.last_used.scatter_(0, touch, own.clock.expand(E))
            self.prefetched.scatter_(0, touch, torch.zeros(E, dtype=torch.bool, device=x.device))
            self.heat.mul_(own.cfg.heat_decay).add_(pairs.float())
            n_miss = miss.sum()
            row = torch.stack([torch.ones_like(n_miss), needed.sum(), hits_before.sum(), n_miss,
                               to_stage.sum(), torch.zeros_like(n_miss), pf_hit.sum(), torch.zeros_like(n_miss)])
            self.stats[bucket].add_(row)
            self.stats[bucket, -1] = torch.maximum(self.stats[bucket, -1], n_miss)
            rows = self._local_rows(cand, to_stage, stage_rows)
            if self.next is not None and own.cfg.prefetch != "none":
                self.next._prefetch(x, bucket)
        ids = routing.ids.long()
        local = routing._replace(kept_experts=rows[routing.kept_experts.long()].to(torch.int32),
                                 ids=torch.where(ids >= 0, rows[ids.clamp_min(0)], -1).to(torch.int32))
        return self.view13, self.view2, local

    def _prefetch(self, x: Tensor, bucket: int) -> None:
        """Called by the previous MoE layer with its MoE input x: fetch this layer's likely experts."""
        own = self.owner
        width = min(own.prefetch_width, self.N)
        if own.cfg.prefetch == "router":
            score = predict_router(x, self.ffn.gate.weight, self.K, self.ffn.gate.bias)
        else:
            score = predict_heat(self.heat)
        want = prefetch_candidates(score, width)
        _, _, to_cache, _, _ = self._admit(want, score, width, False, "prefetch")
        self.stats[bucket, _STAT_FIELDS.index("prefetched")] += to_cache.sum()

    # -- residency-aware budget ------------------------------------------------------------------------------
    def aware_route(self, logits: Tensor, top_k: int, budget: int, scoring: str = "softmax", bias=None,
                    renormalize: bool = True, token_weights: Tensor | None = None, protect: Tensor | None = None,
                    policy: str = "substitute", n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2",
                    scale: float = 1.0) -> Routing:
        """`ops.route_budget`'s contract with the residency-aware kept set (module docstring); device ops.
        Softmax routers without selection bias or expert groups (plan_offload refuses the others)."""
        from .routing_edit import group_routing
        if scoring != "softmax" or bias is not None or n_group != 1 or policy not in POLICIES:
            raise ValueError("residency-aware budget: softmax scoring without bias or groups, policy "
                             "substitute|truncate")
        Nt, E = logits.shape
        B = min(budget, E)
        x = logits.float()
        x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
        probs = torch.softmax(x, -1)
        order_tok = torch.sort(x, dim=-1, descending=True, stable=True).indices          # [Nt, E]
        natural = order_tok[:, :top_k]
        w_tok = torch.ones(Nt, device=x.device) if token_weights is None else \
            torch.where(token_weights.float() > 0, token_weights.float(), torch.zeros((), device=x.device))
        score = (w_tok[:, None] * probs).sum(0)                                            # [E]
        protected = torch.zeros(E, dtype=torch.bool, device=x.device)
        if protect is not None:
            hit = protect.bool()[:, None].expand_as(natural).reshape(-1)
            protected = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(
                0, natural.reshape(-1), hit.long()) > 0
        resident = self.resident()

        def kept_by(key: Tensor) -> Tensor:
            o = torch.sort(key, descending=True, stable=True).indices
            o = o[torch.sort(protected[o].to(torch.int8), descending=True, stable=True).indices]
            return torch.zeros(E, dtype=torch.bool, device=x.device).scatter_(0, o[:B], True)

        plain = kept_by(score)
        kept = kept_by(score + self.owner.cfg.residency_margin * score.max() * resident.float())
        if policy == "substitute":
            o = torch.gather(order_tok, 1, torch.sort(kept[order_tok].to(torch.int8), dim=1, descending=True,
                                                      stable=True).indices)
            ids = o[:, :top_k]
        else:
            ids = torch.where(kept[natural], natural, torch.full_like(natural, -1))
        w = torch.where(ids >= 0, probs.gather(1, ids.clamp_min(0)), torch.zeros((), device=x.device))
        if renormalize:
            s = w.sum(-1, keepdim=True)
            w = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
        if scale != 1.0:
            w = w * scale
        total = score.sum().clamp_min(1e-30)
        row = torch.stack([(score * plain).sum() / total, (score * kept).sum() / total,
                           (plain & ~resident).sum().double(), (kept & ~resident).sum().double(),
                           torch.ones((), dtype=torch.float64, device=x.device)]).double()
        self.budget_stats[self.owner._bucket()].add_(row)
        kept_ids = torch.sort(torch.where(kept, torch.arange(E, device=x.device), E)).values[:B]
        return group_routing(w, ids, kept_ids, E)


# ---- the whole model ---------------------------------------------------------------------------------------

class ExpertOffload:
    """Every MoE layer's host store + device cache of one model (module docstring). Build it through
    `empty_offloaded_model` / `load_model(..., offload=...)` / `build_offloaded_preset`."""

    def __init__(self, model: nn.Module, cfg: OffloadConfig, plan: OffloadPlan, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, torch.device(device)
        self.model_ref = weakref.ref(model)
        self.prefetch_width = cfg.prefetch_experts or plan.top_k
        self.backend = self._backend()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.clock = torch.zeros(1, dtype=torch.long, device=self.device)
        self._forwards = 0                       # fetching forwards since reset_stats (bucket 0 = the first)
        self.rows_copied = 0                     # rows the "index" backend copied (host count, for tests)
        self.fetch_s = [0.0, 0.0]                # measured fetch seconds per bucket (eager fetches only)
        self._events: list = [[], []]
        self.layers: list[LayerExperts] = []
        self._build(model)

    def _backend(self) -> str:
        c = self.cfg.copy
        if self.device.type != "cuda":
            if c not in ("auto", "index"):
                raise OffloadError(f"expert offload: copy {c!r} needs a CUDA device (the CPU uses 'index')")
            return "index"
        if c == "index":
            raise OffloadError("expert offload: copy 'index' is the CPU backend; on CUDA use 'triton' or 'eager'")
        if c == "auto":
            return "triton" if triton_available() else "eager"
        if c == "triton" and not triton_available():
            raise OffloadError("expert offload: copy 'triton' requested but Triton is not installed")
        return c

    @property
    def capturable(self) -> bool:
        """Whether a step that fetches can be captured in a CUDA graph (no host synchronization)."""
        return self.backend in ("index", "triton")

    def _build(self, model) -> None:
        p = self.plan
        ffns = [(i, blk.ffn) for i, blk in enumerate(model.layers) if model.args.moe_layers[i]]
        h, f = model.args.hidden_size, model.args.moe_intermediate_size
        dtype = ffns[0][1].w13.dtype
        self.layers = []
        for g in range(p.groups):
            members = ffns[g * p.layers_per_group:(g + 1) * p.layers_per_group]
            R = len(members) * p.resident + p.staging
            grp = _Group(torch.zeros(R, 2 * f, h, dtype=dtype, device=self.device),
                         torch.zeros(R, h, f, dtype=dtype, device=self.device), len(members))
            for j, (i, ffn) in enumerate(members):
                le = LayerExperts(self, i, len(self.layers), ffn, grp, j)
                ffn.offload = le
                self.layers.append(le)
        for a, b in zip(self.layers, self.layers[1:]):
            a.next = b
        if self.device.type == "cuda" and self.backend == "triton":
            self._alias = {}                     # host store -> CUDA alias, when Triton refuses host tensors
            self._check_triton()

    def _check_triton(self) -> None:
        """One masked copy of a host row through the Triton path, compared byte for byte with a copy-engine
        copy (one synchronization, at construction). On failure the fetches use the eager copy (which
        synchronizes, so steps are not captured) and a warning says why."""
        le = self.layers[0]
        dev = self.device
        lane = (torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
                torch.ones(1, dtype=torch.int32, device=dev))
        try:
            self._triton_copy(le.ffn.w13, le.view13, *lane, 1)
            torch.cuda.synchronize(dev)
            ok = torch.equal(le.view13[0].view(torch.uint8), le.ffn.w13[0].to(dev).view(torch.uint8))
            why = "it copied different bytes"
        except Exception as e:                   # Triton / driver refused the host memory
            ok, why = False, f"{type(e).__name__}: {str(e)[:160]}"
        le.view13[0].zero_()
        if not ok:
            warnings.warn(f"expert offload: the Triton zero-copy fetch failed its check ({why}); using the eager "
                          f"copy, which synchronizes: steps that fetch run without CUDA graphs")
            self.backend = "eager"

    def resize(self, cfg: OffloadConfig) -> None:
        """Host side (benchmarks): new cache sizes / policies for the same host store; the cache starts empty."""
        model = self.model_ref()
        plan = plan_offload(model.args, self.layers[0].view13.dtype, cfg)
        self.layers = []
        for blk in model.layers:
            if getattr(blk.ffn, "offload", None) is not None:
                blk.ffn.offload = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cfg, self.plan = cfg, plan
        self.prefetch_width = cfg.prefetch_experts or plan.top_k
        self.backend = self._backend()
        self._build(model)
        self.reset_stats()

    # -- residency for the self drafter ------------------------------------------------------------------------
    def resident_mask(self) -> Tensor:
        """[L_moe, E] bool on the device: the experts in each MoE layer's cache slots now."""
        return torch.stack([le.resident() for le in self.layers])

    # -- copies ------------------------------------------------------------------------------------------------
    def _copy(self, le: LayerExperts, kind: str, cand: Tensor, rows: Tensor, valid: Tensor) -> None:
        """Copy host rows cand[i] -> view rows rows[i] of le where valid[i] (both weights)."""
        src13, src2 = le.ffn.w13, le.ffn.w2
        if self.backend == "index":
            t0 = time.perf_counter()
            sel = valid.nonzero().squeeze(1)
            src, dst = cand[sel], rows[sel]
            le.view13.index_copy_(0, dst, src13.index_select(0, src))
            le.view2.index_copy_(0, dst, src2.index_select(0, src))
            self.rows_copied += dst.shape[0]
            self.fetch_s[self._bucket()] += time.perf_counter() - t0
            return
        main = torch.cuda.current_stream(self.device)
        lane_src, lane_dst, lane_ok = le.lanes[kind]
        M = cand.shape[0]
        lane_src[:M].copy_(cand)
        lane_dst[:M].copy_(rows)
        lane_ok[:M].copy_(valid)
        self.stream.wait_stream(main)
        timing = not torch.cuda.is_current_stream_capturing()
        with torch.cuda.stream(self.stream):
            if timing:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            if self.backend == "triton":
                self._triton_copy(src13, le.view13, lane_src, lane_dst, lane_ok, M)
                self._triton_copy(src2, le.view2, lane_src, lane_dst, lane_ok, M)
            else:                                                 # eager: synchronizes (not capturable)
                sel = lane_ok[:M].nonzero().squeeze(1)
                for s, d in zip(lane_src[sel].tolist(), lane_dst[sel].tolist()):
                    le.view13[d].copy_(src13[s], non_blocking=True)
                    le.view2[d].copy_(src2[s], non_blocking=True)
            if timing:
                ev[1].record()
                self._events[self._bucket()].append(ev)

    def _triton_copy(self, src: Tensor, dst: Tensor, src_rows, dst_rows, valid, lanes: int) -> None:
        import triton
        row = src[0].numel()
        BLOCK = 8192
        grid = (lanes, triton.cdiv(row, BLOCK))
        kernel = _triton_copy_kernel()
        key = src.data_ptr()
        s = self._alias.get(key, src)
        try:
            kernel[grid](s, dst, src_rows, dst_rows, valid, row, BLOCK=BLOCK)
        except Exception:
            if key in self._alias:
                raise
            self._alias[key] = _device_alias(src)                  # Triton refused the host tensor: its alias
            kernel[grid](self._alias[key], dst, src_rows, dst_rows, valid, row, BLOCK=BLOCK)

    def _join(self) -> None:
        """The compute stream waits for the copies issued so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _bucket(self) -> int:
        """Statistics bucket of the forward running now: 0 = the first fetching one since reset_stats."""
        return 0 if self._forwards <= 1 else 1

    # -- statistics --------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters; the next fetching forward (a prefill) is bucket 0 ("prefill")."""
        for le in self.layers:
            le.stats.zero_()
            le.budget_stats.zero_()
        self._forwards = 0
        self.rows_copied = 0
        self.fetch_s = [0.0, 0.0]
        self._events = [[], []]

    def counters(self) -> dict[str, Tensor]:
        """Host copies: 'stats' [2, L_moe, fields] int64, 'budget' [2, L_moe, fields] float64 (one read)."""
        st = torch.stack([le.stats for le in self.layers], 1).cpu()
        bs = torch.stack([le.budget_stats for le in self.layers], 1).cpu()
        return {"stats": st, "budget": bs}

    def report(self, steps: int | None = None, tokens: int | None = None, decode_s: float | None = None) -> dict:
        """JSON-able statistics (module docstring); steps / tokens / decode_s of the decode phase give the
        per-step, per-token and fetch-share figures."""
        if self.stream is not None:
            torch.cuda.synchronize(self.device)
        c = self.counters()
        eb = self.plan.expert_bytes
        out = {"config": {"eviction": self.cfg.eviction, "prefetch": self.cfg.prefetch,
                          "prefetch_experts": self.prefetch_width, "copy": self.backend,
                          "residency_aware_budget": self.cfg.residency_aware_budget,
                          "residency_margin": self.cfg.residency_margin, **self.plan.describe()}}
        for b, name in enumerate(("prefill", "steps")):
            st = c["stats"][b]
            col = {f: st[:, i] for i, f in enumerate(_STAT_FIELDS)}
            moved = int((col["misses"].sum() + col["prefetched"].sum()) * eb)
            fetch_s = self.fetch_s[b] + sum(a.elapsed_time(z) / 1e3 for a, z in self._events[b])
            measured = self.backend == "index" or bool(self._events[b]) or not int(col["forwards"].sum())
            need = int(col["needed"].sum())
            blk = {"forwards_per_layer": col["forwards"].tolist(), "bytes_moved": moved,
                   "hits_per_layer": col["hits"].tolist(), "misses_per_layer": col["misses"].tolist(),
                   "staged_per_layer": col["staged"].tolist(), "prefetched_per_layer": col["prefetched"].tolist(),
                   "prefetch_hits_per_layer": col["prefetch_hits"].tolist(),
                   "max_fetched_per_forward": col["max_fetch"].tolist(),
                   "hit_rate": round(int(col["hits"].sum()) / need, 4) if need else None,
                   "fetch_s": round(fetch_s, 6) if measured else None}
            if name == "steps" and steps:
                blk["bytes_per_step"] = round(moved / steps, 1)
            if name == "steps" and tokens:
                blk["bytes_per_token"] = round(moved / tokens, 1)
            if name == "steps" and decode_s and blk["fetch_s"] is not None:
                blk["fetch_share_of_decode"] = round(blk["fetch_s"] / decode_s, 4)
            bud = c["budget"][b]
            n = bud[:, -1]
            if float(n.sum()) > 0:
                per = lambda i: [round(float(v), 4) for v in bud[:, i] / n.clamp_min(1)]  # noqa: E731
                blk["residency_aware_budget"] = {
                    "score_mass_kept_plain_per_layer": per(0), "score_mass_kept_aware_per_layer": per(1),
                    "routing_mass_lost": round(float((bud[:, 0] - bud[:, 1]).sum() / n.sum()), 6),
                    "nonresident_kept_plain_per_layer": per(2), "nonresident_kept_aware_per_layer": per(3),
                    "bytes_saved": int(float((bud[:, 2] - bud[:, 3]).sum()) * eb)}
            out[name] = blk
        return out


def expert_offload(model) -> ExpertOffload | None:
    """The model's ExpertOffload, or None (all experts on the device)."""
    return getattr(model, "expert_offload", None)


# ---- construction ----------------------------------------------------------------------------------------------

def _host_param(shape, dtype, pin: bool) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    if pin:                      # registered for the Parameter's lifetime (the finalizer is attached to it)
        try:
            pin_host_tensor(p)
        except RuntimeError as e:    # e.g. a sandbox without cudaHostRegister: the caching pinned allocator
            global _PIN_FALLBACK_WARNED
            if not _PIN_FALLBACK_WARNED:
                warnings.warn(f"{e}; page-locking the host store with pin_memory=True instead (its blocks are "
                              f"rounded up to powers of two)")
                _PIN_FALLBACK_WARNED = True
            p = nn.Parameter(torch.empty(shape, dtype=dtype, pin_memory=True), requires_grad=False)
    return p


_PIN_FALLBACK_WARNED = False


def empty_offloaded_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype,
                          cfg: OffloadConfig, plan: OffloadPlan | None = None):
    """Allocate once: non-expert parameters on `device`, each MoE layer's w13 / w2 in host memory
    (page-locked on CUDA unless cfg.pin_memory is False), the expert caches on `device`; "meta": shapes."""
    from .model import Transformer
    device = torch.device(device)
    plan = plan or plan_offload(args, dtype, cfg)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype)
    ffns = [blk.ffn for i, blk in enumerate(model.layers) if args.moe_layers[i]]
    shapes = [(ffn.w13.shape, ffn.w2.shape) for ffn in ffns]
    for ffn in ffns:                         # the expert parameters never reach the device
        del ffn.w13, ffn.w2
    model = model.to_empty(device=device)
    model.reset_buffers()
    meta = device.type == "meta"
    pin = (device.type == "cuda") if cfg.pin_memory is None else (bool(cfg.pin_memory) and device.type == "cuda")
    for ffn, (s13, s2) in zip(ffns, shapes):
        if meta:
            ffn.w13 = nn.Parameter(torch.empty(s13, dtype=dtype, device="meta"), requires_grad=False)
            ffn.w2 = nn.Parameter(torch.empty(s2, dtype=dtype, device="meta"), requires_grad=False)
        else:
            ffn.w13, ffn.w2 = _host_param(s13, dtype, pin), _host_param(s2, dtype, pin)
    model = model.eval().requires_grad_(False)
    model.expert_offload = ExpertOffload(model, cfg, plan, device)
    return model


@torch.no_grad()
def init_random_offloaded(model, std: float = 0.02, seed: int = 0):
    """`Transformer.init_random` for an offloaded model: the same generator and order, each host-store
    tensor drawn on the device then copied to the host, so the weights equal the resident model's."""
    off = expert_offload(model)
    dev = off.device
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif p.device != dev:
            tmp = torch.empty(p.shape, dtype=p.dtype, device=dev)
            tmp.normal_(0.0, std, generator=g)
            p.copy_(tmp)
        else:
            p.normal_(0.0, std, generator=g)
    return model


def build_offloaded_preset(name: str, device: torch.device | str, dtype: str | torch.dtype | None,
                           cfg: OffloadConfig, seed: int = 0, n_layers: int | None = None, std: float = 0.02):
    """`presets.build_preset` with the experts offloaded: checkpoint presets go through the loader,
    random-weight presets are filled like `init_random` (identical weights)."""
    from .loader import check_device_memory, load_model, resolve_dtype
    from .presets import get_preset
    p = get_preset(name)
    if not p.random:
        if n_layers is not None:
            raise ValueError(f"preset {name!r} is a checkpoint; n_layers cannot be changed")
        return load_model(p.path, device, dtype, offload=cfg)
    args = p.args()
    if n_layers is not None:
        args = args.replace(n_layers=n_layers, moe_layers=args.moe_layers[:n_layers])
    tdtype = resolve_dtype(dtype, device)
    plan = plan_offload(args, tdtype, cfg)
    check_offload_memory(plan, device, f"preset {name}", check_device_memory)
    model = empty_offloaded_model(args, device, tdtype, cfg, plan)
    return model if torch.device(device).type == "meta" else init_random_offloaded(model, std=std, seed=seed)


def check_offload_memory(plan: OffloadPlan, device, what: str, check_device_memory: Callable) -> None:
    """Device: non-expert weights + caches; host: the store (both on the CPU when the device is the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        check_device_memory(plan.device_bytes, device, what, "device memory (non-expert weights + expert cache)")
        check_device_memory(plan.host_bytes, "cpu", what, "host memory (offloaded experts)")
    else:
        check_device_memory(plan.device_bytes + plan.host_bytes, device, what,
                            "memory (weights + offloaded experts + expert cache)")


__all__ = ["OffloadConfig", "OffloadPlan", "OffloadError", "ExpertOffload", "LayerExperts", "plan_offload",
           "empty_offloaded_model", "init_random_offloaded", "build_offloaded_preset", "expert_offload",
           "eviction_order", "predict_router", "predict_heat", "prefetch_candidates", "EVICTION_POLICIES",
           "PREFETCH_POLICIES", "check_offload_memory"]

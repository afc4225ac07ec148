"""Plain-PyTorch ground truth for every specmoe op (float32 upcast). Tests and benchmarks only.

Shape legend: T tokens, E experts, K experts per token, B budget (Bk = min(B, E) kept experts).

These functions state the ops' semantics; the C++ CPU and CUDA implementations must agree with them
(expert ids exactly, float outputs within dtype tolerance).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masks import unpack_bits
from .routing_types import Routing, SCORINGS, POLICIES


def _stable_desc_order(key: Tensor) -> Tensor:
    """Indices sorting `key` descending along the last dim; equal keys keep ascending index order."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


_FLOAT_MAX = torch.finfo(torch.float32).max


def clean_logits(logits: Tensor) -> Tensor:
    """[T, E] -> float32: NaN counts as -inf, +inf as the largest finite float (routing.h clean_logit)."""
    x = logits.float()
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x).clamp(max=_FLOAT_MAX)


def router_probs(logits: Tensor, scoring: str) -> Tensor:
    """[T, E] logits -> [T, E] float32 probabilities of the clean logits: NaN counts as -inf (probability
    0), +inf as the largest finite float (a softmax row's +inf experts share probability 1); a softmax
    row with no finite logit gets all-zero probabilities."""
    x = clean_logits(logits)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    s = e.sum(dim=-1, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def selection_key(logits: Tensor, probs: Tensor, bias: Tensor | None) -> Tensor:
    """What top-K ranks: the clean logits (same order as the probabilities, and exact across
    implementations) unless a bias is given, then probability + bias (DeepSeek-V3 style: the bias
    steers selection only, the weights come from the unbiased probabilities); a NaN key (NaN bias)
    counts as -inf (routing.h clean_key)."""
    if bias is None:
        return clean_logits(logits)
    key = probs + bias.float()
    return torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)


def _weights_for(probs: Tensor, ids: Tensor, renormalize: bool, scale: float = 1.0) -> Tensor:
    valid = ids >= 0
    w = torch.where(valid, probs.gather(1, ids.clamp_min(0).long()), torch.zeros((), dtype=probs.dtype))
    if renormalize:
        s = w.sum(dim=-1, keepdim=True)
        w = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
    return w * scale


GROUP_SCORINGS = ("top2", "max")


def group_mask(probs: Tensor, bias: Tensor | None, n_group: int, topk_group: int, group_scoring: str) -> Tensor:
    """[T, E] bool: expert e lies in one of token t's topk_group best groups (experts in n_group contiguous
    groups of E / n_group). A group's score: the sum of its two best ("top2") or its best ("max") values of
    P + bias (bias given; NaN counting as -inf, as the selection key) or P; a NaN score counts as -inf;
    ties go to the lower group index. All True for n_group = 1."""
    T, E = probs.shape
    if n_group <= 1:
        return torch.ones(T, E, dtype=torch.bool)
    g = probs if bias is None else selection_key(None, probs, bias)
    best = torch.sort(g.view(T, n_group, E // n_group), dim=-1, descending=True).values
    score = best[..., 0] + best[..., 1] if group_scoring == "top2" else best[..., 0]
    score = torch.where(torch.isnan(score), torch.full_like(score, float("-inf")), score)
    groups = _stable_desc_order(score)[:, :topk_group]
    keep = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, groups, True)
    return keep.repeat_interleave(E // n_group, dim=1)


def _ranked(key: Tensor, first: Tensor, second: Tensor | None = None) -> Tensor:
    """[T, E] expert order: those with `first` by key (ties: lower id), then `second`, then the rest."""
    o = _stable_desc_order(key)
    rank = first.to(torch.int8) * 2 + (second.to(torch.int8) if second is not None else 0)
    return torch.gather(o, 1, torch.sort(rank.gather(1, o), dim=1, descending=True, stable=True).indices)


def route_topk(logits: Tensor, top_k: int, scoring: str = "softmax", bias: Tensor | None = None,
               renormalize: bool = True, n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2",
               scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Natural top-K routing: ([T, K] float32 weights, [T, K] int32 expert ids, best first); grouped when
    n_group > 1 (see `group_mask`), weights times `scale`."""
    assert scoring in SCORINGS and group_scoring in GROUP_SCORINGS
    logits, bias = logits.cpu(), (None if bias is None else bias.cpu())
    probs = router_probs(logits, scoring)
    allowed = group_mask(probs, bias, n_group, topk_group, group_scoring)
    ids = _ranked(selection_key(logits, probs, bias), allowed)[:, :top_k]
    return _weights_for(probs, ids, renormalize, scale), ids.int()


def clean_token_weights(token_weights: Tensor) -> Tensor:
    """[T] -> float32 max(w, 0), NaN counting as 0 and +inf as the largest finite float (routing.h
    clean_token_weight): a token with a NaN or negative weight does not vote."""
    w = token_weights.float()
    return torch.where(w > 0, w, torch.zeros_like(w)).clamp(max=_FLOAT_MAX)


def expert_scores(probs: Tensor, token_weights: Tensor | None) -> Tensor:
    """MoE-Spec expert scores s[e] = sum_t w_t * P[t, e] (float32 [E]), w = the clean token weights."""
    if token_weights is None:
        return probs.sum(dim=0)
    return (clean_token_weights(token_weights)[:, None] * probs).sum(dim=0)


def route_budget(logits: Tensor, top_k: int, budget: int, scoring: str = "softmax",
                 bias: Tensor | None = None, renormalize: bool = True,
                 token_weights: Tensor | None = None, protect: Tensor | None = None,
                 policy: str = "substitute", n_group: int = 1, topk_group: int = 1, group_scoring: str = "top2",
                 scale: float = 1.0) -> Routing:
    """Budgeted routing + grouping; see `specmoe_ext.ops.route_budget` for the contract."""
    assert scoring in SCORINGS and policy in POLICIES and group_scoring in GROUP_SCORINGS
    logits, bias, token_weights, protect = (None if t is None else t.cpu()
                                            for t in (logits, bias, token_weights, protect))
    T, E = logits.shape
    K = top_k
    Bk = min(budget, E)
    probs = router_probs(logits, scoring)
    key = selection_key(logits, probs, bias)
    allowed = group_mask(probs, bias, n_group, topk_group, group_scoring)
    natural = _ranked(key, allowed)[:, :K]

    # Kept experts: protected first, then by score, ties to the lower index (protected experts beyond
    # the budget: the Bk best-scoring of them).
    protected = torch.zeros(E, dtype=torch.bool)
    if protect is not None and bool(protect.any()):
        protected[natural[protect.bool()].reshape(-1)] = True
    score = expert_scores(probs, token_weights)
    order = _stable_desc_order(score)
    order = order[torch.sort(protected[order].to(torch.int8), descending=True, stable=True).indices]
    kept_mask = torch.zeros(E, dtype=torch.bool)
    kept_mask[order[:Bk]] = True
    kept = torch.nonzero(kept_mask).flatten()

    if policy == "substitute":   # kept experts of the token's groups first, then the other kept ones
        kept_t = kept_mask.expand(T, E)
        ids = _ranked(key, kept_t & allowed, kept_t & ~allowed)[:, :K]
    else:  # truncate
        ids = torch.where(kept_mask[natural], natural, torch.full_like(natural, -1))
    weights = _weights_for(probs, ids, renormalize, scale)

    # Grouping: (token, slot) pairs as flat indices t*K+k, by kept-expert position then flat index.
    slot_of = torch.full((E,), -1, dtype=torch.long)
    slot_of[kept] = torch.arange(Bk)
    flat_slot = torch.where(ids >= 0, slot_of[ids.clamp_min(0)], torch.full_like(ids, -1)).reshape(-1)
    counts = torch.bincount(flat_slot[flat_slot >= 0], minlength=Bk)
    offsets = torch.zeros(Bk + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    valid = torch.nonzero(flat_slot >= 0).flatten()
    pairs = valid[torch.sort(flat_slot[valid], stable=True).indices]
    sorted_pairs = torch.full((T * K,), -1, dtype=torch.long)
    sorted_pairs[: pairs.numel()] = pairs
    i32 = lambda t: t.to(torch.int32)
    return Routing(weights, i32(ids), i32(kept), i32(counts), i32(offsets), i32(sorted_pairs))


def _expert_ffn(x: Tensor, w13: Tensor, w2: Tensor, act_dtype: torch.dtype) -> Tensor:
    """x [n, h] float32, w13 [2f, h], w2 [h, f] -> [n, h] float32 = W2 (silu(W1 x) * W3 x), the activation
    rounded to act_dtype as the op stores it."""
    f = w2.shape[-1]
    gu = x @ w13.float().t()
    act = (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]).to(act_dtype).float()
    return act @ w2.float().t()


def fused_moe(x: Tensor, w13: Tensor, w2: Tensor, routing: Routing,
              shared: "tuple[Tensor, Tensor, Tensor] | None" = None) -> Tensor:
    """y[t] = sum_k w[t, k] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t]) (+ ws[t] * the shared expert's FFN
    of x[t], shared = (w13s [2fs, h], w2s [h, fs], ws [T])) in float32, computed on x's device from the
    routing's ids/weights directly (independent of its grouping); returns float32 [T, h] on CPU.
    As in the op's contract, the silu * up activation is rounded to x's dtype (a no-op for float32), so
    the op differs from this only by its final rounding to x's dtype and float32 summation order."""
    act_dtype = x.dtype
    x = x.float()
    ids, weights = routing.ids.long().to(x.device), routing.weights.float().to(x.device)
    y = torch.zeros_like(x)
    for e in ids[ids >= 0].unique().tolist():  # upcast only the experts used (large shapes on GPU)
        t, k = torch.nonzero(ids == e, as_tuple=True)
        y.index_add_(0, t, weights[t, k, None] * _expert_ffn(x[t], w13[e], w2[e], act_dtype))
    if shared is not None:
        w13s, w2s, ws = shared
        y += ws.float().to(x.device)[:, None] * _expert_ffn(x, w13s, w2s, act_dtype)
    return y.cpu()


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_lens: Tensor, tree_mask: Tensor,
                   scale: float | None = None) -> Tensor:
    """ops.tree_attention in plain PyTorch, float32: a dense [bs, T, S] visibility mask from the prefix
    lengths and the unpacked ancestor bits, then softmax attention per query head. -> [bs, T, Hq, d]
    in q's dtype."""
    bs, T, Hq, d = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    j = torch.arange(S, device=q.device)[None, None, :] - prefix_lens.to(q.device).long()[:, None, None]
    anc = unpack_bits(tree_mask, T)                                                     # [bs, T, T]
    bit = torch.gather(anc, 2, j.clamp(0, T - 1).expand(bs, T, S))
    visible = (j < 0) | ((j < T) & bit)                                                 # [bs, T, S]
    rep = Hq // Hk
    qf = q.float().transpose(1, 2)                                                      # [bs, Hq, T, d]
    kf = k_cache.float().repeat_interleave(rep, 1)
    vf = v_cache.float().repeat_interleave(rep, 1)
    s = (qf @ kf.transpose(2, 3)) * scale
    s = s.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2).to(q.dtype)


# ---- verify step: tree acceptance (specmoe::tree_accept) and KV compaction (specmoe::kv_compact) -------
# Contract: csrc/kernels/tree_accept.h. Shapes: bs requests, T tree nodes, V vocab.

_MASK32 = 0xFFFFFFFF
_LOG2E = 1.4426950408889634
# 2^f on [0, 1): ln2^k / k! rounded to float32, highest degree first (the kernels' exp2_frac)
_EXP2_COEFFS = [float.fromhex(h) for h in (
    "0x1.62c022p-20", "0x1.ffcbfcp-17", "0x1.430912p-13", "0x1.5d87fep-10", "0x1.3b2ab6p-7",
    "0x1.c6b08ep-5", "0x1.ebfbe0p-3", "0x1.62e430p-1", "0x1.0p0")]


def philox4x32_10(counter: "tuple[int, int, int, int]", key: "tuple[int, int]") -> "list[int]":
    """Philox4x32-10 (Salmon et al. 2011) on Python ints: 4 counter words + 2 key words -> 4 words."""
    c = [x & _MASK32 for x in counter]
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & _MASK32, p1 & _MASK32, ((p0 >> 32) ^ c[3] ^ k1) & _MASK32,
             p0 & _MASK32]
    return c


def philox_bits24(seed: int, offset: int, node: int) -> int:
    """The 24 random bits of node `node`'s uniform (u = bits * 2^-24): key = seed, counter =
    (offset low, offset high, node, 0); seed / offset as 64-bit two's complement."""
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    return philox4x32_10((o, o >> 32, node, 0), (s, s >> 32))[0] >> 8


def fixed_weights(x: Tensor, m: Tensor, scale: Tensor) -> Tensor:
    """Integer weights ~ 2^32 * exp((x - m) / temperature), bit-identical to the kernels: x [V] float32
    (NaN already -inf), m and scale 0-dim float32 (scale = float32(log2(e) / temperature))."""
    z = (x - m) * scale
    keep = z > -40.0
    z = torch.where(keep, z, torch.zeros_like(z))
    n = torch.floor(z)
    f = z - n
    c = [torch.tensor(v, dtype=torch.float32) for v in _EXP2_COEFFS]
    p = torch.full_like(f, _EXP2_COEFFS[0])
    for ck in c[1:]:
        p = p * f + ck
    pow2 = ((n.to(torch.int32) + (32 + 127)) << 23).view(torch.float32)
    w = (p * pow2).to(torch.int64)
    return torch.where(keep, w, torch.zeros_like(w))


def node_draw(x: Tensor, temperature: float, top_p: float, top_k: int, bits24: int) -> int:
    """One node's token: the argmax (temperature 0, or no positive mass) or the inverse-CDF draw over
    the kept set (top-k, then top-p on the integer masses; ties at either boundary kept)."""
    x = x.float().cpu()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    V = x.shape[0]
    amax = int(x.argmax())
    if temperature == 0:
        return amax
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        keep = x >= torch.topk(x, top_k).values[-1]
    scale = torch.tensor(_LOG2E / temperature, dtype=torch.float32)
    w = torch.where(keep, fixed_weights(x, x[amax], scale), torch.zeros((), dtype=torch.int64))
    if top_p < 1.0:
        wk = int(w.sum())
        if wk > 0:
            order = torch.sort(x, descending=True, stable=True).indices
            xs, ws = x[order], w[order]
            cum = torch.cumsum(ws, 0)
            start = torch.searchsorted(-xs, -xs, right=False)          # first position of each value
            above = torch.where(start > 0, cum[(start - 1).clamp_min(0)], torch.zeros_like(cum))
            keep_sorted = above.double() < top_p * float(wk)
            keep = keep & torch.zeros_like(keep).scatter(0, order, keep_sorted)
            w = torch.where(keep, w, torch.zeros_like(w))
    W = int(w.sum())
    if W == 0:
        return amax
    t = (bits24 * W) >> 24
    return int(torch.searchsorted(torch.cumsum(w, 0), torch.tensor([t]), right=True)[0])


def tree_accept(logits: Tensor, tokens: Tensor, parent: Tensor, valid: Tensor, temperature: float,
                top_p: float, top_k: int, seed: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(path [bs, T], n_accepted [bs], bonus [bs]) int64 of specmoe::tree_accept; `offset` is NOT advanced
    here. Greedy: deepest accepted node, ties to the lowest index (spec.accept.accept_greedy); sampled:
    move to the first valid child carrying the node's draw (spec.accept.accept_target_sampling)."""
    bs, T, V = logits.shape
    tok, par, val = tokens.cpu().tolist(), parent.cpu().tolist(), valid.cpu().tolist()
    seeds, offs = seed.cpu().tolist(), offset.cpu().tolist()
    path = torch.full((bs, T), -1, dtype=torch.long)
    n_acc = torch.zeros(bs, dtype=torch.long)
    bonus = torch.zeros(bs, dtype=torch.long)
    lg = logits.cpu()
    for b in range(bs):
        y = [-1] * T
        for i in range(T):
            if i == 0 or val[b][i]:
                y[i] = node_draw(lg[b, i], temperature, top_p, top_k, philox_bits24(seeds[b], offs[b], i))
        pr = [p if (i > 0 and 0 <= p < i) else -1 for i, p in enumerate(par[b])]
        ok = [i == 0 or (val[b][i] and pr[i] >= 0) for i in range(T)]
        if temperature == 0:
            depth, best = [0] * T, 0
            for i in range(1, T):
                ok[i] = ok[i] and ok[pr[i]] and tok[b][i] == y[pr[i]]
                if ok[i]:
                    depth[i] = depth[pr[i]] + 1
                    if depth[i] > depth[best]:
                        best = i
            v = best
            for j in range(depth[best], -1, -1):
                path[b, j] = v
                v = pr[v]
            n_acc[b], bonus[b] = depth[best], y[best]
        else:
            cur, nodes = 0, [0]
            while True:
                kids = [i for i in range(cur + 1, T) if ok[i] and pr[i] == cur and tok[b][i] == y[cur]]
                if not kids:
                    break
                cur = kids[0]
                nodes.append(cur)
            path[b, :len(nodes)] = torch.tensor(nodes)
            n_acc[b], bonus[b] = len(nodes) - 1, y[cur]
    dev = tokens.device
    return path.to(dev), n_acc.to(dev), bonus.to(dev)


def kv_compact(cache: "list[Tensor]", lengths: Tensor, path: Tensor, n_accepted: Tensor
               ) -> tuple["list[Tensor]", Tensor]:
    """Out-of-place specmoe::kv_compact: (new cache tensors, new lengths). Slot lengths[b] + path[b, j]
    -> lengths[b] + j for j = 1..n_accepted[b] (all sources read first); lengths += n_accepted + 1."""
    L, P, n = lengths.cpu().tolist(), path.cpu().tolist(), n_accepted.cpu().tolist()
    out = [c.clone() for c in cache]
    for c_new, c_old in zip(out, cache):
        for b in range(len(L)):
            if n[b] > 0:
                src = torch.tensor([L[b] + P[b][j] for j in range(1, n[b] + 1)], device=c_old.device)
                dst = torch.tensor([L[b] + j for j in range(1, n[b] + 1)], device=c_old.device)
                c_new[b, :, dst] = c_old[b, :, src]
    return out, lengths + n_accepted + 1


# ---- tree acceptance rules as vectorized walks (cross-checks of tree_accept and the q-aware rule) -----------
# tokens / parent / valid [bs, T] (parent[:, 0] = -1, parent[i] < i); results (path [bs, D+1] root first, -1
# padded, n_accepted [bs], bonus [bs]) with D the deepest node. Loops over the tree depth and children,
# reading the device freely: ground truth, not a hot path.

def tree_ancestors(parent: Tensor) -> Tensor:
    """parent [bs, T] -> bool [bs, T, T], A[b, i, j] = node j is node i or one of its ancestors."""
    bs, T = parent.shape
    A = torch.eye(T, dtype=torch.bool, device=parent.device).repeat(bs, 1, 1)
    rows = torch.arange(bs, device=parent.device)
    for i in range(1, T):
        A[:, i] |= A[rows, parent[:, i].clamp_min(0)] & (parent[:, i] >= 0)[:, None]
    return A


def _depth(parent: Tensor) -> Tensor:
    return tree_ancestors(parent).sum(-1) - 1


def accept_greedy(tokens: Tensor, parent: Tensor, valid: Tensor, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A node is on an accepted path when its token equals the target's argmax at its parent, and so are all
    its ancestors'; the deepest such node wins (ties: lowest index), its argmax is the bonus token."""
    bs, T = tokens.shape
    A, depth = tree_ancestors(parent), _depth(parent)
    am = logits.float().argmax(-1)
    ok = valid & (tokens == torch.gather(am, 1, parent.clamp_min(0)))
    ok[:, 0] = True
    path_ok = ~(A & ~ok[:, None, :]).any(-1)
    idx = torch.arange(T, device=tokens.device)
    key = torch.where(path_ok, depth * (T + 1) + (T - idx), torch.full_like(depth, -1))
    best = key.argmax(1)
    n = torch.gather(depth, 1, best[:, None])[:, 0]
    D = int(depth.max())
    on = A[torch.arange(bs, device=tokens.device), best]
    path = torch.full((bs, D + 2), -1, dtype=torch.long, device=tokens.device)
    path.scatter_(1, torch.where(on, depth, torch.full_like(depth, D + 1)), idx.expand(bs, T))
    return path[:, :D + 1], n, torch.gather(am, 1, best[:, None])[:, 0]


def _draw(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw per row: p [n, V] (any scale), u [n] in [0, 1) -> [n] (zero-mass tokens never)."""
    cdf = p.float().cumsum(-1)
    return torch.searchsorted(cdf, (u.float() * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=p.shape[-1] - 1)


def _walk(tokens: Tensor, parent: Tensor, choose) -> tuple[Tensor, Tensor, Tensor]:
    """Root-to-leaf acceptance walk: at each level, choose(rows, cur, alive) -> (chosen child [bs] or -1,
    the token to emit if no child is chosen [bs]); moves there or stops with that bonus token."""
    bs, T = tokens.shape
    dev = tokens.device
    D = int(_depth(parent).max())
    rows = torch.arange(bs, device=dev)
    cur = torch.zeros(bs, dtype=torch.long, device=dev)
    alive = torch.ones(bs, dtype=torch.bool, device=dev)
    n, bonus = torch.zeros_like(cur), torch.zeros_like(cur)
    path = torch.full((bs, D + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    for level in range(D + 1):
        chosen, y = choose(rows, cur, alive)
        has = alive & (chosen >= 0)
        if level < D:
            path[:, level + 1] = torch.where(has, chosen, path[:, level + 1])
        n += has.long()
        bonus = torch.where(alive & ~has, y, bonus)
        cur, alive = torch.where(has, chosen, cur), has
    return path, n, bonus


def accept_target_sampling(tokens: Tensor, parent: Tensor, valid: Tensor, p: Tensor, u: Tensor):
    """Any tree: at the current node draw y ~ p[node] with u[., node]; move to the first valid child carrying
    y, else emit y as the bonus token."""
    def choose(rows, cur, alive):
        y = _draw(p[rows, cur], u[rows, cur])
        match = (parent == cur[:, None]) & (tokens == y[:, None]) & valid
        return torch.where(match.any(1), match.long().argmax(1), torch.full_like(y, -1)), y
    return _walk(tokens, parent, choose)


def accept_q_aware(tokens: Tensor, parent: Tensor, valid: Tensor, p: Tensor, q: Tensor, u: Tensor, u_res: Tensor):
    """Trees whose children were drawn i.i.d. from q[node] (recursive rejection, SpecInfer): children in index
    order; child x accepted when u[., x] * q(x) < p(x), else p <- normalize(max(p - q, 0)); when every child is
    rejected the bonus is drawn from the final residual with u_res[., node]. p, q [bs, T, V]."""
    T = tokens.shape[1]

    def choose(rows, cur, alive):
        pr, qc = p[rows, cur].float(), q[rows, cur].float()
        chosen = torch.full_like(cur, -1)
        for b in range(len(rows)):
            if not bool(alive[b]):
                continue
            for c in range(int(cur[b]) + 1, T):
                if int(parent[b, c]) != int(cur[b]) or not bool(valid[b, c]):
                    continue
                x = int(tokens[b, c])
                if float(u[b, c]) * float(qc[b, x]) < float(pr[b, x]):
                    chosen[b] = c
                    break
                resid = (pr[b] - qc[b]).clamp_min(0)
                if float(resid.sum()) > 0:
                    pr[b] = resid / resid.sum()
        return chosen, _draw(pr, u_res[rows, cur])
    return _walk(tokens, parent, choose)

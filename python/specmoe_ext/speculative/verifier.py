"""The one verifier: a target forward over every tree node, acceptance, KV compaction. CPU, GPU eager and
GPU graph all run this body (the CUDA graph is captured around the whole step from outside).

Shape legend: bs requests, T tree nodes (node 0 = root), V vocab, D = the tree's max depth, C most children
of one node, N_f fed nodes, E experts, L_moe MoE layers, h hidden.

    geo            = cache.tree_geometry(depth, anc)     node i at slot L + i, position L + depth_i, seeing the
                                                         committed prefix and its ancestors
    logits, hidden = target(tokens, geo, cache, moe)     moe: MoE-Spec budget, padding mask, expert stats
    path, n, bonus = accept(logits, tree, plan)          greedy | target sampling: ops.tree_accept;
                                                         q-aware: `accept_q_aware` (Philox uniforms)
    ops.kv_compact(cache, cache.lengths, path, n)        accepted path -> slots L+1.., L += n + 1
    emitted [bs, D+1]                                    accepted draft tokens, then the bonus token

Acceptance rules (lossless; shared/algorithms.md section 2):
    greedy   (temperature 0) the deepest node whose path matches the target's argmax chain; output equals
             greedy autoregressive decoding token for token
    target   (any tree) at the current node draw y ~ p; move to the first valid child carrying y, else emit
             y as the bonus. Drafts may be deterministic (top-k); exact for any tree
    q        (sampled chain / static trees, whose children were drawn i.i.d. from q) SpecInfer recursive
             rejection: accept child x with probability min(1, p(x)/q(x)), else p <- norm(max(p - q, 0));
             when every child is rejected the bonus is drawn from the residual. Higher acceptance than
             `target` for a good drafter (sum min(p, q) instead of p(top-1))
One random stream per request: Philox(seed_b, offset_b); tree_accept draws node i from counter
(offset, i, 0), the q-aware rule uses streams 1 (node i's accept test) and 2 (node i's residual draw),
sampled drafting 16 + level; offset advances by one per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.generate import SamplingParams, process_logits
from ..models.model import ExpertStats, MoEControl, Transformer
from .tree import DraftTree, sample_rows

RULES = ("auto", "target", "q")
ACCEPT_STREAM = 1          # q-aware accept tests (and residual draws at ACCEPT_STREAM + 1)


def resolve_rule(rule: str, spec, greedy: bool) -> str:
    """"greedy" | "target" | "q" for a tree of this spec. auto: greedy at temperature 0, else q-aware for
    chain / static trees (drafted by sampling) and the target-sampling rule for dynamic trees and root-only
    steps."""
    if rule not in RULES:
        raise ValueError(f"acceptance rule {rule!r}: choose one of {RULES}")
    if greedy:
        return "greedy"
    if not spec.speculates:
        return "target"
    if rule == "q" and spec.kind == "dynamic":
        raise ValueError("acceptance rule 'q' needs sampled drafts: use a chain or static tree, or rule 'target'")
    if rule == "auto":
        return "target" if spec.kind == "dynamic" else "q"
    return rule


@dataclass
class Verdict:
    path: Tensor                 # [bs, T] accepted nodes root first, -1 padded
    n_accepted: Tensor           # [bs] accepted draft tokens
    bonus: Tensor                # [bs] the token emitted where the walk stopped
    emitted: Tensor              # [bs, D+1] accepted draft tokens then the bonus (index n), 0 after
    hidden: Tensor | None        # [bs, T, sum of h] the target features the drafter asked for
    stats: ExpertStats | None    # expert counts of the tree's valid nodes


def verify_control(tree: DraftTree, budget, mask_padding: bool, stats: bool) -> MoEControl:
    """MoEControl of a verify forward over tree nodes. mask_padding: invalid nodes skip the experts
    (a padding node is routed as its tree's root with weight 0: 2 element-wise ops per MoE layer).
    budget: a BudgetConfig or None; its token weights are 1 ("uniform") or the draft probability of
    reaching the node ("path"; root logp 0 -> 1), 0 on padding; the root is protected when asked.
    stats: count the valid nodes' experts (natural and routed)."""
    bs, T = tree.tokens.shape
    flat = tree.valid.reshape(-1)
    kw: dict = dict(stats=ExpertStats(mask=flat) if stats else None, token_mask=flat if mask_padding else None)
    if mask_padding:                  # a padding node routes as its tree's root (loaded anyway), weight 0
        kw["token_donor"] = torch.arange(bs, device=flat.device).repeat_interleave(T) * T
    if budget is not None:
        w = flat.float() if budget.weights == "uniform" else torch.exp(tree.logp.float()).reshape(-1) * flat
        protect = (torch.arange(T, device=flat.device) == 0).repeat(bs) if budget.protect_root else None
        kw.update(budget=budget.budget, policy=budget.policy, token_weights=w.contiguous(), protect=protect)
    return MoEControl(**kw)


def target_probs(logits: Tensor, sampling: SamplingParams) -> Tensor:
    """[bs, T, V] target logits -> [bs, T, V] float32 sampling distribution (temperature, top-k, top-p as
    in autoregressive sampling)."""
    bs, T, V = logits.shape
    return torch.softmax(process_logits(logits.reshape(bs * T, V), sampling), -1).reshape(bs, T, V)


def accept_q_aware(logits: Tensor, tree: DraftTree, sampling: SamplingParams, seed: Tensor,
                   offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The q-aware rule on the device, fixed shape (loops over the static depth and child slots): ->
    (path [bs, T], n_accepted [bs], bonus [bs]). Children are tried in index order; node i's accept test
    uses Philox uniform (seed, offset; i, stream 1), its residual draw (seed, offset; i, stream 2)."""
    from .. import ops
    bs, T, V = logits.shape
    dev = logits.device
    p = target_probs(logits, sampling)
    u = ops.philox_uniform(seed, offset, T, ACCEPT_STREAM)
    u_res = ops.philox_uniform(seed, offset, T, ACCEPT_STREAM + 1)
    rows = torch.arange(bs, device=dev)
    C = tree.kids.shape[-1]
    cur = torch.zeros(bs, dtype=torch.long, device=dev)
    alive = torch.ones(bs, dtype=torch.bool, device=dev)
    n = torch.zeros_like(cur)
    bonus = torch.zeros_like(cur)
    path = torch.full((bs, T), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    for level in range(tree.max_depth + 1):
        pr = p[rows, cur]                                                       # [bs, V] running residual
        qc = tree.q[rows, tree.fed[rows, cur].clamp_min(0)]                     # what cur's children were drawn from
        chosen = torch.full_like(cur, -1)
        for j in range(C):
            c = tree.kids[rows, cur, j]
            cc = c.clamp_min(0)
            live = alive & (c >= 0) & (chosen < 0) & tree.valid[rows, cc]
            x = tree.tokens[rows, cc][:, None]
            px, qx = pr.gather(1, x)[:, 0], qc.gather(1, x)[:, 0]
            acc = live & (u[rows, cc] * qx < px)
            chosen = torch.where(acc, c, chosen)
            resid = (pr - qc).clamp_min(0)
            tot = resid.sum(-1, keepdim=True)
            # p == q leaves no residual mass: that rejection had probability 0 (numerically possible);
            # keeping p then is as good as any choice.
            resid = torch.where(tot > 0, resid / torch.where(tot > 0, tot, torch.ones_like(tot)), pr)
            pr = torch.where((live & ~acc)[:, None], resid, pr)
        has = alive & (chosen >= 0)
        y = sample_rows(pr, u_res[rows, cur][:, None])[:, 0]
        if level + 1 < T:
            path[:, level + 1] = torch.where(has, chosen, path[:, level + 1])
        n = n + has.long()
        bonus = torch.where(alive & ~has, y, bonus)
        cur = torch.where(has, chosen, cur)
        alive = has
    return path, n, bonus


def accept(logits: Tensor, tree: DraftTree, rule: str, sampling: SamplingParams, seed: Tensor,
           offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(path [bs, T], n_accepted [bs], bonus [bs]) under `rule` ("greedy" | "target" | "q"); advances
    offset by one."""
    from .. import ops
    if rule == "q":
        out = accept_q_aware(logits, tree, sampling, seed, offset)
        offset.add_(1)
        return out
    temperature = 0.0 if rule == "greedy" else sampling.temperature
    return ops.tree_accept(logits.contiguous(), tree.tokens, tree.parent, tree.valid, temperature=temperature,
                           top_p=sampling.top_p, top_k=sampling.top_k, seed=seed, offset=offset)


def emitted_tokens(tree: DraftTree, path: Tensor, n: Tensor, bonus: Tensor) -> Tensor:
    """[bs, D+1]: the accepted draft tokens tree.tokens[path[1..n]], the bonus token at index n, 0 after."""
    D = tree.max_depth
    acc = tree.tokens.gather(1, path[:, 1:D + 1].clamp_min(0))                   # [bs, D]
    acc = torch.cat([acc, torch.zeros(acc.shape[0], 1, dtype=acc.dtype, device=acc.device)], 1)
    j = torch.arange(D + 1, device=path.device)
    return torch.where(j < n[:, None], acc, torch.where(j == n[:, None], bonus[:, None], torch.zeros_like(acc)))


def verify(target: Transformer, batch, tree: DraftTree, plan) -> Verdict:
    """The verify body (module docstring): one target forward over every node of every request's tree,
    acceptance, KV compaction of the accepted paths. Device tensors only."""
    from .. import ops
    cache = batch.cache
    geo = cache.tree_geometry(tree.depth, tree.anc)
    moe = verify_control(tree, plan.budget, plan.mask_padding, plan.stats)
    logits, hidden = target(tree.tokens, geo, cache, moe, hidden_layers=plan.hidden_layers)
    path, n, bonus = accept(logits, tree, plan.rule, plan.sampling, batch.seed, batch.offset)
    ops.kv_compact(cache.k + cache.v, cache.lengths, path, n)
    return Verdict(path, n, bonus, emitted_tokens(tree, path, n, bonus),
                   torch.cat(hidden, -1) if hidden else None, moe.stats)

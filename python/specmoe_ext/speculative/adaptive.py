"""Lossless adaptive verification (EVICT-style, shared/algorithms.md section 6): before the target verifies a
drafted tree, keep only the nodes whose expected gain pays for the time they add; the others become invalid
nodes (the tree keeps its fixed shape; invalid nodes are never accepted and skip the experts).

Shape legend: bs requests, T tree nodes, D the tree's max depth, V vocab, M nodes kept beyond the roots over
the batch, Q calibration buckets, E experts, K experts per token, L_moe MoE layers.

    gain(i)   = P(node i accepted) = prod over the path root..i (root excluded) of c(f_j)
                f_j  the drafter's confidence for node j: the conditional draft probability of its token
                     (greedy and target rule), or for the q-aware rule the largest draft probability at its
                     PARENT (a decision that must not depend on the sampled token itself, or the rejection
                     sampling would no longer see i.i.d. draws)
                c(f) the calibrated acceptance rate of nodes whose parent was accepted, per confidence bucket
                     of f, learned online on the device from every step's accepted paths (decayed counts;
                     the prior of a bucket without data is its own confidence, weight PRIOR trials), so gains
                     are honest when the drafter is over- or under-confident
    time(M)   = fixed + T_verify(t = bs + M tokens, N_B(t) experts)      (perf_model.PerfProfile: the fitted
                MoESD model; N(t) = E (1 - (1 - rho)^t) with rho an online estimate of the activation rate,
                from each step's distinct experts, warm-started from the profile's meta["rho_eff"] or K/E;
                fixed = the step's draft forwards + acceptance, which the truncation does not change)
    choose    M* = argmax_M (bs + sum of the M largest gains) / time(M)
              over every node of the batch at once (the step time is the batch's), nodes of finished rows
              and invalid nodes having gain 0; a node's gain never exceeds its parent's and ties keep
              index order, so the M* best nodes are ancestor-closed prefixes of each request's tree in
              draft-score order; the root is always kept.
Everything runs on the device inside the step (graph-capturable, no host read); `table()` reads the
calibration once, after the loop. Lossless: only whole subtrees are removed before verification, by a
decision that depends on draft-side values only (for the q-aware rule: on the accepted context only).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .perf_model import PerfProfile
from .tree import DraftTree, compact_tree

BUCKETS = 12                     # confidence buckets on a log scale: [1, 1/2), [1/2, 1/4), ... , [2^-11, 0]
PRIOR = 2.0                      # pseudo-trials at the bucket's own confidence (geometric midpoint)


def _bucket(f: Tensor) -> Tensor:
    """Confidence in [0, 1] -> bucket 0 (most confident) .. BUCKETS - 1, halving per bucket."""
    return (-torch.log2(f.clamp_min(1e-30))).floor().long().clamp(0, BUCKETS - 1)


class AdaptiveVerifier:
    """The truncation's device state (calibration counts, activation-rate estimate) and the two step hooks."""

    def __init__(self, profile: PerfProfile, device, decay: float = 0.98):
        if not 0 < decay <= 1:
            raise ValueError(f"adaptive verification: decay must be in (0, 1], got {decay}")
        self.profile, self.decay = profile, decay
        p = profile.params
        self.E, self.K, self.RP = profile.E, profile.K, profile.RP
        self._p = (p["bias"], p["k1"], p["k2"], p["k3"], p["s"], p["lam"])
        rho0 = float(profile.meta.get("rho_eff", profile.K / profile.E))
        self.trials = torch.zeros(BUCKETS, dtype=torch.float32, device=device)
        self.accepts = torch.zeros(BUCKETS, dtype=torch.float32, device=device)
        self.rho = torch.full((), rho0, dtype=torch.float32, device=device)
        self.rho0 = rho0
        i = torch.arange(BUCKETS, dtype=torch.float32, device=device)
        self._mid = torch.where(i < BUCKETS - 1, 2.0 ** (-i - 0.5), torch.full_like(i, 2.0 ** -BUCKETS))

    def reset(self) -> None:
        self.trials.zero_()
        self.accepts.zero_()
        self.rho.fill_(self.rho0)

    # ---- gains -------------------------------------------------------------------------------------------
    def _confidence(self, tree: DraftTree, rule: str) -> Tensor:
        """[bs, T] f of every node (see the module docstring); the root's is unused."""
        if rule == "q":
            parent = tree.parent.clamp_min(0)
            qmax = tree.q.amax(-1)                                            # [bs, N_f] per fed node
            fed_parent = tree.fed.gather(1, parent).clamp_min(0)
            return qmax.gather(1, fed_parent)
        return torch.exp(tree.logp - tree.logp.gather(1, tree.parent.clamp_min(0))).nan_to_num(0.0)

    def calibrated(self) -> Tensor:
        """[Q] acceptance rate per confidence bucket: (accepts + PRIOR * f_mid) / (trials + PRIOR), f_mid the
        bucket's confidence (a drafter is taken at its word until the counts say otherwise)."""
        return (self.accepts + PRIOR * self._mid) / (self.trials + PRIOR)

    def gains(self, tree: DraftTree, rule: str, live: Tensor) -> Tensor:
        """[bs, T] P(node accepted): the product of calibrated rates along its path (exact products level by
        level, so a child never outranks its parent); 0 for invalid nodes and rows that no longer generate."""
        c = self.calibrated()[_bucket(self._confidence(tree, rule))]          # [bs, T]
        g = torch.ones_like(c)
        parent = tree.parent.clamp_min(0)
        for d in range(1, tree.max_depth + 1):
            g = torch.where(tree.depth == d, g.gather(1, parent) * c, g)
        return torch.where(tree.valid & live[:, None], g, torch.zeros_like(g))

    # ---- time ---------------------------------------------------------------------------------------------
    def _growth(self, t: Tensor) -> Tensor:
        bias, k1, k2, k3, s, lam = self._p
        knee, ls = lam * self.RP, math.log(s)
        base = torch.exp(torch.minimum(t, torch.full_like(t, knee)) * ls)
        return torch.where(t <= knee, base, base * (1 + ls * (t - knee)))

    def verify_time(self, t: Tensor, budget: int | None, t_experts: Tensor | None = None) -> Tensor:
        """Predicted target-forward seconds over t tokens (tensor), MoESD with the online activation rate; the
        distinct experts come from t_experts tokens (default t: a compacted tree's padding nodes run the
        forward but route to their root's experts)."""
        bias, k1, k2, k3, s, lam = self._p
        n = self.E * (1 - (1 - self.rho) ** (t if t_experts is None else t_experts))
        if budget is not None:
            n = n.clamp(max=float(budget))
        n = n.clamp_min(1e-6)
        return bias + k1 * self._growth(t) + k2 * n + k3 * self._growth(t * self.K / n)

    def fixed_time(self, bs: int, plan) -> float:
        """Seconds of the step the truncation does not change: its draft forwards and acceptance."""
        pr = self.profile
        n_draft = len(plan.tree.frontier_widths()) if plan.speculates else 0
        return float(n_draft * pr.t_draft(bs) + pr.t_reject(bs))

    # ---- the two step hooks ---------------------------------------------------------------------------------
    def truncate(self, batch, tree: DraftTree, plan) -> Tensor:
        """Invalidate (in place) the nodes not worth verifying -> the predicted step time [1] (seconds)."""
        return self._truncate(batch, tree, plan, None)[0]

    def truncate_to_width(self, batch, tree: DraftTree, plan, width: int | None) -> tuple[DraftTree, Tensor]:
        """`truncate` with at most width - 1 nodes beyond the root per request, then the kept nodes compacted
        into a tree of `width` nodes (tree.compact_tree): the verify forward runs over bs * width tokens
        instead of every drafted node -> (that tree, the predicted step time [1]). width None: `truncate`,
        the tree kept whole."""
        predicted, gains = self._truncate(batch, tree, plan, width)
        return (tree if width is None else compact_tree(tree, gains, width)), predicted

    def _truncate(self, batch, tree: DraftTree, plan, width: int | None) -> tuple[Tensor, Tensor]:
        bs, T = tree.tokens.shape
        live = ~batch.finished
        gains = self.gains(tree, plan.rule, live)
        g = gains[:, 1:]
        if width is not None:          # a request's own width - 1 best nodes only (ties: lower index)
            rank = torch.sort(g, dim=1, descending=True, stable=True).indices.argsort(dim=1)
            g = torch.where(rank < width - 1, g, torch.zeros_like(g))
        g = g.reshape(-1)                                                       # non-root nodes, row-major
        order = torch.sort(g, descending=True, stable=True).indices
        cum = torch.cat([g.new_zeros(1), g[order].cumsum(0)])                   # [bs*(T-1) + 1]
        m = torch.arange(cum.numel(), device=g.device, dtype=torch.float32)
        n_live = live.sum().float()
        budget = plan.budget.budget if plan.budget is not None and isinstance(plan.budget.budget, int) else None
        if width is None:
            time = self.fixed_time(bs, plan) + self.verify_time(bs + m, budget)
        else:                          # the compacted forward always runs bs * width tokens
            time = self.fixed_time(bs, plan) + self.verify_time(torch.full_like(m, bs * width), budget, bs + m)
        best = ((n_live + cum) / time).argmax()
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=g.device))
        keep = (rank < best).view(bs, T - 1) & (g.view(bs, T - 1) > 0)
        tree.valid[:, 1:] &= keep
        kept = torch.cat([gains[:, :1], torch.where(keep, gains[:, 1:], torch.zeros_like(gains[:, 1:]))], 1)
        return time.gather(0, best.reshape(1)), kept    # not time[best]: a 0-d index tensor is read on the host

    def observe(self, tree: DraftTree, verdict, plan) -> None:
        """Update the calibration from this step's accepted paths (every valid node whose parent was
        accepted is a trial; it succeeds when it is accepted too) and the activation-rate estimate from the
        distinct experts the verified nodes wanted."""
        bs, T = tree.tokens.shape
        on = torch.zeros(bs, T + 1, dtype=torch.bool, device=tree.tokens.device)
        on.scatter_(1, torch.where(verdict.path >= 0, verdict.path, T), True)
        on = on[:, :T]
        trial = tree.valid & on.gather(1, tree.parent.clamp_min(0))
        trial[:, 0] = False
        b = _bucket(self._confidence(tree, plan.rule))
        self.trials.mul_(self.decay).scatter_add_(0, b.flatten(), trial.flatten().float())
        self.accepts.mul_(self.decay).scatter_add_(0, b.flatten(), (trial & on).flatten().float())
        if verdict.stats is not None:
            t = tree.valid.sum().float()
            frac = (verdict.stats.touched().float() / self.E).clamp(max=1 - 1e-6)
            rho = 1 - torch.exp(torch.log1p(-frac).mean() / t)
            self.rho.mul_(self.decay).add_((1 - self.decay) * rho.clamp(1e-6, 1.0))

    def table(self) -> dict:
        """Host copy of the calibration (after the loop): per bucket, its confidence range, decayed trial
        and acceptance counts and the calibrated rate; and the activation-rate estimate."""
        trials, acc, rate = self.trials.tolist(), self.accepts.tolist(), self.calibrated().tolist()
        rows = [{"confidence": [2.0 ** -(i + 1) if i < BUCKETS - 1 else 0.0, 2.0 ** -i],
                 "trials": round(n, 2), "accepted": round(a, 2), "rate": round(r, 4)}
                for i, (n, a, r) in enumerate(zip(trials, acc, rate))]
        return {"buckets": rows, "rho_eff": round(float(self.rho), 5), "rho_uniform": self.K / self.E}

"""MoESD performance model: when does speculative decoding pay for an MoE (shared/algorithms.md section 5).

Pure numpy (scipy only for `fit`, imported lazily). No torch, no GPU: the caller measures step times
(e.g. with CUDA events) and hands them in as `Point`s; this module fits and predicts.

Legend (units and shapes)
    bs       requests in the batch (int >= 1)
    t        tokens processed by one target forward over the whole batch (t = bs * n_tok)
    n_tok    tokens per request in one target forward: 1 = autoregressive step, gamma for a chain verify
             (as written in section 5: T_T(bs, gamma) uses t = bs * gamma), T for a tree of T nodes
    gamma    draft length of a chain (draft forwards per step)
    E, K     experts per MoE layer, experts per token (top-k);  rho = K / E
    B        expert budget per layer (K <= B <= E), None = no budget
    RP       ridge point of the GPU = peak FLOP/s / peak bytes/s (FLOP per byte, a hardware constant,
             not fitted)
    times    seconds (float) everywhere; parameters bias, k1, k2, k3, draft_bias, draft_k, reject_bias,
             reject_k are seconds (or seconds per G unit / per expert / per request); s, lam unitless

The 10 fitted parameters (PARAM_NAMES order) and where each is used:
    T_ar(bs)          = T_target(bs, 1)
    T_ver(bs, n, B)   = T_target(bs, n, B)
    T_target(bs,n,B)  = bias + k1*G(t) + k2*N_B(t) + k3*G(t*K/N_B(t)),   t = bs*n,
                        N_B(t) = min(B, N(t))  (or a measured distinct-expert count when given)
        bias  time of everything not scaling with tokens/experts (non-expert weight reads, launches)
        k1    dense (attention + shared) compute growth with tokens
        k2    time per activated expert (reading one expert's weights, all MoE layers)
        k3    per-expert compute growth with tokens per active expert t*K/N
        s,lam roofline shape of G (s = growth rate, lam*RP = knee in tokens)
    T_draft(bs)       = draft_bias + draft_k * G(bs)         (one draft forward; a step runs gamma)
    T_reject(bs)      = reject_bias + reject_k * bs          (accept/reject + KV compaction)
    T_step(bs,g,B)    = g * T_draft(bs) + T_ver(bs, g, B) + T_reject(bs)
    speedup           = tokens_per_step(alpha, g) * T_ar(bs) / T_step(bs, g, B)
Identifiability: G(t) ~ 1 for small t, so k1 and k3 also carry a constant part that trades off against
bias, and k1/k3/lam trade off against each other over bs in 1..64.  On ~20 synthetic points (+1% noise)
k2, s, draft_*, reject_* come back within 10%, bias within ~25%, k1/k3/lam not individually; the
predicted times (held-out MAPE < 2%) and speedups are what the fit is for.  Points spread over batch
sizes AND tokens per request (and budgets) are needed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

PARAM_NAMES = ("bias", "k1", "k2", "k3", "s", "lam", "draft_bias", "draft_k", "reject_bias", "reject_k")
POINT_KINDS = ("target", "draft", "reject", "step")
_G_LOG_CAP = 690.0          # exp(690) ~ 1e300: G saturates there instead of overflowing to inf


def _need_scipy():
    try:
        from scipy.optimize import least_squares
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ImportError("specmoe_ext.speculative.perf_model.fit needs scipy (pip install scipy); the rest of the "
                          "performance model (prediction, profiles) works without it") from e
    return least_squares


# ---------------------------------------------------------------------------------------------- formulas
def experts_activated(t, E: int, K: int, budget: int | None = None, measured=None):
    """Expected distinct experts per layer hit by t tokens: N(t) = E * (1 - ((E-K)/E)^t).

    t: scalar or array (tokens, >= 0; may be fractional).  With `measured` (scalar/array of measured
    distinct-expert counts, same shape as t) that count replaces N(t).  With a budget B the result is
    min(B, N(t)).  Contract: 0 <= result <= min(E, B), monotone non-decreasing in t, N(1) = K."""
    if not (0 < K <= E):
        raise ValueError(f"need 0 < K <= E, got K={K}, E={E}")
    t = np.asarray(t, dtype=float)
    n = np.asarray(measured, dtype=float) if measured is not None else E * (1.0 - ((E - K) / E) ** t)
    if budget is not None:
        if budget < K:
            raise ValueError(f"budget B={budget} < K={K}")
        n = np.minimum(float(budget), n)
    return n if n.ndim else float(n)


def full_activation_threshold(E: int, K: int, tau: float = 0.95) -> int:
    """Smallest t with N(t) >= tau*E: t_thres = ceil(log_(1-rho)(1-tau)), rho = K/E (1 when K == E)."""
    if not (0 < K <= E) or not (0 < tau < 1):
        raise ValueError("need 0 < K <= E and 0 < tau < 1")
    if K == E:
        return 1
    rho = K / E
    return int(math.ceil(math.log(1 - tau) / math.log(1 - rho) - 1e-12))


def tokens_per_active_expert(t, E: int, K: int, budget: int | None = None, measured=None):
    """Mean tokens per active expert t*K / N_B(t) (0 at t = 0)."""
    t = np.asarray(t, dtype=float)
    n = np.asarray(experts_activated(t, E, K, budget, measured), dtype=float)
    out = np.where(n > 0, t * K / np.maximum(n, 1e-300), 0.0)
    return out if out.ndim else float(out)


def roofline_growth(t, s: float, lam: float, RP: float):
    """G(t) = s^t for t <= lam*RP, else s^(lam*RP) * (1 + ln(s)*(t - lam*RP)).

    Continuous with continuous slope at the knee t = lam*RP (value and derivative ln(s)*s^(lam*RP) match).
    Saturates near 1e300 instead of overflowing for extreme s, RP."""
    t = np.asarray(t, dtype=float)
    knee = lam * RP
    ls = math.log(s)
    expo = np.minimum(np.minimum(t, knee) * ls, _G_LOG_CAP)
    base = np.exp(expo)
    out = np.where(t <= knee, base, base * (1.0 + ls * (t - knee)))
    return out if out.ndim else float(out)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Tokens emitted per step by a chain of gamma drafts with i.i.d. acceptance alpha (bonus included):
    (1 - alpha^(gamma+1)) / (1 - alpha); gamma + 1 at alpha = 1, 1 at gamma = 0."""
    if not (0.0 <= alpha <= 1.0) or gamma < 0:
        raise ValueError("need 0 <= alpha <= 1 and gamma >= 0")
    if alpha >= 1.0 - 1e-12:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def mape(predicted, measured) -> float:
    """Mean absolute percentage error, in percent: 100 * mean(|p - m| / |m|). Measured must be nonzero."""
    p = np.asarray(predicted, dtype=float).ravel()
    m = np.asarray(measured, dtype=float).ravel()
    if p.shape != m.shape or m.size == 0:
        raise ValueError("predicted and measured need the same nonzero length")
    if np.any(m == 0):
        raise ValueError("measured contains 0")
    return float(100.0 * np.mean(np.abs(p - m) / np.abs(m)))


# ------------------------------------------------------------------------------------------ data types
@dataclass
class Point:
    """One measured time.  kind:
        "target": one target forward over bs requests x n_tok tokens (n_tok=1: autoregressive step), budget
                  B or None, optional measured distinct experts per layer (n_experts) replacing N(t)
        "draft":  one draft forward at batch bs
        "reject": the accept/reject + compaction part of one step at batch bs
        "step":   a whole speculative step: n_tok = gamma (draft forwards and verify tokens per request)"""
    kind: str
    bs: int
    time_s: float
    n_tok: int = 1
    budget: int | None = None
    n_experts: float | None = None

    def __post_init__(self):
        if self.kind not in POINT_KINDS:
            raise ValueError(f"kind {self.kind!r} not in {POINT_KINDS}")
        if self.bs < 1 or self.n_tok < 1 or not self.time_s > 0:
            raise ValueError("need bs >= 1, n_tok >= 1, time_s > 0")


@dataclass
class PerfProfile:
    """Hardware/model constants + the 10 fitted parameters; JSON-serialisable (the controller's warm start).

    E, K, RP are constants; params maps every name of PARAM_NAMES to a float.  `meta` is free-form
    (model name, GPU, fit MAPE, points used ...)."""
    E: int
    K: int
    RP: float
    params: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [n for n in PARAM_NAMES if n not in self.params]
        if missing:
            raise ValueError(f"profile params missing {missing}")
        self.params = {n: float(self.params[n]) for n in PARAM_NAMES}

    # ---- time model (seconds) --------------------------------------------------------------------------
    def _G(self, t):
        p = self.params
        return roofline_growth(t, p["s"], p["lam"], self.RP)

    def t_target(self, bs, n_tok=1, budget: int | None = None, n_experts=None):
        """Time of one target forward over bs*n_tok tokens (scalar or array inputs broadcast)."""
        p = self.params
        t = np.asarray(bs, dtype=float) * np.asarray(n_tok, dtype=float)
        n = np.asarray(experts_activated(t, self.E, self.K, budget, n_experts), dtype=float)
        out = p["bias"] + p["k1"] * self._G(t) + p["k2"] * n + p["k3"] * self._G(t * self.K / n)
        return out if np.ndim(out) else float(out)

    def t_ar(self, bs):
        """Autoregressive step time at batch bs (no budget: budgeting an AR step is not a setting here)."""
        return self.t_target(bs, 1)

    def t_verify(self, bs, n_tok, budget: int | None = None, n_experts=None):
        return self.t_target(bs, n_tok, budget, n_experts)

    def t_draft(self, bs):
        p = self.params
        out = p["draft_bias"] + p["draft_k"] * self._G(np.asarray(bs, dtype=float))
        return out if np.ndim(out) else float(out)

    def t_reject(self, bs):
        p = self.params
        out = p["reject_bias"] + p["reject_k"] * np.asarray(bs, dtype=float)
        return out if np.ndim(out) else float(out)

    def t_step(self, bs, gamma, budget: int | None = None, n_verify=None, n_draft=None):
        """Speculative step: n_draft draft forwards (default gamma) + one verify over n_verify tokens per
        request (default gamma, as in section 5; pass the tree size T for trees) + reject.
        gamma = 0 means speculation off: returns T_ar(bs)."""
        if gamma == 0:
            return self.t_ar(bs)
        nd = gamma if n_draft is None else n_draft
        nv = gamma if n_verify is None else n_verify
        return nd * self.t_draft(bs) + self.t_verify(bs, nv, budget) + self.t_reject(bs)

    def predict_speedup(self, bs, gamma, alpha, budget: int | None = None, tokens_per_step=None,
                        n_verify=None, n_draft=None) -> float:
        """Predicted speedup over autoregressive decoding at batch bs:
        tokens_per_step * T_ar(bs) / T_step(bs, gamma, B).  tokens_per_step defaults to
        expected_tokens_per_step(alpha, gamma) (chain, i.i.d. acceptance); pass a measured value for trees
        or budgets (a budget may lower acceptance: the model does not know by how much).  Equals the
        Cascade utility U of the setting."""
        if gamma == 0:
            return 1.0
        tps = expected_tokens_per_step(alpha, gamma) if tokens_per_step is None else tokens_per_step
        return float(tps * self.t_ar(bs) / self.t_step(bs, gamma, budget, n_verify, n_draft))

    def predict_point(self, pt: Point) -> float:
        if pt.kind == "target":
            return float(self.t_target(pt.bs, pt.n_tok, pt.budget, pt.n_experts))
        if pt.kind == "draft":
            return float(self.t_draft(pt.bs))
        if pt.kind == "reject":
            return float(self.t_reject(pt.bs))
        return float(pt.n_tok * self.t_draft(pt.bs) + self.t_target(pt.bs, pt.n_tok, pt.budget, pt.n_experts)
                     + self.t_reject(pt.bs))

    def predict_points(self, points: Sequence[Point]) -> np.ndarray:
        return np.array([self.predict_point(p) for p in points])

    # ---- JSON ---------------------------------------------------------------------------------------------
    def to_json(self, path: str | None = None) -> str:
        """Serialise (and write to `path` when given). Format: {"version":1,"E","K","RP","params","meta"}."""
        s = json.dumps({"version": 1, **asdict(self)}, indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(s + "\n")
        return s

    @classmethod
    def from_json(cls, text_or_path: str) -> "PerfProfile":
        """Inverse of to_json: accepts the JSON text or a path to the file."""
        s = text_or_path
        if not s.lstrip().startswith("{"):
            with open(s) as f:
                s = f.read()
        d = json.loads(s)
        if d.get("version", 1) != 1:
            raise ValueError(f"unsupported profile version {d.get('version')}")
        return cls(E=int(d["E"]), K=int(d["K"]), RP=float(d["RP"]), params=d["params"], meta=d.get("meta", {}))


# ------------------------------------------------------------------------------------------------- fit
def default_bounds(dense_bytes: float | None = None, expert_bytes: float | None = None,
                   bandwidth_Bps: float | None = None) -> dict:
    """Bounds of section 5 as {name: (lo, hi)}.

    Reading of "bias and k2 between the weight-bytes/bandwidth time of dense and of one expert and 5x
    that" used here: bias in [D, 5D] with D = dense_bytes / bandwidth (all non-expert weights: attention,
    embeddings, router, shared experts, every layer), k2 in [X, 5X] with X = expert_bytes / bandwidth (one
    expert's weights summed over all MoE layers).  Without the byte counts both are only >= 0.
    lam in [0.2, 1], s in [1, 2], everything else in [0, inf)."""
    b = {n: (0.0, np.inf) for n in PARAM_NAMES}
    b["lam"] = (0.2, 1.0)
    b["s"] = (1.0, 2.0)
    if bandwidth_Bps:
        if dense_bytes:
            D = dense_bytes / bandwidth_Bps
            b["bias"] = (D, 5.0 * D)
        if expert_bytes:
            X = expert_bytes / bandwidth_Bps
            b["k2"] = (X, 5.0 * X)
    return b


@dataclass
class FitResult:
    profile: PerfProfile
    mape_pct: float            # in-sample MAPE (percent)
    cost: float                # least_squares cost (0.5 * sum of squared relative residuals)
    success: bool
    message: str
    n_points: int


def fit(points: Sequence[Point], E: int, K: int, RP: float, bounds: dict | None = None,
        dense_bytes: float | None = None, expert_bytes: float | None = None,
        bandwidth_Bps: float | None = None, x0: dict | None = None, n_starts: int = 4, max_nfev: int = 400,
        meta: dict | None = None) -> FitResult:
    """Fit the 10 parameters to measured points by bounded least squares (scipy least_squares, 'trf') on
    relative residuals (pred - meas) / meas, so every point weighs the same whatever its scale.

    bounds: {name: (lo, hi)} overriding default_bounds(dense_bytes, expert_bytes, bandwidth_Bps).
    Several starts (different s, lam: the fit is non-convex in them) are tried; the lowest cost wins.
    Parameters no point constrains (e.g. draft_* without "draft"/"step" points) stay at their start."""
    least_squares = _need_scipy()
    points = list(points)
    if len(points) < 3:
        raise ValueError("need at least 3 points")
    bd = default_bounds(dense_bytes, expert_bytes, bandwidth_Bps)
    if bounds:
        bd.update({k: tuple(v) for k, v in bounds.items()})
    lo = np.array([bd[n][0] for n in PARAM_NAMES], dtype=float)
    hi = np.array([bd[n][1] for n in PARAM_NAMES], dtype=float)
    if np.any(lo > hi):
        raise ValueError("a lower bound exceeds its upper bound")
    meas = np.array([p.time_s for p in points])

    def clip(v, i):
        # strictly inside the box (trf needs a feasible start)
        a, b = lo[i], hi[i]
        if np.isfinite(b) and b > a:
            return float(min(max(v, a + 1e-9 * (b - a)), b - 1e-9 * (b - a)))
        return float(max(v, a + 1e-12)) if not np.isfinite(b) else float(a)

    tmed = float(np.median(meas))
    base = {"bias": 0.5 * tmed, "k1": 0.05 * tmed, "k2": 0.01 * tmed, "k3": 0.05 * tmed,
            "s": 1.01, "lam": 0.5, "draft_bias": 0.1 * tmed, "draft_k": 0.01 * tmed,
            "reject_bias": 0.01 * tmed, "reject_k": 0.001 * tmed}
    for n in ("bias", "k2"):      # start inside the physical range when it is known
        if np.isfinite(hi[PARAM_NAMES.index(n)]):
            i = PARAM_NAMES.index(n)
            base[n] = 1.5 * lo[i]
    if x0:
        base.update(x0)
    starts = []
    for s0, l0 in [(base["s"], base["lam"]), (1.001, 0.5), (1.05, 0.3), (1.2, 0.8), (1.005, 1.0)][:max(1, n_starts)]:
        d = dict(base, s=s0, lam=l0)
        starts.append(np.array([clip(d[n], i) for i, n in enumerate(PARAM_NAMES)]))

    # vectorised form of PerfProfile.predict_point over all points (the fit calls it thousands of times)
    kind = np.array([p.kind for p in points])
    bs = np.array([p.bs for p in points], dtype=float)
    ntok = np.array([p.n_tok for p in points], dtype=float)
    budg = np.array([np.inf if p.budget is None else p.budget for p in points], dtype=float)
    nexp = np.array([np.nan if p.n_experts is None else p.n_experts for p in points], dtype=float)
    t = bs * ntok
    n_act = np.where(np.isnan(nexp), E * (1.0 - ((E - K) / E) ** t), nexp)
    n_act = np.minimum(budg, n_act)
    tpe = t * K / n_act
    is_t, is_d, is_r, is_s = (kind == "target"), (kind == "draft"), (kind == "reject"), (kind == "step")

    def residuals(x):
        bias, k1, k2, k3, s, lam, db, dk, rb, rk = x
        with np.errstate(over="ignore", invalid="ignore"):
            tgt = bias + k1 * roofline_growth(t, s, lam, RP) + k2 * n_act + k3 * roofline_growth(tpe, s, lam, RP)
            drf = db + dk * roofline_growth(bs, s, lam, RP)
            rej = rb + rk * bs
            pred = np.where(is_t, tgt, 0.0) + np.where(is_d, drf, 0.0) + np.where(is_r, rej, 0.0) \
                + np.where(is_s, ntok * drf + tgt + rej, 0.0)
            r = (pred - meas) / meas
        return np.nan_to_num(r, nan=1e6, posinf=1e6, neginf=-1e6)

    best = None
    for xs in starts:
        res = least_squares(residuals, xs, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev,
                            xtol=1e-9, ftol=1e-9, gtol=1e-9)
        if best is None or res.cost < best.cost:
            best = res
    prof = PerfProfile(E, K, RP, dict(zip(PARAM_NAMES, best.x)), meta=dict(meta or {}))
    m = mape(prof.predict_points(points), meas)
    prof.meta.setdefault("fit_mape_pct", m)
    prof.meta.setdefault("fit_points", len(points))
    return FitResult(prof, m, float(best.cost), bool(best.success), str(best.message), len(points))


def synthetic_points(profile: PerfProfile, specs: Iterable[tuple], noise: float = 0.0,
                     seed: int = 0) -> list[Point]:
    """Points generated by the model itself (tests, dry runs of `specmoe plan`): specs are tuples
    (kind, bs, n_tok, budget); each time is multiplied by (1 + noise * N(0,1))."""
    rng = np.random.default_rng(seed)
    out = []
    for kind, bs, n_tok, budget in specs:
        pt = Point(kind, int(bs), 1.0, int(n_tok), budget)
        pt.time_s = profile.predict_point(pt) * (1.0 + noise * rng.standard_normal())
        out.append(pt)
    return out


# ------------------------------------------------------------------------------------- planning helpers
def default_plan(max_bs: int = 64, n_toks: Sequence[int] = (1, 4, 8), budgets: Sequence[int | None] = (None,),
                 n_draft: int = 3, n_reject: int = 3) -> list[tuple]:
    """A measurement design of about 20 points for `specmoe plan`: (kind, bs, n_tok, budget) tuples.

    Target forwards over bs = 1, 2, 4, ..., max_bs at n_tok = 1 (the AR curve), the other n_toks at a
    spread of batch sizes (every other power of two), each budget (not None) at the smallest and
    largest of those; plus n_draft draft and n_reject reject points spread over bs."""
    bss = [1 << i for i in range(int(math.log2(max_bs)) + 1)]
    specs = [("target", b, 1, None) for b in bss]
    for n in n_toks:
        if n == 1:
            continue
        specs += [("target", b, n, None) for b in bss[::2]]
        for B in budgets:
            if B is not None:
                specs += [("target", bss[0], n, B), ("target", bss[-1], n, B)]

    def spread(k):
        idx = np.unique(np.linspace(0, len(bss) - 1, max(1, k)).round().astype(int))
        return [bss[i] for i in idx]
    specs += [("draft", b, 1, None) for b in spread(n_draft)]
    specs += [("reject", b, 1, None) for b in spread(n_reject)]
    return specs


def best_setting(profile: PerfProfile, bs: int, alpha: float, gammas: Sequence[int] = (1, 2, 3, 4, 6, 8),
                 budgets: Sequence[int | None] = (None,)) -> tuple[int, int | None, float]:
    """argmax over (gamma, B) of the predicted speedup at (bs, alpha); (0, None, 1.0) when none beats
    autoregressive decoding.  Chain drafting, i.i.d. acceptance (the budget's effect on alpha ignored)."""
    best = (0, None, 1.0)
    for g in gammas:
        for B in budgets:
            sp = profile.predict_speedup(bs, g, alpha, B)
            if sp > best[2]:
                best = (int(g), B, float(sp))
    return best

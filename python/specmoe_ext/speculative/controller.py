"""Cascade controller, extended to the expert budget (shared/algorithms.md section 4).

Chooses, per request or per batch bucket (one controller each; see `ControllerBank`), the speculation
setting of the next step from measured step times and emitted tokens.  No timing code inside: the caller
measures (e.g. CUDA events read a few steps late, so no host sync is added to the step) and calls
`observe`.  Pure Python, no torch.

    ctl = CascadeController(make_candidates(ks=(0, 1, 2, 4, 8), budgets=(None, 16)))
    loop:  s = ctl.next_setting()          # Setting(k, budget); k = 0 means speculation off
           ... run one step with s ...
           ctl.observe(s, step_time_s, tokens_emitted)     # may arrive late / out of order

Units: step_time_s = seconds of one whole step (draft + verify + accept; for k = 0 one plain decode
step); tokens_emitted = tokens the step emitted over the whole batch (a k = 0 step emits bs).
Utility of a setting, as a throughput ratio (equal to section 4's U when a k = 0 step emits 1 token per
request, and well defined for a batch):
    U(s) = (tokens(s) / time(s)) / (tokens(0) / time(0))
         = tokens_per_step(s) * T_step(0) / T_step(s)      (tokens per step normalised by tokens(0))
Phases:
    test   every active candidate (k = 0 always included, first) runs `test_steps` steps; when a
           candidate's observations lag (late events), extra test steps go to the least-measured one
           until each has `test_steps` observations (after dropping `warmup_steps` per candidate)
    set    best = argmax U; if U(best) >= 1 + margin, run best for `set_steps` steps (default 10x the
           test phase) and reset the back-off; otherwise speculation off (k = 0) for
           set_steps * backoff steps, backoff doubling (up to max_backoff) on each consecutive "off"
    then a new test phase.  A set phase also ends early (`drift_tol`) when the chosen setting's
    measured throughput falls below (1 - drift_tol) x its test-phase throughput (environment changed).
Warm start (optional): a perf_model.PerfProfile predicts U of each candidate at (bs, alpha); candidates
predicted below `prune_below` are never tested, the rest are tested in predicted order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence


@dataclass(frozen=True, order=True)
class Setting:
    """k: speculation length (chain) or tree size (nodes), 0 = off; budget: expert budget B or None."""
    k: int
    budget: int | None = None

    def __post_init__(self):
        if self.k < 0:
            raise ValueError("k must be >= 0")
        if self.k == 0 and self.budget is not None:
            raise ValueError("k = 0 (no speculation) takes no budget")

    @property
    def off(self) -> bool:
        return self.k == 0


OFF = Setting(0)


def make_candidates(ks: Iterable[int] = (0, 1, 2, 4, 8), budgets: Iterable[int | None] = (None,)) -> list[Setting]:
    """Cartesian product ks x budgets (k = 0 once, without budget); OFF first."""
    out = [OFF]
    for k, b in itertools.product(ks, budgets):
        if k > 0:
            s = Setting(int(k), b)
            if s not in out:
                out.append(s)
    return out


CANDIDATES_SYNTAX = "k=K1,K2,...[;budget=B1,B2,...]   (e.g. 'k=0,1,2,4;budget=none,32'; 'none' = no budget)"


def parse_candidates(text: str) -> list[Setting]:
    """The `--spec-candidates` syntax: "k=0,1,2,4;budget=none,32" -> make_candidates(ks, budgets).

    Sections separated by ';', each "name=v1,v2,..."; k (speculation lengths, 0 = off; required) and budget
    (expert budgets B, 'none' = no budget; default none). k = 0 is always a candidate (the baseline), and
    takes no budget. Raises ValueError with the expected syntax on anything else."""
    def bad(why: str) -> ValueError:
        return ValueError(f"--spec-candidates {text!r}: {why}; expected {CANDIDATES_SYNTAX}")
    sec: dict[str, list[str]] = {}
    for part in str(text).split(";"):
        if not part.strip():
            continue
        name, eq, vals = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in ("k", "budget"):
            raise bad(f"unknown section {part.strip()!r}")
        if name in sec:
            raise bad(f"section {name!r} given twice")
        sec[name] = [v.strip().lower() for v in vals.split(",")]
    if "k" not in sec:
        raise bad("no k section")
    try:
        ks = [int(v) for v in sec["k"]]
        budgets = [None if v in ("none", "-") else int(v) for v in sec.get("budget", ["none"])]
    except ValueError:
        raise bad("values must be integers (budget: integers or 'none')") from None
    if any(k < 0 for k in ks):
        raise bad("k must be >= 0")
    if any(b is not None and b < 1 for b in budgets):
        raise bad("budgets must be >= 1")
    if len(set(ks)) != len(ks) or len(set(budgets)) != len(budgets):
        raise bad("duplicate values")
    return make_candidates(ks, budgets)


class _Acc:
    __slots__ = ("n", "time", "tokens")

    def __init__(self):
        self.n, self.time, self.tokens = 0, 0.0, 0.0

    def add(self, t, tok):
        self.n += 1
        self.time += t
        self.tokens += tok

    @property
    def throughput(self) -> float:
        return self.tokens / self.time if self.time > 0 else 0.0


class CascadeController:
    """See the module docstring.  Not thread-safe; one per request / batch bucket."""

    def __init__(self, candidates: Sequence[Setting] | None = None, test_steps: int = 4,
                 set_steps: int | None = None, set_factor: float = 10.0, warmup_steps: int = 0,
                 margin: float = 0.0, max_backoff: int = 64, drift_tol: float | None = 0.25,
                 drift_window: int = 8):
        cands = list(candidates) if candidates is not None else make_candidates()
        if OFF not in cands:
            cands.insert(0, OFF)           # the baseline T_step(0) is always measured
        else:
            cands.remove(OFF)
            cands.insert(0, OFF)
        if len(set(cands)) != len(cands):
            raise ValueError("duplicate candidates")
        if test_steps < 1 or warmup_steps < 0 or max_backoff < 1:
            raise ValueError("need test_steps >= 1, warmup_steps >= 0, max_backoff >= 1")
        self.all_candidates: list[Setting] = cands
        self.candidates: list[Setting] = list(cands)        # active (after pruning)
        self.pruned: list[Setting] = []
        self.predicted_u: dict[Setting, float] = {}
        self.test_steps, self.warmup_steps = test_steps, warmup_steps
        self._set_steps_fixed = set_steps
        self.set_factor, self.margin, self.max_backoff = set_factor, margin, max_backoff
        self.drift_tol, self.drift_window = drift_tol, drift_window
        self.backoff = 1                                      # multiplier of the next "off" phase
        self.history: list[tuple] = []                        # (phase, setting, length, utilities)
        self.last_utility: dict[Setting, float] = {}
        self.steps_issued = 0
        self._start_test()

    # ---- configuration --------------------------------------------------------------------------------
    @property
    def set_steps(self) -> int:
        if self._set_steps_fixed is not None:
            return self._set_steps_fixed
        return max(1, int(round(self.set_factor * self.test_steps * len(self.candidates))))

    def warm_start(self, profile, bs: int, alpha: float | Callable[[Setting], float],
                   prune_below: float = 0.9, tokens_per_step: Callable[[Setting], float] | None = None,
                   n_verify: Callable[[Setting], int] | None = None, n_draft: Callable[[Setting], int] | None = None,
                   trust: bool = False):
        """Rank/prune candidates with a perf_model.PerfProfile before the first measurement.

        Predicted U(s) = profile.predict_speedup(bs, s.k, alpha(s), s.budget, ...) (k as chain length by
        default; for trees pass tokens_per_step / n_verify / n_draft callables of the setting).  Candidates
        with predicted U < prune_below are dropped from all test phases (OFF never is); the rest are
        tested in decreasing predicted U.  Restarts the test phase; with trust=True there is no first test
        phase at all: the predicted best runs a set phase at once (OFF when nothing is predicted to beat
        it), so a short request never pays for testing; measurements take over from the next test phase
        (or earlier, through drift detection).  Returns {setting: predicted U}."""
        pred = {}
        for s in self.all_candidates:
            if s.off:
                pred[s] = 1.0
                continue
            a = alpha(s) if callable(alpha) else alpha
            pred[s] = float(profile.predict_speedup(
                bs, s.k, a, s.budget, tokens_per_step=tokens_per_step(s) if tokens_per_step else None,
                n_verify=n_verify(s) if n_verify else None, n_draft=n_draft(s) if n_draft else None))
        keep = [s for s in self.all_candidates if s.off or pred[s] >= prune_below]
        self.pruned = [s for s in self.all_candidates if s not in keep]
        self.candidates = [OFF] + sorted((s for s in keep if not s.off), key=lambda s: -pred[s])
        self.predicted_u = pred
        self._start_test()
        if trust and self.phase == "test":
            best = max(self.candidates, key=lambda c: (pred[c], c.off))
            off = best.off or pred[best] < 1.0 + self.margin
            self._enter_set(OFF if off else best, {c: pred[c] for c in self.candidates}, off=off)
        return pred

    # ---- phase machinery ------------------------------------------------------------------------------
    def _start_test(self):
        self.phase = "test"
        self._acc = {s: _Acc() for s in self.candidates}
        self._seen = {s: 0 for s in self.candidates}          # observations incl. warm-up ones
        self._schedule = [s for s in self.candidates for _ in range(self.test_steps + self.warmup_steps)]
        self._issued_in_phase = 0
        self.current: Setting | None = None
        self._remaining = 0
        if len(self.candidates) == 1:                          # nothing to choose: off for good
            self._enter_set(OFF, {OFF: 1.0}, off=True)

    def _measured_enough(self) -> bool:
        return all(self._acc[s].n >= self.test_steps for s in self.candidates)

    def utilities(self) -> dict[Setting, float]:
        """U of every candidate measured in the current/last test phase (throughput ratio to OFF)."""
        base = self._acc[OFF].throughput if OFF in self._acc else 0.0
        if base <= 0:
            return {}
        return {s: a.throughput / base for s, a in self._acc.items() if a.n > 0}

    def _decide(self):
        u = self.utilities()
        self.last_utility = dict(u)
        if not u:                                              # OFF emitted no tokens: nothing to compare
            self._enter_set(OFF, u, off=True)
            return
        best = max(u, key=lambda s: (u[s], s.off))            # ties go to OFF
        if best.off or u[best] < 1.0 + self.margin:
            self._enter_set(OFF, u, off=True)
        else:
            self._enter_set(best, u, off=False)

    def _enter_set(self, setting: Setting, u: dict, off: bool):
        self.phase = "off" if off else "set"
        self.current = setting
        if off:
            self._remaining = self.set_steps * self.backoff
            self.history.append(("off", setting, self._remaining, u))
            self.backoff = min(self.backoff * 2, self.max_backoff)
        else:
            self._remaining = self.set_steps
            self.history.append(("set", setting, self._remaining, u))
            self.backoff = 1
        self._ref_tp = self._acc[setting].throughput if hasattr(self, "_acc") and setting in self._acc else 0.0
        self._drift = _Acc()

    # ---- public API -----------------------------------------------------------------------------------
    def next_setting(self) -> Setting:
        """The setting to run the next step with (advances the schedule by one step)."""
        self.steps_issued += 1
        if self.phase == "test":
            if self._issued_in_phase < len(self._schedule):
                s = self._schedule[self._issued_in_phase]
                self._issued_in_phase += 1
                return s
            if self._measured_enough():
                self._decide()
            else:                                              # observations lag: measure the least-seen one
                s = min(self.candidates, key=lambda c: self._acc[c].n)
                self._issued_in_phase += 1
                return s
        if self._remaining <= 0:
            self._start_test()
            self.steps_issued -= 1
            return self.next_setting()
        self._remaining -= 1
        return self.current

    def observe(self, setting: Setting, step_time_s: float, tokens_emitted: float) -> None:
        """Record one measured step (may be called late, in any order relative to next_setting).
        Observations of settings outside the current test phase only feed drift detection.  A test phase
        ends only once every candidate has test_steps observations: a caller that never observes keeps
        the controller testing (extra steps go to the least-measured candidate)."""
        if not step_time_s > 0 or tokens_emitted < 0:
            raise ValueError("need step_time_s > 0 and tokens_emitted >= 0")
        if self.phase == "test":
            if setting in self._acc:
                self._seen[setting] += 1
                if self._seen[setting] > self.warmup_steps:
                    self._acc[setting].add(step_time_s, tokens_emitted)
            return
        if setting == self.current and self.drift_tol is not None and self._ref_tp > 0:
            self._drift.add(step_time_s, tokens_emitted)
            if self._drift.n >= self.drift_window:
                if self._drift.throughput < (1.0 - self.drift_tol) * self._ref_tp:
                    self._remaining = 0                        # environment changed: re-test now
                    if self.phase == "off":
                        self.backoff = 1
                self._drift = _Acc()

    def state(self) -> dict:
        """Introspection for logs: phase, current setting, steps left, back-off, last utilities."""
        return {"phase": self.phase, "current": self.current, "remaining": self._remaining,
                "backoff": self.backoff, "utilities": dict(self.last_utility),
                "candidates": list(self.candidates), "pruned": list(self.pruned)}


class ControllerBank:
    """One controller per key (request id or batch-size bucket).  bucket(bs) = next power of two."""

    def __init__(self, factory: Callable[[], CascadeController]):
        self.factory = factory
        self.ctl: dict[Hashable, CascadeController] = {}

    @staticmethod
    def bucket(bs: int) -> int:
        return 1 << max(0, int(bs) - 1).bit_length()

    def get(self, key: Hashable) -> CascadeController:
        if key not in self.ctl:
            self.ctl[key] = self.factory()
        return self.ctl[key]

    def for_batch(self, bs: int) -> CascadeController:
        return self.get(("bs", self.bucket(bs)))

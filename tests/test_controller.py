"""Cascade controller (shared/algorithms.md section 4, extended to the expert budget) on synthetic
environments: step time and tokens per step are functions of the setting, with noise."""
import random
from collections import Counter, deque

import pytest

from specmoe_ext.speculative.controller import OFF, CascadeController, ControllerBank, Setting, make_candidates
from specmoe_ext.speculative.perf_model import PerfProfile, expected_tokens_per_step

CANDS = make_candidates(ks=(0, 1, 2, 4, 8), budgets=(None, 16))


class Env:
    """bs requests; a step with setting s takes t_ar * (1 + c*k) * (budget discount) seconds and emits
    bs * E[tokens | alpha(s), k] tokens (noisy)."""

    def __init__(self, alpha=0.9, c=0.08, budget_gain=0.5, budget_alpha_loss=0.03, bs=4, noise=0.03, seed=0):
        self.alpha, self.c, self.bg, self.bal, self.bs, self.noise = alpha, c, budget_gain, budget_alpha_loss, bs, noise
        self.rng = random.Random(seed)
        self.t_ar = 0.02

    def mean_time(self, s):
        if s.off:
            return self.t_ar
        extra = self.c * s.k * (self.bg if s.budget is not None else 1.0)
        return self.t_ar * (1 + extra)

    def mean_tokens(self, s):
        a = self.alpha - (self.bal if s.budget is not None else 0.0)
        return self.bs * expected_tokens_per_step(max(a, 0.0), s.k)

    def utility(self, s):
        return (self.mean_tokens(s) / self.mean_time(s)) / (self.mean_tokens(OFF) / self.mean_time(OFF))

    def best(self, cands):
        return max(cands, key=self.utility)

    def step(self, s):
        t = self.mean_time(s) * (1 + self.noise * self.rng.gauss(0, 1))
        tok = self.mean_tokens(s) * (1 + self.noise * self.rng.gauss(0, 1))
        return t, tok


def run(ctl, env, n, lag=0, log=None):
    pending = deque()
    for _ in range(n):
        s = ctl.next_setting()
        if log is not None:
            log.append(s)
        pending.append((s, *env.step(s)))
        while len(pending) > lag:                 # CUDA events read `lag` steps late
            ctl.observe(*pending.popleft())


def set_decisions(ctl):
    return [(ph, s) for ph, s, _, _ in ctl.history]


def check_env_margin(env, cands, rel=0.08):
    us = sorted((env.utility(s) for s in cands), reverse=True)
    assert us[0] > 1 and us[0] > (1 + rel) * us[1], us[:3]       # the test itself: a clear winner exists


@pytest.mark.parametrize("lag", [0, 3])
def test_converges_to_best_setting(lag):
    env = Env()
    check_env_margin(env, CANDS)
    best = env.best(CANDS)
    assert best.budget == 16 and best.k >= 2                          # the budget knob matters here
    ctl = CascadeController(CANDS, test_steps=4)
    log = []
    run(ctl, env, 2000, lag=lag, log=log)
    test_len = len(CANDS) * 4
    first = ctl.history[0]
    assert first[0] == "set" and first[1] == best
    # decided right after the test phase (+ the lag of late observations)
    assert log[test_len:test_len + 5].count(best) == 5 if lag == 0 else best in log[test_len:test_len + lag + 8]
    assert all(d == ("set", best) for d in set_decisions(ctl))
    share = Counter(log)[best] / len(log)
    assert share > 0.85                                             # test-phase overhead ~1/(1+set_factor)
    u = ctl.last_utility
    assert u[best] == pytest.approx(env.utility(best), rel=0.1)


def test_speculation_off_when_every_utility_below_one_with_exponential_backoff():
    env = Env(alpha=0.2, c=0.5)                                       # speculation never pays
    assert max(env.utility(s) for s in CANDS if not s.off) < 0.95
    ctl = CascadeController(CANDS, test_steps=2, set_steps=20, max_backoff=8)
    log = []
    run(ctl, env, 2500, log=log)
    assert all(ph == "off" and s == OFF for ph, s, _, _ in ctl.history)
    lengths = [n for _, _, n, _ in ctl.history]
    assert lengths[:5] == [20, 40, 80, 160, 160]                      # doubling, capped at max_backoff
    assert len(lengths) >= 6                                          # and it keeps re-testing
    # re-tests happen: speculative settings are issued again between the off phases
    spec_idx = [i for i, s in enumerate(log) if not s.off]
    assert spec_idx and spec_idx[-1] > 1500
    assert sum(1 for s in log if s.off) / len(log) > 0.85


def test_backoff_resets_when_speculation_starts_paying():
    env = Env(alpha=0.2, c=0.5)
    ctl = CascadeController(CANDS, test_steps=2, set_steps=20, max_backoff=64)
    run(ctl, env, 400)
    assert ctl.backoff >= 8
    env.alpha, env.c = 0.9, 0.05                                      # now speculation wins clearly
    best = env.best(CANDS)
    run(ctl, env, 4000)
    assert ctl.history[-1][:2] == ("set", best) and ctl.backoff == 1


@pytest.mark.parametrize("drift_tol", [0.25, None])
def test_readapts_when_environment_changes(drift_tol):
    env = Env(seed=1)
    check_env_margin(env, CANDS)
    best1 = env.best(CANDS)
    ctl = CascadeController(CANDS, test_steps=3, drift_tol=drift_tol)
    run(ctl, env, 350)
    assert ctl.history[-1][:2] == ("set", best1)
    assert ctl.state()["phase"] == "set" and ctl.state()["remaining"] > 200     # change lands mid set phase
    env.alpha, env.c, env.bal = 0.5, 0.3, 0.25                        # acceptance collapses; budget hurts
    best2 = env.best(CANDS)
    assert best2 != best1 and env.utility(best1) < 0.8
    n_hist = len(ctl.history)
    log = []
    bound = ctl.set_steps + 2 * len(CANDS) * 3 + 5                    # one set phase + a test phase
    run(ctl, env, bound, log=log)
    new = ctl.history[n_hist:]
    assert new and new[-1][1] != best1
    assert env.utility(new[-1][1]) >= 0.95 * env.utility(best2)     # within 5% of the new best
    first_test = next(i for i, s in enumerate(log) if s != best1)
    if drift_tol is not None:                                         # drift ends the stale set phase early
        assert first_test < ctl.drift_window + 5
    else:                                                             # without it the stale phase runs out
        assert first_test > 200


def test_warm_start_skips_hopeless_candidates():
    prof = PerfProfile(128, 8, 295.0, dict(bias=1.2e-3, k1=2e-4, k2=1.8e-4, k3=1e-4, s=1.01, lam=0.5,
                                           draft_bias=2e-3, draft_k=1e-4, reject_bias=1e-4, reject_k=5e-6))
    ctl = CascadeController(CANDS, test_steps=2)
    pred = ctl.warm_start(prof, bs=1, alpha=0.8, prune_below=0.9)
    hopeless = {s for s, u in pred.items() if u < 0.9}
    assert hopeless and Setting(8) in hopeless                        # gamma = 8 at bs = 1 cannot pay
    assert set(ctl.pruned) == hopeless and OFF in ctl.candidates
    kept = [s for s in ctl.candidates if not s.off]
    assert kept and [pred[s] for s in kept] == sorted((pred[s] for s in kept), reverse=True)
    env = Env(alpha=0.8)
    log = []
    run(ctl, env, 800, log=log)
    issued = set(log)
    assert not (issued & hopeless)
    assert set(kept) <= issued                                        # every survivor is measured
    assert ctl.set_steps == 10 * 2 * len(ctl.candidates)              # shorter test phase -> shorter set
    # the warm start only prunes; the measured choice is still the best surviving candidate
    assert ctl.history[-1][1] == max(ctl.candidates, key=env.utility)


def test_warm_start_all_hopeless_runs_off():
    prof = PerfProfile(128, 8, 295.0, dict(bias=1e-3, k1=0, k2=1.5e-4, k3=0, s=1.0, lam=0.5,
                                           draft_bias=5e-2, draft_k=0, reject_bias=0, reject_k=0))
    ctl = CascadeController(CANDS)
    ctl.warm_start(prof, bs=1, alpha=0.5)
    assert ctl.candidates == [OFF]
    assert all(ctl.next_setting() == OFF for _ in range(200))


def test_api_contracts():
    assert make_candidates((0, 2), (None, 8)) == [OFF, Setting(2), Setting(2, 8)]
    with pytest.raises(ValueError):
        Setting(0, 8)
    ctl = CascadeController([Setting(2)])                             # OFF is added, first
    assert ctl.candidates == [OFF, Setting(2)]
    with pytest.raises(ValueError):
        ctl.observe(OFF, 0.0, 1)
    bank = ControllerBank(lambda: CascadeController(CANDS))
    assert [ControllerBank.bucket(b) for b in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64]
    assert bank.for_batch(3) is bank.for_batch(4) and bank.for_batch(3) is not bank.for_batch(5)


def test_off_emitting_no_tokens_does_not_crash():
    ctl = CascadeController([OFF, Setting(2)], test_steps=1, set_steps=5)
    for _ in range(3):
        s = ctl.next_setting()
        ctl.observe(s, 0.01, 0 if s.off else 3)
    assert ctl.phase == "off" and ctl.next_setting() == OFF


def test_trusted_warm_start_skips_the_first_test_phase():
    """trust=True: the predicted best runs at once (no test steps a short request would pay for); the next
    test phase measures as usual."""
    prof = PerfProfile(8, 2, 10.0, dict(bias=1e-3, k1=1e-5, k2=1e-5, k3=1e-5, s=1.01, lam=0.5, draft_bias=1e-5,
                                        draft_k=1e-6, reject_bias=1e-6, reject_k=1e-7))
    ctl = CascadeController(make_candidates(ks=(0, 1, 2, 4)), test_steps=2, set_steps=5)
    pred = ctl.warm_start(prof, bs=1, alpha=0.9, trust=True)
    best = max((s for s in pred if not s.off), key=lambda s: pred[s])
    assert pred[best] > 1.0 and ctl.phase == "set"
    assert [ctl.next_setting() for _ in range(5)] == [best] * 5
    assert ctl.next_setting() == OFF and ctl.phase == "test"           # then a regular test phase, OFF first
    # predicted to lose everywhere: speculation off at once
    slow = PerfProfile(8, 2, 10.0, dict(prof.params, draft_bias=1.0))
    ctl = CascadeController(make_candidates(ks=(0, 1, 2)), test_steps=2, set_steps=5)
    ctl.warm_start(slow, bs=1, alpha=0.5, trust=True, prune_below=0.0)
    assert ctl.phase == "off" and ctl.next_setting() == OFF

"""MoESD performance model (shared/algorithms.md section 5): formulas, bounded fit, profile JSON."""
import importlib.util
import json
import math

import numpy as np
import pytest

# only fit() needs scipy; everything else is tested without it
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="fit needs scipy")

from specmoe_ext.speculative.perf_model import (PARAM_NAMES, best_setting, default_plan, PerfProfile, Point, default_bounds, expected_tokens_per_step,
                                         experts_activated, fit, full_activation_threshold, mape,
                                         roofline_growth, synthetic_points, tokens_per_active_expert)

E, K, RP = 128, 8, 295.0                 # qwen3-30b-a3b-like MoE, H100 ridge point (989 TFLOP/s / 3.35 TB/s)
DENSE_B, EXPERT_B, BW = 3e9, 4.5e8, 3.35e12
TRUE = dict(bias=1.2e-3, k1=2e-4, k2=1.8e-4, k3=1e-4, s=1.01, lam=0.5, draft_bias=2e-3, draft_k=1e-4,
            reject_bias=1e-4, reject_k=5e-6)
TRAIN = ([("target", bs, n, B) for bs, n, B in
          [(1, 1, None), (2, 1, None), (4, 1, None), (8, 1, None), (16, 1, None), (32, 1, None), (64, 1, None),
           (1, 4, None), (1, 8, None), (4, 4, None), (16, 4, None), (64, 4, None), (8, 8, 16), (1, 8, 16)]]
         + [("draft", b, 1, None) for b in (1, 8, 64)] + [("reject", b, 1, None) for b in (1, 16, 64)])
HELD_OUT = ([("target", bs, n, B) for bs, n, B in
             [(3, 1, None), (12, 1, None), (48, 1, None), (2, 8, None), (8, 4, 32), (32, 2, None), (24, 4, None)]]
            + [("step", b, g, None) for b, g in [(1, 4), (8, 2), (32, 4)]])


def true_profile():
    return PerfProfile(E, K, RP, TRUE)


def test_experts_activated_properties():
    t = np.arange(0, 400)
    n = experts_activated(t, E, K)
    assert n[0] == 0 and math.isclose(n[1], K)                      # one token -> exactly K experts
    assert np.all(np.diff(n) > 0) and np.all(n < E)                 # strictly monotone, bounded by E
    assert experts_activated(2000, E, K) == pytest.approx(E, rel=1e-9)
    nb = experts_activated(t, E, K, budget=24)
    assert np.all(nb <= 24) and np.allclose(nb, np.minimum(24, n)) and nb[-1] == 24
    meas = np.full(5, 40.0)
    assert np.allclose(experts_activated(np.arange(5), E, K, budget=32, measured=meas), 32)
    assert np.allclose(experts_activated(np.arange(5), E, K, measured=meas), 40)
    with pytest.raises(ValueError):
        experts_activated(3, E, K, budget=K - 1)
    # mean tokens per active expert: rho*t / (1 - (1-rho)^t)
    rho = K / E
    assert tokens_per_active_expert(10, E, K) == pytest.approx(rho * 10 / (1 - (1 - rho) ** 10))


def test_full_activation_threshold():
    t = full_activation_threshold(E, K, 0.95)
    assert experts_activated(t, E, K) >= 0.95 * E > experts_activated(t - 1, E, K)
    assert full_activation_threshold(8, 2, 0.95) == 11          # log(0.05)/log(0.75) = 10.41
    assert full_activation_threshold(4, 4) == 1


def test_roofline_growth_continuity_and_shape():
    s, lam = 1.02, 0.4
    knee = lam * RP
    eps = 1e-7
    below, above = roofline_growth(knee - eps, s, lam, RP), roofline_growth(knee + eps, s, lam, RP)
    assert above == pytest.approx(below, rel=1e-6)                  # value continuous at lam*RP
    d_below = (roofline_growth(knee - eps, s, lam, RP) - roofline_growth(knee - 2e-3, s, lam, RP)) / (2e-3 - eps)
    d_above = (roofline_growth(knee + 2e-3, s, lam, RP) - roofline_growth(knee + eps, s, lam, RP)) / (2e-3 - eps)
    assert d_above == pytest.approx(d_below, rel=1e-3)               # and its slope
    assert roofline_growth(10, s, lam, RP) == pytest.approx(s ** 10)  # exponential below the knee
    g = roofline_growth(np.array([knee + 10, knee + 20, knee + 30]), s, lam, RP)
    assert np.diff(g, 2) == pytest.approx([0.0], abs=1e-9)           # linear above it
    assert roofline_growth(50, 1.0, lam, RP) == 1.0
    assert np.isfinite(roofline_growth(1e6, 2.0, 1.0, 5000.0))       # saturates, no overflow


def test_expected_tokens_and_mape():
    assert expected_tokens_per_step(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert expected_tokens_per_step(1.0, 5) == 6 and expected_tokens_per_step(0.5, 0) == 1
    assert mape([110, 90], [100, 100]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        mape([1.0], [0.0])


def test_step_model_and_speedup():
    p = true_profile()
    assert p.t_ar(4) == pytest.approx(p.t_target(4, 1))
    g, bs = 4, 8
    assert p.t_step(bs, g) == pytest.approx(g * p.t_draft(bs) + p.t_verify(bs, g) + p.t_reject(bs))
    assert p.t_step(bs, 0) == p.t_ar(bs) and p.predict_speedup(bs, 0, 0.8) == 1.0
    sp = p.predict_speedup(bs, g, 0.8)
    assert sp == pytest.approx(expected_tokens_per_step(0.8, g) * p.t_ar(bs) / p.t_step(bs, g))
    # a budget lowers verification time (fewer experts read) at small batch, not below the bias
    assert p.t_verify(1, 8, budget=K) < p.t_verify(1, 8) and p.t_verify(1, 8, budget=K) > TRUE["bias"]
    assert p.predict_speedup(1, 8, 0.8, budget=16) > p.predict_speedup(1, 8, 0.8)
    # MoESD finding: speedup over batch size is not monotone-decreasing as for dense models at small bs
    s = [p.predict_speedup(b, 4, 0.8) for b in (1, 16)]
    assert s[1] > s[0]


def test_default_bounds():
    b = default_bounds(DENSE_B, EXPERT_B, BW)
    assert b["bias"] == pytest.approx((DENSE_B / BW, 5 * DENSE_B / BW))
    assert b["k2"] == pytest.approx((EXPERT_B / BW, 5 * EXPERT_B / BW))
    assert b["lam"] == (0.2, 1.0) and b["s"] == (1.0, 2.0) and b["k1"] == (0.0, np.inf)
    assert default_bounds()["bias"] == (0.0, np.inf)


@needs_scipy
def test_fit_recovers_parameters_and_predicts_held_out():
    prof = true_profile()
    pts = synthetic_points(prof, TRAIN, noise=0.01, seed=1)
    assert len(pts) == 20
    r = fit(pts, E, K, RP, dense_bytes=DENSE_B, expert_bytes=EXPERT_B, bandwidth_Bps=BW, n_starts=2)
    assert r.success and r.mape_pct < 2.0                           # fits its own points to the noise level
    got = r.profile.params
    bd = default_bounds(DENSE_B, EXPERT_B, BW)
    for n in PARAM_NAMES:                                            # bounds respected
        assert bd[n][0] - 1e-15 <= got[n] <= bd[n][1] + 1e-15, n
    # well-identified parameters come back; k1/k3/lam trade off against each other on this range and bias
    # only jointly with the constant parts of k1*G, k3*G (G ~ 1 at small t), so it gets a looser check and
    # the quantity it belongs to (T_ar at bs=1) a tight one
    for n in ("k2", "s", "draft_bias", "reject_bias", "reject_k"):
        assert got[n] == pytest.approx(TRUE[n], rel=0.1), n
    assert got["bias"] == pytest.approx(TRUE["bias"], rel=0.35)
    assert r.profile.t_ar(1) == pytest.approx(prof.t_ar(1), rel=0.02)
    held = synthetic_points(prof, HELD_OUT, noise=0.01, seed=2)
    err = mape(r.profile.predict_points(held), [p.time_s for p in held])
    assert err < 10.0
    # predicted speedups agree with the true model where the controller needs them
    for bs in (1, 8, 32):
        for g in (1, 2, 4):
            assert r.profile.predict_speedup(bs, g, 0.8) == pytest.approx(prof.predict_speedup(bs, g, 0.8), rel=0.1)


@needs_scipy
def test_fit_respects_user_bounds_and_reports_bad_points():
    prof = true_profile()
    pts = synthetic_points(prof, TRAIN, noise=0.0, seed=3)
    r = fit(pts, E, K, RP, bounds={"s": (1.0, 1.0001), "lam": (0.2, 0.2001)}, n_starts=1)
    assert r.profile.params["s"] <= 1.0001 and r.profile.params["lam"] <= 0.2001
    with pytest.raises(ValueError):
        fit(pts[:2], E, K, RP)
    with pytest.raises(ValueError):
        Point("verify", 1, 1e-3)


def test_profile_json_round_trip(tmp_path):
    p = PerfProfile(E, K, RP, TRUE, meta={"gpu": "H100", "model": "qwen3-30b-a3b"})
    path = tmp_path / "profile.json"
    text = p.to_json(str(path))
    assert json.loads(text)["version"] == 1
    for q in (PerfProfile.from_json(text), PerfProfile.from_json(str(path))):
        assert (q.E, q.K, q.RP, q.meta) == (E, K, RP, p.meta)
        assert q.params == p.params
        assert q.predict_speedup(4, 3, 0.7, budget=32) == p.predict_speedup(4, 3, 0.7, budget=32)
    bad = dict(TRUE)
    del bad["lam"]
    with pytest.raises(ValueError):
        PerfProfile(E, K, RP, bad)


@needs_scipy
def test_default_plan_fits_like_hand_design():
    specs = default_plan(64, n_toks=(1, 4, 8), budgets=(None, 16))
    assert 18 <= len(specs) <= 26
    assert {s[1] for s in specs if s[0] == "target" and s[2] == 1} == {1, 2, 4, 8, 16, 32, 64}
    assert any(s[3] == 16 for s in specs) and {s[0] for s in specs} == {"target", "draft", "reject"}
    prof = true_profile()
    r = fit(synthetic_points(prof, specs, noise=0.01, seed=4), E, K, RP, dense_bytes=DENSE_B,
            expert_bytes=EXPERT_B, bandwidth_Bps=BW, n_starts=1)
    held = synthetic_points(prof, HELD_OUT, noise=0.01, seed=5)
    assert mape(r.profile.predict_points(held), [p.time_s for p in held]) < 10.0


def test_best_setting():
    prof = true_profile()
    g, B, sp = best_setting(prof, 32, 0.8, budgets=(None, 16))
    assert g > 0 and sp == pytest.approx(prof.predict_speedup(32, g, 0.8, B))
    assert all(prof.predict_speedup(32, gg, 0.8, bb) <= sp + 1e-12 for gg in (1, 2, 3, 4, 6, 8) for bb in (None, 16))
    assert best_setting(prof, 1, 0.05) == (0, None, 1.0)           # hopeless acceptance: stay autoregressive

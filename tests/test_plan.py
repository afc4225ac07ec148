"""`specmoe plan`: measure the MoESD model's points on the tiny preset (CPU), fit, print, save a profile that
`generate --spec auto --profile` loads.

Shape legend: bs requests per timed forward (1..--max-bs), n tokens per request (--n-toks).
"""
from __future__ import annotations

import json

import pytest

from specmoe_ext.cli import build_parser, main
from specmoe_ext.speculative.perf_model import PerfProfile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["plan", "--device", "cpu", "--max-bs", "2", "--repeats", "1", "--n-toks", "1,4"]


def test_plan_writes_a_loadable_profile(capsys, tmp_path):
    out = tmp_path / "profile.json"
    assert main([*SMALL, "--budgets", "none,4", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    kinds = [r["kind"] for r in doc["points"]]
    assert kinds.count("target") == 5 and kinds.count("draft") == 2 and kinds.count("reject") == 2
    assert [r["budget"] for r in doc["points"] if r["budget"] is not None] == [4, 4]
    assert any(r["held_out"] for r in doc["points"]) and doc["mape_held_out_pct"] is not None
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in doc["points"])
    prof = PerfProfile.from_json(str(out))
    assert (prof.E, prof.K, prof.RP) == (8, 2, 10.0)
    assert prof.meta["model"] == "tiny" and len(prof.meta["points"]) == 9
    assert prof.t_ar(1) > 0 and prof.predict_speedup(1, 2, 0.8) > 0
    # the measured activation rate, which adaptive verification warm-starts from
    from specmoe_ext.speculative.adaptive import AdaptiveVerifier
    rho = prof.meta["rho_eff"]
    assert 0 < rho <= 1 and prof.meta["rho_uniform"] == 2 / 8
    assert AdaptiveVerifier(prof, "cpu").rho0 == rho
    # the profile warm-starts --spec auto
    assert main(["generate", "--device", "cpu", "--no-progress", "--json", "--max-new-tokens", "8", "--draft",
                 "model", "--spec", "auto", "--profile", str(out)]) == 0
    c = json.loads(capsys.readouterr().out)["speculative"]["controller"]
    assert set(c["predicted_utility"]) == {"k=0", "k=1", "k=2", "k=4"}


def test_plan_table_and_plot(capsys, tmp_path):
    png = tmp_path / "plan.png"
    assert main([*SMALL, "--out", str(tmp_path / "p.json"), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "measured ms" in text and "predicted ms" in text and "MAPE: fit points" in text and "held-out" in text
    try:
        import matplotlib  # noqa: F401
        assert png.is_file() and f"plot -> {png}" in text
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in text


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--max-bs", "3"], "must be a power of two"),
    (["--n-toks", "1,x"], "--n-toks '1,x': expected a comma list of integers"),
    (["--budgets", "none,1"], r"--budgets 1: expert budget 1 < top_k 2"),
    (["--budgets", "none,9"], r"--budgets 9: expert budget 9 exceeds the 8 experts per MoE layer"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--preset", "nosuch"], "nosuch"),
])
def test_plan_errors(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["plan", "--device", "cpu", *argv])


def test_plan_help():
    text = build_parser()[1]["plan"].format_help()
    for flag in ("--model", "--preset", "--device", "--out", "--plot", "--max-bs", "--budgets", "--ridge-point"):
        assert flag in text, flag


def test_spread_leaves_out_one_stray_run():
    from specmoe_ext.speculative.plan import median, spread
    assert spread([1.0]) == 0.0 and median([1.0, 2.0, 3.0]) == 2.0
    assert spread([1.0, 1.0, 1.5]) == pytest.approx(0.5)                  # < 5 runs: (max - min) / median
    assert spread([0.5, 1.0, 1.0, 1.1, 9.0]) == pytest.approx(0.1)        # 5+ runs: the extremes left out


def _runs_noisy_at(points):
    """A stand-in for plan._time_runs: the runs of the points numbered in `points` are 2x apart."""
    count = iter(range(1000))
    return lambda fn, dev, warmup, repeats: ([1e-3] * (repeats - 1) + [2e-3 if next(count) in points else 1e-3], False)


def test_plan_warns_when_repeated_runs_disagree(capsys, tmp_path, monkeypatch):
    from specmoe_ext.speculative import plan as planlib
    monkeypatch.setattr(planlib, "_time_runs", _runs_noisy_at(range(7)))
    assert main([*SMALL, "--repeats", "3", "--out", str(tmp_path / "p.json"), "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert len(doc["noisy_points"]) == 7 and doc["noisy_points"][0] == "target bs=1 n=1: 100%"
    assert "specmoe plan: warning: the repeated runs of 7 of 7 points disagree by more than 30%" in cap.err
    assert "target bs=1 n=1: 100%; " in cap.err and "--threads 1" in cap.err
    monkeypatch.setattr(planlib, "_time_runs", _runs_noisy_at({5}))     # one stray point: reported, no warning
    assert main([*SMALL, "--repeats", "3", "--out", str(tmp_path / "p.json"), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["noisy_points"] == ["reject bs=1 n=1: 100%"] and "warning" not in cap.err


def test_plan_is_quiet_when_runs_agree(capsys, tmp_path, monkeypatch):
    from specmoe_ext.speculative import plan as planlib
    monkeypatch.setattr(planlib, "_time_runs", lambda fn, dev, warmup, repeats: ([1e-3] * repeats, False))
    assert main([*SMALL, "--repeats", "3", "--out", str(tmp_path / "p.json")]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err and "1 thread(s)" in cap.out


def test_activation_rate_inverts_the_distinct_expert_count():
    """rho_eff solves N = E (1 - (1 - rho)^t) per layer: a router that sends every token to the same K
    experts has N = K at any t, so rho -> 1 - (1 - K/E)^(1/t); uniform random routing gives about K/E."""
    import torch
    from specmoe_ext.models import build_preset
    from specmoe_ext.speculative.plan import _Bench
    t = build_preset("tiny", "cpu", "float32")
    E, K = t.args.n_experts, t.args.top_k
    rho = _Bench(16, 4).activation_rate(t, 1, 4)
    assert 0 < rho <= 1
    for layer in t.layers:                    # constant router: experts 0..K-1 for every token
        gate = getattr(layer.ffn, "gate", None)
        if gate is not None:
            with torch.no_grad():
                gate.weight.zero_()
                if getattr(gate, "bias", None) is not None:
                    gate.bias.zero_()
    one = _Bench(16, 4).activation_rate(t, 1, 4)
    assert one == pytest.approx(1 - (1 - K / E) ** (1 / 4), rel=1e-6)

"""`specmoe generate --draft ... --spec auto`: the Cascade controller picks each step's chain length K (0 = a plain
autoregressive step through the speculative engine) and expert budget; greedy output stays autoregressive.

Shape legend: bs prompts per call (one per --prompt), N generated tokens per prompt.
"""
from __future__ import annotations

import json

import pytest
import torch

from specmoe_ext.cli import main
from specmoe_ext.speculative import SpecEngine, make_drafter
from specmoe_ext.speculative.controller import CascadeController, Setting, make_candidates, parse_candidates
from specmoe_ext.speculative.perf_model import PerfProfile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["generate", "--max-new-tokens", "24", "--ignore-eos", "--prompt", "Return a new", "--prompt", "The value"]


def _json(capsys, *argv):
    assert main([*argv, "--json", "--no-progress", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_auto_greedy_equals_autoregressive_and_reports_choices(capsys, draft):
    ar = _json(capsys, *BASE)
    sp = _json(capsys, *BASE, "--draft", draft, "--spec", "auto", "--spec-candidates", "k=0,1,3",
               "--spec-test-steps", "1")
    assert [o["tokens"] for o in sp["outputs"]] == [o["tokens"] for o in ar["outputs"]]
    s = sp["speculative"]
    assert s["spec"] == "auto" and s["tree"] == "chain:3" and s["budget"] is None
    c = s["controller"]
    assert c["candidates"] == ["k=0", "k=1", "k=3"]
    runs = c["settings_over_time"]
    assert sum(n for _, _, n in runs) == s["steps"] == sp["stats"]["decode_steps"]
    assert [k for k, _, _ in runs[:3]] == [0, 1, 3]                 # the first test phase, OFF first
    assert all(b is None for _, b, _ in runs)
    assert c["phases"] and c["utilities"]["k=0"] == 1.0
    assert set(c["phases"][0]["utilities"]) == {"k=0", "k=1", "k=3"}


def test_auto_with_budget_candidates(capsys):
    out = _json(capsys, *BASE, "--draft", "model", "--spec", "auto", "--spec-candidates", "k=0,2;budget=none,4",
                "--spec-test-steps", "1", "--budget-policy", "truncate")
    c = out["speculative"]["controller"]
    assert c["candidates"] == ["k=0", "k=2", "k=2,budget=4"]
    # the first test phase runs each candidate (observations arrive a step late: the lagging one may get more)
    assert [k for k, _, _ in c["settings_over_time"][:3]] == [0, 2, 2]
    assert c["settings_over_time"][2][1] == 4
    assert main([*BASE, "--draft", "model", "--spec", "auto", "--device", "cpu", "--no-progress"]) == 0
    assert "--spec auto settings over time" in capsys.readouterr().err


def test_auto_warm_start_from_profile(capsys, tmp_path):
    # a profile where long chains are predicted to lose: k=4 is pruned, the rest tested best-first
    prof = PerfProfile(8, 2, 10.0, dict(bias=1e-3, k1=1e-4, k2=1e-4, k3=1e-4, s=1.01, lam=0.5, draft_bias=4e-4,
                                        draft_k=1e-5, reject_bias=1e-5, reject_k=1e-6))
    path = tmp_path / "p.json"
    prof.to_json(str(path))
    out = _json(capsys, *BASE, "--draft", "model", "--spec", "auto", "--profile", str(path), "--profile-alpha", "0.5")
    c = out["speculative"]["controller"]
    pu = c["predicted_utility"]
    assert set(pu) == {"k=0", "k=1", "k=2", "k=4"} and pu["k=0"] == 1.0
    assert c["pruned"] == [k for k in ("k=1", "k=2", "k=4") if pu[k] < 0.9]
    assert "k=4" in c["pruned"]


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["k=2;bud=3", "budget=4", "k=a,2", "k=-1", "k=1;budget=0", "k=1,1", "k=1;k=2",
                                  "k=1;budget=4,x"])
def test_bad_candidate_syntax_is_a_clear_error(text):
    with pytest.raises(ValueError, match=r"--spec-candidates .*expected k=K1,K2"):
        parse_candidates(text)
    with pytest.raises(SystemExit, match=r"expected k=K1,K2"):
        main([*BASE, "--no-progress", "--device", "cpu", "--draft", "model", "--spec", "auto",
              "--spec-candidates", text])


def test_parse_candidates():
    assert parse_candidates("k=0,1,2,4;budget=none,32") == make_candidates((0, 1, 2, 4), (None, 32))
    assert parse_candidates(" budget = 6 ; k = 2 ") == [Setting(0), Setting(2, 6)]
    assert parse_candidates("k=3") == [Setting(0), Setting(3)]


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--draft", "model", "--spec", "auto", "--tree", "chain:2"], "--tree is chosen by --spec auto"),
    (["--draft", "model", "--spec", "auto", "--budget", "4"], "give budgets as candidates"),
    (["--draft", "model", "--spec", "auto", "--spec-candidates", "k=0"], "needs some k >= 1"),
    (["--draft", "model", "--spec", "auto", "--spec-candidates", "k=2;budget=1"], "expert budget 1 < top_k 2"),
    (["--draft", "model", "--spec", "auto", "--profile", "/nonexistent.json"], "--profile /nonexistent.json"),
    (["--draft", "model", "--profile", "x.json"], "--profile apply to --spec auto"),
    (["--spec", "auto"], "--spec apply to speculative decoding: add --draft"),
])
def test_auto_flag_errors(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", "--no-progress", "--device", "cpu", "--max-new-tokens", "4", *argv])


@pytest.mark.bad_input(2)
def test_engine_checks_controller_candidates():
    from specmoe_ext.models.presets import build_preset
    m = build_preset("tiny", "cpu", torch.float32)
    ids = [[1, 2, 3]]
    eng = SpecEngine(m, make_drafter("ngram", m), "static:2,2")
    with pytest.raises(ValueError, match=r"a static tree \(static:2,2\) is on \(k=6\) or off"):
        eng.generate(ids, 4, controller=CascadeController(make_candidates((0, 2))))
    eng = SpecEngine(m, make_drafter("ngram", m), "chain:2")
    with pytest.raises(ValueError, match="exceeds the engine's chain length 2"):
        eng.generate(ids, 4, controller=CascadeController(make_candidates((0, 4))))
    res = eng.generate(ids, 6, controller=CascadeController(make_candidates((0, 1, 2), (None, 3)), test_steps=1))
    assert sum(n for *_, n in res.config["controller"]["settings_over_time"]) == len(res.steps)
    assert all(s.tree_nodes == 1 for s in res.steps[:1])          # the first step is the OFF baseline: root only


@pytest.mark.parametrize("rule", ["auto", "q"])
def test_auto_sampling_runs(capsys, rule):
    # k = 0 steps are root-only trees: their token is drawn by the 'target' rule whatever --accept says.
    # (No run-to-run equality: the controller's choices depend on measured times, and so does the random
    # stream's use; each step stays lossless.)
    a = _json(capsys, *BASE, "--draft", "model", "--spec", "auto", "--spec-test-steps", "1", "--temperature", "0.8",
              "--seed", "3", "--accept", rule)
    assert all(len(o["tokens"]) == 24 for o in a["outputs"])
    assert [k for k, _, _ in a["speculative"]["controller"]["settings_over_time"][:4]] == [0, 1, 2, 4]

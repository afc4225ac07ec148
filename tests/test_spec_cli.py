"""`specmoe generate --draft ...` and `specmoe demo`: flags, JSON acceptance statistics, errors.

Shape legend: bs prompts per call (one per --prompt), N generated tokens per prompt, L MoE layers (4 for tiny).
"""
from __future__ import annotations

import json

import pytest
import torch

from specmoe_ext.cli import build_parser, main
from specmoe_ext.models.presets import PRESETS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _json(capsys, *argv):
    assert main([*argv, "--json", "--no-progress", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


BASE = ["generate", "--max-new-tokens", "16", "--ignore-eos", "--prompt", "Return a new", "--prompt", "The value"]


@pytest.mark.parametrize("draft,tree", [("model", "chain:3"), ("self:4", "dynamic:topk=3,depth=3,tokens=8"),
                                        ("ngram", "static:2,2")])
def test_speculative_generate_matches_autoregressive_and_reports_acceptance(capsys, draft, tree):
    ar = _json(capsys, *BASE)
    sp = _json(capsys, *BASE, "--draft", draft, "--tree", tree)
    assert [o["tokens"] for o in sp["outputs"]] == [o["tokens"] for o in ar["outputs"]]
    assert [o["text"] for o in sp["outputs"]] == [o["text"] for o in ar["outputs"]]
    s = sp["speculative"]
    assert s["tree"] == tree and s["drafter"] == draft.split(":")[0] and s["budget"] is None
    assert s["steps"] == sp["stats"]["decode_steps"] >= 1
    assert 0 <= s["accepted_per_step"] and s["tokens_per_step"] == pytest.approx(s["accepted_per_step"] + 1)
    assert sum(s["acceptance_histogram"].values()) >= s["steps"]
    assert len(s["experts_touched_per_layer"]) == 4 and s["experts_touched_per_layer"] == s["experts_loaded_per_layer"]
    assert sp["stats"]["accepted_per_step"] == s["accepted_per_step"]
    assert "speculative" not in ar


def test_budget_flags(capsys):
    out = _json(capsys, *BASE, "--draft", "model", "--tree", "dynamic:topk=4,depth=4,tokens=16", "--budget", "3",
                "--budget-policy", "truncate", "--budget-weights", "path")
    s = out["speculative"]
    assert s["budget"] == {"budget": 3, "policy": "truncate", "weights": "path", "protect_root": True}
    assert max(s["experts_loaded_per_layer"]) <= 3 < min(s["experts_touched_per_layer"])
    per = _json(capsys, *BASE, "--draft", "ngram", "--budget", "none,2,4,none", "--no-protect-root")
    assert _json(capsys, *BASE, "--draft", "ngram", "--budget=-,2,4,-")["speculative"]["budget"]["budget"] == [None, 2, 4, None]
    assert per["speculative"]["budget"]["budget"] == [None, 2, 4, None]
    assert per["speculative"]["budget"]["protect_root"] is False


def test_sampling_with_a_draft_is_seeded(capsys):
    args = [*BASE, "--draft", "model", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    a, b = _json(capsys, *args), _json(capsys, *args)
    assert [o["tokens"] for o in a["outputs"]] == [o["tokens"] for o in b["outputs"]]
    assert a["speculative"]["rule"] == "auto"


def test_human_output_mentions_acceptance_and_experts(capsys):
    assert main([*BASE, "--draft", "model", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "speculative steps" in err and "tokens/step" in err and "touched -> loaded" in err


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--draft", "model", "--tree", "chain:0"], "chain length must be >= 1"),
    (["--draft", "model", "--tree", "bush:3"], "unknown kind 'bush'"),
    (["--draft", "model", "--budget", "1"], r"expert budget 1 < top_k 2"),
    (["--draft", "model", "--budget", "two"], "expected an integer or a comma list"),
    (["--draft", "model", "--budget", "4,4"], "2 entries, the model has 4 layers"),
    (["--draft", "medusa"], "unknown drafter 'medusa'"),
    (["--draft", "eagle:/nonexistent/head"], "does not exist"),
    (["--draft", "model", "--model", str(PRESETS["tiny"].path)], "no bundled draft model"),
    (["--budget", "4"], "--budget apply to speculative decoding: add --draft"),
    (["--tree", "chain:2"], "--tree apply to speculative decoding"),
    (["--draft", "self", "--preset", "tiny", "--tree", "dynamic:topk=2,depth=2,tokens=4", "--accept", "q"],
     "needs sampled drafts"),
])
def test_errors_are_clear(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", "--no-progress", "--device", "cpu", "--max-new-tokens", "4", *argv])


def test_help_documents_the_flags(capsys):
    parser, subs = build_parser()
    text = subs["generate"].format_help()
    for flag in ("--draft", "--tree", "--budget", "--budget-policy", "--budget-weights", "--accept",
                 "model:DIR", "eagle:DIR", "dynamic:topk=K,depth=D,tokens=M", "substitute", "truncate"):
        assert flag in text, flag


def test_demo_runs_every_mode_and_gives_a_verdict(capsys):
    out = _json(capsys, "demo", "--max-new-tokens", "12", "--repeats", "2")
    runs = {r["run"]: r for r in out["runs"]}
    assert list(runs) == ["autoregressive", "speculative", "speculative + budget B=4", "speculative, --spec auto"]
    assert runs["speculative"]["matches_autoregressive"] is True
    assert runs["speculative, --spec auto"]["matches_autoregressive"] is True
    assert all(len(r["tokens_per_s_runs"]) == 2 for r in runs.values())
    b = runs["speculative + budget B=4"]
    assert max(b["experts_loaded_per_layer"]) <= 4 and b["config"]["budget"]["budget"] == 4
    assert out["experts"] == 8 and out["draft"] == "model" and out["repeats"] == 2
    v = out["verdict"]
    assert v["speculation_pays"] == (runs["speculative"]["tokens_per_s"] > runs["autoregressive"]["tokens_per_s"])
    assert sum(v["auto_steps_per_setting"].values()) == sum(n for *_, n in runs["speculative, --spec auto"]["settings_over_time"])
    assert main(["demo", "--max-new-tokens", "6", "--device", "cpu", "--draft", "ngram", "--budget", "2",
                 "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "autoregressive" in text and "speculative + budget B=2" in text and "touched" in text
    assert "speculation pays here" in text or "speculation does NOT pay here" in text


def test_every_drafter_kind_runs_from_the_cli(capsys, tmp_path):
    """Each --draft form is built twice: on the shape-only (meta) target for the checks, then for real."""
    from specmoe_ext.models.presets import build_preset
    from specmoe_ext.speculative import save_random_eagle3
    head = save_random_eagle3(tmp_path / "eagle3", build_preset("tiny"), draft_vocab_size=512, layer_ids=(0, 1, 2))
    ar = _json(capsys, *BASE)
    for draft in ("model", f"model:{PRESETS['tiny'].draft_path}", "self", "ngram:3", f"eagle:{head}"):
        sp = _json(capsys, *BASE, "--draft", draft)
        assert [o["tokens"] for o in sp["outputs"]] == [o["tokens"] for o in ar["outputs"]], draft


def test_verify_adaptive_from_the_cli(capsys, tmp_path):
    """--verify adaptive --profile P: lossless (same tokens as full verification), the JSON says which mode
    ran, how many nodes were drafted vs verified, and the calibration table; without --profile, or without a
    drafter, a clear error."""
    import math
    from specmoe_ext.speculative.perf_model import PerfProfile
    prof = tmp_path / "profile.json"    # a verify cost of 1 ms + 0.3 ms per token: deep nodes rarely pay
    PerfProfile(8, 2, 1e-9, dict(bias=1e-3 - 3e-4, k1=3e-4, k2=0.0, k3=0.0, s=math.e, lam=0.2, draft_bias=0.0,
                                 draft_k=0.0, reject_bias=0.0, reject_k=0.0)).to_json(str(prof))
    tree = ["--draft", "model", "--tree", "dynamic:topk=3,depth=4,tokens=12"]
    full = _json(capsys, *BASE, *tree)
    ad = _json(capsys, *BASE, *tree, "--verify", "adaptive", "--profile", str(prof))
    assert [o["tokens"] for o in ad["outputs"]] == [o["tokens"] for o in full["outputs"]]
    s = ad["speculative"]
    assert s["verify"] == "adaptive" and full["speculative"]["verify"] == "full"
    assert s["nodes_verified_per_step"] < s["nodes_drafted_per_step"]
    assert s["calibration"]["buckets"]
    with pytest.raises(SystemExit, match="--verify adaptive needs --profile"):
        main([*BASE, *tree, "--verify", "adaptive", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--verify apply to speculative decoding"):
        main([*BASE, "--verify", "adaptive", "--profile", str(prof), "--device", "cpu"])

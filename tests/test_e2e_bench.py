"""The controlled-acceptance drafter (bench/controlled.py) and bench/bench_e2e.py's CPU path.

Shape legend: bs prompts, N new tokens per prompt, gamma chain length, alpha per-token acceptance rate.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specmoe_ext.models import load_tokenizer
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.speculative import SpecEngine, generate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from controlled import ControlledDrafter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Return a new", "The default value of the", "Raise ValueError if the", "This module provides",
         "Create a new instance of the", "If the file does not exist,", "Return True if the object is",
         "Read the contents of"]
N = 48
EXTRA = 8          # reference tokens past N: the drafter looks up to the tree depth ahead


@pytest.fixture(scope="module")
def setup(tiny):
    target, draft = tiny
    tok = load_tokenizer(TINY_DIR / "target")
    prompts = [tok.encode(t) for t in TEXTS]
    ref = generate(target, prompts, N + EXTRA)
    refs = [p + o for p, o in zip(prompts, ref.tokens)]
    return target, draft, prompts, refs, [o[:N] for o in ref.tokens]


def _run(setup, alpha, tree="chain:4", seed=0):
    target, draft, prompts, refs, ar = setup
    res = SpecEngine(target, ControlledDrafter(draft, target, refs, alpha, seed=seed), tree).generate(prompts, N)
    return res, ar


def _alpha_hat(res, depth):
    acc = [a for s in res.steps for a in s.accepted]
    succ = sum(acc)
    return succ / (succ + sum(1 for a in acc if a < depth))


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_acceptance_rate_matches_alpha_and_output_is_autoregressive(setup, alpha):
    res, ar = _run(setup, alpha)
    assert res.tokens == ar                                  # the target verifies: greedy output unchanged
    acc = [a for s in res.steps for a in s.accepted]
    trials = sum(acc) + sum(1 for a in acc if a < 4)
    # per-token acceptance: successes / trials, within 4 standard errors (deterministic seed: no flakiness)
    se = (alpha * (1 - alpha) / trials) ** 0.5
    assert abs(_alpha_hat(res, 4) - alpha) < 4 * se + 0.01, (_alpha_hat(res, 4), alpha, trials)
    assert res.config["acceptance"] == "controlled acceptance" and res.config["alpha"] == alpha


def test_alpha_one_accepts_everything_alpha_zero_nothing(setup):
    res1, ar = _run(setup, 1.0)
    assert res1.tokens == ar
    assert all(a == 4 for s in res1.steps for a in s.accepted)
    res0, _ = _run(setup, 0.0)
    assert res0.tokens == ar
    assert all(a == 0 for s in res0.steps for a in s.accepted)
    tree = "dynamic:topk=4,depth=5,tokens=32"               # trees: the best branch carries the reference
    rt, _ = _run(setup, 1.0, tree)
    assert rt.tokens == ar and all(a == 5 for s in rt.steps for a in s.accepted)
    assert rt.summary()["tree_nodes_mean"] > 20             # other branches exist (random tokens, never accepted)
    rs, _ = _run(setup, 0.0, "static:3,2")
    assert rs.tokens == ar and all(a == 0 for s in rs.steps for a in s.accepted)


def test_seeded_and_reproducible(setup):
    a, _ = _run(setup, 0.7, seed=3)
    b, _ = _run(setup, 0.7, seed=3)
    c, _ = _run(setup, 0.7, seed=4)
    acc = lambda r: [s.accepted for s in r.steps]           # noqa: E731
    assert acc(a) == acc(b) and acc(a) != acc(c)


def test_reference_count_and_alpha_are_checked(setup):
    target, draft, prompts, refs, _ = setup
    with pytest.raises(ValueError, match="alpha"):
        ControlledDrafter(draft, target, refs, 1.5)
    with pytest.raises(ValueError, match="reference"):
        SpecEngine(target, ControlledDrafter(draft, target, refs[:2], 0.5)).generate(prompts, 4)


@pytest.mark.parametrize("extra", [[], ["--drafter", "controlled", "--batch-sizes", "2"]])
def test_bench_quick_cpu_writes_json(tmp_path, extra):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--quick", "--device", "cpu", "--preset", "tiny",
           "--out-dir", str(tmp_path), "--no-progress", "--max-new-tokens", "16", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = list(tmp_path.glob("e2e_tiny_*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["benchmark"] == "e2e_tiny" and doc["preset"] == "tiny" and doc["lossless_mismatches"] == []
    rows = doc["rows"]
    controlled = "controlled" in extra
    assert doc["acceptance"] == ("controlled acceptance" if controlled else "real")
    assert {r["bs"] for r in rows} == ({2} if controlled else {1, 4})
    ar = [r for r in rows if r["setting"] == "AR"]
    spec = [r for r in rows if r["setting"] != "AR"]
    assert ar and spec and all(r["speedup"] == 1.0 and r["decode_tokens_per_s"] > 0 for r in ar)
    for r in spec:
        assert "error" not in r and "skipped" not in r, r
        assert r["decode_tokens_per_s"] > 0 and r["speedup"] > 0 and r["accepted_per_step"] >= 0
        assert len(r["experts_loaded_per_layer"]) == 4 and r["verify_over_ar"] > 0
        if r["lossless"]:
            assert r["matches_autoregressive"] is True
        if controlled:
            assert r["acceptance"] == "controlled acceptance" and r["alpha"] == 0.8
    assert any(r["budget"] is not None for r in spec) and any(r["setting"].startswith("auto") for r in spec)
    assert "End to end" in p.stdout


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_controlled_self_drafter_on_an_offloaded_target(alpha):
    """bench_offload's controlled self drafter (it borrows ControlledDrafter's reference handling): on the
    offloaded tiny target, alpha 1 accepts every draft inside the reference, alpha 0 none, and the output
    is the autoregressive one either way (lossless)."""
    from bench_offload import ControlledSelfDrafter
    from specmoe_ext.models.loader import load_model
    from specmoe_ext.models.offload import OffloadConfig
    target = load_model(TINY_DIR / "target", "cpu", offload=OffloadConfig(resident_experts=4))
    tok = load_tokenizer(TINY_DIR / "target")
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    ar = generate(target, prompts, 16 + EXTRA)
    refs = [p + o for p, o in zip(prompts, ar.tokens)]
    res = SpecEngine(target, ControlledSelfDrafter(target, refs, alpha), "chain:3").generate(prompts, 16)
    assert res.tokens == [o[:16] for o in ar.tokens]
    accepted = [a for s in res.steps for a in s.accepted]
    assert (min(accepted) >= 2) if alpha == 1.0 else (max(accepted) == 0), accepted

"""Tensor and expert parallelism (models/parallel.py) on the CPU: gloo, 2 and 3 processes, small models.

Shape legend: N ranks, bs prompts (3, of different lengths), V vocab (1000 in the family configs).
Every test spawns its ranks once and checks several things there (process start-up dominates).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest_models import hf_checkpoint, prompts
from parallel_workers import balanced_caps, logits_and_greedy, spawn, speculative
from specmoe_ext.models import load_model
from specmoe_ext.speculative import generate
from specmoe_ext.models.parallel import ParallelConfig, check_config, map_piece, Rule, split_range
from specmoe_ext.models.presets import TINY_DIR
from test_models import _batched_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode,world", [("tp", 2), ("ep", 2), ("ep", 3)])
def test_logits_and_greedy_equal_one_process(mode, world):
    """Every family's logits (a batch of prompts of different lengths) within fp32 rounding of the
    single-process model, bitwise equal on every rank; greedy generation identical. EP splits are uneven
    at 3 ranks (Mixtral's 4 experts as 2/1/1, 16 as 6/5/5, 8 as 3/3/2)."""
    paths = {f: str(hf_checkpoint(f)[0]) for f in FAMILIES}
    plist = prompts((5, 2, 9))
    ref = {}
    for f, p in paths.items():
        m = load_model(p, "cpu", "float32")
        ref[f] = (_batched_logits(m, plist), generate(m, plist, 6).tokens)
    ranks = spawn(logits_and_greedy, world, mode=mode, paths=paths, prompts=plist, new_tokens=6)
    for f in FAMILIES:
        for r in ranks[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r[f]["logits"], ranks[0][f]["logits"])), f
        for got, want in zip(ranks[0][f]["logits"], ref[f][0]):
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 2e-5 * max(1.0, scale), (f, (got - want).abs().max().item())
        assert all(r[f]["greedy"] == ref[f][1] for r in ranks), f


CASES = [("model", "chain:3", None), ("self", "static:2,2", None), ("ngram", "chain:3", None),
         ("model", "dynamic:topk=2,depth=3,tokens=6", 4), ("ngram", "chain:2", 3)]


@pytest.mark.parametrize("mode,world,balance", [("tp", 2, "global"), ("ep", 2, "global"), ("ep", 3, "rank")])
def test_greedy_speculative_equals_autoregressive(mode, world, balance):
    """On the tiny pair: every drafter without a budget commits the autoregressive tokens on every rank;
    with a (lossy) global budget the same tokens as one process with that budget, the experts loaded per
    layer <= B; with a rank-balanced budget (a policy of its own) the same tokens on every rank."""
    plist = prompts((4, 7, 3), seed=2)
    plist = [[t % 2048 for t in p] for p in plist]
    one = build_one_process_runs(plist, 12)
    ranks = spawn(speculative, world, mode=mode, path=str(TINY_DIR / "target"), draft_path=str(TINY_DIR / "draft"),
                  prompts=plist, new_tokens=12, cases=CASES, balance=balance)
    for r in ranks:
        assert r["ar"] == one["ar"]
        for case in CASES:
            if case[2] is None:
                assert r[case]["tokens"] == one["ar"], (mode, case)
            elif balance == "global":
                assert r[case]["tokens"] == one[case], (mode, case)
                assert r[case]["max_loaded"] <= case[2], (mode, case, r[case]["max_loaded"])
            else:
                assert r[case]["tokens"] == ranks[0][case]["tokens"], (mode, case)


def build_one_process_runs(plist, n):
    from specmoe_ext.speculative import BudgetConfig, ModelDrafter, NGramDrafter, SpecEngine
    t = load_model(TINY_DIR / "target", "cpu", "float32")
    d = load_model(TINY_DIR / "draft", "cpu", "float32")
    out = {"ar": generate(t, plist, n).tokens}
    for kind, tree, budget in CASES:
        if budget is not None:
            drafter = ModelDrafter(d, t) if kind == "model" else NGramDrafter(t.args.vocab_size, max_n=3)
            out[(kind, tree, budget)] = SpecEngine(t, drafter, tree, BudgetConfig(budget)).generate(plist, n).tokens
    return out


@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_rank_balanced_budget_caps_every_rank(policy):
    """budget_balance='rank' under EP3 (8 experts as 3/3/2), B=4: no rank runs more than ceil(4/3) = 2
    experts in any layer, although the natural routing of the forward touches more."""
    ranks = spawn(balanced_caps, 3, path=str(TINY_DIR / "target"), budget=4, policy=policy)
    per = ranks[0]["per_rank"]
    assert all(r["per_rank"] == per for r in ranks)
    assert all(max(layer) <= 2 for layer in per), per
    assert ranks[0]["natural_max"] > 4


# ---- without processes: the rules, the checks ---------------------------------------------------------

def test_split_range_and_piece_mapping():
    assert [split_range(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [split_range(16, 3, r) for r in range(3)] == [(0, 6), (6, 11), (11, 16)]
    # a per-expert piece (e, slice(0, f)) of w13 [E, 2f, h] under TP (dim 1 split: gate | up rows)
    rule = Rule(1, ((4, 8, 0), (12, 16, 4)))            # f = 8, rank 1 of 2: gate rows 4:8, up rows 12:16
    assert map_piece((3, slice(0, 8)), (8, 5), rule) == [((slice(4, 8),), (3, slice(0, 4)))]
    assert map_piece((3, slice(8, 16)), (8, 5), rule) == [((slice(4, 8),), (3, slice(4, 8)))]
    # a fused expert tensor under EP (dim 0: experts 3..5 of this rank)
    assert map_piece((), (6, 16, 5), Rule(0, ((3, 5, 0),))) == [((slice(3, 5),), (slice(0, 2),))]
    assert map_piece((1,), (16, 5), Rule(0, ((3, 5, 0),))) == []
    assert map_piece((4,), (16, 5), Rule(0, ((3, 5, 0),))) == [((), (1,))]


@pytest.mark.bad_input(4)
def test_bad_configurations_are_refused():
    from specmoe_ext.models.loader import load_args
    a = load_args(TINY_DIR / "target")                                       # 4 heads, 2 KV heads, 8 experts
    with pytest.raises(ValueError, match="tp=3 does not divide the model's 4 attention heads"):
        check_config(a, ParallelConfig(tp=3))
    with pytest.raises(ValueError, match="ep=9 exceeds the 8 experts"):
        check_config(a, ParallelConfig(ep=9))
    with pytest.raises(ValueError, match="tp=2 and ep=2 together"):
        ParallelConfig(tp=2, ep=2)
    with pytest.raises(ValueError, match="needs ep > 1"):
        ParallelConfig(tp=2, budget_balance="rank")


# ---- torchrun, the CLI, failures -----------------------------------------------------------------------

def _torchrun(n: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "python"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--standalone", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(REPO))


def test_cli_under_torchrun_matches_one_process(capsys):
    """`torchrun --nproc-per-node 2 -m specmoe_ext generate --tp 2 --draft model ...`: rank 0 prints the
    JSON, with the same tokens as one process; the other rank prints nothing."""
    from specmoe_ext.cli import main
    argv = ["generate", "--device", "cpu", "--no-progress", "--json", "--max-new-tokens", "10", "--ignore-eos",
            "--prompt", "Return a new", "--prompt", "The value", "--draft", "model", "--tree", "chain:3"]
    assert main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    p = _torchrun(2, ["-m", "specmoe_ext", *argv, "--tp", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(p.stdout)
    assert [o["tokens"] for o in two["outputs"]] == [o["tokens"] for o in one["outputs"]]
    par = two["parallel"]
    assert {k: par[k] for k in ("tp", "ep", "budget_balance", "world")} == {"tp": 2, "ep": 1,
                                                                             "budget_balance": "global", "world": 2}
    assert par["parameters_per_rank"] < one["parameters"]               # this rank's shard only


@pytest.mark.bad_input(2)
def test_bad_cli_configurations_end_every_rank_with_the_message():
    p = _torchrun(3, ["-m", "specmoe_ext", "generate", "--device", "cpu", "--max-new-tokens", "4", "--prompt", "a",
                      "--tp", "3"])
    assert p.returncode != 0
    assert p.stderr.count("tp=3 does not divide the model's 4 attention heads") >= 3, p.stderr[-3000:]
    p = _torchrun(2, ["-m", "specmoe_ext", "generate", "--device", "cpu", "--max-new-tokens", "4", "--prompt", "a",
                      "--ep", "3"])
    assert p.returncode != 0 and "--ep 3 needs 3 processes, got WORLD_SIZE=2" in p.stderr, p.stderr[-3000:]


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    """Rank 1 raises in the middle of generation while rank 0 waits in a collective: both exit within
    seconds (not the collective timeout), rank 0 naming rank 1's error."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys\n"
        "from specmoe_ext.models import load_model\n"
        "from specmoe_ext.speculative import generate\n"
        "from specmoe_ext.models.parallel import ParallelConfig, report_failure\n"
        f"m = load_model({str(TINY_DIR / 'target')!r}, 'cpu', 'float32', parallel=ParallelConfig(tp=2, timeout_s=90))\n"
        "rank = int(os.environ['RANK'])\n"
        "try:\n"
        "    if rank == 1:\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    generate(m, [[5, 6, 7]], 8)\n"
        "except Exception as e:\n"
        "    report_failure(rank, str(e))\n"
        "    raise\n")
    import time
    t0 = time.time()
    p = _torchrun(2, [str(script)], timeout=80)
    assert p.returncode != 0
    assert time.time() - t0 < 60
    assert "stopping: rank 1: injected failure on rank 1" in p.stderr, p.stderr[-3000:]


def test_spec_auto_and_budget_under_expert_parallelism(capsys):
    """`--ep 2 --spec auto` (host decisions on timings: the ranks agree on the slowest rank's) and a
    rank-balanced budget run to the end with rank 0's JSON; --spec auto is lossless: one process's tokens."""
    from specmoe_ext.cli import main
    base = ["generate", "--device", "cpu", "--no-progress", "--json", "--max-new-tokens", "16", "--ignore-eos",
            "--prompt", "Return a new", "--prompt", "The default value of the", "--draft", "model"]
    assert main([*base, "--spec", "auto"]) == 0
    one = json.loads(capsys.readouterr().out)
    p = _torchrun(2, ["-m", "specmoe_ext", *base, "--spec", "auto", "--ep", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert [o["tokens"] for o in json.loads(p.stdout)["outputs"]] == [o["tokens"] for o in one["outputs"]]
    p = _torchrun(2, ["-m", "specmoe_ext", *base, "--budget", "4", "--ep", "2", "--budget-balance", "rank"])
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)["speculative"]
    assert max(s["experts_loaded_per_layer"]) <= 4


@pytest.mark.bad_input(2)
def test_families_not_split_yet_are_refused():
    from specmoe_ext.models import get_preset
    with pytest.raises(ValueError, match="GPT-OSS's clamped-SwiGLU experts are not split yet"):
        check_config(get_preset("gpt-oss-20b").args(), ParallelConfig(ep=2))
    with pytest.raises(ValueError, match="latent attention / sinks\\) is not split yet: use --ep"):
        check_config(get_preset("deepseek-v2-lite").args(), ParallelConfig(tp=2))
    check_config(get_preset("deepseek-v2-lite").args(), ParallelConfig(ep=2))      # EP: attention replicated


def test_expert_parallel_deepseek_and_glm_equal_one_process():
    """EP over 3 ranks for DeepSeek-V3 (latent attention replicated; sigmoid, grouped top-k with the
    correction bias and the routed scaling, dense first layer, ungated shared expert) and GLM-4.5 (with
    its MTP layer): logits within fp32 rounding of one process, greedy generation identical."""
    from test_families_new import family_checkpoint, prompts as family_prompts
    paths = {v: str(family_checkpoint(v)[0]) for v in ("deepseek_v3", "glm4_moe+mtp")}
    plist = family_prompts((5, 2, 9))
    ref = {}
    for f, p in paths.items():
        m = load_model(p, "cpu", "float32")
        ref[f] = (_batched_logits(m, plist), generate(m, plist, 6).tokens)
    ranks = spawn(logits_and_greedy, 3, mode="ep", paths=paths, prompts=plist, new_tokens=6)
    for f in paths:
        for got, want in zip(ranks[0][f]["logits"], ref[f][0]):
            assert (got - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item()), f
        assert all(r[f]["greedy"] == ref[f][1] for r in ranks), f

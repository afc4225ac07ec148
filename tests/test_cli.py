"""The `specmoe` command: generate with the embedded default model, JSON output, flags, errors.

Shape legend: bs prompts per call (one per --prompt), N generated tokens per prompt.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specmoe_ext.cli import build_parser, main


def _run_json(capsys, *argv):
    assert main(["generate", "--json", "--no-progress", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_runs_embedded_tiny_model(capsys):
    out = _run_json(capsys, "--max-new-tokens", "12", "--device", "cpu")
    assert out["model"] == "tiny" and out["architecture"] == "Qwen3MoeForCausalLM"
    assert out["device"] == "cpu" and out["dtype"] == "float32"
    (o,) = out["outputs"]
    assert 1 <= len(o["tokens"]) <= 12 and o["finish_reason"] in ("stop", "length")
    assert isinstance(o["text"], str) and len(o["text"]) > 0
    s = out["stats"]
    assert s["generated_tokens"] == len(o["tokens"]) and s["tokens_per_s"] > 0 and s["cuda_graph"] is False


def test_batch_of_prompts_and_sampling_flags(capsys):
    args = ["--prompt", "Return the", "--prompt", "def parse(text):\n    \"\"\"Parse", "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--device", "cpu",
            "--ignore-eos"]
    a = _run_json(capsys, *args)
    b = _run_json(capsys, *args)
    assert [o["tokens"] for o in a["outputs"]] == [o["tokens"] for o in b["outputs"]]   # seeded
    assert [len(o["tokens"]) for o in a["outputs"]] == [6, 6]
    assert a["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 3}


def test_model_folder_and_human_output(capsys):
    from specmoe_ext.models.presets import PRESETS
    assert main(["generate", "--model", str(PRESETS["tiny"].draft_path), "--prompt", "Return",
                 "--max-new-tokens", "5", "--device", "cpu", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Return") and "tokens/s" in cap.err and "Qwen3ForCausalLM" in cap.err


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--preset", "nope"], "unknown preset 'nope'; available: tiny"),
    (["--model", "/nonexistent/dir"], "does not exist"),
    (["--top-p", "0"], "top_p must be in"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_errors_are_clear(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", "--no-progress", "--device", "cpu", *argv])


@pytest.mark.bad_input(1)
def test_model_and_preset_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "--preset", "tiny"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_models_listing(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in out["presets"]]
    assert names == ["tiny", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-57b-a14b", "mixtral-8x7b", "gpt-oss-20b",
                     "deepseek-v2-lite", "deepseek-v3-lite"]
    assert "OlmoeForCausalLM" in out["architectures"]


def test_parser_is_extensible():
    """Later features add flags to existing subcommands through build_parser()."""
    parser, subs = build_parser()
    subs["generate"].add_argument("--future-flag")
    a = parser.parse_args(["generate", "--future-flag", "d"])
    assert a.future_flag == "d" and a.preset is None and a.draft is None   # --draft exists since issue 4


@pytest.mark.bad_input(1)
def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["specmoe_ext", "specmoe_ext.cli"])
def test_module_entry_points_run(module):
    r = subprocess.run([sys.executable, "-m", module, "generate", "--max-new-tokens", "3",
                        "--json", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["generated_tokens"] <= 3


def test_version(capsys):
    import specmoe_ext
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"specmoe {specmoe_ext.__version__}"
    r = subprocess.run([sys.executable, "-m", "specmoe_ext", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"specmoe {specmoe_ext.__version__}"


def test_help_shows_defaults():
    _, subs = build_parser()
    text = " ".join(subs["generate"].format_help().split())            # argparse wraps lines
    for flag_default in ("--max-new-tokens N tokens to generate per prompt (default: 64)",
                         "(default: 'Return a new')", "1 = off (default: 1.0)", "(default: auto)",
                         "--tree SPEC", "keep the M best overall) (default: chain:4)", "--threads N",
                         "(default: OMP_NUM_THREADS if set, else 1 for models under 100M parameters",
                         "--seed S", "give the same tokens on every run", "0 = greedy; finite, >= 0 (default: 0.0)",
                         "0 = off (default: 0)"):
        assert flag_default in text, flag_default
    assert "(default: None)" not in text and "(default: False)" not in text
    plan = " ".join(subs["plan"].format_help().split())
    assert "(default: profile.json)" in plan and "(default: 1,4,8)" in plan and "(default: 16)" in plan
    demo = " ".join(subs["demo"].format_help().split())
    assert "(default: 5)" in demo and "(default: model)" in demo


def _word_level_folder(tmp_path):
    import shutil
    from test_loader import word_level_tokenizer
    from specmoe_ext.models.presets import PRESETS
    d = tmp_path / "words"
    shutil.copytree(PRESETS["tiny"].path, d)
    word_level_tokenizer(d / "tokenizer.json")
    return d


def test_prompt_and_continuation_keep_their_word_boundary(capsys, tmp_path):
    """The tokenizer's decoder joins words with spaces: the continuation is decoded after the prompt, so the
    printed text is "w5 w17 w93 ...", not "w5 w17w93 ..." (token ids unchanged)."""
    from specmoe_ext.models import load_tokenizer
    d = _word_level_folder(tmp_path)
    tok = load_tokenizer(d)
    argv = ["--model", str(d), "--prompt", "w5 w17", "--max-new-tokens", "6", "--ignore-eos", "--device", "cpu"]
    (o,) = _run_json(capsys, *argv)["outputs"]
    assert o["text"].startswith(" w") and o["text"] == " " + tok.decode(o["tokens"])
    assert "w5 w17" + o["text"] == tok.decode(tok.encode("w5 w17") + o["tokens"])
    assert main(["generate", "--no-progress", *argv]) == 0
    assert capsys.readouterr().out.startswith("w5 w17" + o["text"] + "\n")


def test_threads_default_and_flag(capsys, monkeypatch):
    import torch
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _run_json(capsys, "--max-new-tokens", "2", "--device", "cpu")["stats"]["threads"] == 1   # tiny: < 100M
    assert _run_json(capsys, "--max-new-tokens", "2", "--device", "cpu", "--threads", "2")["stats"]["threads"] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                  # the user's environment is respected
    assert _run_json(capsys, "--max-new-tokens", "2", "--device", "cpu")["stats"]["threads"] == before
    assert torch.get_num_threads() == before                    # main restores the caller's thread count

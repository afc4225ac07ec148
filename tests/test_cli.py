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


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "nope"], "unknown preset 'nope'; available: tiny"),
    (["--model", "/nonexistent/dir"], "does not exist"),
    (["--top-p", "0"], "top_p must be in"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_errors_are_clear(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", "--no-progress", "--device", "cpu", *argv])


def test_model_and_preset_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "--preset", "tiny"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_models_listing(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in out["presets"]]
    assert names == ["tiny", "qwen3-30b-a3b", "olmoe-1b-7b", "qwen2-57b-a14b", "mixtral-8x7b"]
    assert "OlmoeForCausalLM" in out["architectures"]


def test_parser_is_extensible():
    """Later features add flags to existing subcommands through build_parser()."""
    parser, subs = build_parser()
    subs["generate"].add_argument("--future-flag")
    a = parser.parse_args(["generate", "--future-flag", "d"])
    assert a.future_flag == "d" and a.preset is None and a.draft is None   # --draft exists since issue 4


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "specmoe_ext.cli", "generate", "--max-new-tokens", "3",
                        "--json", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["generated_tokens"] <= 3

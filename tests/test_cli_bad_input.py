"""Bad input to `specmoe generate|demo|plan`: every case is one `specmoe <cmd>: ...` line naming the flag, key
or file, raised before the model is loaded (the `no_load` fixture fails a test that gets that far) and
before anything of the run's size is allocated.

Shape legend: P prompt tokens, N --max-new-tokens, S KV-cache slots per request.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specmoe_ext import cli
from specmoe_ext.cli import main
from specmoe_ext.models import loader
from specmoe_ext.models.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = PRESETS["tiny"].path


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading (or building) the target model."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error was detected")
    monkeypatch.setattr(cli, "_load_target", boom)


@pytest.fixture
def small_host(monkeypatch):
    """A host with 8 GiB available of 16 GiB, whatever this machine has."""
    mem = {"MemAvailable": 8 << 30, "MemTotal": 16 << 30}
    monkeypatch.setattr(loader, "_meminfo_bytes", mem.get)


def _folder(tmp_path: Path, edit_config=None, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(TINY, d)
    if edit_config is not None:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _gen(*argv):
    return main(["generate", "--no-progress", "--device", "cpu", *argv])


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--temperature", "nan"], r"^specmoe generate: --temperature: temperature must be finite and >= 0, got nan$"),
    (["--temperature", "inf"], r"--temperature: temperature must be finite"),
    (["--temperature", "-1"], r"--temperature: temperature must be finite and >= 0, got -1"),
    (["--top-p", "nan"], r"--top-p: top_p must be in \(0, 1\], got nan"),
    (["--top-p", "inf", "--draft", "model"], r"--top-p: top_p must be in \(0, 1\], got inf"),
    (["--temperature", "nan", "--draft", "ngram"], r"--temperature: temperature must be finite"),
    (["--top-k", "-2"], r"--top-k: top_k must be >= 0"),
    (["--device", "tpu"], r"^specmoe generate: --device: unknown device 'tpu': expected auto, cpu, cuda or cuda:N$"),
    (["--threads", "0"], r"--threads 0: must be >= 1"),
    (["--draft", "model", "--tree", "chain:0"], r"chain length must be >= 1"),
    (["--draft", "model", "--tree", "static:"], r"static needs branching factors"),
    (["--draft", "bogus"], r"unknown drafter 'bogus'"),
    (["--draft", "self:x"], r"self:N needs an integer N"),
    (["--draft", "self:99"], r"resident experts per layer must be in \[top_k=2, E=8\], got 99"),
    (["--draft", "model:/nonexistent/draft"], r"checkpoint folder '/nonexistent/draft' does not exist"),
    (["--draft", "eagle"], r"--draft eagle needs the head folder"),
    (["--draft", "model", "--budget", "1000"], r"^specmoe generate: --budget 1000: expert budget 1000 exceeds the "
                                               r"8 experts per MoE layer"),
    (["--draft", "model", "--budget", "4,4,4,9"], r"--budget 4,4,4,9: expert budget 9 exceeds the 8 experts"),
    (["--draft", "model", "--budget", "1"], r"--budget 1: expert budget 1 < top_k 2"),
    (["--draft", "model", "--spec", "auto", "--spec-candidates", "k=2;budget=9"],
     r"--spec-candidates budget 9: expert budget 9 exceeds the 8 experts"),
    (["--draft", "model", "--spec", "auto", "--profile-alpha", "2"], r"--profile-alpha must be in \[0, 1\]"),
    (["--draft", "model", "--verify-width", "4"], r"^specmoe generate: --verify-width applies to --verify adaptive$"),
    (["--draft", "model", "--verify", "adaptive", "--profile", "p.json", "--tree", "static:2,2,1", "--verify-width", "3"],
     r"--verify-width 3: must be in \[4, 11\] for --tree static:2,2,1 \(depth 3, 11 nodes\)"),
    (["--draft", "model", "--verify", "adaptive", "--profile", "p.json", "--tree", "chain:4", "--verify-width", "9"],
     r"--verify-width 9: must be in \[5, 5\]"),
    (["--max-new-tokens", "5000"], r"^specmoe generate: the longest prompt \(3 tokens\) \+ --max-new-tokens 5000: 5003 "
                                   r"positions exceed max_position_embeddings=2048 of tiny; lower --max-new-tokens, "
                                   r"or pass --allow-long-context to run past it$"),
    (["--max-new-tokens", "2046", "--draft", "model"], r"2049 positions exceed max_position_embeddings=2048"),
    (["--max-new-tokens", "0"], r"--max-new-tokens must be >= 1"),
    (["--preset", "nope"], r"unknown preset 'nope'"),
])
def test_generate_flags_are_checked_before_loading(no_load, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        _gen(*argv)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--budget", "1000"], r"^specmoe demo: --budget 1000: expert budget 1000 exceeds the 8 experts"),
    (["--tree", "bush:1"], r"unknown kind 'bush'"),
    (["--draft", "medusa"], r"unknown drafter 'medusa'"),
    (["--max-new-tokens", "4000"], r"4003 positions exceed max_position_embeddings=2048"),
    (["--device", "tpu"], r"unknown device 'tpu'"),
    (["--repeats", "0"], r"--repeats must be >= 1"),
])
def test_demo_flags_are_checked_before_loading(no_load, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["demo", "--device", "cpu", *argv])


def _config_edits():
    return [
        ("config-list", lambda d: (d / "config.json").write_text("[1, 2]"),
         r"config.json must hold a JSON object \(key: value pairs\), got a list"),
        ("string-hidden-size", lambda d: _edit(d, hidden_size="128"),
         r"config key 'hidden_size' must be an integer >= 1, got '128'"),
        ("600-experts", lambda d: _edit(d, num_experts=600), r"num_experts=600 exceeds the 512 experts"),
        ("top-k-17", lambda d: _edit(d, num_experts_per_tok=17, num_experts=32),
         r"num_experts_per_tok=17 must be in \[1, min\(num_experts=32, 16\)\]"),
        ("corrupt-tokenizer", lambda d: (d / "tokenizer.json").write_text("{bad"),
         r"tokenizer.json is not a valid tokenizer file"),
        ("bad-generation-config", lambda d: (d / "generation_config.json").write_text("{"),
         r"generation_config.json is not valid JSON"),
        ("weight-map-list", lambda d: _index(d, lambda wm: list(wm)), r"'weight_map' must map tensor names"),
        ("weight-map-int", lambda d: _index(d, lambda wm: {k: 1 for k in wm}),
         r"'weight_map' values must be shard file names"),
        ("shard-outside", lambda d: _index(d, lambda wm: {k: "../outside.safetensors" for k in wm}),
         r"shard paths must stay inside the checkpoint folder, got '../outside.safetensors'"),
        ("weights-folder", lambda d: _replace(d, "model.safetensors", lambda p: p.mkdir()),
         r"model.safetensors is a folder, not a file"),
        ("weights-symlink-loop", lambda d: _replace(d, "model.safetensors", lambda p: p.symlink_to(p)),
         r"model.safetensors is a symlink loop"),
        ("sliding-window", lambda d: _edit(d, use_sliding_window=True, sliding_window=8),
         r"^specmoe generate: the longest prompt \(3 tokens\) \+ --max-new-tokens 8 needs 12 cache slots: sequence "
         r"capacity 12 exceeds 8 tokens: sliding-window attention \(window 8\) is not implemented; it only changes "
         r"results for sequences longer than the window$"),
    ]


def _edit(d: Path, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))


def _index(d: Path, weight_map):
    """model.safetensors -> one shard named by an index whose weight_map is weight_map(the real map)."""
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        real = {k: "model.safetensors" for k in f.keys()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map(real)}))
    shutil.copy(d / "model.safetensors", d.parent / "outside.safetensors")


def _replace(d: Path, name: str, make):
    (d / name).unlink()
    make(d / name)


@pytest.mark.bad_input
@pytest.mark.parametrize("case,edit,msg", _config_edits(), ids=[c[0] for c in _config_edits()])
def test_bad_checkpoint_folders_are_one_line_errors(tmp_path, no_load, case, edit, msg):
    d = _folder(tmp_path)
    edit(d)
    with pytest.raises(SystemExit, match=msg):
        _gen("--model", str(d), "--max-new-tokens", "8")


@pytest.mark.bad_input(2)
def test_sliding_window_limits_of_the_speculative_path_and_the_draft(tmp_path, no_load):
    d = _folder(tmp_path, lambda cfg: cfg.update(use_sliding_window=True, sliding_window=16))
    with pytest.raises(SystemExit, match=r"needs \d+ cache slots: sequence capacity \d+ exceeds 16 tokens"):
        _gen("--model", str(d), "--max-new-tokens", "8", "--draft", "ngram")
    draft = tmp_path / "draft"
    shutil.copytree(PRESETS["tiny"].draft_path, draft)
    _edit(draft, layer_types=["sliding_attention", "full_attention"], sliding_window=12)
    with pytest.raises(SystemExit, match=r"exceeds 12 tokens: sliding-window attention \(window 12\)"):
        _gen("--max-new-tokens", "8", "--draft", f"model:{draft}")


@pytest.mark.bad_input(3)
def test_host_memory_is_estimated_before_allocating(no_load, small_host):
    with pytest.raises(SystemExit, match=r"^specmoe generate: qwen3-30b-a3b: needs 113.8 GiB of memory \(weights "
                                         r"113.74 GiB \+ KV cache 0.02 GiB, float32\) but cpu has only 8.0 GiB "
                                         r"available \(MemAvailable\) of 16.0 GiB; try --dtype bfloat16"):
        _gen("--preset", "qwen3-30b-a3b")
    with pytest.raises(SystemExit, match=r"tiny: needs \d+\.\d GiB of memory \(weights 0.01 GiB \+ KV cache "
                                         r"\d+\.\d+ GiB, float32\) .*; lower --max-new-tokens or the number of prompts"):
        _gen("--max-new-tokens", "1000000000", "--allow-long-context")
    with pytest.raises(SystemExit, match=r"plan: qwen3-30b-a3b: needs \d+\.\d GiB of memory"):
        main(["plan", "--device", "cpu", "--preset", "qwen3-30b-a3b", "--dtype", "bfloat16"])


def test_allow_long_context_warns_and_runs(capsys):
    assert _gen("--max-new-tokens", "2100", "--allow-long-context", "--json") == 0
    err = capsys.readouterr().err
    assert "warning: the longest prompt (3 tokens) + --max-new-tokens 2100: 2103 positions exceed" in err


@pytest.mark.bad_input
@pytest.mark.parametrize("argv,msg", [
    (["--out", "/nonexistent/dir/p.json"], r"^specmoe plan: --out /nonexistent/dir/p.json: folder "
                                           r"'/nonexistent/dir' does not exist$"),
    (["--plot", "/nonexistent/dir/p.png"], r"--plot /nonexistent/dir/p.png: folder '/nonexistent/dir' does not exist"),
    (["--out", "."], r"--out .: is a folder"),
    (["--device", "tpu"], r"unknown device 'tpu'"),
    (["--threads", "-1"], r"--threads -1: must be >= 1"),
    (["--draft-model", "/nonexistent/draft"], r"--draft-model: checkpoint folder '/nonexistent/draft' does not exist"),
    (["--preset", "olmoe-1b-7b", "--budgets", "65"], r"--budgets 65: expert budget 65 exceeds the 64 experts"),
])
def test_plan_flags_are_checked_before_loading_or_measuring(no_load, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["plan", "--device", "cpu", "--max-bs", "1", "--repeats", "1", *argv])


@pytest.mark.bad_input(1)
def test_plan_refuses_a_dense_target_before_loading(no_load):
    with pytest.raises(SystemExit, match=r"performance model is for MoE targets \(Qwen3ForCausalLM has no experts\)"):
        main(["plan", "--device", "cpu", "--model", str(PRESETS["tiny"].draft_path)])


@pytest.mark.bad_input(1)
def test_check_weights_refuses_nan_weights(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file
    d = _folder(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.mlp.gate.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=rf"^specmoe generate: {d}: tensors with NaN or Inf values: {key}$"):
        _gen("--model", str(d), "--check-weights", "--max-new-tokens", "2")
    assert torch.isnan(sd[key]).any()

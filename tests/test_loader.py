"""Checkpoint loader: formats (single file, shards, fused experts), dtypes, and every error case, each
raised with a message naming the offending thing and before the model is allocated.

Shape legend: h hidden, E experts, f expert FFN, V vocab.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest_models import FAMILIES, hf_checkpoint, prompts

from specmoe_ext.models import loader
from specmoe_ext.models.loader import CheckpointError, hf_state_dict, load_model, load_tokenizer


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if the loader gets as far as allocating the model."""
    def boom(*a, **k):
        raise AssertionError("model was allocated before the error was detected")
    monkeypatch.setattr(loader, "empty_model", boom)


def _copy(family, tmp_path):
    src, _ = hf_checkpoint(family)
    dst = tmp_path / family
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    """Apply fn(state_dict) -> state_dict to model.safetensors."""
    sd = load_file(str(path / "model.safetensors"))
    save_file(fn(sd), str(path / "model.safetensors"), metadata={"format": "pt"})


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]


@pytest.mark.bad_input(4)
def test_missing_folder_and_files(tmp_path, no_allocation):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_model(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(empty)


@pytest.mark.bad_input(1)
def test_no_weights_file_names_what_was_found(tmp_path, no_allocation):
    d = _copy("llama", tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*found pytorch_model.bin"):
        load_model(d)


@pytest.mark.bad_input(1)
def test_unsupported_architecture_lists_supported(tmp_path, no_allocation):
    d = _copy("qwen2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: "
                                              r"MixtralForCausalLM, .*Qwen3ForCausalLM"):
        load_model(d)


@pytest.mark.bad_input
@pytest.mark.parametrize("change,msg", [
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope type 'longrope' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(hidden_size=None), "missing required key 'hidden_size'"),
    (dict(hidden_size="64"), r"config key 'hidden_size' must be an integer >= 1, got '64'"),
    (dict(num_hidden_layers=0), r"config key 'num_hidden_layers' must be an integer >= 1, got 0"),
    (dict(num_attention_heads=4.5), r"config key 'num_attention_heads' must be an integer"),
    (dict(vocab_size=True), r"config key 'vocab_size' must be an integer >= 1, got True"),
    (dict(rms_norm_eps="1e-6"), r"config key 'rms_norm_eps' must be a finite number > 0"),
    (dict(tie_word_embeddings="no"), r"config key 'tie_word_embeddings' must be true or false, got 'no'"),
    (dict(eos_token_id="</s>"), r"config key 'eos_token_id' must be an integer >= 0"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": "4", "rope_theta": 1e4}),
     r"config key \"rope_parameters\['factor'\]\" must be a finite number"),
    (dict(architectures="Qwen3ForCausalLM"), "config key 'architectures' must be a list of names"),
])
def test_unsupported_config_values_are_named(tmp_path, no_allocation, change, msg):
    d = _copy("qwen3", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)


@pytest.mark.bad_input(1)
def test_missing_tensor_is_named(tmp_path, no_allocation):
    d = _copy("qwen3_moe", tmp_path)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing tensors .*{key}"):
        load_model(d)


@pytest.mark.bad_input(1)
def test_unexpected_tensor_is_named(tmp_path, no_allocation):
    d = _copy("olmoe", tmp_path)
    _rewrite(d, lambda sd: {**sd, "model.layers.0.mlp.extra_bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model.layers.0.mlp.extra_bias"):
        load_model(d)


@pytest.mark.bad_input(1)
def test_shape_mismatch_is_named_with_both_shapes(tmp_path, no_allocation):
    d = _copy("mixtral", tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite(d, lambda sd: {**sd, key: torch.zeros(64, 95)})
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key} \[64, 95\] \(expected \[64, 96\]\)"):
        load_model(d)


@pytest.mark.bad_input(1)
def test_unsupported_tensor_dtype_is_named(tmp_path, no_allocation):
    d = _copy("qwen2", tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(d, lambda sd: {**sd, key: sd[key].to(torch.int8)})
    with pytest.raises(CheckpointError, match=rf"unsupported tensor dtype: {key} \(I8\)"):
        load_model(d)


@pytest.mark.bad_input(1)
def test_unsupported_target_dtype(tmp_path, no_allocation):
    d, _ = hf_checkpoint("qwen2")
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        load_model(d, dtype="int8")


@pytest.mark.bad_input(1)
def test_missing_shard_is_named(tmp_path, no_allocation):
    d = _copy("qwen2_moe", tmp_path)
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d)
    sharded = tmp_path / "sharded"
    m.save_pretrained(sharded, max_shard_size="200KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard files .*missing: {shards[1]}"):
        load_model(sharded)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    d, hf = hf_checkpoint("qwen2_moe")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = prompts((9,))[0]
    torch.testing.assert_close(_logits(load_model(sharded), ids), _logits(load_model(d), ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_fused_expert_layout_loads_identically(tmp_path, family):
    """transformers>=5 in-memory layout (mlp.experts.gate_up_proj [E, 2f, h] / down_proj [E, h, f])."""
    d, _ = hf_checkpoint(family)
    ref = load_model(d)
    out = tmp_path / "fused"
    shutil.copytree(d, out)
    sd = {k: v.contiguous().clone() for k, v in hf_state_dict(ref, fused_experts=True).items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd) and not any(".experts.0." in k for k in sd)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = prompts((6,))[0]
    torch.testing.assert_close(_logits(load_model(out), ids), _logits(ref, ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_round_trip_to_the_checkpoint(family):
    """Every checkpoint tensor lands in its slot: mapping our stacked/fused parameters back to HF names
    gives exactly the saved tensors (tied embeddings: no separate lm_head)."""
    d, hf = hf_checkpoint(family)
    ours = hf_state_dict(load_model(d))
    on_disk = load_file(str(d / "model.safetensors"))
    assert set(ours) == set(on_disk) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    for k, v in ours.items():
        assert torch.equal(v, on_disk[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_in_reduced_precision(dtype):
    d, _ = hf_checkpoint("llama")
    m = load_model(d, "cpu", dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in m.parameters())
    assert m.inv_freq.dtype == torch.float32      # RoPE frequencies stay float32


@pytest.mark.bad_input(2)
def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    d, _ = hf_checkpoint("qwen2")                 # a random checkpoint: no tokenizer files
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(d)


def test_tokenizer_matches_transformers_autotokenizer():
    from transformers import AutoTokenizer
    from specmoe_ext.models.presets import PRESETS
    path = PRESETS["tiny"].path
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
    for text in ["def f(x):\n    return x + 1", "Return the sum of a and b.", "  spaces  and\ttabs\n\n"]:
        assert ours.encode(text) == theirs(text).input_ids
        assert ours.decode(ours.encode(text)) == text
    assert theirs.eos_token_id in ours.eos_token_ids


# ---- files and formats that must be refused (or reported), each before the model is allocated ----------

def _write_config(d, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.bad_input
@pytest.mark.parametrize("change,msg", [
    (dict(num_experts=600), r"num_experts=600 exceeds the 512 experts per layer the routing kernels support"),
    (dict(num_experts_per_tok=17, num_experts=32), r"num_experts_per_tok=17 must be in \[1, min\(num_experts=32, 16\)\]"),
    (dict(num_experts_per_tok=0), r"config key 'num_experts_per_tok' must be an integer >= 1"),
    (dict(decoder_sparse_step=0), r"config key 'decoder_sparse_step' must be an integer >= 1, got 0"),
    (dict(mlp_only_layers=[1, "2"]), r"config key 'mlp_only_layers' must be an integer >= 0"),
])
def test_moe_configs_beyond_the_kernels_are_refused_at_load(tmp_path, no_allocation, change, msg):
    """Configs that used to load and then fail in the first forward's routing kernel."""
    d = _copy("qwen3_moe", tmp_path)
    _write_config(d, **change)
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)


def test_config_kernel_limits_match_the_kernel_headers():
    import re
    from pathlib import Path
    from specmoe_ext.models.config import MAX_EXPERTS, MAX_TOP_K
    root = Path(__file__).resolve().parent.parent / "csrc" / "kernels"
    routing, fused = (root / "routing.h").read_text(), (root / "fused_moe.h").read_text()
    const = lambda text, name: int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))  # noqa: E731
    assert const(routing, "kMaxExperts") == const(fused, "kMaxExperts") == MAX_EXPERTS
    assert const(routing, "kMaxTopK") == MAX_TOP_K


@pytest.mark.bad_input(3)
def test_config_that_is_not_an_object(tmp_path, no_allocation):
    from specmoe_ext.models import ModelArgs, UnsupportedModelError
    d = _copy("qwen3", tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object .*got a list"):
        load_model(d)
    with pytest.raises(UnsupportedModelError, match="config must be a JSON object"):
        ModelArgs.from_hf_config(["Qwen3ForCausalLM"])
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config.json is a folder, not a file"):
        load_model(d)


def _sharded(tmp_path, family="qwen2_moe"):
    _, hf = hf_checkpoint(family)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    return sharded, sharded / "model.safetensors.index.json"


def _edit_index(index, fn):
    doc = json.loads(index.read_text())
    fn(doc)
    index.write_text(json.dumps(doc))


@pytest.mark.bad_input
@pytest.mark.parametrize("edit,msg", [
    (lambda doc: doc.update(weight_map=list(doc["weight_map"])), r"'weight_map' must map tensor names .*got list"),
    (lambda doc: doc.pop("weight_map"), r"'weight_map' must map tensor names .*got none"),
    (lambda doc: doc["weight_map"].update({"model.norm.weight": 3}), r"values must be shard file names, got "
                                                                      r"'model.norm.weight': 3"),
    (lambda doc: doc["weight_map"].update({"model.norm.weight": "../outside.safetensors"}),
     r"shard paths must stay inside the checkpoint folder, got '../outside.safetensors'"),
    (lambda doc: doc["weight_map"].update({"model.norm.weight": "sub/../../outside.safetensors"}),
     r"must stay inside the checkpoint folder, got 'sub/../../outside.safetensors'"),
    (lambda doc: doc["weight_map"].update({"model.norm.weight": "/tmp/outside.safetensors"}),
     r"must stay inside the checkpoint folder, got '/tmp/outside.safetensors'"),
])
def test_bad_shard_index_is_refused(tmp_path, no_allocation, edit, msg):
    sharded, index = _sharded(tmp_path)
    # a real shard outside the folder: the loader used to read it
    shutil.copy(next(sharded.glob("model-*.safetensors")), tmp_path / "outside.safetensors")
    _edit_index(index, edit)
    with pytest.raises(CheckpointError, match=msg):
        load_model(sharded)


@pytest.mark.bad_input(4)
def test_symlink_loops_folders_and_broken_links_are_named(tmp_path, no_allocation):
    d = _copy("llama", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model.safetensors is a folder, not a file"):
        load_model(d)
    (d / "model.safetensors").rmdir()
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a symlink loop"):
        load_model(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a broken symlink"):
        load_model(d)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match=r"checkpoint folder '.*loop' is a symlink loop"):
        load_model(loop)


def test_symlinked_files_inside_the_folder_still_load(tmp_path):
    """Hugging Face cache snapshots link each file to ../../blobs/...: the links may leave the folder."""
    src, _ = hf_checkpoint("llama")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    shutil.copytree(src, blobs)
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    ids = prompts((5,))[0]
    torch.testing.assert_close(_logits(load_model(snap), ids), _logits(load_model(src), ids), atol=0, rtol=0)


@pytest.mark.bad_input(2)
def test_nan_weights_are_refused_on_request(tmp_path):
    d = _copy("qwen3", tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite(d, lambda sd: {**sd, key: sd[key].index_fill(1, torch.tensor([3]), float("nan"))})
    assert torch.isnan(load_model(d).layers[1].ffn.w2.weight).any()      # off by default: loads as it is
    with pytest.raises(CheckpointError, match=rf"tensors with NaN or Inf values: {key}"):
        load_model(d, check_finite=True)
    _rewrite(d, lambda sd: {**sd, key: torch.full_like(sd[key], float("inf"))})
    with pytest.raises(CheckpointError, match=rf"NaN or Inf values: {key}"):
        load_model(d, check_finite=True)


def test_meta_load_checks_and_builds_shapes_only():
    d, _ = hf_checkpoint("olmoe")
    m = load_model(d, "meta")
    assert all(p.is_meta for p in m.parameters())
    assert loader.param_bytes(m.args, torch.float32) == sum(p.numel() * 4 for p in m.parameters())


@pytest.mark.bad_input(3)
def test_device_names_are_checked(tmp_path):
    from specmoe_ext.models.loader import resolve_device
    with pytest.raises(CheckpointError, match=r"unknown device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(CheckpointError, match="unknown device"):
        load_model(hf_checkpoint("qwen2")[0], "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(CheckpointError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.bad_input(1)
def test_host_memory_is_checked_before_allocating(monkeypatch, no_allocation):
    from specmoe_ext.models.loader import NotEnoughMemoryError, available_memory, check_device_memory
    avail, total = available_memory("cpu")
    assert 0 < avail <= total
    check_device_memory(1 << 20, "cpu", "small")
    monkeypatch.setattr(loader, "_meminfo_bytes", lambda field: {"MemAvailable": 1 << 30, "MemTotal": 2 << 30}[field])
    with pytest.raises(NotEnoughMemoryError, match=r"x: needs 3.0 GiB of weights but cpu has only 1.0 GiB "
                                                   r"available \(MemAvailable\) of 2.0 GiB"):
        check_device_memory(3 << 30, "cpu", "x")
    from specmoe_ext.models.presets import build_preset
    with pytest.raises(NotEnoughMemoryError, match="preset olmoe-1b-7b: needs 25.8 GiB of weights"):
        build_preset("olmoe-1b-7b", "cpu", "float32")
    check_device_memory(1 << 50, "meta", "shapes only")                    # meta: nothing to fit


def test_default_cpu_threads():
    from specmoe_ext.models.loader import SMALL_MODEL_PARAMS, default_cpu_threads
    assert default_cpu_threads(SMALL_MODEL_PARAMS - 1) == 1
    assert default_cpu_threads(SMALL_MODEL_PARAMS) == torch.get_num_threads()


def _tokenizer_folder(tmp_path):
    from specmoe_ext.models.presets import PRESETS
    d = tmp_path / "tok"
    shutil.copytree(PRESETS["tiny"].path, d)
    return d


@pytest.mark.bad_input(5)
def test_corrupt_tokenizer_and_generation_config_are_reported(tmp_path):
    d = _tokenizer_folder(tmp_path)
    good = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text("{bad")
    with pytest.raises(CheckpointError, match=r"tokenizer.json is not a valid tokenizer file"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text(good)
    (d / "generation_config.json").write_text("{\"eos_token_id\": ")
    with pytest.raises(CheckpointError, match=r"generation_config.json is not valid JSON"):
        load_tokenizer(d)
    (d / "generation_config.json").write_text("[0]")
    with pytest.raises(CheckpointError, match=r"generation_config.json must hold a JSON object"):
        load_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: config key 'eos_token_id' must be an "
                                              r"integer >= 0, got '</s>'"):
        load_tokenizer(d)
    (d / "generation_config.json").unlink()
    (d / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json is not valid JSON"):
        load_tokenizer(d)


def word_level_tokenizer(path, vocab_size: int = 2048):
    """A word-level tokenizer.json (words w0 .. w{V-1}, split on whitespace): its decoder joins words with
    spaces, so a continuation decoded alone loses the space before its first word."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_decode_continuation_keeps_word_boundaries(tmp_path):
    d = _tokenizer_folder(tmp_path)
    word_level_tokenizer(d / "tokenizer.json")
    tok = load_tokenizer(d)
    p, g = tok.encode("w5 self w17"), [93, 94]
    assert tok.decode(g) == "w93 w94"                                # alone: the boundary is lost
    assert tok.decode_continuation(p, g) == " w93 w94"
    tiny = load_tokenizer(_tokenizer_folder(tmp_path / "t"))
    p = tiny.encode("Return a new")
    g = tiny.encode("Return a new string, or None")[len(p):]
    assert "Return a new" + tiny.decode_continuation(p, g) == "Return a new string, or None"

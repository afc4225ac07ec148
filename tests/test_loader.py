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


def test_no_weights_file_names_what_was_found(tmp_path, no_allocation):
    d = _copy("llama", tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*found pytorch_model.bin"):
        load_model(d)


def test_unsupported_architecture_lists_supported(tmp_path, no_allocation):
    d = _copy("qwen2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: "
                                              r"MixtralForCausalLM, .*Qwen3ForCausalLM"):
        load_model(d)


@pytest.mark.parametrize("change,msg", [
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope type 'longrope' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(hidden_size=None), "missing required key 'hidden_size'"),
])
def test_unsupported_config_values_are_named(tmp_path, no_allocation, change, msg):
    d = _copy("qwen3", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)


def test_missing_tensor_is_named(tmp_path, no_allocation):
    d = _copy("qwen3_moe", tmp_path)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing tensors .*{key}"):
        load_model(d)


def test_unexpected_tensor_is_named(tmp_path, no_allocation):
    d = _copy("olmoe", tmp_path)
    _rewrite(d, lambda sd: {**sd, "model.layers.0.mlp.extra_bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model.layers.0.mlp.extra_bias"):
        load_model(d)


def test_shape_mismatch_is_named_with_both_shapes(tmp_path, no_allocation):
    d = _copy("mixtral", tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite(d, lambda sd: {**sd, key: torch.zeros(64, 95)})
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {key} \[64, 95\] \(expected \[64, 96\]\)"):
        load_model(d)


def test_unsupported_tensor_dtype_is_named(tmp_path, no_allocation):
    d = _copy("qwen2", tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(d, lambda sd: {**sd, key: sd[key].to(torch.int8)})
    with pytest.raises(CheckpointError, match=rf"unsupported tensor dtype: {key} \(I8\)"):
        load_model(d)


def test_unsupported_target_dtype(tmp_path, no_allocation):
    d, _ = hf_checkpoint("qwen2")
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        load_model(d, dtype="int8")


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

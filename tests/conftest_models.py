"""Shared helpers for the model-runtime tests (imported by test_models / test_loader / test_kv_cache /
test_generate / test_cli; not a pytest conftest, so it never affects other test files).

Shape legend: bs prompts, T tokens, V vocab (1000 in these configs).

`FAMILIES` holds, per supported architecture, a small random transformers config that also exercises that
family's peculiarities (q/k norms, shared expert, dense layers among MoE ones, biases, RoPE scaling
types, tied embeddings, GQA ratios, head_dim != hidden/heads). `hf_checkpoint(family)` builds the
transformers model with a fixed seed and `save_pretrained`s it once per session.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 1000
INIT_STD = 0.08  # larger than HF's 0.02 so attention and routing are far from uniform (a sharper test)


def _cfgs():
    T = transformers
    common = dict(vocab_size=VOCAB, initializer_range=INIT_STD, max_position_embeddings=512, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)),
        "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, dict(
            hidden_size=96, intermediate_size=160, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, **common)),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(
            hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=48, num_experts=16, num_experts_per_tok=4,
            norm_topk_prob=True, mlp_only_layers=[1], **common)),
        "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=8.0,
            **common)),
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                             "rope_theta": 500000.0}, **common)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, **common)),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                             "rope_theta": 10000.0}, **common)),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "qwen3"]
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
_ROOT = Path(tempfile.mkdtemp(prefix="specmoe_models_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def hf_config(family: str, **overrides):
    C, _, kw = _cfgs()[family]
    return C(**{**kw, **overrides})


@functools.lru_cache(maxsize=None)
def hf_checkpoint(family: str) -> tuple[Path, "torch.nn.Module"]:
    """(folder, transformers model in fp32 eval mode) for a family; saved once per test session."""
    _, M, _ = _cfgs()[family]
    torch.manual_seed(1234)
    model = M(hf_config(family)).eval()
    path = _ROOT / family
    model.save_pretrained(path)
    return path, model


def hf_model_in(family: str, dtype: torch.dtype, device: str = "cpu"):
    """A copy of the family's transformers model in `dtype` on `device` (the fp32 original is kept)."""
    import copy
    _, m = hf_checkpoint(family)
    return copy.deepcopy(m).to(device=device, dtype=dtype).eval()


PROMPT_LENS = (5, 11, 8)


def prompts(lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


def cuda_ok() -> bool:
    return torch.cuda.is_available()


def extension_has_cuda() -> bool:
    import specmoe_ext
    return specmoe_ext.cuda_kernels_available()

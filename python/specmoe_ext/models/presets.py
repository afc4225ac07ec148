"""Named models for benchmarking and demos, with no download.

Shape legend: h hidden, L layers, E experts, K experts per token, f expert FFN, V vocab.

Full-size presets build the real architectures (configs as published on the Hugging Face hub) with
seeded random weights generated directly on the target device (no host copy, no file):

    qwen3-30b-a3b   Qwen3MoeForCausalLM   L=48 h=2048 E=128 K=8  f=768            30.5B params, 61 GB bf16
    olmoe-1b-7b     OlmoeForCausalLM      L=16 h=2048 E=64  K=8  f=1024            6.9B params, 14 GB bf16
    qwen2-57b-a14b  Qwen2MoeForCausalLM   L=28 h=3584 E=64  K=8  f=2560 + shared  57.4B params, 115 GB bf16
    mixtral-8x7b    MixtralForCausalLM    L=32 h=4096 E=8   K=2  f=14336          46.7B params, 93 GB bf16
    gpt-oss-20b     GptOssForCausalLM     L=24 h=2880 E=32  K=4  f=2880  sinks, window 128 / full   20.9B, 42 GB
    deepseek-v2-lite DeepseekV2ForCausalLM L=27 h=2048 E=64 K=6  f=1408  MLA r=512 + 2 shared    15.7B, 31 GB
    deepseek-v3-lite DeepseekV3ForCausalLM the V2-Lite sizes with DeepSeek-V3's routing (sigmoid, correction bias,
                    8 groups / 4 kept, scale 2.5) and one MTP layer: a synthetic config   16.3B, 33 GB
(qwen2-57b-a14b and mixtral need an H200; the device-memory check says so before allocating anything).

`tiny` is a real embedded checkpoint pair (assets/tiny/{target,draft}, trained by scripts/train_tiny.py
on Python-stdlib docstrings): a Qwen3-MoE target (4 layers, 8 experts top-2) and a Qwen3 dense draft
(2 layers) sharing one 2048-token BPE tokenizer, so drafts get a genuine acceptance rate on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelArgs
from .loader import check_device_memory, empty_model, load_model, param_bytes, resolve_dtype
from .model import Transformer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS / "tiny"

_QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 48, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
_OLMOE_1B_7B: dict[str, Any] = {
    "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
    "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "attention_bias": False, "clip_qkv": None, "bos_token_id": None,
    "eos_token_id": 50279, "pad_token_id": 1, "torch_dtype": "bfloat16",
}
_QWEN2_57B_A14B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
    "hidden_size": 3584, "intermediate_size": 18944, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
    "sliding_window": 65536, "max_window_layers": 28, "qkv_bias": True, "bos_token_id": 151643,
    "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
_MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


_GPT_OSS_20B: dict[str, Any] = {   # openai/gpt-oss-20b's config.json, in bf16 (its quantization_config dropped)
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "sliding_window": 128, "attention_bias": True,
    "hidden_act": "silu", "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "truncate": False, "original_max_position_embeddings": 4096},
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
    "torch_dtype": "bfloat16",
}
_DEEPSEEK_V2_LITE: dict[str, Any] = {   # deepseek-ai/DeepSeek-V2-Lite's config.json
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 1,
    "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 0.707, "mscale_all_dim": 0.707,
                                          "original_max_position_embeddings": 4096},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
    "torch_dtype": "bfloat16",
}
# Not a published model: DeepSeek-V2-Lite's sizes in the DeepSeek-V3 architecture (sigmoid scores with the
# correction bias, 8 expert groups of which 4 are kept, routed_scaling_factor 2.5, renormalized) and one MTP
# layer, so grouped routing and the MTP drafter can be measured on one GPU.
_DEEPSEEK_V3_LITE: dict[str, Any] = {
    **{k: v for k, v in _DEEPSEEK_V2_LITE.items() if k not in ("topk_method", "scoring_func", "moe_layer_freq")},
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "rope_interleave": True, "num_nextn_predict_layers": 1,
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hf_config: dict[str, Any] | None = None   # random-weight presets
    path: Path | None = None                  # embedded checkpoint presets
    draft_path: Path | None = None

    @property
    def random(self) -> bool:
        return self.hf_config is not None

    def args(self) -> ModelArgs:
        if self.hf_config is not None:
            return ModelArgs.from_hf_config(self.hf_config)
        from .loader import load_args
        return load_args(self.path)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "embedded Qwen3-MoE target (4L, 8 experts top-2) + Qwen3 dense draft (2L), trained "
                   "on Python docstrings", path=TINY_DIR / "target", draft_path=TINY_DIR / "draft"),
    "qwen3-30b-a3b": Preset("qwen3-30b-a3b", "Qwen3-30B-A3B architecture, random weights", _QWEN3_30B_A3B),
    "olmoe-1b-7b": Preset("olmoe-1b-7b", "OLMoE-1B-7B-0924 architecture, random weights", _OLMOE_1B_7B),
    "qwen2-57b-a14b": Preset("qwen2-57b-a14b", "Qwen2-57B-A14B architecture, random weights", _QWEN2_57B_A14B),
    "mixtral-8x7b": Preset("mixtral-8x7b", "Mixtral-8x7B-v0.1 architecture, random weights", _MIXTRAL_8X7B),
    "gpt-oss-20b": Preset("gpt-oss-20b", "gpt-oss-20b architecture (bf16), random weights", _GPT_OSS_20B),
    "deepseek-v2-lite": Preset("deepseek-v2-lite", "DeepSeek-V2-Lite architecture (MLA), random weights",
                               _DEEPSEEK_V2_LITE),
    "deepseek-v3-lite": Preset("deepseek-v3-lite", "DeepSeek-V3 architecture at V2-Lite size + 1 MTP layer "
                               "(synthetic config), random weights", _DEEPSEEK_V3_LITE),
}
DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def build_preset(name: str, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None,
                 seed: int = 0, n_layers: int | None = None, std: float = 0.02) -> Transformer:
    """The preset's target model on `device`. Random presets: allocated once on the device and filled in
    place with seeded normal(0, std) weights (norms 1). n_layers overrides the depth (smoke tests)."""
    p = get_preset(name)
    if not p.random:
        if n_layers is not None:
            raise ValueError(f"preset {name!r} is a checkpoint; n_layers cannot be changed")
        return load_model(p.path, device, dtype)
    args = p.args()
    if n_layers is not None:
        args = args.replace(n_layers=n_layers, moe_layers=args.moe_layers[:n_layers],
                            layer_windows=args.layer_windows[:n_layers])
    tdtype = resolve_dtype(dtype, device)
    check_device_memory(param_bytes(args, tdtype), device, f"preset {name}")
    model = empty_model(args, device, tdtype)
    # meta: shapes only (parameter counting, planning); nothing to initialize
    return model if torch.device(device).type == "meta" else model.init_random(std=std, seed=seed)


def build_draft(name: str, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None) -> Transformer:
    p = get_preset(name)
    if p.draft_path is None:
        raise ValueError(f"preset {name!r} has no draft model")
    return load_model(p.draft_path, device, dtype)

"""Named models for benchmarking and demos, with no download.

Shape legend: h hidden, L layers, E experts, K experts per token, f expert FFN, V vocab.

Full-size presets build the real architectures (configs as published on the Hugging Face hub) with
seeded random weights generated directly on the target device (no host copy, no file):

    qwen3-30b-a3b   Qwen3MoeForCausalLM   L=48 h=2048 E=128 K=8  f=768            30.5B params, 61 GB bf16
    olmoe-1b-7b     OlmoeForCausalLM      L=16 h=2048 E=64  K=8  f=1024            6.9B params, 14 GB bf16
    qwen2-57b-a14b  Qwen2MoeForCausalLM   L=28 h=3584 E=64  K=8  f=2560 + shared  57.4B params, 115 GB bf16
    mixtral-8x7b    MixtralForCausalLM    L=32 h=4096 E=8   K=2  f=14336          46.7B params, 93 GB bf16
(the last two need an H200; the device-memory check says so before allocating anything).

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
        args = args.replace(n_layers=n_layers, moe_layers=args.moe_layers[:n_layers])
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

"""MoE model runtime: decoder, HF checkpoint loader, static KV cache, generation, presets.

Shape legend (as in every module here): bs requests, T tokens, S cache capacity, h hidden, V vocab,
E experts, K experts per token, f expert FFN.

    from specmoe_ext.models import load_model, load_tokenizer, SamplingParams
    from specmoe_ext.speculative import generate                      # the one generation loop
    model = load_model("path/to/hf_folder", device="cuda")          # bf16 on CUDA by default
    tok = load_tokenizer("path/to/hf_folder")
    res = generate(model, [tok.encode("Hello")], max_new_tokens=32, stop_ids=tok.eos_token_ids)
"""
from .config import ModelArgs, SUPPORTED_ARCHITECTURES, UnsupportedModelError
from .generate import GenerationResult, SamplingParams, check_prompts, prefill, process_logits
from .kv_cache import CacheCapacityError, Geometry, KVCache
from .loader import CheckpointError, Tokenizer, hf_state_dict, load_args, load_model, load_tokenizer, save_checkpoint
from .model import ExpertStats, MoEControl, PrefixTreeMask, Transformer, attention, causal_mask, tree_mask
from .moe import moe_experts
from .presets import PRESETS, build_draft, build_preset, get_preset

__all__ = [
    "ModelArgs", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError", "GenerationResult", "SamplingParams",
    "check_prompts", "prefill", "process_logits", "CacheCapacityError", "Geometry", "KVCache", "CheckpointError",
    "Tokenizer", "hf_state_dict", "load_args", "load_model", "load_tokenizer", "save_checkpoint", "ExpertStats",
    "MoEControl", "PrefixTreeMask", "Transformer", "attention", "causal_mask", "tree_mask", "moe_experts", "PRESETS", "build_draft",
    "build_preset", "get_preset",
]

"""Model hyper-parameters parsed from a Hugging Face `config.json` (a plain dict; transformers not needed).

Shape legend: h hidden, V vocab, Hq/Hk query/key-value heads, d head dim, E experts, K experts per token,
f expert FFN (moe_intermediate_size), f_dense dense FFN (intermediate_size), L layers.

Contract: `ModelArgs.from_hf_config(cfg)` either returns a complete description of the network that
`model.Transformer` builds (and that reproduces transformers' forward for that architecture), or raises
`UnsupportedModelError` naming the config key that is missing or unsupported. Nothing is allocated here.
Per-family defaults are transformers 5.17's class defaults, used when a config.json omits a key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this runtime does not implement."""


# HF architecture name -> family (the model_type transformers uses).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# transformers 5.17 class defaults for the keys a config.json may omit (core sizes are required).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, num_experts_per_tok=2,
                    num_local_experts=8, max_position_embeddings=4096 * 32, rope_theta=1e6, bos_token_id=1,
                    eos_token_id=2),
    "qwen2_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28, decoder_sparse_step=1, num_experts_per_tok=4, num_experts=60,
                      norm_topk_prob=False, mlp_only_layers=[], qkv_bias=True, max_position_embeddings=32768,
                      rope_theta=10000.0),
    "qwen3_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      attention_bias=False, decoder_sparse_step=1, num_experts_per_tok=8, num_experts=128,
                      norm_topk_prob=False, mlp_only_layers=[], max_position_embeddings=32768,
                      rope_theta=10000.0),
    "olmoe": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, clip_qkv=None,
                  num_experts_per_tok=8, num_experts=64, norm_topk_prob=False, max_position_embeddings=4096,
                  rope_theta=10000.0, eos_token_id=50279),
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, max_position_embeddings=32768, rope_theta=10000.0),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, attention_bias=False, head_dim=128, max_position_embeddings=32768,
                  rope_theta=10000.0),
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters (transformers' `rope_parameters`, standardized)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int                 # dense MLP f_dense (dense layers of MoE models, dense models)
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None             # None | "head" (Qwen3: over d per head) | "full" (OLMoE: over Hq*d)
    clip_qkv: float | None = None          # OLMoE: clamp q, k, v to [-c, c] after the q/k norms
    # MoE (n_experts == 0: dense model)
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0        # f
    norm_topk_prob: bool = False           # renormalize the top-K weights
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (with a sigmoid gate); 0 = none
    moe_layers: tuple[bool, ...] = ()      # per layer: sparse MoE block (True) or dense MLP (False)
    # Longest sequence this runtime reproduces the reference for (sliding window / dynamic NTK only act
    # beyond it, and are not implemented); None = max_position_embeddings is merely advisory.
    max_context: int | None = None
    max_context_reason: str = ""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None         # the checkpoint's dtype as declared in config.json

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0 and any(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    def check_context(self, n_tokens: int) -> None:
        """Raise if a sequence of n_tokens would leave the range where this runtime is exact."""
        if self.max_context is not None and n_tokens > self.max_context:
            raise UnsupportedModelError(
                f"sequence capacity {n_tokens} exceeds {self.max_context} tokens: {self.max_context_reason}")

    @staticmethod
    def from_hf_config(cfg: dict[str, Any]) -> "ModelArgs":
        return _parse(cfg)


def _arch_of(cfg: dict[str, Any]) -> tuple[str, str]:
    archs = cfg.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if archs:
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {supported}")
        return arch, SUPPORTED_ARCHITECTURES[arch]
    mt = cfg.get("model_type")
    for arch, fam in SUPPORTED_ARCHITECTURES.items():
        if fam == mt:
            return arch, fam
    raise UnsupportedModelError(
        f"config has no 'architectures' entry and unsupported model_type {mt!r}; supported: {supported}")


def _rope(cfg: dict[str, Any], get) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise UnsupportedModelError(f"rope_parameters must be a dict, got {rp!r}")
    if rp and not ({"rope_type", "type", "rope_theta", "factor"} & set(rp)):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", get("rope_theta"))))
    factor = rp.get("factor")
    if rtype in ("linear", "dynamic", "llama3") and factor is None:
        raise UnsupportedModelError(f"rope type {rtype!r} needs rope_parameters['factor']")
    omax = rp.get("original_max_position_embeddings")
    if rtype in ("llama3", "yarn") and omax is None:
        omax = cfg.get("original_max_position_embeddings", get("max_position_embeddings"))
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if rp.get(k) is None:
                raise UnsupportedModelError(f"rope type 'llama3' needs rope_parameters[{k!r}]")
    if rtype == "yarn" and factor is None:
        factor = get("max_position_embeddings") / omax
    return RopeConfig(
        rope_type=rtype, theta=theta, factor=float(factor) if factor is not None else 1.0,
        low_freq_factor=rp.get("low_freq_factor"), high_freq_factor=rp.get("high_freq_factor"),
        original_max_position_embeddings=int(omax) if omax is not None else None,
        attention_factor=rp.get("attention_factor"), beta_fast=rp.get("beta_fast"),
        beta_slow=rp.get("beta_slow"), mscale=rp.get("mscale"), mscale_all_dim=rp.get("mscale_all_dim"),
        truncate=bool(rp.get("truncate", True)))


def _parse(cfg: dict[str, Any]) -> ModelArgs:
    arch, fam = _arch_of(cfg)
    defaults = _FAMILY_DEFAULTS[fam]
    for k in _REQUIRED:
        if cfg.get(k) is None:
            raise UnsupportedModelError(f"config.json of {arch} is missing required key {k!r}")

    def get(key: str, default: Any = None) -> Any:
        v = cfg.get(key)
        if v is None:
            v = defaults.get(key, default)
        return v

    h, H = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    L = int(cfg["num_hidden_layers"])
    Hk = int(get("num_key_value_heads") or H)
    if H % Hk:
        raise UnsupportedModelError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hk}")
    head_dim = int(get("head_dim") or h // H)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
    rope = _rope(cfg, get)
    max_pos = int(get("max_position_embeddings"))

    kw: dict[str, Any] = {}
    # attention projections' biases and q/k norms
    if fam == "llama":
        kw.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                  mlp_bias=bool(get("mlp_bias")))
    elif fam == "qwen2":
        kw.update(qkv_bias=True)
    elif fam == "qwen2_moe":
        kw.update(qkv_bias=bool(get("qkv_bias")))
    elif fam in ("qwen3", "qwen3_moe"):
        kw.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")), qk_norm="head")
    elif fam == "olmoe":
        kw.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")), qk_norm="full",
                  clip_qkv=get("clip_qkv"))
        if head_dim * H != h:
            raise UnsupportedModelError("OLMoE with head_dim * num_attention_heads != hidden_size is not supported")

    # MoE structure
    moe_layers = [False] * L
    if fam in MOE_FAMILIES:
        E = cfg.get("num_experts", cfg.get("num_local_experts"))
        E = int(E if E is not None else get("num_experts", get("num_local_experts")))
        K = int(get("num_experts_per_tok"))
        if not 0 < K <= E:
            raise UnsupportedModelError(f"num_experts_per_tok={K} must be in [1, num_experts={E}]")
        kw.update(n_experts=E, top_k=K)
        if fam in ("mixtral", "olmoe"):
            # These two store the expert FFN size in `intermediate_size` and have no dense layers.
            kw.update(moe_intermediate_size=int(cfg["intermediate_size"]),
                      norm_topk_prob=True if fam == "mixtral" else bool(get("norm_topk_prob")))
            moe_layers = [True] * L
        else:
            if cfg.get("moe_intermediate_size") is None:
                raise UnsupportedModelError(f"config.json of {arch} is missing required key 'moe_intermediate_size'")
            step = int(get("decoder_sparse_step"))
            only = set(get("mlp_only_layers") or [])
            moe_layers = [(i not in only) and E > 0 and (i + 1) % step == 0 for i in range(L)]
            kw.update(moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                      norm_topk_prob=bool(get("norm_topk_prob")))
            if fam == "qwen2_moe":
                kw.update(shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0))
    needs_dense = not all(moe_layers) or fam not in MOE_FAMILIES
    if needs_dense and cfg.get("intermediate_size") is None:
        raise UnsupportedModelError(f"config.json of {arch} is missing required key 'intermediate_size'")
    f_dense = int(cfg.get("intermediate_size") or 0) if fam not in ("mixtral", "olmoe") else 0

    # Where this runtime stops being exact: sliding windows and dynamic NTK act only on long sequences.
    limits: list[tuple[int, str]] = []
    window = None
    if fam == "mixtral":
        window = cfg.get("sliding_window")
    elif fam == "qwen3_moe":
        window = cfg.get("sliding_window") if get("use_sliding_window") else None
    elif fam in ("qwen2", "qwen2_moe", "qwen3"):
        lt = cfg.get("layer_types")
        if lt is None and get("use_sliding_window"):
            mwl = int(get("max_window_layers"))
            lt = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(L)]
        if lt and "sliding_attention" in lt:
            window = get("sliding_window")
    if window:
        limits.append((int(window), f"sliding-window attention (window {window}) is not implemented; it only "
                                    f"changes results for sequences longer than the window"))
    if rope.rope_type == "dynamic":
        limits.append((max_pos, f"dynamic NTK RoPE scaling is not implemented; it equals plain RoPE up to "
                                f"max_position_embeddings={max_pos}"))
    max_ctx, reason = (min(limits) if limits else (None, ""))

    eos = cfg.get("eos_token_id", defaults.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    bos = cfg.get("bos_token_id", defaults.get("bos_token_id"))
    return ModelArgs(
        architecture=arch, family=fam, vocab_size=int(cfg["vocab_size"]), hidden_size=h, n_layers=L, n_heads=H,
        n_kv_heads=Hk, head_dim=head_dim, intermediate_size=f_dense, rms_norm_eps=float(get("rms_norm_eps")),
        rope=rope, max_position_embeddings=max_pos, tie_word_embeddings=bool(get("tie_word_embeddings")),
        moe_layers=tuple(moe_layers), max_context=max_ctx, max_context_reason=reason,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"), torch_dtype=cfg.get("dtype", cfg.get("torch_dtype")), **kw)

"""Model hyper-parameters parsed from a Hugging Face `config.json` (a plain dict; transformers not needed).

Shape legend: h hidden, V vocab, Hq/Hk query/key-value heads, d head dim, E experts, K experts per token,
f expert FFN (moe_intermediate_size), f_dense dense FFN (intermediate_size), L layers.

Contract: `ModelArgs.from_hf_config(cfg)` either returns a complete description of the network that
`model.Transformer` builds (and that reproduces transformers' forward for that architecture), or raises
`UnsupportedModelError` naming the config key that is missing, mistyped (a string `hidden_size`), out of
range, or beyond the kernels' limits (MAX_EXPERTS experts per layer, MAX_TOP_K experts per token), so a
config that parses also runs its first forward. Nothing is allocated here.
Per-family defaults are transformers 5.17's class defaults, used when a config.json omits a key.

Sizes of a run, for the checks made before anything is allocated:
    ModelArgs.check_context(n)     n slots beyond where this runtime is exact (sliding window, dynamic NTK)
    ModelArgs.check_positions(n)   n positions beyond max_position_embeddings (what the model was trained for)
    ModelArgs.kv_cache_bytes(bs, S, elem)   the static KV cache of bs requests x S slots
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this runtime does not implement."""


class ContextLengthError(ValueError):
    """A run would use more positions than the model's max_position_embeddings."""


# The routing / fused-MoE kernels' limits (csrc/kernels/routing.h kMaxExperts, kMaxTopK; fused_moe.h).
MAX_EXPERTS = 512
MAX_TOP_K = 16


def check_experts(e_key: str, E: int, K: int) -> None:
    """E experts and top-K routing within the routing kernels' limits (e_key: the config key E came from)."""
    if E > MAX_EXPERTS:
        raise UnsupportedModelError(f"{e_key}={E} exceeds the {MAX_EXPERTS} experts per layer the routing kernels "
                                    f"support")
    if not K <= min(E, MAX_TOP_K):
        raise UnsupportedModelError(f"num_experts_per_tok={K} must be in [1, min({e_key}={E}, {MAX_TOP_K})] "
                                    f"({MAX_TOP_K} = the routing kernels' top-k limit)")


# HF architecture name -> family (the model_type transformers uses).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # families.py parses these (MLA, grouped sigmoid routing, attention sinks, sliding windows, partial RoPE)
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
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
class MLAArgs:
    """Multi-head latent attention (DeepSeek-V2/V3): q through an optional low-rank projection, K/V from a
    shared latent of kv_lora_rank plus one rotary key part of qk_rope_head_dim (what the KV cache stores)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool          # RoPE pairs (2i, 2i+1) instead of (i, i + d/2)
    softmax_scale: float           # qk_head_dim ** -0.5, times the YaRN mscale(all dims) squared

    @property
    def latent_dim(self) -> int:
        """Cache entry per token and layer: the normalized latent then the rotated key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RouterArgs:
    """How an MoE layer turns router logits into experts (the routing op's arguments)."""

    scoring: str = "softmax"       # "softmax" | "sigmoid"
    correction_bias: bool = False  # e_score_correction_bias, added for selection only (DeepSeek-V3, GLM-4.5)
    linear_bias: bool = False      # the router projection has a bias (GPT-OSS)
    n_group: int = 1               # grouped top-K (DeepSeek-V2/V3, GLM-4.5)
    topk_group: int = 1
    group_scoring: str = "top2"    # "top2" (V3 / GLM) | "max" (V2)
    scale: float = 1.0             # routed_scaling_factor
    fp32_logits: bool = False      # router logits computed in float32 (DeepSeek, GLM), else the activation dtype

    def op_kwargs(self) -> dict:
        return dict(scoring=self.scoring, n_group=self.n_group, topk_group=self.topk_group,
                    group_scoring=self.group_scoring, scale=self.scale)


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
    # Architecture variants of the families in families.py (defaults: the families above)
    mla: MLAArgs | None = None             # multi-head latent attention (head_dim is then its rotary part)
    rotary_dim: int | None = None          # RoPE on the first rotary_dim dims of each head (None: all d)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding-window size, None = full attention
    attn_sinks: bool = False               # GPT-OSS: a learned per-head logit joins every softmax
    router: RouterArgs = RouterArgs()
    shared_expert_gate: bool = True        # Qwen2-MoE's sigmoid-gated shared expert; False: ungated (DeepSeek)
    expert_act: str = "silu"               # "silu" (SwiGLU) | "gpt_oss" (clamped SwiGLU, alpha 1.702, biases)
    swiglu_limit: float = 7.0              # gpt_oss: gate <= limit, up in [-limit, limit]
    norm_weight_fp32: bool = False         # RMSNorm scales by its weight before the cast (GPT-OSS)
    n_mtp_layers: int = 0                  # multi-token-prediction layers built (num_nextn_predict_layers)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0 and any(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def tree_kernel_ok(self) -> bool:
        """The tree-attention kernel's attention: plain GQA, no sinks, no sliding windows."""
        return self.mla is None and not self.attn_sinks and not any(w for w in self.layer_windows)

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    def check_context(self, n_tokens: int) -> None:
        """Raise if a sequence of n_tokens would leave the range where this runtime is exact."""
        if self.max_context is not None and n_tokens > self.max_context:
            raise UnsupportedModelError(
                f"sequence capacity {n_tokens} exceeds {self.max_context} tokens: {self.max_context_reason}")

    def check_positions(self, n_tokens: int) -> None:
        """Raise ContextLengthError if a sequence of n_tokens exceeds max_position_embeddings."""
        if n_tokens > self.max_position_embeddings:
            raise ContextLengthError(f"{n_tokens} positions exceed max_position_embeddings="
                                     f"{self.max_position_embeddings}")

    def kv_cache_bytes(self, batch_size: int, capacity: int, elem_bytes: int) -> int:
        """Bytes of a static KV cache: L layers x (K, V) x bs x Hk x d x S slots x elem_bytes; MLA: L layers x
        bs x (kv_lora_rank + qk_rope_head_dim) x S slots x elem_bytes (the latent, no separate values)."""
        if self.mla is not None:
            return self.n_layers * batch_size * self.mla.latent_dim * capacity * elem_bytes
        return self.n_layers * 2 * batch_size * self.n_kv_heads * self.head_dim * capacity * elem_bytes

    @staticmethod
    def from_hf_config(cfg: dict[str, Any]) -> "ModelArgs":
        if not isinstance(cfg, dict):
            raise UnsupportedModelError(f"config must be a JSON object (key: value pairs), got a "
                                        f"{type(cfg).__name__}")
        return _parse(cfg)


def _arch_of(cfg: dict[str, Any]) -> tuple[str, str]:
    archs = cfg.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UnsupportedModelError(f"config key 'architectures' must be a list of names, got {archs!r}")
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


def _as_int(v: Any, key: str, minimum: int = 1) -> int:
    """An integer config value >= minimum (JSON 8.0 is 8; booleans and strings are refused)."""
    ok = (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) and not isinstance(v, bool)
    if not ok or v < minimum:
        raise UnsupportedModelError(f"config key {key!r} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _as_float(v: Any, key: str, positive: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (positive and v <= 0):
        raise UnsupportedModelError(f"config key {key!r} must be a finite number{' > 0' if positive else ''}, "
                                    f"got {v!r}")
    return float(v)


def _as_bool(v: Any, key: str) -> bool:
    if v in (None, 0, 1) or isinstance(v, bool):      # None: absent with no family default
        return bool(v)
    raise UnsupportedModelError(f"config key {key!r} must be true or false, got {v!r}")


def token_ids(v: Any, key: str) -> tuple[int, ...]:
    """A token id, a list of them, or None -> the ids."""
    vals = v if isinstance(v, list) else [v]
    return tuple(_as_int(x, key, minimum=0) for x in vals if x is not None)


class _Config:
    """Typed reads of config keys: the config's value, else the family default; errors name the key."""

    def __init__(self, cfg: dict[str, Any], defaults: dict[str, Any]):
        self.cfg, self.defaults = cfg, defaults

    def raw(self, key: str, default: Any = None) -> Any:
        v = self.cfg.get(key)
        return self.defaults.get(key, default) if v is None else v

    def integer(self, key: str, default: Any = None, minimum: int = 1) -> int:
        return _as_int(self.raw(key, default), key, minimum)

    def optional_integer(self, key: str, minimum: int = 1) -> int | None:
        v = self.raw(key)
        return None if v is None else _as_int(v, key, minimum)

    def number(self, key: str, default: Any = None, positive: bool = False) -> float:
        return _as_float(self.raw(key, default), key, positive)

    def flag(self, key: str) -> bool:
        return _as_bool(self.raw(key), key)


def _rope(c: _Config) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
    cfg = c.cfg
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rp = cfg.get(key) or {}
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

    def num(k: str, cast=_as_float):
        v = rp.get(k)
        return None if v is None else cast(v, f"{key}[{k!r}]")

    theta = num("rope_theta") if rp.get("rope_theta") is not None else c.number("rope_theta", positive=True)
    factor = num("factor")
    if rtype in ("linear", "dynamic", "llama3") and factor is None:
        raise UnsupportedModelError(f"rope type {rtype!r} needs rope_parameters['factor']")
    omax = num("original_max_position_embeddings", _as_int)
    if rtype in ("llama3", "yarn") and omax is None:
        omax = (_as_int(cfg["original_max_position_embeddings"], "original_max_position_embeddings")
                if cfg.get("original_max_position_embeddings") is not None else c.integer("max_position_embeddings"))
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if rp.get(k) is None:
                raise UnsupportedModelError(f"rope type 'llama3' needs rope_parameters[{k!r}]")
    if rtype == "yarn" and factor is None:
        factor = c.integer("max_position_embeddings") / omax
    return RopeConfig(
        rope_type=rtype, theta=theta, factor=factor if factor is not None else 1.0,
        low_freq_factor=num("low_freq_factor"), high_freq_factor=num("high_freq_factor"),
        original_max_position_embeddings=omax, attention_factor=num("attention_factor"),
        beta_fast=num("beta_fast"), beta_slow=num("beta_slow"), mscale=num("mscale"),
        mscale_all_dim=num("mscale_all_dim"), truncate=_as_bool(rp.get("truncate", True), f"{key}['truncate']"))


def _parse(cfg: dict[str, Any]) -> ModelArgs:
    arch, fam = _arch_of(cfg)
    if fam not in _FAMILY_DEFAULTS:
        from .families import parse_family
        return parse_family(cfg, arch, fam)
    c = _Config(cfg, _FAMILY_DEFAULTS[fam])
    for k in _REQUIRED:
        if cfg.get(k) is None:
            raise UnsupportedModelError(f"config.json of {arch} is missing required key {k!r}")

    h, H, L = c.integer("hidden_size"), c.integer("num_attention_heads"), c.integer("num_hidden_layers")
    Hk = c.optional_integer("num_key_value_heads") or H
    if H % Hk:
        raise UnsupportedModelError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hk}")
    head_dim = c.optional_integer("head_dim") or h // H
    if head_dim < 1:
        raise UnsupportedModelError(f"hidden_size={h} / num_attention_heads={H} gives head_dim 0: set head_dim")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
    rope = _rope(c)
    max_pos = c.integer("max_position_embeddings")

    kw: dict[str, Any] = {}
    # attention projections' biases and q/k norms
    if fam == "llama":
        kw.update(qkv_bias=c.flag("attention_bias"), o_bias=c.flag("attention_bias"), mlp_bias=c.flag("mlp_bias"))
    elif fam == "qwen2":
        kw.update(qkv_bias=True)
    elif fam == "qwen2_moe":
        kw.update(qkv_bias=c.flag("qkv_bias"))
    elif fam in ("qwen3", "qwen3_moe"):
        kw.update(qkv_bias=c.flag("attention_bias"), o_bias=c.flag("attention_bias"), qk_norm="head")
    elif fam == "olmoe":
        clip = c.raw("clip_qkv")
        kw.update(qkv_bias=c.flag("attention_bias"), o_bias=c.flag("attention_bias"), qk_norm="full",
                  clip_qkv=None if clip is None else _as_float(clip, "clip_qkv", positive=True))
        if head_dim * H != h:
            raise UnsupportedModelError("OLMoE with head_dim * num_attention_heads != hidden_size is not supported")

    # MoE structure
    moe_layers = [False] * L
    if fam in MOE_FAMILIES:
        e_key = next((k for k in ("num_experts", "num_local_experts") if cfg.get(k) is not None),
                     "num_local_experts" if fam == "mixtral" else "num_experts")
        E, K = c.integer(e_key), c.integer("num_experts_per_tok")
        check_experts(e_key, E, K)
        kw.update(n_experts=E, top_k=K)
        if fam in ("mixtral", "olmoe"):
            # These two store the expert FFN size in `intermediate_size` and have no dense layers.
            kw.update(moe_intermediate_size=c.integer("intermediate_size"),
                      norm_topk_prob=True if fam == "mixtral" else c.flag("norm_topk_prob"))
            moe_layers = [True] * L
        else:
            if cfg.get("moe_intermediate_size") is None:
                raise UnsupportedModelError(f"config.json of {arch} is missing required key 'moe_intermediate_size'")
            step = c.integer("decoder_sparse_step")
            only = c.raw("mlp_only_layers") or []
            if not isinstance(only, list):
                raise UnsupportedModelError(f"config key 'mlp_only_layers' must be a list of layer indices, "
                                            f"got {only!r}")
            only = {_as_int(i, "mlp_only_layers", minimum=0) for i in only}
            moe_layers = [(i not in only) and (i + 1) % step == 0 for i in range(L)]
            kw.update(moe_intermediate_size=c.integer("moe_intermediate_size"), norm_topk_prob=c.flag("norm_topk_prob"))
            if fam == "qwen2_moe":
                fs = cfg.get("shared_expert_intermediate_size")
                kw.update(shared_expert_intermediate_size=0 if fs is None else
                          _as_int(fs, "shared_expert_intermediate_size", minimum=0))
    needs_dense = not all(moe_layers) or fam not in MOE_FAMILIES
    if needs_dense and cfg.get("intermediate_size") is None:
        raise UnsupportedModelError(f"config.json of {arch} is missing required key 'intermediate_size'")
    f_dense = 0
    if fam not in ("mixtral", "olmoe") and cfg.get("intermediate_size") is not None:
        f_dense = c.integer("intermediate_size", minimum=1 if needs_dense else 0)

    max_ctx, reason = _exact_context(c, fam, L, max_pos, rope)
    return ModelArgs(
        architecture=arch, family=fam, vocab_size=c.integer("vocab_size"), hidden_size=h, n_layers=L, n_heads=H,
        n_kv_heads=Hk, head_dim=head_dim, intermediate_size=f_dense,
        rms_norm_eps=c.number("rms_norm_eps", positive=True), rope=rope, max_position_embeddings=max_pos,
        tie_word_embeddings=c.flag("tie_word_embeddings"), moe_layers=tuple(moe_layers), max_context=max_ctx,
        max_context_reason=reason, bos_token_id=_token_id(c, "bos_token_id"),
        eos_token_ids=token_ids(cfg.get("eos_token_id", c.defaults.get("eos_token_id")), "eos_token_id"),
        pad_token_id=_token_id(c, "pad_token_id"),
        torch_dtype=cfg.get("dtype", cfg.get("torch_dtype")), **kw)


def _token_id(c: _Config, key: str) -> int | None:
    """A single special-token id (an explicit null stays None; absent: the family default)."""
    ids = token_ids(c.cfg.get(key, c.defaults.get(key)), key)
    return ids[0] if ids else None


def _exact_context(c: _Config, fam: str, L: int, max_pos: int, rope: RopeConfig) -> tuple[int | None, str]:
    """Where this runtime stops being exact: sliding windows and dynamic NTK act only on long sequences."""
    cfg = c.cfg
    limits: list[tuple[int, str]] = []
    window = None
    if fam == "mixtral":
        window = cfg.get("sliding_window")
    elif fam == "qwen3_moe":
        window = cfg.get("sliding_window") if c.flag("use_sliding_window") else None
    elif fam in ("qwen2", "qwen2_moe", "qwen3"):
        lt = cfg.get("layer_types")
        if lt is None and c.flag("use_sliding_window"):
            mwl = c.integer("max_window_layers", minimum=0)
            lt = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(L)]
        if lt and "sliding_attention" in lt:
            window = c.raw("sliding_window")
    if window:
        window = _as_int(window, "sliding_window")
        limits.append((window, f"sliding-window attention (window {window}) is not implemented; it only "
                               f"changes results for sequences longer than the window"))
    if rope.rope_type == "dynamic":
        limits.append((max_pos, f"dynamic NTK RoPE scaling is not implemented; it equals plain RoPE up to "
                                f"max_position_embeddings={max_pos}"))
    return min(limits) if limits else (None, "")

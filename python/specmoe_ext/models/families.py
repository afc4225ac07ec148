"""Config parsing and checkpoint weight plans of the 2026 MoE families: DeepSeek-V3 (and the DeepSeek-V3 layout:
Kimi-K2, ...), DeepSeek-V2, GLM-4.5 (Glm4MoeForCausalLM) and GPT-OSS.

Shape legend: h hidden, V vocab, L layers, H query heads, Hk key-value heads, d head dim, E routed experts,
K experts per token, f expert FFN, fs shared-expert FFN (n_shared_experts x f), f_dense dense FFN,
r kv_lora_rank, rq q_lora_rank, dn / dr / dv the no-RoPE, RoPE and value parts of an MLA head.

    parse_family(cfg, arch, family) -> ModelArgs   (config.py calls it for these families)
    weight_plan(args, available) -> [Piece]        (loader.py calls it for these families)
    with_checkpoint_layers(args, keys)             MTP layers kept only when the checkpoint holds them
    shared_copies(args)                            checkpoint names that duplicate the target's tensors

What each family adds (all exact against transformers 5.17, which the tests check):
  deepseek_v3  multi-head latent attention (models/mla.py), the first first_k_dense_replace layers dense,
               routed experts + ungated shared experts (fs = n_shared_experts x f), sigmoid scores with the
               selection-only e_score_correction_bias, grouped top-K (n_group / topk_group, a group scored
               by its two best scores), routed_scaling_factor; router logits in float32; MTP layers
               (num_nextn_predict_layers) at checkpoint layer indices L, L+1, ...
  deepseek_v2  MLA, softmax scores, "greedy" or "group_limited_greedy" (a group scored by its best score)
  glm4_moe     GQA with q/k/v biases, optional per-head q/k norm, RoPE on the first
               partial_rotary_factor x d dims, DeepSeek-V3 routing, MTP layers
  gpt_oss      GQA with biases and a learned sink logit per head, alternating sliding-window layers
               (layer_types / sliding_window), softmax over the top-K router logits (router bias), clamped
               SwiGLU experts with biases (models/gpt_oss.py); bf16 / fp16 / fp32 checkpoints (MXFP4 ones
               are refused with the conversion recipe)
"""
from __future__ import annotations

import math
from typing import Any

from .config import (MLAArgs, ModelArgs, RouterArgs, UnsupportedModelError, _as_float, _as_int,
                     _Config, _exact_context, _REQUIRED, _rope, _token_id, check_experts, token_ids)

# transformers 5.17 class defaults for the keys a config.json may omit (core sizes are required)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(intermediate_size=18432, moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
                        rope_interleave=True, attention_bias=False, rope_theta=10000.0, num_nextn_predict_layers=1),
    "deepseek_v2": dict(intermediate_size=11008, moe_intermediate_size=1407, n_shared_experts=2, n_routed_experts=64,
                        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", first_k_dense_replace=0,
                        norm_topk_prob=False, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                        rope_theta=10000.0, num_nextn_predict_layers=0),
    "glm4_moe": dict(intermediate_size=10944, moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1,
                     n_routed_experts=128, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                     first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=False, max_position_embeddings=131072,
                     rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                     partial_rotary_factor=0.5, num_key_value_heads=8, num_nextn_predict_layers=1),
    "gpt_oss": dict(num_local_experts=128, intermediate_size=2880, head_dim=64, num_key_value_heads=8,
                    sliding_window=128, tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    num_experts_per_tok=4, attention_bias=True, rope_theta=150000.0, swiglu_limit=7.0),
}
# GPT-OSS's rope when the config gives none (GptOssConfig.__post_init__)
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}
MLA_NORM_EPS = 1e-6    # q_a_layernorm / kv_a_layernorm: transformers (and DeepSeek's code) use the default eps


def _yarn_mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _groups(c: _Config, E: int, K: int, scoring: str, G: int | None = None, TG: int | None = None) -> tuple[int, int]:
    """(n_group, topk_group), checked against the routing op's rules; errors name the config keys."""
    G = c.integer("n_group") if G is None else G
    TG = c.integer("topk_group") if TG is None else TG
    if G > 32 or E % G:
        raise UnsupportedModelError(f"config key 'n_group'={G} must divide n_routed_experts={E} and be <= 32")
    if not 1 <= TG <= G:
        raise UnsupportedModelError(f"config key 'topk_group'={TG} must be in [1, n_group={G}]")
    if TG * (E // G) < K:
        raise UnsupportedModelError(f"topk_group={TG} groups of {E // G} experts hold fewer than "
                                    f"num_experts_per_tok={K} experts")
    if G > 1 and scoring == "top2" and E // G < 2:
        raise UnsupportedModelError(f"n_group={G}: groups of {E // G} expert cannot be scored by their best two")
    return G, TG


def _moe_structure(c: _Config, L: int, *, e_key: str = "n_routed_experts") -> dict[str, Any]:
    E, K = c.integer(e_key), c.integer("num_experts_per_tok")
    check_experts(e_key, E, K)
    k_dense = c.integer("first_k_dense_replace", minimum=0)
    f = c.integer("moe_intermediate_size")
    n_shared = c.integer("n_shared_experts", minimum=0)
    return dict(n_experts=E, top_k=K, moe_intermediate_size=f, shared_expert_intermediate_size=n_shared * f,
                shared_expert_gate=False, moe_layers=tuple(i >= k_dense for i in range(L)))


def _mla(c: _Config, rope) -> MLAArgs:
    dn, dr, dv = c.integer("qk_nope_head_dim"), c.integer("qk_rope_head_dim"), c.integer("v_head_dim")
    if dr % 2:
        raise UnsupportedModelError(f"config key 'qk_rope_head_dim'={dr} must be even")
    scale = (dn + dr) ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:   # transformers' yarn_apply_mscale
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    # an explicit null q_lora_rank (DeepSeek-V2-Lite, ...) means a plain q_proj; absent: the class default
    qr = c.cfg["q_lora_rank"] if "q_lora_rank" in c.cfg else c.defaults.get("q_lora_rank")
    return MLAArgs(q_lora_rank=None if qr is None else _as_int(qr, "q_lora_rank"),
                   kv_lora_rank=c.integer("kv_lora_rank"),
                   qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
                   rope_interleave=c.flag("rope_interleave") if c.raw("rope_interleave") is not None else True,
                   softmax_scale=scale)


def _deepseek(c: _Config, fam: str, L: int, rope) -> dict[str, Any]:
    cfg = c.cfg
    kw = _moe_structure(c, L)
    E, K = kw["n_experts"], kw["top_k"]
    scale = c.number("routed_scaling_factor", positive=True)
    if fam == "deepseek_v3":
        sf, tm = cfg.get("scoring_func", "sigmoid"), cfg.get("topk_method", "noaux_tc")
        if sf != "sigmoid" or tm != "noaux_tc":
            raise UnsupportedModelError(f"DeepseekV3ForCausalLM with scoring_func={sf!r} / topk_method={tm!r} is not "
                                        f"supported (only 'sigmoid' / 'noaux_tc', what transformers implements)")
        G, TG = _groups(c, E, K, "top2")
        router = RouterArgs(scoring="sigmoid", correction_bias=True, n_group=G, topk_group=TG, group_scoring="top2",
                            scale=scale, fp32_logits=True)
        norm = c.flag("norm_topk_prob")
    else:
        sf, tm = cfg.get("scoring_func", "softmax"), c.raw("topk_method")
        if sf != "softmax":
            raise UnsupportedModelError(f"DeepseekV2ForCausalLM with scoring_func={sf!r} is not supported "
                                        f"(only 'softmax')")
        if tm == "greedy":
            G, TG = 1, 1
        elif tm == "group_limited_greedy":
            G, TG = _groups(c, E, K, "max")
        else:
            raise UnsupportedModelError(f"config key 'topk_method'={tm!r} is not supported (DeepseekV2ForCausalLM: "
                                        f"'greedy' or 'group_limited_greedy')")
        if c.flag("norm_topk_prob"):
            raise UnsupportedModelError("DeepseekV2ForCausalLM with norm_topk_prob=true is not supported "
                                        "(transformers ignores the key, DeepSeek's code renormalizes: ambiguous)")
        if cfg.get("moe_layer_freq", 1) != 1:
            raise UnsupportedModelError(f"config key 'moe_layer_freq'={cfg.get('moe_layer_freq')!r} is not supported "
                                        f"(only 1)")
        if c.flag("mlp_bias"):
            raise UnsupportedModelError("DeepseekV2ForCausalLM with mlp_bias=true is not supported")
        router = RouterArgs(scoring="softmax", n_group=G, topk_group=TG, group_scoring="max", scale=scale,
                            fp32_logits=True)
        norm = False
    bias = c.flag("attention_bias")
    kw.update(mla=_mla(c, rope), router=router, norm_topk_prob=norm, qkv_bias=bias, o_bias=bias,
              head_dim=c.integer("qk_rope_head_dim"), n_mtp_layers=c.integer("num_nextn_predict_layers", minimum=0))
    return kw


def _glm4_moe(c: _Config, L: int, head_dim: int, prf: float) -> dict[str, Any]:
    kw = _moe_structure(c, L)
    E, K = kw["n_experts"], kw["top_k"]
    G, TG = _groups(c, E, K, "top2")
    rd = int(head_dim * prf)
    if not 2 <= rd <= head_dim or rd % 2:
        raise UnsupportedModelError(f"partial_rotary_factor={prf} of head_dim={head_dim} gives {rd} rotary dims "
                                    f"(need an even number in [2, head_dim])")
    kw.update(router=RouterArgs(scoring="sigmoid", correction_bias=True, n_group=G, topk_group=TG,
                                group_scoring="top2", scale=c.number("routed_scaling_factor", positive=True),
                                fp32_logits=True),
              norm_topk_prob=c.flag("norm_topk_prob"), qkv_bias=c.flag("attention_bias"), o_bias=False,
              qk_norm="head" if c.flag("use_qk_norm") else None, rotary_dim=None if rd == head_dim else rd,
              n_mtp_layers=c.integer("num_nextn_predict_layers", minimum=0))
    return kw


def _gpt_oss(c: _Config, L: int) -> dict[str, Any]:
    E, K = c.integer("num_local_experts"), c.integer("num_experts_per_tok")
    check_experts("num_local_experts", E, K)
    lt = c.cfg.get("layer_types")
    if lt is None:
        lt = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if not isinstance(lt, list) or len(lt) != L or not set(lt) <= {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"config key 'layer_types' must list 'sliding_attention' / 'full_attention' "
                                    f"for each of the {L} layers, got {lt!r}")
    window = c.optional_integer("sliding_window") if "sliding_attention" in lt else None
    if "sliding_attention" in lt and window is None:
        raise UnsupportedModelError("config has sliding_attention layers but no 'sliding_window'")
    bias = c.flag("attention_bias")
    return dict(n_experts=E, top_k=K, moe_intermediate_size=c.integer("intermediate_size"), norm_topk_prob=True,
                moe_layers=(True,) * L, layer_windows=tuple(window if t == "sliding_attention" else None for t in lt),
                attn_sinks=True, qkv_bias=bias, o_bias=bias, router=RouterArgs(scoring="softmax", linear_bias=True),
                expert_act="gpt_oss", swiglu_limit=c.number("swiglu_limit", positive=True), norm_weight_fp32=True)


def parse_family(cfg: dict[str, Any], arch: str, fam: str) -> ModelArgs:
    """config.json of one of this module's families -> ModelArgs (UnsupportedModelError naming the key)."""
    for k in _REQUIRED:
        if cfg.get(k) is None:
            raise UnsupportedModelError(f"config.json of {arch} is missing required key {k!r}")
    rcfg = dict(cfg)
    prf = 1.0
    if fam == "glm4_moe":      # partial rotary: handled here, so the shared RoPE parser sees a full-rotary config
        rp = dict(rcfg.get("rope_parameters") or rcfg.get("rope_scaling") or {})
        prf = rp.pop("partial_rotary_factor",
                     rcfg.pop("partial_rotary_factor", _DEFAULTS[fam]["partial_rotary_factor"]))
        prf = _as_float(prf, "partial_rotary_factor", positive=True)
        for key in ("rope_parameters", "rope_scaling"):
            if rcfg.get(key):
                rcfg[key] = rp
    if fam == "gpt_oss" and not (rcfg.get("rope_parameters") or rcfg.get("rope_scaling")):
        rcfg["rope_parameters"] = dict(_GPT_OSS_ROPE, rope_theta=cfg.get("rope_theta", 150000.0))
    c = _Config(rcfg, _DEFAULTS[fam])
    h, H, L = c.integer("hidden_size"), c.integer("num_attention_heads"), c.integer("num_hidden_layers")
    Hk = c.optional_integer("num_key_value_heads") or H
    if H % Hk:
        raise UnsupportedModelError(f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hk}")
    head_dim = c.optional_integer("head_dim") or h // H
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
    rope = _rope(c)
    max_pos = c.integer("max_position_embeddings")
    if fam in ("deepseek_v3", "deepseek_v2"):
        kw = _deepseek(c, fam, L, rope)
    elif fam == "glm4_moe":
        kw = _glm4_moe(c, L, head_dim, prf)
    else:
        kw = _gpt_oss(c, L)
    kw.setdefault("head_dim", head_dim)
    needs_dense = not all(kw["moe_layers"])
    f_dense = c.integer("intermediate_size") if needs_dense else 0
    max_ctx, reason = _exact_context(c, fam, L, max_pos, rope)
    return ModelArgs(
        architecture=arch, family=fam, vocab_size=c.integer("vocab_size"), hidden_size=h, n_layers=L, n_heads=H,
        n_kv_heads=Hk, intermediate_size=f_dense, rms_norm_eps=c.number("rms_norm_eps", positive=True), rope=rope,
        max_position_embeddings=max_pos, tie_word_embeddings=c.flag("tie_word_embeddings"), max_context=max_ctx,
        max_context_reason=reason, bos_token_id=_token_id(c, "bos_token_id"),
        eos_token_ids=token_ids(cfg.get("eos_token_id", c.defaults.get("eos_token_id")), "eos_token_id"),
        pad_token_id=_token_id(c, "pad_token_id"), torch_dtype=cfg.get("dtype", cfg.get("torch_dtype")), **kw)


# ---- checkpoint layout ---------------------------------------------------------------------------------

FAMILIES = ("deepseek_v3", "deepseek_v2", "glm4_moe", "gpt_oss")


def _mtp_prefixes(args: ModelArgs) -> list[tuple[str, str]]:
    """(checkpoint prefix, our prefix) of each MTP layer: model.layers.{L + i}. -> mtp.{i}."""
    return [(f"model.layers.{args.n_layers + i}.", f"mtp.{i}.") for i in range(args.n_mtp_layers)]


def with_checkpoint_layers(args: ModelArgs, keys) -> ModelArgs:
    """The MTP layers a checkpoint actually carries: configs declare num_nextn_predict_layers, but exports
    through transformers drop those weights; a layer counts when any tensor of it is present (a partial
    one then fails validation by name). Other families: unchanged."""
    if args.family not in FAMILIES or not args.n_mtp_layers:
        return args
    keys = list(keys)
    n = 0
    for ck, _ in _mtp_prefixes(args):
        if not any(k.startswith(ck) for k in keys):
            break
        n += 1
    return args.replace(n_mtp_layers=n)


def shared_copies(args: ModelArgs) -> set[str]:
    """Checkpoint tensors that copy the target's own (an MTP layer's embed_tokens and shared_head.head):
    the MTP drafter uses the target's embedding and LM head, as transformers and SGLang do."""
    return {ck + n for ck, _ in _mtp_prefixes(args) for n in ("embed_tokens.weight", "shared_head.head.weight")}


def _refuse_mxfp4(args: ModelArgs, avail: set[str]) -> None:
    from .loader import CheckpointError
    q = sorted(k for k in avail if k.endswith(("_blocks", "_scales")))
    if q:
        raise CheckpointError(
            f"{args.architecture}: this checkpoint holds MXFP4-quantized expert weights ({q[0]}, ... {len(q)} "
            f"tensors); specmoe loads bfloat16 / float16 / float32 weights. Get bf16 weights once with transformers: "
            f"`AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16, "
            f"quantization_config=Mxfp4Config(dequantize=True)).save_pretrained(OUT)` (then copy the tokenizer "
            f"files into OUT), or use a published bf16 copy of the model")


def _refuse_fp8(args: ModelArgs, avail: set[str]) -> None:
    from .loader import CheckpointError
    q = sorted(k for k in avail if k.endswith("weight_scale_inv"))
    if q:
        raise CheckpointError(
            f"{args.architecture}: this checkpoint holds FP8 block-quantized weights ({q[0]}, ... {len(q)} scale "
            f"tensors, as DeepSeek-V3 publishes them); specmoe loads bfloat16 / float16 / float32 weights. Convert "
            f"them once to bf16 (DeepSeek's inference/fp8_cast_bf16.py, or transformers' from_pretrained with "
            f"dtype=torch.bfloat16 and save_pretrained, which drops the MTP layer), or use a published bf16 copy")


def _gqa_pieces(args: ModelArgs, A: str, M: str) -> list:
    from .loader import Piece
    h, d, q, kv = args.hidden_size, args.head_dim, args.q_size, args.kv_size
    pl = [Piece(A + "q_proj.weight", (q, h), M + "wqkv.weight", (slice(0, q),)),
          Piece(A + "k_proj.weight", (kv, h), M + "wqkv.weight", (slice(q, q + kv),)),
          Piece(A + "v_proj.weight", (kv, h), M + "wqkv.weight", (slice(q + kv, q + 2 * kv),)),
          Piece(A + "o_proj.weight", (h, q), M + "wo.weight")]
    if args.qkv_bias:
        pl += [Piece(A + "q_proj.bias", (q,), M + "wqkv.bias", (slice(0, q),)),
               Piece(A + "k_proj.bias", (kv,), M + "wqkv.bias", (slice(q, q + kv),)),
               Piece(A + "v_proj.bias", (kv,), M + "wqkv.bias", (slice(q + kv, q + 2 * kv),))]
    if args.o_bias:
        pl.append(Piece(A + "o_proj.bias", (h,), M + "wo.bias"))
    if args.qk_norm == "head":
        pl += [Piece(A + "q_norm.weight", (d,), M + "q_norm.weight"),
               Piece(A + "k_norm.weight", (d,), M + "k_norm.weight")]
    if args.attn_sinks:
        pl.append(Piece(A + "sinks", (args.n_heads,), M + "sinks"))
    return pl


def _mla_pieces(args: ModelArgs, A: str, M: str) -> list:
    from .loader import Piece
    m, h, H = args.mla, args.hidden_size, args.n_heads
    dq, r = m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank
    pl = []
    if m.q_lora_rank is None:
        pl.append(Piece(A + "q_proj.weight", (H * dq, h), M + "q_proj.weight"))
    else:
        rq = m.q_lora_rank
        pl += [Piece(A + "q_a_proj.weight", (rq, h), M + "q_a_proj.weight"),
               Piece(A + "q_a_layernorm.weight", (rq,), M + "q_a_norm.weight"),
               Piece(A + "q_b_proj.weight", (H * dq, rq), M + "q_b_proj.weight")]
        if args.qkv_bias:
            pl.append(Piece(A + "q_a_proj.bias", (rq,), M + "q_a_proj.bias"))
    pl += [Piece(A + "kv_a_proj_with_mqa.weight", (m.latent_dim, h), M + "kv_a_proj.weight"),
           Piece(A + "kv_a_layernorm.weight", (r,), M + "kv_a_norm.weight"),
           Piece(A + "kv_b_proj.weight", (H * (m.qk_nope_head_dim + m.v_head_dim), r), M + "kv_b_proj.weight"),
           Piece(A + "o_proj.weight", (h, H * m.v_head_dim), M + "wo.weight")]
    if args.qkv_bias:
        pl.append(Piece(A + "kv_a_proj_with_mqa.bias", (m.latent_dim,), M + "kv_a_proj.bias"))
    if args.o_bias:
        pl.append(Piece(A + "o_proj.bias", (h,), M + "wo.bias"))
    return pl


def _ffn_pieces(args: ModelArgs, P: str, dst: str, moe: bool, avail: set[str]) -> list:
    from .loader import Piece, _mlp_pieces, _moe_pieces
    h, E = args.hidden_size, args.n_experts
    if not moe:
        return _mlp_pieces(P + "mlp.", dst, h, args.intermediate_size)
    if args.expert_act == "gpt_oss":
        X, f = P + "mlp.experts.", args.moe_intermediate_size
        return [Piece(P + "mlp.router.weight", (E, h), dst + "gate.weight"),
                Piece(P + "mlp.router.bias", (E,), dst + "gate.bias"),
                Piece(X + "gate_up_proj", (E, h, 2 * f), dst + "w13"),
                Piece(X + "gate_up_proj_bias", (E, 2 * f), dst + "b13"),
                Piece(X + "down_proj", (E, f, h), dst + "w2"),
                Piece(X + "down_proj_bias", (E, h), dst + "b2")]
    # gate + routed experts (per-expert hub names or fused), then DeepSeek's ungated shared experts
    pl = _moe_pieces(args.replace(shared_expert_intermediate_size=0), P, dst, avail)
    if args.router.correction_bias:
        pl.append(Piece(P + "mlp.gate.e_score_correction_bias", (E,), dst + "correction.weight"))
    fs = args.shared_expert_intermediate_size
    if fs:
        pl += _mlp_pieces(P + "mlp.shared_experts.", dst + "shared.", h, fs)
    return pl


def _layer_pieces(args: ModelArgs, P: str, M: str, moe: bool, avail: set[str]) -> list:
    from .loader import Piece
    h = args.hidden_size
    attn = _mla_pieces if args.mla is not None else _gqa_pieces
    return ([Piece(P + "input_layernorm.weight", (h,), M + "attention_norm.weight"),
             Piece(P + "post_attention_layernorm.weight", (h,), M + "ffn_norm.weight")]
            + attn(args, P + "self_attn.", M + "attention.") + _ffn_pieces(args, P, M + "ffn.", moe, avail))


def weight_plan(args: ModelArgs, available: set[str] | None = None) -> list:
    """The checkpoint tensors of one of these families and where each goes (see loader.weight_plan)."""
    from .loader import Piece
    avail = available or set()
    if args.family == "gpt_oss":
        _refuse_mxfp4(args, avail)
    else:
        _refuse_fp8(args, avail)
    h, V = args.hidden_size, args.vocab_size
    pl = [Piece("model.embed_tokens.weight", (V, h), "tok_embeddings.weight"),
          Piece("model.norm.weight", (h,), "norm.weight")]
    if not args.tie_word_embeddings:
        pl.append(Piece("lm_head.weight", (V, h), "output.weight"))
    for i in range(args.n_layers):
        pl += _layer_pieces(args, f"model.layers.{i}.", f"layers.{i}.", args.moe_layers[i], avail)
    for ck, M in _mtp_prefixes(args):
        pl += [Piece(ck + "enorm.weight", (h,), M + "enorm.weight"),
               Piece(ck + "hnorm.weight", (h,), M + "hnorm.weight"),
               Piece(ck + "eh_proj.weight", (h, 2 * h), M + "eh_proj.weight"),
               Piece(ck + "shared_head.norm.weight", (h,), M + "norm.weight")]
        pl += _layer_pieces(args, ck, M + "block.", True, avail)
    return pl

"""EAGLE-3 draft heads in their published checkpoint layout: load, run, and save a random one for tests.

Shape legend: bs requests, n tokens in one head forward, h hidden (= the target's), ht target hidden
(features), 3ht the three concatenated target features, Hq/Hk heads, d head dim, f MLP size, V target
vocab, Vd draft vocab, S the head's KV capacity.

Layout (SafeAILab/EAGLE `cnets.py`, as published on the hub, read by vLLM / SGLang): a folder with
config.json (a Llama config plus `draft_vocab_size`, optionally `target_hidden_size`, `head_dim`,
`rope_theta` / `rope_scaling`, and `eagle_config.eagle_aux_hidden_state_layer_ids`) and model.safetensors
or pytorch_model.bin holding
    fc.weight                          [h, 3ht]    fuses the target's low / mid / high hidden states
    midlayer.input_layernorm.weight    [h]         (norm of the token embedding)
    midlayer.hidden_norm.weight        [h]         (norm of the feature)
    midlayer.self_attn.{q,k,v}_proj.weight [Hq*d | Hk*d, 2h]   attention over cat(emb, feature)
    midlayer.self_attn.o_proj.weight   [h, Hq*d]
    midlayer.post_attention_layernorm.weight [h]
    midlayer.mlp.{gate,up}_proj.weight [f, h], midlayer.mlp.down_proj.weight [h, f]
    norm.weight [h], lm_head.weight [Vd, h]
    d2t [Vd] int64: target id = draft id + d2t[draft id];  t2d [V] bool (ignored; implied by d2t)
    embed_tokens.weight [V, h] (optional: otherwise the target's embedding is used, as EAGLE does)
(`layers.0.` is accepted in place of `midlayer.`.)

Forward of one position (pair of a feature and the NEXT token):
    x = cat(input_layernorm(embed(token)), hidden_norm(feat));  a = feat + o_proj(attn(q, k, v of x))
    out = a + mlp(post_attention_layernorm(a));  logits = lm_head(norm(out)) mapped to V with d2t
`out` (pre-norm) is the feature of the next drafting step. Target features: the hidden states entering
the target's layers [2, L//2, L-3] (EAGLE's own convention), or, when the config lists
eagle_aux_hidden_state_layer_ids (SGLang / SpecForge convention: the OUTPUT of those layers), entering
layers [i + 1 for i in ids].
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.config import ModelArgs, UnsupportedModelError
from ..models.loader import CheckpointError, resolve_dtype
from ..models.model import RMSNorm, Transformer, attention
from ..models.rope import apply_rope, inv_freq_and_scale, rope_cos_sin

_PREFIXES = ("midlayer.", "layers.0.")
_LAYER_KEYS = ("input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
               "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class Eagle3Head(nn.Module):
    def __init__(self, args: ModelArgs, target_hidden: int, draft_vocab: int, capture_layers: tuple[int, ...],
                 own_embedding: bool):
        super().__init__()
        h, q, kv = args.hidden_size, args.q_size, args.kv_size
        self.args, self.target_hidden, self.draft_vocab = args, target_hidden, draft_vocab
        self.capture_layers = capture_layers
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.fc = nn.Linear(3 * target_hidden, h, bias=False)
        self.input_layernorm = RMSNorm(h, args.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, args.rms_norm_eps)
        self.q_proj = nn.Linear(2 * h, q, bias=False)
        self.k_proj = nn.Linear(2 * h, kv, bias=False)
        self.v_proj = nn.Linear(2 * h, kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)
        f = args.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.norm = RMSNorm(h, args.rms_norm_eps)
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        self.embed_tokens = nn.Embedding(args.vocab_size, h) if own_embedding else None
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        inv, self.rope_scale = inv_freq_and_scale(args.rope, args.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._target_embed: nn.Embedding | None = None

    def bind_target(self, target: Transformer) -> None:
        """Use the target's token embedding (EAGLE heads ship without one)."""
        self._target_embed = target.tok_embeddings

    def embed(self, tokens: Tensor) -> Tensor:
        emb = self.embed_tokens if self.embed_tokens is not None else self._target_embed
        if emb is None:
            raise RuntimeError("Eagle3Head: no embedding (call bind_target(target) first)")
        return emb(tokens)

    def fuse(self, target_feats: Tensor) -> Tensor:
        """[..., 3ht] target low/mid/high hidden states -> [..., h] head input feature."""
        return self.fc(target_feats.to(self.fc.weight.dtype))

    def forward(self, tokens: Tensor, feats: Tensor, geo, cache) -> tuple[Tensor, Tensor]:
        """tokens [bs, n], feats [bs, n, h] (fused target features or the head's own previous outputs), geo
        a Geometry of its one-layer cache (positions / slots [bs, n], mask) -> (out [bs, n, h] pre-norm,
        logits [bs, n, V] float32 over the TARGET vocabulary: -inf outside the draft vocabulary)."""
        positions, slots, mask = geo
        if not isinstance(mask, Tensor):              # PrefixTreeMask: the head runs SDPA on the dense form
            mask = mask.dense(cache.attend_limit)
        bs, n = tokens.shape
        x = torch.cat([self.input_layernorm(self.embed(tokens).to(feats.dtype)), self.hidden_norm(feats)], -1)
        q = self.q_proj(x).view(bs, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(bs, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bs, n, self.n_kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(0, k, v, slots)
        S = mask.shape[-1]                            # the slots attended (<= the capacity)
        o = attention(q.transpose(1, 2), cache.k[0][:, :, :S], cache.v[0][:, :, :S], mask)
        a = feats + self.o_proj(o.transpose(1, 2).reshape(bs, n, -1))
        hn = self.post_attention_layernorm(a)
        out = a + self.down_proj(F.silu(self.gate_proj(hn)) * self.up_proj(hn))
        ld = self.lm_head(self.norm(out)).float()                                 # [bs, n, Vd]
        logits = ld.new_full((bs, n, self.args.vocab_size), float("-inf"))
        logits[..., self.d2t + torch.arange(self.draft_vocab, device=ld.device)] = ld
        return out, logits


# ---- checkpoint I/O ---------------------------------------------------------------------------------

def _head_args(cfg: dict[str, Any], where: str) -> ModelArgs:
    c = dict(cfg)
    c["architectures"], c["model_type"], c["num_hidden_layers"] = ["LlamaForCausalLM"], "llama", 1
    try:
        return ModelArgs.from_hf_config(c)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{where}: EAGLE-3 config: {e}") from None


def _capture_layers(cfg: dict[str, Any], target_layers: int, where: str) -> tuple[int, ...]:
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is not None:
        layers = tuple(int(i) + 1 for i in ids)      # output of layer i = input of layer i + 1
    else:
        L = target_layers
        layers = (2, L // 2, L - 3)
        if len(set(layers)) != 3 or min(layers) < 0:
            raise CheckpointError(f"{where}: the default EAGLE-3 feature layers (2, L//2, L-3) are not three "
                                  f"distinct layers for a {L}-layer target; set "
                                  f"eagle_config.eagle_aux_hidden_state_layer_ids in config.json")
    if len(layers) != 3 or not all(0 <= i <= target_layers for i in layers):
        raise CheckpointError(f"{where}: EAGLE-3 needs 3 feature layers within the target's {target_layers} "
                              f"layers; config gives inputs of layers {list(layers)}")
    return layers


def _read_weights(path: Path) -> dict[str, Tensor]:
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except Exception as e:
            raise CheckpointError(f"cannot read {st}: {e}") from None
    if pt.is_file():
        try:
            sd = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {pt}: {e}") from None
        return sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin "
                          f"(files: {', '.join(sorted(p.name for p in path.iterdir())) or 'none'})")


def load_eagle3(path: str | os.PathLike, target: Transformer, device: torch.device | str | None = None,
                dtype: str | torch.dtype | None = None) -> Eagle3Head:
    """Load an EAGLE-3 head folder for `target` (same device / dtype as the target by default). Every
    check (config, sizes against the target, tensor names and shapes, d2t range) runs before the head is
    built; errors name the file, key and expected value."""
    path = Path(path)
    where = str(path)
    if not path.is_dir():
        raise CheckpointError(f"EAGLE-3 head folder {where!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{where}: no config.json")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}/config.json is not valid JSON: {e}") from None
    ta = target.args
    args = _head_args(cfg, where)
    th = int(cfg.get("target_hidden_size") or args.hidden_size)
    if th != ta.hidden_size:
        raise CheckpointError(f"{where}: head expects target hidden size {th}, target has {ta.hidden_size}")
    if args.vocab_size != ta.vocab_size:
        raise CheckpointError(f"{where}: head vocab_size {args.vocab_size} != target vocab_size {ta.vocab_size} "
                              f"(the head must be trained for this target)")
    Vd = int(cfg.get("draft_vocab_size") or args.vocab_size)
    layers = _capture_layers(cfg, ta.n_layers, where)
    sd = _read_weights(path)
    prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise CheckpointError(f"{where}: no decoder layer tensors (expected names starting with 'midlayer.'); "
                              f"found: {', '.join(sorted(sd)[:8])}")
    h, q, kv, f = args.hidden_size, args.q_size, args.kv_size, args.intermediate_size
    own_embed = "embed_tokens.weight" in sd
    if not own_embed and h != ta.hidden_size:
        raise CheckpointError(f"{where}: head hidden size {h} differs from the target's {ta.hidden_size} and the "
                              f"checkpoint has no embed_tokens.weight")
    want = {"fc.weight": (h, 3 * th), "norm.weight": (h,), "lm_head.weight": (Vd, h)}
    shapes = {"input_layernorm.weight": (h,), "hidden_norm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, 2 * h), "self_attn.k_proj.weight": (kv, 2 * h),
              "self_attn.v_proj.weight": (kv, 2 * h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    want.update({prefix + k: v for k, v in shapes.items()})
    if Vd != args.vocab_size:
        want["d2t"] = (Vd,)
    if own_embed:
        want["embed_tokens.weight"] = (args.vocab_size, h)
    missing = sorted(set(want) - set(sd))
    if missing:
        raise CheckpointError(f"{where}: missing EAGLE-3 tensors: {', '.join(missing)}")
    unexpected = sorted(set(sd) - set(want) - {"t2d", "d2t"})
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors for an EAGLE-3 head: {', '.join(unexpected[:8])}")
    bad = [f"{k} {list(sd[k].shape)} (expected {list(s)})" for k, s in want.items() if tuple(sd[k].shape) != s]
    if bad:
        raise CheckpointError(f"{where}: shape mismatch: {'; '.join(bad[:6])}")
    d2t = sd["d2t"].long() if "d2t" in sd else torch.zeros(Vd, dtype=torch.long)
    if d2t.shape != (Vd,):
        raise CheckpointError(f"{where}: d2t has shape {list(d2t.shape)}, expected [{Vd}]")
    tid = d2t + torch.arange(Vd)
    if int(tid.min()) < 0 or int(tid.max()) >= ta.vocab_size or tid.unique().numel() != Vd:
        raise CheckpointError(f"{where}: d2t maps draft ids outside [0, {ta.vocab_size}) or onto the same target id")

    w = target.tok_embeddings.weight
    device = w.device if device is None else torch.device(device)
    tdtype = w.dtype if dtype is None else resolve_dtype(dtype, device)
    head = Eagle3Head(args, th, Vd, layers, own_embed)
    params = {
        "fc.weight": "fc.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
        prefix + "input_layernorm.weight": "input_layernorm.weight",
        prefix + "hidden_norm.weight": "hidden_norm.weight",
        prefix + "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        prefix + "self_attn.q_proj.weight": "q_proj.weight", prefix + "self_attn.k_proj.weight": "k_proj.weight",
        prefix + "self_attn.v_proj.weight": "v_proj.weight", prefix + "self_attn.o_proj.weight": "o_proj.weight",
        prefix + "mlp.gate_proj.weight": "gate_proj.weight", prefix + "mlp.up_proj.weight": "up_proj.weight",
        prefix + "mlp.down_proj.weight": "down_proj.weight"}
    if own_embed:
        params["embed_tokens.weight"] = "embed_tokens.weight"
    mine = dict(head.named_parameters())
    with torch.no_grad():
        for src, dst in params.items():
            mine[dst].copy_(sd[src])
        head.d2t.copy_(d2t)
    head = head.to(device=device, dtype=tdtype)
    head.inv_freq = inv_freq_and_scale(args.rope, args.head_dim)[0].to(device)   # float32, not tdtype
    head.bind_target(target)
    return head.eval().requires_grad_(False)


def save_random_eagle3(path: str | os.PathLike, target: Transformer, draft_vocab_size: int | None = None,
                       seed: int = 0, layer_ids: tuple[int, int, int] | None = None, std: float = 0.02,
                       intermediate_size: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a randomly initialized EAGLE-3 head for `target` in the published layout (config.json +
    model.safetensors; no embed_tokens, as published heads). The draft vocabulary is a seeded random
    subset of the target's (exercising d2t); layer_ids go to eagle_config.eagle_aux_hidden_state_layer_ids
    (default: 3 evenly spread layers). For tests and for trying the EAGLE path without a trained head."""
    from safetensors.torch import save_file

    ta = target.args
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    h, V = ta.hidden_size, ta.vocab_size
    Vd = V if draft_vocab_size is None else int(draft_vocab_size)
    if not 1 <= Vd <= V:
        raise ValueError(f"draft_vocab_size must be in [1, {V}], got {Vd}")
    L = ta.n_layers
    ids = tuple(layer_ids) if layer_ids is not None else (0, max(0, L // 2 - 1), max(0, L - 2))
    Hq, Hk, d = ta.n_heads, ta.n_kv_heads, ta.head_dim
    f = intermediate_size or 3 * h
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * std).to(dtype)   # noqa: E731
    sd = {"fc.weight": rnd(h, 3 * h), "norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rnd(Vd, h),
          "midlayer.input_layernorm.weight": torch.ones(h, dtype=dtype),
          "midlayer.hidden_norm.weight": torch.ones(h, dtype=dtype),
          "midlayer.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
          "midlayer.self_attn.q_proj.weight": rnd(Hq * d, 2 * h), "midlayer.self_attn.k_proj.weight": rnd(Hk * d, 2 * h),
          "midlayer.self_attn.v_proj.weight": rnd(Hk * d, 2 * h), "midlayer.self_attn.o_proj.weight": rnd(h, Hq * d),
          "midlayer.mlp.gate_proj.weight": rnd(f, h), "midlayer.mlp.up_proj.weight": rnd(f, h),
          "midlayer.mlp.down_proj.weight": rnd(h, f)}
    kept = torch.sort(torch.randperm(V, generator=g)[:Vd]).values
    sd["d2t"] = kept - torch.arange(Vd)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[kept] = True
    sd["t2d"] = t2d
    rope = {"rope_theta": ta.rope.theta}
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": f, "num_attention_heads": Hq, "num_key_value_heads": Hk, "head_dim": d,
           "num_hidden_layers": 1, "rms_norm_eps": ta.rms_norm_eps, "max_position_embeddings": ta.max_position_embeddings,
           "vocab_size": V, "draft_vocab_size": Vd, "hidden_act": "silu", "tie_word_embeddings": False,
           "torch_dtype": str(dtype).replace("torch.", ""), **rope,
           "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(ids)}}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path

"""The MTP drafter (`--draft mtp`): DeepSeek-V3 / GLM-4.5 drafting with the checkpoint's own multi-token-
prediction layer, EAGLE-style (SGLang's MTP): one layer, applied again and again, from the target's last
hidden state.

Shape legend: bs requests, n tokens of one MTP forward, h hidden, V vocab, S the MTP cache's capacity, T tree
nodes, D the tree's max depth, L_b committed tokens of request b.

The MTP layer (models/mtp_layer.py, Transformer.mtp[0]) maps a pair (previous state, next token) to a state
and logits:  out = norm(block(eh_proj(cat(enorm(embed(token)), hnorm(prev)))));  logits = lm_head(out).
Drafting follows the EAGLE-3 drafter's machinery (drafters.Eagle3Drafter), which this class reuses:
    pair t  = (target state at position t, token t+1) at MTP-cache slot t, RoPE position t (a uniform shift
              of transformers' t+1: attention only sees position differences). The target state is the
              target's final-norm hidden state (the LM head's input; vLLM, SGLang and transformers feed that
              one), captured by every verification (hidden_layers = (L,): the pre-norm state, normalized here)
    prefill the prompt's pairs, the last one (state at L_b - 1, root) giving the root's draft logits
    tree    node x at depth d fed as (MTP output of its parent, x) at position L_b - 1 + d: a chain is the
            MTP layer applied D times to its own outputs; trees expand level by level (top-k children)
    commit  the step's accepted pairs are fed with the fresh target states (n + 1 of them: a fixed window of
            D + 1), which overwrites the drafted entries and yields the next root's logits
Its cache is one layer laid out like the target's (MLA: the latent rows; GQA: K/V). Everything inside the
step is device tensors only: the whole step is captured in one CUDA graph with one host read per step.
Only the first MTP layer drafts (checkpoints ship one; SGLang's EAGLE-style MTP also chains the first).
The MTP layer's weights are part of the target (counted there); the head adds none.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..models.kv_cache import KVCache
from ..models.model import Transformer
from ..models.rope import rope_cos_sin
from .drafters import Eagle3Drafter


class NoMTPLayerError(ValueError):
    """The target has no MTP layer weights to draft with."""


def check_mtp(target: Transformer) -> None:
    a = target.args
    if getattr(target, "mtp", None) is not None and len(target.mtp) > 0:
        return
    if a.family in ("deepseek_v3", "glm4_moe"):
        raise NoMTPLayerError(
            f"--draft mtp: this {a.architecture} checkpoint has no MTP layer weights (expected tensors "
            f"model.layers.{a.n_layers}.eh_proj.weight, .enorm, .hnorm, .shared_head.norm and a decoder layer; "
            f"transformers' save_pretrained drops them): use the original checkpoint files, or another drafter "
            f"(ngram, self)")
    raise NoMTPLayerError(f"--draft mtp: {a.architecture} has no multi-token-prediction layers (DeepSeek-V3-style "
                          f"and GLM-4.5 checkpoints with num_nextn_predict_layers carry them); use another drafter")


class MTPHead(nn.Module):
    """The drafting interface of the target's MTP layer (what Eagle3Drafter calls its head): fuse() makes the
    target's captured state the MTP input, forward() runs one MTP step. It registers no parameters of its
    own (the layer, embedding and LM head belong to the target)."""

    def __init__(self, target: Transformer, index: int = 0):
        super().__init__()
        object.__setattr__(self, "target", target)          # plain references: not submodules
        object.__setattr__(self, "layer", target.mtp[index])
        self.args = target.args
        self.index = index
        self.capture_layers = (target.args.n_layers,)
        self.draft_vocab = target.args.vocab_size

    def fuse(self, feats: Tensor) -> Tensor:
        """[..., h] the target's pre-norm last hidden state -> its final-norm state (the LM head's input)."""
        return self.target.norm(feats)

    def forward(self, tokens: Tensor, feats: Tensor, geo, cache) -> tuple[Tensor, Tensor]:
        """tokens [bs, n], feats [bs, n, h] (previous states), geo a Geometry of the MTP cache -> (out [bs, n, h]
        the next states, logits [bs, n, V] float32)."""
        positions, slots, mask = geo
        if not isinstance(mask, Tensor):              # PrefixTreeMask: the dense form (MLA has no tree kernel)
            mask = mask.dense(cache.attend_limit)
        t = self.target
        emb = t.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, t.inv_freq, t.rope_scale, emb.dtype)
        out = self.layer(emb, feats, cos, sin, cache, slots, mask)
        return out, t.lm_head(out).float()


def mtp_cache(target: Transformer, batch_size: int, capacity: int) -> KVCache:
    """The MTP layer's one-layer cache, laid out like the target's (MLA latent rows or GQA K/V)."""
    a, w = target.args, target.tok_embeddings.weight
    if a.mla is not None:
        return KVCache(1, batch_size, 1, a.mla.latent_dim, capacity, w.dtype, w.device, values=False)
    return KVCache(1, batch_size, a.n_kv_heads, a.head_dim, capacity, w.dtype, w.device)


class MTPDrafter(Eagle3Drafter):
    """Drafts with the target's first MTP layer (module docstring). NoMTPLayerError (a ValueError) names what
    is missing when the checkpoint carries no MTP weights."""

    name = "mtp"

    def __init__(self, target: Transformer):
        check_mtp(target)
        self.head, self.target, self.source = MTPHead(target, 0), target, None
        self.hidden_layers = (target.args.n_layers,)
        self.cache: KVCache | None = None

    def _features(self, hidden) -> Tensor:
        if hidden is None or len(hidden) != 1:
            raise ValueError("MTP drafter: the engine must pass the target's last hidden state")
        return self.head.fuse(hidden[0])

    def _new_cache(self, bs: int, capacity: int) -> KVCache:
        return mtp_cache(self.target, bs, capacity)

    def _state_dtype_width(self) -> tuple[torch.dtype, int]:
        return self.target.tok_embeddings.weight.dtype, self.target.args.hidden_size

    def describe(self) -> dict:
        return {"drafter": "mtp", "mtp_layer": self.head.index, "mtp_layers": len(self.target.mtp),
                "architecture": self.target.args.architecture}

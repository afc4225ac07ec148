"""A multi-token-prediction (MTP) layer of DeepSeek-V3 / GLM-4.5 checkpoints (num_nextn_predict_layers).

Shape legend: bs requests, n tokens of one forward, h hidden, V vocab.

Checkpoint layout (layer index L + i after the L decoder layers; transformers drops these, the loader keeps
them as Transformer.mtp[i]):
    model.layers.{L+i}.enorm.weight [h], hnorm.weight [h], eh_proj.weight [h, 2h]
    model.layers.{L+i}.{input_layernorm, self_attn.*, post_attention_layernorm, mlp.*}   one decoder layer
                                                                                         (MoE, as layer L-1)
    model.layers.{L+i}.shared_head.norm.weight [h]
    model.layers.{L+i}.{embed_tokens.weight, shared_head.head.weight}   copies of the target's embedding and
                                                                        LM head: not loaded, the target's used
Forward of a pair (previous hidden state, next token), as transformers' MtpLayer / SGLang's NextN:
    x   = eh_proj(cat(enorm(embed(token)), hnorm(prev)))      prev: the target's final-norm hidden state (the
                                                              LM head's input), or this layer's own output
    out = norm(block(x))                                      the next step's `prev`; logits = lm_head(out)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelArgs
from .model import Block, MoEControl, RMSNorm


def mtp_block_args(args: ModelArgs) -> ModelArgs:
    """The MTP block's args: one MoE layer at index 0 of its own one-layer cache, no windows."""
    return args.replace(n_layers=1, moe_layers=(True,), layer_windows=(), n_mtp_layers=0)


class MTPLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = Block(mtp_block_args(args), 0)
        self.norm = RMSNorm(h, eps)

    def forward(self, emb: Tensor, prev: Tensor, cos: Tensor, sin: Tensor, cache, slots: Tensor, mask: Tensor,
                moe: MoEControl | None = None) -> Tensor:
        """emb [bs, n, h] token embeddings, prev [bs, n, h] previous hidden states, cos / sin the positions'
        RoPE, cache a one-layer cache of the block's attention, slots [bs, n], mask bool [bs, n, S]
        -> out [bs, n, h] (final-norm states: the LM head's input and the next step's prev)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(prev.to(emb.dtype))], dim=-1))
        return self.norm(self.block(x, cos, sin, cache, slots, mask, moe or MoEControl()))

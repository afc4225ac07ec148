#!/usr/bin/env python3
"""Train a speculative-decoding pair: an MoE target and a dense draft distilled from it (issue 21's `realpair`,
and the trainer behind scripts/train_tiny.py). Output: Hugging Face folders (config.json, model.safetensors
in the hub layout, tokenizer files, generation_config.json) that `specmoe_ext.models.load_model` and
transformers' AutoModelForCausalLM load, plus training.json.

Shape legend: B windows per step, T window length, N = B*T tokens, V vocab, h hidden, L layers, E experts,
K experts per token, f expert FFN, C expert capacity (slots per expert per layer and step), P = N*K pairs.

    python scripts/train_pair.py --corpus corpus/realpair --out runs/realpair            # GPU: ~3-4 min
    python scripts/train_pair.py --corpus corpus/realpair --out /tmp/rp --smoke          # CPU: seconds

Models (default; --smoke: a toy of the same families, h=64, 2+1 layers, 8 experts top-2, a few steps):
    target  Qwen3MoeForCausalLM  L=8, h=512, 8 query / 4 KV heads of 64, q/k RMSNorm, 64 experts top-4
            (norm_topk_prob), f=256, V=32000 (Mixtral's tokenizer), tied embeddings: 224.3M parameters,
            35.5M active per token (16.4M of them the tied embedding / LM head)
    draft   Qwen3ForCausalLM     L=2, h=512, the same heads, dense SwiGLU f=1536, tied: 22.7M parameters
Same tokenizer (the corpus's tokenizer/ folder), <s> = 1 before and </s> = 2 (EOS) after every document.

Training (deterministic from --seed: initialization, the window order and the schedule follow from it and the
step counts, never from time):
    data     the corpus's train split (scripts/make_corpus.py), tokenized once (cached as .npz beside the
             models) and concatenated in the corpus's fixed document order; each step takes B random windows
             of T+1 tokens (a seeded CPU generator)
    target   next-token cross-entropy + 0.01 x the Switch load-balancing loss (E * sum_e share of the top-K
             slots of e * mean router probability of e, per MoE layer), AdamW (betas 0.9/0.95, wd 0.05,
             fused on CUDA), linear warm-up then cosine to 10%, gradient clipping 1.0, bf16 autocast on CUDA
             (float32 master weights and float32 on the CPU)
    draft    0.5 x cross-entropy + 0.5 x KL(target || draft) on the target's next-token distributions (the
             trained target runs as the teacher in the same step), which raises the acceptance rate
Forward used for training (--moe-forward): `fast_forward` below runs the model's own modules and weights with
causal SDPA (flash on the GPU) and `train_moe`: softmax top-K routing, the (token, slot) pairs sorted by expert,
no host synchronization on CUDA, and
    grouped   (default) each expert's pairs in a row block padded to a multiple of 16, two grouped GEMMs
              (torch's CUTLASS grouped_mm, differentiable, bf16; on the CPU a per-expert loop stands in):
              exact, no pair dropped. Checked on CUDA before training against the capacity dispatch on one
              batch (loss and gradients, `check_grouped_dispatch`); if that fails, training falls back to
              capacity with factor max(--capacity-factor, 3) and training.json says so.
    capacity  C = ceil(cf * P / E) slots per expert (--capacity-factor, default 2.0), pairs past C dropped
              (their share is logged as drop_frac), two batched matmuls over [E, C, h].
    library   `Transformer.forward` with a differentiable router (reference.route_budget, host-side) and the
              "loop" experts: exact but slow; what scripts/train_tiny.py uses, so that its pair stays
              reproducible.
Without drops, grouped and capacity equal the library forward (tests/test_real_pair_scripts.py checks logits and
gradients).
On CUDA, torch.use_deterministic_algorithms(True, warn_only=True) is set (CUBLAS_WORKSPACE_CONFIG=:4096:8);
the kernels that still warn are listed in training.json ("nondeterministic_warnings"). On the CPU two runs
are bit-identical (tested).

Throughput (an ESTIMATE from FLOPs, not a measurement; training.json records the measured tokens/s):
    target  6 x 35.5M active parameters (+ 6 x 12.6M x (cf - 1) of padding with --moe-forward capacity; the
            grouped dispatch pads at most 16 rows per expert) + causal attention 6 x L x T x 512
            -> 0.23 GFLOP per token (`flops_per_token`); at an assumed 20% of the H200's 989 TFLOP/s dense
            bf16 peak (~200 TFLOP/s: small h=512 matrices, 64 expert groups, the per-layer sort / gather)
            that is ~0.87M tokens/s, so the default 2000 steps x 64 x 512 = 65.5M tokens (one pass over
            the 65M-token train split) take ~75 s.
    draft   6 x 22.7M (student) + 2 x 35.5M (teacher forward) + attention -> 0.22 GFLOP per token, ~0.9M
            tokens/s estimated: 800 steps x 32768 = 26M tokens in ~30 s.
    Tokenizing the corpus (156 MiB of text, Rust tokenizers on 16 cores) adds ~20 s the first time (cached).
--max-seconds S is a deadline guard for the whole run: the target stage stops at a step boundary once it has
used 72% of what is left after tokenizing, the draft before S (the result then depends on speed, and
training.json says "stopped_early"). A finished run in --out with the same arguments is not redone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from specmoe_ext import reference  # noqa: E402
from specmoe_ext.models.config import ModelArgs  # noqa: E402
from specmoe_ext.models.loader import save_checkpoint  # noqa: E402
from specmoe_ext.models.model import MoEControl, MoEFeedForward, Transformer  # noqa: E402
from specmoe_ext.models.rope import apply_rope, rope_cos_sin  # noqa: E402


# ---- configs ------------------------------------------------------------------------------------------

def target_config(vocab: int, bos: int | None, eos: int, smoke: bool = False) -> dict:
    h, L, E, K, f, heads, kv, d = (64, 2, 8, 2, 64, 2, 1, 32) if smoke else (512, 8, 64, 4, 256, 8, 4, 64)
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        "hidden_size": h, "intermediate_size": 3 * h, "moe_intermediate_size": f, "num_hidden_layers": L,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d, "num_experts": E,
        "num_experts_per_tok": K, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "bos_token_id": bos,
        "eos_token_id": eos, "pad_token_id": None, "router_aux_loss_coef": 0.01, "output_router_logits": False,
    }


def draft_config(vocab: int, bos: int | None, eos: int, smoke: bool = False) -> dict:
    h, L, f, heads, kv, d = (64, 1, 128, 2, 1, 32) if smoke else (512, 2, 1536, 8, 4, 64)
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": f, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": d, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "layer_types": ["full_attention"] * L, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None,
    }


def active_params(args: ModelArgs) -> tuple[int, int]:
    """(total, active per token) parameters from the shapes (meta device)."""
    with torch.device("meta"):
        m = Transformer(args)
    total = m.num_parameters()
    if not args.is_moe:
        return total, total
    per_expert = 3 * args.hidden_size * args.moe_intermediate_size
    inactive = sum(args.moe_layers) * (args.n_experts - args.top_k) * per_expert
    return total, total - inactive


def flops_per_token(args: ModelArgs, T: int, capacity_factor: float = 1.0, train: bool = True) -> float:
    """Matmul FLOPs per token: 2 (forward) or 6 (forward + backward) x active parameters (the experts' share
    x the capacity padding), + causal attention (scores and values over T/2 keys on average)."""
    _, active = active_params(args)
    pad = 0.0
    if args.is_moe:
        expert = 3 * args.hidden_size * args.moe_intermediate_size
        pad = (capacity_factor - 1.0) * sum(args.moe_layers) * args.top_k * expert
    mult = 6 if train else 2
    attn = mult * args.n_layers * T * args.n_heads * args.head_dim  # 2 matmuls x 2 FLOPs x T/2 keys (x3 training)
    return mult * (active + pad) + attn


# ---- the training forward -------------------------------------------------------------------------------

def _causal_attention(att, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The module's own projections / q-k norms / RoPE, causal SDPA. x [B, T, h]."""
    bs, T, _ = x.shape
    q, k, v = att.wqkv(x).split([att.q_size, att.kv_size, att.kv_size], dim=-1)
    if att.qk_norm == "full":
        q, k = att.q_norm(q), att.k_norm(k)
    q = q.view(bs, T, att.n_heads, att.head_dim)
    k = k.view(bs, T, att.n_kv_heads, att.head_dim)
    v = v.view(bs, T, att.n_kv_heads, att.head_dim)
    if att.qk_norm == "head":
        q, k = att.q_norm(q), att.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if torch.is_autocast_enabled(x.device.type):     # SDPA in the autocast dtype (flash on the GPU)
        dt = torch.get_autocast_dtype(x.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    rep = att.n_heads // att.n_kv_heads
    if rep > 1:              # GQA as repeated KV heads: every SDPA backend (flash included) takes that
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return att.wo(o.transpose(1, 2).reshape(bs, T, att.q_size))


def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What torch's grouped_mm computes for a [M, k], b [G, k, n], offs [G] (group ends along M): rows of group
    g times b[g]; rows past offs[-1] are 0. The CPU stand-in (one host read of offs)."""
    ends, start, parts = offs.tolist(), 0, []
    for g, (end, bg) in enumerate(zip(ends, b.unbind(0))):   # unbind: one gradient buffer for b, not one per g
        parts.append(a[start:end] @ bg)
        start = end
    parts.append(a.new_zeros(a.shape[0] - start, b.shape[-1]))
    return torch.cat(parts)


def _grouped_mm_cuda(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")
    dt = torch.bfloat16
    return fn(a.to(dt), b.to(dt), offs=offs)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """CUTLASS grouped GEMM (bf16, differentiable) on CUDA; the loop stand-in elsewhere."""
    return _grouped_mm_cuda(a, b, offs) if a.is_cuda else _grouped_mm_loop(a, b, offs)


ALIGN = 16   # rows per expert group are padded to a multiple of this (the grouped GEMM's backward wants it)


def train_moe(ffn: MoEFeedForward, x: torch.Tensor, dispatch: str = "grouped", capacity_factor: float = 2.0,
              stats: dict | None = None) -> torch.Tensor:
    """Softmax top-K routing (renormalized as the model's norm_topk_prob says) and the experts, differentiable
    and with no host synchronization on CUDA: x [..., h] -> [..., h]. stats (when given) gets the Switch balance
    loss and the dropped-pair share appended. The (token, slot) pairs are sorted by expert, then
      grouped    each expert's pairs in a row block padded to a multiple of ALIGN (at most P + ALIGN*E rows),
                 two grouped GEMMs over the blocks: exact, every pair computed
      capacity   C = ceil(capacity_factor * P / E) slots per expert, pairs past C dropped, two batched
                 matmuls over [E, C, h]
    and combined per token in float32 in slot order (unique-index gathers only: deterministic)."""
    shape, h = x.shape, x.shape[-1]
    xf = x.reshape(-1, h)
    N, E, K = xf.shape[0], ffn.n_experts, ffn.top_k
    P, dev, f = N * K, x.device, ffn.w2.shape[-1]
    probs = ffn.gate(xf).float().softmax(dim=-1)                                    # [N, E]
    topv, topi = probs.topk(K, dim=-1)
    w = topv / topv.sum(dim=-1, keepdim=True) if ffn.renormalize else topv         # [N, K]
    e = topi.reshape(-1)                                                            # [P] pair -> expert
    order = torch.argsort(e, stable=True)
    e_sorted = e[order]
    ar_e, ar_p = torch.arange(E, device=dev), torch.arange(P, device=dev)
    starts = torch.searchsorted(e_sorted, ar_e)                                     # [E]
    counts = torch.searchsorted(e_sorted, ar_e, right=True) - starts
    rank = ar_p - starts[e_sorted]                                                  # slot within its expert
    xs = xf[:, None, :].expand(N, K, h).reshape(P, h)[order]                        # [P, h] in expert order
    if dispatch == "grouped":
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        ends = torch.cumsum(padded, 0)
        M = P + ALIGN * E
        row = (ends - padded)[e_sorted] + rank                                      # unique rows < M
        buf = xs.new_zeros(M, h).index_copy(0, row, xs)
        offs = ends.to(torch.int32)
        live = (torch.arange(M, device=dev) < ends[-1])[:, None]                    # rows past the groups: 0
        gu = torch.where(live, grouped_mm(buf, ffn.w13.transpose(1, 2), offs), 0.0)
        y = torch.where(live, grouped_mm(F.silu(gu[:, :f]) * gu[:, f:], ffn.w2.transpose(1, 2), offs), 0.0)
        y = y[row]                                                                  # [P, h] expert order
        dropped = torch.zeros((), device=dev)
    elif dispatch == "capacity":
        C = max(1, math.ceil(capacity_factor * P / E))
        keep = rank < C
        # every pair gets its own row: kept ones e*C + rank, dropped ones a spare row E*C + i
        dest = torch.where(keep, e_sorted * C + rank, E * C + ar_p)
        buf = xs.new_zeros(E * C + P, h).index_copy(0, dest, xs)
        gu = torch.bmm(buf[:E * C].view(E, C, h), ffn.w13.transpose(1, 2))          # [E, C, 2f]
        y = torch.bmm(F.silu(gu[..., :f]) * gu[..., f:], ffn.w2.transpose(1, 2))    # [E, C, h]
        y = torch.cat([y.reshape(E * C, h), y.new_zeros(P, h)])[dest]               # [P, h]; dropped: 0
        dropped = 1.0 - keep.float().mean()
    else:
        raise ValueError(f"train_moe: dispatch {dispatch!r}: grouped | capacity")
    inv = torch.empty_like(order).index_copy_(0, order, ar_p)
    out = (y[inv].view(N, K, h).float() * w[..., None]).sum(dim=1)
    if stats is not None:
        stats.setdefault("balance", []).append(E * ((counts.float() / P) * probs.mean(dim=0)).sum())
        stats.setdefault("dropped", []).append(dropped)
    if ffn.shared is not None:
        raise NotImplementedError("train_moe: shared experts are not trained by this script")
    return out.to(x.dtype).view(shape)


def fast_forward(model: Transformer, tokens: torch.Tensor, dispatch: str = "grouped", capacity_factor: float = 2.0,
                 stats: dict | None = None) -> torch.Tensor:
    """tokens [B, T] -> logits [B, T, V]: the model's modules, causal attention from position 0, `train_moe`.
    For the families this script trains (Qwen3 / Qwen3-MoE / Mixtral / Llama: full attention, full RoPE,
    no sinks / MLA / windows / shared experts)."""
    a = model.args
    if (a.mla is not None or a.attn_sinks or any(a.layer_windows) or a.clip_qkv is not None
            or (a.rotary_dim and a.rotary_dim != a.head_dim)):
        raise NotImplementedError(f"fast_forward does not cover {a.architecture}'s attention variant")
    B, T = tokens.shape
    x = model.tok_embeddings(tokens)
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    cos, sin = rope_cos_sin(pos, model.inv_freq, model.rope_scale, x.dtype)
    for layer in model.layers:
        x = x + _causal_attention(layer.attention, layer.attention_norm(x), cos, sin)
        hn = layer.ffn_norm(x)
        if isinstance(layer.ffn, MoEFeedForward):
            x = x + train_moe(layer.ffn, hn, dispatch, capacity_factor, stats)
        else:
            x = x + layer.ffn(hn)
    return model.lm_head(model.norm(x))


def check_grouped_dispatch(model: Transformer, tokens: torch.Tensor) -> dict:
    """On CUDA, before training: the grouped dispatch's loss and gradients against the capacity dispatch with
    room for every pair (exact) on one batch, in bf16 autocast. {"ok": bool, ...}; an exception is a failure."""
    a = model.args
    res: dict = {}
    try:
        grads = {}
        for mode in ("grouped", "capacity"):
            model.zero_grad(set_to_none=True)
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.is_cuda):
                logits = fast_forward(model, tokens, mode, a.n_experts / a.top_k)
                loss = F.cross_entropy(logits.reshape(-1, a.vocab_size).float(), tokens.reshape(-1))
            loss.backward()
            res[f"loss_{mode}"] = round(loss.item(), 5)
            grads[mode] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        rel = ((grads["grouped"] - grads["capacity"]).norm() / grads["capacity"].norm().clamp_min(1e-12)).item()
        res.update(grad_rel_diff=round(rel, 5), ok=bool(abs(res["loss_grouped"] - res["loss_capacity"]) < 0.02
                                                        and rel < 0.05))
    except Exception as e:                    # e.g. a torch without a differentiable grouped GEMM
        model.zero_grad(set_to_none=True)
        res.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return res


class _RecordingRouter:
    """Differentiable routing for the library forward; keeps each layer's router logits for the balance loss."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits, top_k, budget, **kw):
        self.logits.append(logits)
        kw.pop("token_weights", None), kw.pop("protect", None)
        return reference.route_budget(logits, top_k, budget, scoring=kw["scoring"],
                                      renormalize=kw["renormalize"], policy=kw["policy"])


def balance_loss(logits_list: list[torch.Tensor], E: int, K: int) -> torch.Tensor:
    """Switch-transformer auxiliary loss: E * sum_e (fraction of top-K slots to e) * (mean prob of e)."""
    total = 0.0
    for lg in logits_list:
        p = lg.float().softmax(-1)
        ids = p.topk(K, dim=-1).indices
        frac = torch.zeros(E).index_add_(0, ids.reshape(-1), torch.ones(ids.numel())) / ids.numel()
        total = total + E * (frac * p.mean(0)).sum()
    return total / len(logits_list)


# ---- training -------------------------------------------------------------------------------------------

def batches(data: torch.Tensor, B: int, T: int, g: torch.Generator):
    """Endless (x, y) [B, T] of random windows of `data` (1-D, any int dtype, on any device); the window
    starts come from the seeded CPU generator g."""
    ar = torch.arange(T + 1, device=data.device)
    while True:
        i = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
        x = data[i.to(data.device)[:, None] + ar].long()
        yield x[:, :-1], x[:, 1:]


def run_training(model: Transformer, data: torch.Tensor, steps: int, lr: float, B: int, T: int, name: str,
                 teacher: Transformer | None = None, seed: int = 0, *, forward: str = "library",
                 capacity_factor: float = 2.0, warmup: int = 30, kd_weight: float = 0.5, balance_coef: float = 0.01,
                 max_seconds: float | None = None, log_every: int = 25, weight_decay: float = 0.05) -> dict:
    """Train `model` in place for `steps` steps of B x T tokens from `data` (see the module docstring)."""
    dev = model.tok_embeddings.weight.device
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            **({"fused": True} if cuda else {}))
    pos = torch.arange(T, device=dev).expand(B, T)
    args = model.args
    step, t0, stopped = 0, time.time(), False
    ema = torch.zeros((), dtype=torch.float64, device=dev)
    drop = torch.zeros((), dtype=torch.float64, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    model.train()
    if teacher is not None:
        teacher.eval()
    caught: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(data, B, T, g):
            # linear warm-up, then cosine decay to 10% over the fixed number of steps (deterministic schedule)
            frac = step / steps
            cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for grp in opt.param_groups:
                grp["lr"] = cur_lr
            with amp:
                if forward == "library":
                    router = _RecordingRouter()
                    logits = model(x, pos, moe=MoEControl(router=router, impl="loop"))[0]
                    aux = balance_loss(router.logits, args.n_experts, args.top_k) if router.logits else None
                else:
                    stats: dict = {}
                    logits = fast_forward(model, x, forward, capacity_factor, stats)
                    aux = torch.stack(stats["balance"]).mean() if stats.get("balance") else None
                    if stats.get("dropped"):
                        drop = torch.stack(stats["dropped"]).mean().double()
                loss = F.cross_entropy(logits.reshape(-1, args.vocab_size).float(), y.reshape(-1))
                ce = loss.detach()
                if aux is not None:
                    loss = loss + balance_coef * aux
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = (teacher(x, pos)[0] if forward == "library"
                                    else fast_forward(teacher, x, forward, capacity_factor))
                        t_logp = t_logits.float().log_softmax(-1)
                    s_logp = logits.float().log_softmax(-1)
                    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
                    loss = (1 - kd_weight) * loss + kd_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = ce.double() if step == 0 else 0.98 * ema + 0.02 * ce.double()
            step += 1
            if step % log_every == 0 or step == steps:
                el = time.time() - t0
                print(f"[{name}] step {step:5d}  ce {ema.item():.3f}  lr {cur_lr:.2e}  "
                      + (f"drop {drop.item():.4f}  " if forward == "capacity" and args.is_moe else "")
                      + f"{el:6.0f}s  {step * B * T / max(el, 1e-9):,.0f} tok/s", flush=True)
            if step >= steps:
                break
            if max_seconds is not None and time.time() - t0 > max_seconds:
                stopped = True
                print(f"[{name}] --max-seconds {max_seconds}: stopped at step {step} of {steps}", flush=True)
                break
    if cuda:
        torch.cuda.synchronize(dev)
    model.eval()
    seconds = time.time() - t0
    nondet = sorted({str(w.message).split("\n")[0][:200] for w in caught if "determinis" in str(w.message)})
    return {"steps": step, "steps_planned": steps, "stopped_early": stopped, "train_ce_ema": round(ema.item(), 4),
            "seconds": round(seconds, 1), "tokens": step * B * T,
            "tokens_per_s_measured": round(step * B * T / max(seconds, 1e-9), 1), "batch": B, "seq": T, "lr": lr,
            "forward": forward, **({"capacity_factor": capacity_factor, "last_drop_frac": round(drop.item(), 5)}
                                   if forward == "capacity" and args.is_moe else {}),
            **({"kd_weight": kd_weight} if teacher is not None else {}), "nondeterministic_warnings": nondet}


@torch.no_grad()
def eval_ce(model: Transformer, data: torch.Tensor, T: int = 256, n: int = 16, impl: str | None = "loop",
            seed: int = 1234, fast: bool = False, dispatch: str = "grouped") -> float:
    """Mean next-token cross-entropy over n random windows (a seeded generator): the library forward with
    MoE implementation `impl`, or (fast) `fast_forward` with a capacity that can hold every pair (no drops)."""
    g = torch.Generator().manual_seed(seed)
    x, y = next(batches(data, n, T, g))
    if fast:
        a = model.args
        logits = fast_forward(model, x, dispatch, a.n_experts / a.top_k if a.is_moe else 1.0)
    else:
        logits = model(x, torch.arange(T, device=x.device).expand(n, T), moe=MoEControl(impl=impl))[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item()


# ---- corpus --------------------------------------------------------------------------------------------

def corpus_tokenizer(corpus: Path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    cfg = json.loads((corpus / "tokenizer" / "tokenizer_config.json").read_text())
    bos = tok.token_to_id(cfg["bos_token"]) if cfg.get("bos_token") else None
    eos = tok.token_to_id(cfg["eos_token"])
    return tok, bos, eos


def tokenize_docs(tok, texts: list[str], bos: int | None, eos: int, batch: int = 512):
    """[<s>] doc [</s>] for every text, concatenated -> numpy int32 (literal '<s>' in text stays text)."""
    import numpy as np
    tok.encode_special_tokens = True
    parts = []
    for i in range(0, len(texts), batch):
        for e in tok.encode_batch(texts[i:i + batch], add_special_tokens=False):
            parts.append(np.asarray(([bos] if bos is not None else []) + e.ids + [eos], dtype=np.int32))
    tok.encode_special_tokens = False
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def corpus_tokens(corpus: Path, cache: Path | None, max_docs: int | None = None) -> dict:
    """{"train": ids, "heldout/code": ids, "heldout/prose": ids, ...} (numpy int32), cached by content hash."""
    import numpy as np
    from make_corpus import read_jsonl_xz
    tok, bos, eos = corpus_tokenizer(corpus)
    h = hashlib.sha256()
    for name in ("train.jsonl.xz", "heldout.jsonl.xz", "tokenizer/tokenizer.json"):
        h.update((corpus / name).read_bytes())
    h.update(str(max_docs).encode())
    key = h.hexdigest()[:16]
    path = cache / f"tokens_{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return {k.replace("__", "/"): z[k] for k in z.files}
    out = {}
    for split in ("train", "heldout"):
        docs = list(read_jsonl_xz(corpus / f"{split}.jsonl.xz"))[:max_docs]
        if split == "train":
            out["train"] = tokenize_docs(tok, [d["text"] for d in docs], bos, eos)
        for kind in sorted({d["kind"] for d in docs}):
            out[f"{split}/{kind}"] = tokenize_docs(tok, [d["text"] for d in docs if d["kind"] == kind], bos, eos)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k.replace("/", "__"): v for k, v in out.items()})
    return out


def verify_tokenizer(corpus: Path, n: int = 200) -> dict:
    """Where sentencepiece is importable (the GPU machine), encode n held-out documents with both."""
    try:
        import sentencepiece as spm
    except ImportError:
        return {"verified": False, "why": "sentencepiece is not importable"}
    model = corpus / "tokenizer" / "tokenizer.model"
    if not model.exists():
        return {"verified": False, "why": "the corpus tokenizer is not a SentencePiece model"}
    from make_corpus import read_jsonl_xz
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok, _, _ = corpus_tokenizer(corpus)
    texts = [d["text"] for _, d in zip(range(n), read_jsonl_xz(corpus / "heldout.jsonl.xz"))]
    tok.encode_special_tokens = True
    ours = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    tok.encode_special_tokens = False
    theirs = sp.encode(texts)
    return {"verified": True, "sentencepiece": spm.__version__, "documents": len(texts),
            "identical_ids": sum(a == b for a, b in zip(ours, theirs)), "tokens": sum(map(len, theirs))}


def write_model_folder(model: Transformer, out: Path, cfg: dict, corpus: Path, bos: int | None, eos: int) -> None:
    save_checkpoint(model, out, cfg, dtype=torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "LICENSE.mistral-common"):
        src = corpus / "tokenizer" / name
        if src.exists():
            shutil.copyfile(src, out / name)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT / "corpus" / "realpair"), help="scripts/make_corpus.py output")
    ap.add_argument("--out", default=str(ROOT / "runs" / "realpair"))
    ap.add_argument("--smoke", action="store_true", help="toy configs and a few steps (CPU CI)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-target", type=int, default=None, help="default 2000 (smoke 4)")
    ap.add_argument("--steps-draft", type=int, default=None, help="default 800 (smoke 3)")
    ap.add_argument("--batch", type=int, default=None, help="windows per step (default 64; smoke 4)")
    ap.add_argument("--seq", type=int, default=None, help="window length T (default 512; smoke 64)")
    ap.add_argument("--lr-target", type=float, default=1.5e-3)
    ap.add_argument("--lr-draft", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 100; smoke 2)")
    ap.add_argument("--capacity-factor", type=float, default=2.0)
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--moe-forward", choices=["grouped", "capacity", "library"], default="grouped")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="a deadline guard for the whole run: the target stops at 72%% of what is left after "
                         "tokenizing, the draft before the end (training.json then says stopped_early)")
    ap.add_argument("--max-docs", type=int, default=None, help="use the first N documents of each split")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="retrain even if --out holds a finished run")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    smoke = a.smoke
    steps_t = a.steps_target if a.steps_target is not None else (4 if smoke else 2000)
    steps_d = a.steps_draft if a.steps_draft is not None else (3 if smoke else 800)
    B = a.batch or (4 if smoke else 64)
    T = a.seq or (64 if smoke else 512)
    warm = a.warmup if a.warmup is not None else (2 if smoke else 100)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.threads:
        torch.set_num_threads(a.threads)
    corpus, out = Path(a.corpus), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    key = {k: v for k, v in vars(a).items() if k not in ("out", "force", "threads", "max_seconds", "device")}
    key["steps_target"], key["steps_draft"], key["batch"], key["seq"], key["warmup"] = steps_t, steps_d, B, T, warm
    done = out / "training.json"
    if done.exists() and not a.force:
        prev = json.loads(done.read_text())
        if prev.get("args") == key and (out / "target" / "model.safetensors").exists() \
                and (out / "draft" / "model.safetensors").exists():
            print(f"train_pair: {out} already holds this run (training.json); --force retrains", flush=True)
            return 0
    t0 = time.time()
    torch.manual_seed(a.seed)
    tok, bos, eos = corpus_tokenizer(corpus)
    V = tok.get_vocab_size()
    toks = corpus_tokens(corpus, out / "cache", a.max_docs)
    train = torch.from_numpy(toks["train"]).to(dev)
    held = {k.split("/", 1)[1]: torch.from_numpy(v).to(dev) for k, v in toks.items()
            if k.startswith("heldout/") and v.size > T + 1}
    tok_s = time.time() - t0
    print(f"corpus: {train.numel():,} train tokens, held-out "
          f"{ {k: int(v.numel()) for k, v in held.items()} } ({tok_s:.0f} s)", flush=True)
    tcfg, dcfg = target_config(V, bos, eos, smoke), draft_config(V, bos, eos, smoke)
    targs, dargs = ModelArgs.from_hf_config(tcfg), ModelArgs.from_hf_config(dcfg)
    (tp, ta), (dp, _) = active_params(targs), active_params(dargs)
    pad = a.capacity_factor if a.moe_forward == "capacity" else 1.0
    est = {"target_gflop_per_token": round(flops_per_token(targs, T, pad) / 1e9, 4),
           "draft_gflop_per_token": round((flops_per_token(dargs, T) + flops_per_token(targs, T, pad, train=False))
                                          / 1e9, 4),
           "note": "ESTIMATES from FLOPs (see the module docstring); the measured tokens/s are in target/draft"}
    print(f"target {tp / 1e6:.1f}M params ({ta / 1e6:.1f}M active), draft {dp / 1e6:.1f}M; "
          f"{est['target_gflop_per_token']} / {est['draft_gflop_per_token']} GFLOP per training token (estimate)",
          flush=True)
    target = Transformer(targs).init_random(std=0.02, seed=a.seed).to(dev)
    forward, cf, check = a.moe_forward, a.capacity_factor, None
    if forward == "grouped":
        g = torch.Generator().manual_seed(a.seed + 99)
        check = check_grouped_dispatch(target, next(batches(train, min(B, 8), T, g))[0])
        print(f"grouped dispatch check: {check}", flush=True)
        if not check["ok"]:
            forward, cf = "capacity", max(cf, 3.0)
            print(f"train_pair: falling back to the capacity dispatch (factor {cf})", flush=True)
    common = dict(forward=forward, capacity_factor=cf, warmup=warm, log_every=2 if smoke else 50)
    # --max-seconds: the whole run's guard; the target may use 72% of what is left after tokenizing
    left = None if a.max_seconds is None else a.max_seconds - (time.time() - t0)
    t_info = run_training(target, train, steps_t, a.lr_target, B, T, "target", seed=a.seed,
                          max_seconds=None if left is None else 0.72 * left, **common)
    write_model_folder(target, out / "target", tcfg, corpus, bos, eos)
    left = None if a.max_seconds is None else a.max_seconds - (time.time() - t0) - 10
    draft = Transformer(dargs).init_random(std=0.02, seed=a.seed + 1).to(dev)
    d_info = run_training(draft, train, steps_d, a.lr_draft, B, T, "draft", teacher=target, seed=a.seed + 1,
                          kd_weight=a.kd_weight, max_seconds=None if left is None else max(1.0, left), **common)
    write_model_folder(draft, out / "draft", dcfg, corpus, bos, eos)
    val = {f"{name}_{kind}": round(eval_ce(m, d, min(T, 256), 16, fast=True, dispatch=forward), 4)
           for name, m in (("target", target), ("draft", draft)) for kind, d in held.items()}
    info = {"args": key, "python": sys.version.split()[0], "torch": torch.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "corpus": str(corpus), "corpus_manifest_sha256": hashlib.sha256((corpus / "manifest.json").read_bytes())
            .hexdigest() if (corpus / "manifest.json").exists() else None,
            "train_tokens": int(train.numel()), "heldout_tokens": {k: int(v.numel()) for k, v in held.items()},
            "tokenize_s": round(tok_s, 1), "moe_forward": forward, "grouped_dispatch_check": check,
            "target_parameters": tp, "target_active_parameters": ta,
            "draft_parameters": dp, "estimate": est, "target": t_info, "draft": d_info,
            "heldout_ce_16x256": val, "tokenizer_check": verify_tokenizer(corpus),
            "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("target", "draft", "heldout_ce_16x256", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

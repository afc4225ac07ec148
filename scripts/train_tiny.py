#!/usr/bin/env python3
"""Train the embedded `tiny` checkpoint pair on CPU: a Qwen3-MoE target and a Qwen3 dense draft that
share one byte-level BPE tokenizer. Output (HF format: config.json, model.safetensors, tokenizer files;
loadable by `specmoe_ext.models.load_model` and by transformers):

    python/specmoe_ext/assets/tiny/target/   Qwen3MoeForCausalLM  4 layers, h=128, 8 experts top-2, f=128
    python/specmoe_ext/assets/tiny/draft/    Qwen3ForCausalLM     2 layers, h=128, f=384

Corpus: the docstrings of this interpreter's standard library, read with `ast` from the source files
(nothing is imported or downloaded), sorted by path for a deterministic order, joined with the
<|endoftext|> token. Text thus depends on the Python version; the shipped files were made with the
Python named in assets/tiny/README.md.

Shape legend: B batch of windows, T window length, V vocab (2048), E experts (8), K top-k (2).

The target trains with next-token cross-entropy plus a Switch-style load-balancing loss (so all 8
experts get used); the draft with cross-entropy plus distillation (KL to the trained target's
next-token distribution), which raises the draft's agreement with the target, i.e. the speculative
acceptance rate. Routing during training uses `specmoe_ext.reference.route_budget`, which is
differentiable in the router logits (the C++ op is inference-only).

Usage: python scripts/train_tiny.py [--steps-target 800] [--steps-draft 500] [--out DIR]
(about 11 minutes on 2 idle CPU cores; the step counts, not the time, fix the result)
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from specmoe_ext import reference  # noqa: E402
from specmoe_ext.models.config import ModelArgs  # noqa: E402
from specmoe_ext.models.loader import save_checkpoint  # noqa: E402
from specmoe_ext.models.model import MoEControl, Transformer  # noqa: E402

EOT = "<|endoftext|>"
VOCAB = 2048
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "turtledemo", "__pycache__",
             "lib2to3", "ensurepip", "tkinter"}

TARGET_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB,
    "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "bos_token_id": 0,
    "eos_token_id": 0, "pad_token_id": 0, "router_aux_loss_coef": 0.01,
}
DRAFT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": 128,
    "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True,
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "layer_types":
    ["full_attention"] * 2, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}


def stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for fp in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(fp.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(fp.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 40 and d.isascii():
                    docs.append(d.strip())
    return docs


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def write_tokenizer(tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "pad_token": EOT, "bos_token": None,
        "unk_token": None, "model_max_length": 2048, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": 0, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")


def batches(data: torch.Tensor, B: int, T: int, g: torch.Generator):
    while True:
        i = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
        x = torch.stack([data[j:j + T + 1] for j in i.tolist()])
        yield x[:, :-1], x[:, 1:]


class _RecordingRouter:
    """Differentiable routing for training; keeps each layer's router logits for the balance loss."""

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


def run_training(model: Transformer, data: torch.Tensor, steps: int, lr: float, B: int, T: int,
                 name: str, teacher: Transformer | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    pos = torch.arange(T).expand(B, T)
    step, t0, ema = 0, time.time(), None
    warmup = 30
    args = model.args
    model.train()
    for x, y in batches(data, B, T, g):
        # linear warm-up, then cosine decay to 10% over the fixed number of steps (deterministic schedule)
        frac = step / steps
        cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = cur_lr
        router = _RecordingRouter()
        logits = model(x, pos, moe=MoEControl(router=router, impl="loop"))[0]
        loss = F.cross_entropy(logits.reshape(-1, args.vocab_size).float(), y.reshape(-1))
        ce = loss.item()
        if router.logits:
            loss = loss + 0.01 * balance_loss(router.logits, args.n_experts, args.top_k)
        if teacher is not None:
            with torch.no_grad():
                t_logp = teacher(x, pos).float().log_softmax(-1)
            s_logp = logits.float().log_softmax(-1)
            kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
            loss = 0.5 * loss + 0.5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        step += 1
        if step % 25 == 0:
            print(f"[{name}] step {step:5d}  ce {ema:.3f}  lr {cur_lr:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if step >= steps:
            break
    model.eval()
    return {"steps": step, "train_ce_ema": round(ema, 4), "seconds": round(time.time() - t0, 1),
            "batch": B, "seq": T, "lr": lr}


@torch.no_grad()
def eval_ce(model: Transformer, data: torch.Tensor, T: int = 256, n: int = 16) -> float:
    g = torch.Generator().manual_seed(1234)
    x, y = next(batches(data, n, T, g))
    logits = model(x, torch.arange(T).expand(n, T), moe=MoEControl(impl="loop"))[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "python/specmoe_ext/assets/tiny"))
    ap.add_argument("--steps-target", type=int, default=800, help="~8 min on 2 idle cores")
    ap.add_argument("--steps-draft", type=int, default=500, help="~3 min on 2 idle cores")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = Path(a.out)

    t0 = time.time()
    docs = stdlib_docstrings()
    tok = train_tokenizer(docs)
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d).ids + [0]
    data = torch.tensor(ids, dtype=torch.long)
    n_val = data.numel() // 50
    train, val = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.2f} MB text, {data.numel()} tokens "
          f"({time.time() - t0:.0f}s)", flush=True)

    target = Transformer(ModelArgs.from_hf_config(TARGET_CONFIG)).init_random(std=0.02, seed=0)
    t_info = run_training(target, train, a.steps_target, 3e-3, 16, 256, "target")
    draft = Transformer(ModelArgs.from_hf_config(DRAFT_CONFIG)).init_random(std=0.02, seed=1)
    d_info = run_training(draft, train, a.steps_draft, 3e-3, 16, 256, "draft", teacher=target, seed=1)

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "corpus_docstrings": len(docs),
            "corpus_tokens": int(data.numel()), "target": t_info, "draft": d_info,
            "val_ce_target": round(eval_ce(target, val), 4), "val_ce_draft": round(eval_ce(draft, val), 4)}
    for name, model, cfg in (("target", target, TARGET_CONFIG), ("draft", draft, DRAFT_CONFIG)):
        save_checkpoint(model, out / name, cfg, dtype=torch.bfloat16)
        write_tokenizer(tok, out / name)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

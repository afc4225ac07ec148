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
acceptance rate. The training loop is scripts/train_pair.py's `run_training` (the realpair trainer) with
its "library" forward: `Transformer.forward` routed by `specmoe_ext.reference.route_budget`, which is
differentiable in the router logits (the C++ op is inference-only), and the "loop" experts.

Usage: python scripts/train_tiny.py [--steps-target 800] [--steps-draft 500] [--out DIR]
(about 11 minutes on 2 idle CPU cores; the step counts, not the time, fix the result)
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from specmoe_ext.models.config import ModelArgs  # noqa: E402
from specmoe_ext.models.loader import save_checkpoint  # noqa: E402
from specmoe_ext.models.model import Transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pair import eval_ce, run_training  # noqa: E402  (the one trainer; library forward here)

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

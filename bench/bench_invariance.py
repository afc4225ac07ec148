"""Batch invariance of verification: is a tree node computed bitwise as the decode step computes the same
token at the same position? Where not, which component first differs? (issue 18's measurement; run it on
the GPU in bf16, where greedy speculative output drifts from autoregressive output.)

Shape legend: bs requests, P prompt tokens, T chain tokens verified in one forward, h hidden, V vocab,
L layers.

    python bench/bench_invariance.py                                   # tiny, CPU float32
    python bench/bench_invariance.py --preset qwen3-30b-a3b --layers 4 --dtype bfloat16   # on a GPU

Two identical KV caches hold the same bs prompts (one prefill each, same inputs). Then the same T tokens
per request go
  decode   one forward per token (T = 1: the decode step's shapes), cache A
  verify   one forward over all T as a chain (the verify step's shapes: the tree geometry with the chain's
           ancestor bits, so the same attention path as the speculative engine's), cache B
and every component's output is recorded per token with forward hooks: per layer the attention RMSNorm,
the fused q/k/v projection, the attention result (the output projection's input: q/k norms, RoPE, cache
write and attention), the output projection, the attention block, the FFN RMSNorm, the router logits, the
FFN (experts, or the dense MLP), the block output; then the final norm and the logits.
Token i of the verify forward is compared with decode step i: bitwise equal or not, and max |difference|
per component. Batch-size invariance is the second comparison: request 0 decoded alone (bs = 1) against
request 0 decoded inside the batch (decode, bs), which is how a request's tokens change when others join.
The first component that differs (in forward order) is where invariance breaks; later components inherit
it. Results: a table per comparison and bench/results/invariance_<device>_<date>.json (--out-dir).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from specmoe_ext.masks import causal_bits  # noqa: E402
from specmoe_ext.models import build_preset  # noqa: E402
from specmoe_ext.models.generate import prefill  # noqa: E402
from specmoe_ext.models.kv_cache import KVCache  # noqa: E402

# per block, in forward order: (name, submodule path, record its input instead of its output)
PARTS = (("attention_norm", "attention_norm", False), ("qkv_proj", "attention.wqkv", False),
         ("attention_core", "attention.wo", True), ("o_proj", "attention.wo", False), ("attention", "attention", False),
         ("ffn_norm", "ffn_norm", False), ("router", "ffn.gate", False), ("ffn", "ffn", False))


class Recorder:
    """Forward hooks on every block's parts (those it has: dense layers have no router; MLA has no wqkv), the
    block itself and the final norm: out[name] = [bs, n, ...]."""

    def __init__(self, model):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        self.names = []
        for i, blk in enumerate(model.layers):
            for name, path, inp in PARTS:
                mod = blk
                for attr in path.split("."):
                    mod = getattr(mod, attr, None)
                    if mod is None:
                        break
                if isinstance(mod, torch.nn.Module):
                    self._hook(mod, f"L{i}.{name}", inp)
            self._hook(blk, f"L{i}.block", False)
        self._hook(model.norm, "final_norm", False)

    def _hook(self, module, name, record_input):
        def fn(_m, inp, out):
            v = inp[0] if record_input else (out[0] if isinstance(out, tuple) else out)
            self.out[name] = v.detach().clone()
        self.handles.append(module.register_forward_hook(fn))
        self.names.append(name)

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run(model, prompts: list[list[int]], chain: torch.Tensor,
        one_forward: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """prompts (equal lengths), chain [bs, T] -> (per component [bs, T, ...] outputs of the T chain tokens, fed
    one per forward (one_forward=False) or all in one chain-shaped forward; the components in forward order)."""
    dev = model.tok_embeddings.weight.device
    bs, T = chain.shape
    cache = KVCache.for_model(model, bs, len(prompts[0]) + T + 1)
    prefill(model, prompts, cache)
    rec = Recorder(model)
    steps = []
    try:
        widths = [T] if one_forward else [1] * T
        start = 0
        for n in widths:
            depth = torch.arange(n, device=dev).expand(bs, n)
            bits = causal_bits(n, dev).expand(bs, n, -1)
            logits, _ = model(chain[:, start:start + n], cache.tree_geometry(depth, bits), cache)
            rec.out["logits"] = logits.detach().clone()
            # token-flattened outputs (the router's [bs * n, E]) -> [bs, n, ...]
            steps.append({k: v.view(bs, n, *v.shape[1:]) if v.shape[0] == bs * n and (v.dim() < 3 or v.shape[1] != n)
                          else v for k, v in rec.out.items()})
            cache.advance(n)
            start += n
    finally:
        rec.close()
    return {k: torch.cat([s[k] for s in steps], 1) for k in steps[0]}, rec.names + ["logits"]


def compare(a: dict, b: dict, names: list[str], rows_a=slice(None), rows_b=slice(None)) -> list[dict]:
    out = []
    for k in names:
        x, y = a[k][rows_a].float(), b[k][rows_b].float()
        d = (x - y).abs()
        per_token = (d.flatten(2).amax(-1) == 0) if d.dim() > 2 else (d == 0)
        out.append({"component": k, "bitwise_equal": bool(torch.equal(a[k][rows_a], b[k][rows_b])),
                    "tokens_equal": round(float(per_token.float().mean()), 4),
                    "max_abs_diff": float(d.max()), "max_abs": float(x.abs().max())})
    return out


def first_difference(rows: list[dict]) -> str | None:
    return next((r["component"] for r in rows if not r["bitwise_equal"]), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--layers", type=int, default=None, help="random presets: override the depth")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=8, help="T: chain tokens verified in one forward")
    ap.add_argument("--batch-invariant", type=int, default=None, metavar="CHUNK", nargs="?", const=-1,
                    help="run the model's projections batch-invariant (models/invariant.py; CHUNK rows per "
                         "GEMM, default per device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.batch_size < 1 or a.prompt_len < 1:
        ap.error("--tokens, --batch-size and --prompt-len must be >= 1")
    dev = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    kw = {} if a.layers is None else {"n_layers": a.layers}
    model = build_preset(a.preset, dev, dtype, seed=a.seed, **kw).eval()
    chunk = 0
    if a.batch_invariant is not None:
        from specmoe_ext.models.invariant import set_batch_invariant
        chunk = set_batch_invariant(model, None if a.batch_invariant < 0 else a.batch_invariant)
    V = model.args.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(0, V, (a.batch_size, a.prompt_len), generator=g).tolist()
    chain = torch.randint(0, V, (a.batch_size, a.tokens), generator=g).to(dev)
    dec, names = run(model, prompts, chain, one_forward=False)
    ver, _ = run(model, prompts, chain, one_forward=True)
    alone, _ = run(model, prompts[:1], chain[:1], one_forward=False)
    cmp_tokens = compare(dec, ver, names)
    cmp_batch = compare(dec, alone, names, rows_a=slice(0, 1))
    argmax = float((dec["logits"].argmax(-1) == ver["logits"].argmax(-1)).float().mean())
    summary = {"verify_vs_decode_first_difference": first_difference(cmp_tokens),
               "batch_vs_alone_first_difference": first_difference(cmp_batch),
               "verify_vs_decode_logits_bitwise": cmp_tokens[-1]["bitwise_equal"],
               "verify_vs_decode_argmax_agreement": round(argmax, 4)}
    cols = [("component", "component", "s"), ("bitwise_equal", "bitwise", ""), ("tokens_equal", "tokens =", ".3f"),
            ("max_abs_diff", "max |diff|", ".3g"), ("max_abs", "max |x|", ".3g")]
    title = (f"{a.preset} ({dtype}) on {common.device_name()}, bs={a.batch_size}, P={a.prompt_len}, T={a.tokens}"
             + (f", batch-invariant projections (chunk {chunk})" if chunk else ""))
    for label, rows in (("verify (T tokens, one forward) vs decode (one token per forward)", cmp_tokens),
                        ("request 0 decoded in the batch vs alone (bs=1)", cmp_batch)):
        print(f"\n{label}: {title}")
        shown = [r for r in rows if not r["bitwise_equal"]][:12] or rows[-3:]
        common.print_table(shown, cols)
    for k, v in summary.items():
        print(f"{k}: {v}")
    saved = common.RESULTS_DIR
    common.RESULTS_DIR = a.out_dir or saved
    try:
        path = common.write_results("invariance", [{"comparison": "verify_vs_decode", **r} for r in cmp_tokens]
                                    + [{"comparison": "batch_vs_alone", **r} for r in cmp_batch],
                                    {"preset": a.preset, "dtype": dtype, "batch_size": a.batch_size,
                                     "prompt_len": a.prompt_len, "tokens": a.tokens, "layers": len(model.layers),
                                     "batch_invariant_chunk": chunk,
                                     "summary": summary})
    finally:
        common.RESULTS_DIR = saved
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

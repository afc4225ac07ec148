#!/usr/bin/env python3
"""Decode-step time of our runtime vs transformers' generate, against the bandwidth floor.

Shape legend: bs requests, L layers, E experts, K experts per token, h hidden, f expert FFN, V vocab,
Hk kv heads, d head dim, P prompt length.

Per batch size bs (default 1, 4, 16, 64) on the `qwen3-30b-a3b` preset (random bf16 weights, seeded):
  ours        median device time of one plain decoding step of the engine (specmoe_ext.speculative.generate:
              the root-only speculative step = the model forward + acceptance (argmax) + cache commit,
              replayed from its CUDA graph), after a prefill of P random tokens per request; CUDA events
              around each replay (the runner's step times). ours_wall_ms = wall time per step of the same
              loop (pipelined: the host enqueues step i+1 before it reads step i).
  ours_eager  the same step without the graph (shows the launch overhead the graph removes).
  hf          transformers' own `generate` on the SAME weights (the HF model is built on the meta device
              and its parameters are views of ours: no second copy in GPU memory), greedy, sdpa attention,
              its default experts path (grouped_mm where available): per-token decode time
              = (time(generate N+1 tokens) - time(generate 1 token)) / N, both after a warm-up call.
  floor       bytes the step must read / copy bandwidth. Bytes: attention + norms + router weights of
              every layer, the weights of the DISTINCT experts the bs tokens route to in each layer
              (measured from the routing of that very step), dense / shared MLPs, the LM head, bs
              embedding rows, and the KV entries the step attends (prompt + generated so far). Bandwidth:
              a 2 GiB device-to-device copy timed in this run, counting bytes read + written (the
              convention of shared/device.md, where the H100 measured 2.94 TB/s).
Rows that run out of memory are skipped and recorded with the reason. Writes a table to stdout and JSON
to bench/results/decode_<device>_<date>.json. Runs on CPU too (smoke test: --preset tiny --device cpu).

    python bench/bench_decode.py                                   # the H100 run, < 8 min
    python bench/bench_decode.py --preset tiny --device cpu --batch-sizes 1,4 --steps 4 --hf-steps 4
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from specmoe_ext.masks import causal_bits  # noqa: E402
from specmoe_ext.models import KVCache, MoEControl, hf_state_dict, prefill  # noqa: E402
from specmoe_ext.speculative import SpecEngine  # noqa: E402
from specmoe_ext.models.loader import read_config  # noqa: E402
from specmoe_ext.models.presets import build_preset, get_preset  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere. Returns milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int = 1) -> list[float]:
        out = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                out.append(1e3 * (time.perf_counter() - t))
        return out


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read + written; median of 10."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timer = Timer(device)
    timer(lambda: dst.copy_(src), 3)
    ms = statistics.median(timer(lambda: dst.copy_(src), 10))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def step_bytes(model, routings, kv_tokens: int, bs: int) -> dict[str, int]:
    """What one decode step must read (see the module docstring)."""
    a = model.args
    es = model.tok_embeddings.weight.element_size()
    loaded = {layer: int(r.experts_loaded()) for layer, r in routings}
    b = {"attention_and_norms": 0, "router": 0, "experts": 0, "dense_mlp": 0, "lm_head": 0,
         "embedding_rows": bs * a.hidden_size * es, "kv": 0}
    for i, blk in enumerate(model.layers):
        b["attention_and_norms"] += es * (sum(p.numel() for p in blk.attention.parameters())
                                          + blk.attention_norm.weight.numel() + blk.ffn_norm.weight.numel())
        ffn = blk.ffn
        if a.moe_layers[i]:
            b["router"] += es * ffn.gate.weight.numel()
            per_expert = ffn.w13[0].numel() + ffn.w2[0].numel()
            b["experts"] += es * per_expert * loaded[i]
            if ffn.shared is not None:
                b["dense_mlp"] += es * (sum(p.numel() for p in ffn.shared.parameters()) + ffn.shared_gate.weight.numel())
        else:
            b["dense_mlp"] += es * sum(p.numel() for p in ffn.parameters())
    b["attention_and_norms"] += es * model.norm.weight.numel()
    b["lm_head"] = es * model.output_weight().numel()
    b["kv"] = a.n_layers * 2 * kv_tokens * a.n_kv_heads * a.head_dim * es
    return b


def bench_ours(model, bs: int, P: int, steps: int, eager_steps: int, use_graph: bool, seed: int) -> dict:
    dev = model.tok_embeddings.weight.device
    g = torch.Generator().manual_seed(seed + bs)
    prompts = torch.randint(0, model.args.vocab_size, (bs, P), generator=g).tolist()
    row: dict = {"bs": bs, "prompt_len": P}
    with torch.no_grad():
        # routing of one decode step (eager, recorded) -> distinct experts per layer, for the floor
        cache = KVCache.for_model(model, bs, P + 2)
        logits, _ = prefill(model, prompts, cache)
        rec: list = []
        geo = cache.tree_geometry(torch.zeros(bs, 1, dtype=torch.long, device=dev),
                                  causal_bits(1, dev).expand(bs, 1, 1))
        model(logits.argmax(-1, keepdim=True), geo, cache, MoEControl(record=rec))
        kv_tokens = sum(l + 1 for l in cache.host_lengths())
        bytes_ = step_bytes(model, rec, kv_tokens, bs)
        row["experts_loaded_per_layer_mean"] = (round(statistics.mean(int(r.experts_loaded()) for _, r in rec), 2)
                                                if rec else 0)
        del rec, cache
    eager = SpecEngine(model, None, cuda_graph=False)
    eager.generate(prompts, 2)                                           # warm-up
    res = eager.generate(prompts, eager_steps + 1)
    row["ours_eager_ms"] = statistics.median(1e3 * s.step_s for s in res.steps)
    del eager
    if use_graph:
        eng = SpecEngine(model, None)
        first = eng.generate(prompts, 4)                                 # eager first step, capture, replays
        row["graph_capture_s"] = round(first.extra["capture_s"], 2)
        res = eng.generate(prompts, steps + 1)                           # every step replays
        rep = [s.step_s for s in res.steps if s.replayed]
        row["ours_ms"] = statistics.median(1e3 * x for x in rep)
        row["ours_wall_ms"] = round(1e3 * res.decode_s / max(1, res.decode_steps), 4)
        row["replayed_steps"] = len(rep)
        del eng
    else:
        row["ours_ms"] = row["ours_eager_ms"]
    row["cuda_graph"] = "graph_capture_s" in row
    row["bytes"] = bytes_
    row["kv_tokens"] = kv_tokens
    return row


def build_hf_sharing(model, hf_config: dict, device: torch.device):
    """transformers' model for the same config whose parameters are OUR tensors (views, no copy)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cfg_dict = {k: v for k, v in hf_config.items() if k not in ("architectures", "transformers_version")}
    config = transformers.CONFIG_MAPPING[hf_config["model_type"]](**cfg_dict)
    config.architectures = hf_config.get("architectures")
    dtype = model.tok_embeddings.weight.dtype
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    sd = hf_state_dict(model, fused_experts=True)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"HF model does not have: {unexpected[:5]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    # non-persistent buffers (rotary frequencies) were created on meta: rebuild them on the device
    rot = hf.model.rotary_emb
    hf.model.rotary_emb = type(rot)(hf.config).to(device)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"HF model tensors still on meta after sharing weights: {left[:5]}")
    return hf.eval()


def bench_hf(hf, vocab: int, bs: int, P: int, n_new: int, seed: int, device: torch.device) -> dict:
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(seed + bs)
    ids = torch.randint(0, vocab, (bs, P), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n):
        gc_ = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return hf.generate(ids, attention_mask=mask, generation_config=gc_)

    timer = Timer(device)
    with torch.no_grad():
        timer(lambda: run(2), 1)                      # warm-up
        t1 = statistics.median(timer(lambda: run(1), 2))
        tn = statistics.median(timer(lambda: run(n_new + 1), 2))
        out = run(2)
    assert out.shape == (bs, P + 2)
    return {"hf_generate_1_ms": round(t1, 3), f"hf_generate_{n_new + 1}_ms": round(tn, 3),
            "hf_ms": (tn - t1) / n_new}


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for k in ("H100", "H200", "A100", "B200", "L40S"):
        if k in name:
            return k.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed graph replays per batch size")
    ap.add_argument("--eager-steps", type=int, default=5)
    ap.add_argument("--hf-steps", type=int, default=16, help="new tokens per timed transformers generate")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-probe copy")
    ap.add_argument("--layers", type=int, default=None, help="override depth (smoke tests only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/decode_<device>_<date>.json)")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bss = [int(x) for x in a.batch_sizes.split(",")]
    use_graph = device.type == "cuda" and not a.no_cuda_graph
    t_start = time.time()
    date = datetime.date.today().isoformat()
    result: dict = {
        "benchmark": "decode_step", "date": date, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "preset": a.preset, "dtype": a.dtype,
        "prompt_len": a.prompt_len, "rows": [],
    }
    try:
        import transformers
        result["transformers"] = transformers.__version__
    except ImportError:
        a.no_hf = True

    copy_gib = a.copy_gib if device.type == "cuda" else min(a.copy_gib, 0.25)
    log(f"measuring copy bandwidth ({copy_gib} GiB copy) on {result['device']}")
    bw = copy_bandwidth(device, int(copy_gib * 2**30))
    result["copy_gib"] = copy_gib
    result["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")

    preset = get_preset(a.preset)
    log(f"building preset {a.preset} ({a.dtype}, {'seeded random weights' if preset.random else 'checkpoint'}) "
        f"on {device}")
    t = time.time()
    model = build_preset(a.preset, device, a.dtype, seed=a.seed, n_layers=a.layers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["build_s"] = round(time.time() - t, 1)
    result["parameters"] = model.num_parameters()
    result["architecture"] = model.args.architecture
    result["layers"] = model.args.n_layers
    log(f"built {model.num_parameters() / 1e9:.3f} B parameters in {result['build_s']} s")

    rows = {bs: {"bs": bs} for bs in bss}
    for i, bs in enumerate(bss):
        log(f"[ours {i + 1}/{len(bss)}] bs={bs}: prefill {a.prompt_len} tokens, "
            f"{'capture + ' if use_graph else ''}{a.steps} timed steps")
        try:
            r = bench_ours(model, bs, a.prompt_len, a.steps, a.eager_steps, use_graph, a.seed)
            r["floor_ms"] = sum(r["bytes"].values()) / bw * 1e3
            rows[bs].update(r)
            log(f"    ours {r['ours_ms']:.3f} ms/step (eager {r['ours_eager_ms']:.3f}), floor {r['floor_ms']:.3f} ms, "
                f"{r['experts_loaded_per_layer_mean']} experts/layer")
        except torch.cuda.OutOfMemoryError as e:
            rows[bs]["ours_skipped"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
            log(f"    skipped: {rows[bs]['ours_skipped']}")
        except Exception as e:  # keep going: the other rows and the JSON are still worth having
            rows[bs]["ours_skipped"] = f"{type(e).__name__}: {e}"
            log(f"    failed: {rows[bs]['ours_skipped']}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not a.no_hf:
        hf_cfg = preset.hf_config if preset.random else read_config(preset.path)
        if a.layers is not None:
            hf_cfg = {**hf_cfg, "num_hidden_layers": a.layers}
        log("building the transformers model on the same weights (shared tensors, no copy)")
        try:
            hf = build_hf_sharing(model, hf_cfg, device)
            result["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
            # same weights, same maths: one short forward must agree (within bf16 noise / routing flips)
            with torch.no_grad():
                ids = torch.randint(0, model.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
                ids = ids.to(device)
                ours_l = model(ids, torch.arange(16, device=device)[None])[0].float()
                hf_l = hf(ids).logits.float()
                result["hf_vs_ours_logits"] = {
                    "max_abs_diff": round((ours_l - hf_l).abs().max().item(), 4),
                    "median_abs_diff": round((ours_l - hf_l).abs().median().item(), 5),
                    "max_abs_logit": round(hf_l.abs().max().item(), 4),
                    "argmax_agreement": round((ours_l.argmax(-1) == hf_l.argmax(-1)).float().mean().item(), 3)}
            log(f"    same-weights check: {result['hf_vs_ours_logits']}")
            result["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
            for i, bs in enumerate(bss):
                log(f"[transformers {i + 1}/{len(bss)}] bs={bs}: generate {a.hf_steps + 1} vs 1 tokens")
                try:
                    r = bench_hf(hf, model.args.vocab_size, bs, a.prompt_len, a.hf_steps, a.seed, device)
                    rows[bs].update(r)
                    log(f"    transformers {r['hf_ms']:.3f} ms/token-step")
                except torch.cuda.OutOfMemoryError as e:
                    rows[bs]["hf_skipped"] = f"CUDA out of memory: {str(e).splitlines()[0]}"
                    log(f"    skipped: {rows[bs]['hf_skipped']}")
                except Exception as e:
                    rows[bs]["hf_skipped"] = f"{type(e).__name__}: {e}"
                    log(f"    failed: {rows[bs]['hf_skipped']}")
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del hf
        except Exception as e:  # record, keep our numbers
            result["hf_error"] = f"{type(e).__name__}: {e}"
            log(f"transformers side failed: {result['hf_error']}")

    for r in rows.values():
        if "ours_ms" in r:
            r["ours_tokens_per_s"] = round(r["bs"] / (r["ours_ms"] / 1e3), 1)
            r["ours_over_floor"] = round(r["ours_ms"] / r["floor_ms"], 2)
        if "hf_ms" in r:
            r["hf_tokens_per_s"] = round(r["bs"] / (r["hf_ms"] / 1e3), 1)
        if "ours_ms" in r and "hf_ms" in r:
            r["speedup_vs_hf"] = round(r["hf_ms"] / r["ours_ms"], 2)
        for k in ("ours_ms", "ours_eager_ms", "hf_ms", "floor_ms"):
            if k in r:
                r[k] = round(r[k], 4)
    result["rows"] = list(rows.values())
    result["total_s"] = round(time.time() - t_start, 1)

    hdr = f"{'bs':>4} {'ours ms':>9} {'eager ms':>9} {'HF ms':>9} {'floor ms':>9} {'vs HF':>7} {'/floor':>7} {'experts/layer':>14} {'ours tok/s':>11}"
    print(f"\nDecode step, {a.preset} ({result['parameters'] / 1e9:.3f} B params, {a.dtype}) on {result['device']}, "
          f"prompt {a.prompt_len}; copy bandwidth {bw / 1e12:.3f} TB/s")
    print(hdr)
    f = lambda r, k, fmt: (format(r[k], fmt) if k in r else "-")  # noqa: E731
    for r in result["rows"]:
        print(f"{r['bs']:>4} {f(r, 'ours_ms', '9.3f')} {f(r, 'ours_eager_ms', '9.3f')} {f(r, 'hf_ms', '9.3f')} "
              f"{f(r, 'floor_ms', '9.3f')} {f(r, 'speedup_vs_hf', '7.2f')} {f(r, 'ours_over_floor', '7.2f')} "
              f"{f(r, 'experts_loaded_per_layer_mean', '14')} {f(r, 'ours_tokens_per_s', '11.1f')}")
        for k in ("ours_skipped", "hf_skipped"):
            if k in r:
                print(f"     {k}: {r[k]}")

    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"decode_{device_slug(device)}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} (total {result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `specmoe` command.

Shape legend: bs prompts in one batch (one per --prompt), N generated tokens per prompt (<= --max-new-tokens).

    specmoe generate [--model DIR | --preset NAME] [--prompt TEXT ...] [--max-new-tokens N]
                     [--temperature T] [--top-p P] [--top-k K] [--seed S] [--dtype D] [--device DEV]
                     [--no-cuda-graph] [--json] [--no-progress]
    specmoe models   list the presets and the supported checkpoint architectures

With no --model/--preset, `generate` runs the embedded `tiny` MoE model (CPU is fine). Several --prompt
flags make one batch. Random-weight presets have no tokenizer: their prompt is encoded with the tiny
model's tokenizer (its ids are valid in every preset's vocabulary) and only token ids are reported.

Structure: each subcommand is an (add_arguments, run) pair in COMMANDS; later features add flags to a
subparser through `build_parser()` (e.g. --draft/--tree/--budget on generate) or add subcommands.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

EXIT_USAGE = 2


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder")
    src.add_argument("--preset", metavar="NAME", help="named model (see `specmoe models`; default: tiny)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt text; repeat for a batch (default: 'Return a new')")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")


DEFAULT_PROMPT = "Return a new"


def _resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"specmoe: --device {name} requested but CUDA is not available")
    return name


def _run_generate(a: argparse.Namespace) -> int:
    import torch
    from .models import SamplingParams, generate, load_tokenizer
    from .models.loader import CheckpointError, load_model, resolve_dtype
    from .models.presets import DEFAULT_PRESET, TINY_DIR, build_preset, get_preset

    try:
        sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"specmoe generate: {e}")
    if a.max_new_tokens < 1:
        raise SystemExit("specmoe generate: --max-new-tokens must be >= 1")
    device = _resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    prompts = a.prompt or [DEFAULT_PROMPT]

    t0 = time.perf_counter()
    try:
        if a.model:
            name = a.model
            tok = load_tokenizer(a.model)
            model = load_model(a.model, device, dtype)
            has_text = True
        else:
            name = a.preset or DEFAULT_PRESET
            preset = get_preset(name)
            tok = load_tokenizer(preset.path if not preset.random else TINY_DIR / "target")
            model = build_preset(name, device, dtype, seed=a.seed)
            has_text = not preset.random
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"specmoe generate: {e}")
    load_s = time.perf_counter() - t0

    ids = [tok.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise SystemExit("specmoe generate: a prompt encodes to zero tokens")
    stop = () if a.ignore_eos or not has_text else tuple(sorted(tok.eos_token_ids))

    bar = None
    if not a.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=a.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False,
                   disable=None)
    res = generate(model, ids, a.max_new_tokens, sampling, stop,
                   cuda_graph=False if a.no_cuda_graph else None,
                   on_token=(lambda step, t: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()

    outputs = []
    for p, t, r in zip(prompts, res.tokens, res.finish_reasons):
        outputs.append({"prompt": p, "text": tok.decode(t) if has_text else None, "tokens": t,
                        "finish_reason": r})
    stats = {
        "generated_tokens": res.n_generated, "tokens_per_s": round(res.tokens_per_s, 2),
        "prefill_ms": round(1e3 * res.prefill_s, 3), "decode_steps": res.decode_steps,
        "decode_step_ms": round(res.decode_step_ms, 3),
        "decode_tokens_per_s": round(len(ids) / (res.decode_step_ms / 1e3), 2) if res.decode_steps else None,
        "cuda_graph": res.cuda_graph, "graph_capture_ms": round(1e3 * res.extra.get("capture_s", 0.0), 1),
        "load_s": round(load_s, 3),
    }
    dt = str(dtype).replace("torch.", "")
    if a.json:
        print(json.dumps({
            "model": name, "architecture": model.args.architecture, "device": str(device),
            "dtype": dt, "parameters": model.num_parameters(),
            "sampling": {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "seed": a.seed},
            "max_new_tokens": a.max_new_tokens, "outputs": outputs, "stats": stats}, indent=2))
        return 0
    for o in outputs:
        if has_text:
            print(o["prompt"] + o["text"])
        else:
            print(f"[random-weight preset {name}: token ids] {o['tokens']}")
        print("-" * 72)
    print(f"{res.n_generated} tokens in {res.prefill_s + res.decode_s:.2f} s: {res.tokens_per_s:.1f} tokens/s "
          f"(prefill {1e3 * res.prefill_s:.1f} ms, decode {res.decode_step_ms:.2f} ms/step x "
          f"{res.decode_steps}, batch {len(ids)}, {model.args.architecture} on {device} {dt}"
          f"{', CUDA graph' if res.cuda_graph else ''})", file=sys.stderr)
    return 0


def _add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _run_models(a: argparse.Namespace) -> int:
    from .models.config import SUPPORTED_ARCHITECTURES
    from .models.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        args = p.args()
        rows.append({"name": name, "architecture": args.architecture, "layers": args.n_layers,
                     "hidden": args.hidden_size, "experts": args.n_experts, "top_k": args.top_k,
                     "random_weights": p.random, "description": p.description})
    if a.json:
        print(json.dumps({"presets": rows, "architectures": list(SUPPORTED_ARCHITECTURES)}, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:16s} {r['architecture']:22s} L={r['layers']:<3d} h={r['hidden']:<5d} "
              f"E={r['experts']:<4d} K={r['top_k']:<2d} {r['description']}")
    print("checkpoint architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return 0


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate text with an MoE model (autoregressive baseline)", _add_generate_args, _run_generate),
    "models": ("list presets and supported checkpoint architectures", _add_models_args, _run_models),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="specmoe", description="Speculative decoding for MoE LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}
    for name, (help_, add, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(_run=run)
        subs[name] = sp
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return a._run(a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Tensor and expert parallelism end to end: decode step and speculative tokens/s at TP=N and EP=N against
one GPU, with the communication time beside the measured collective bandwidth (the floor).

Shape legend: N ranks (torchrun processes), bs requests, P prompt tokens, G new tokens, h hidden, L layers.

    torchrun --nproc-per-node 2 bench/bench_parallel.py --preset mixtral-8x7b       # 2 H200s
    torchrun --nproc-per-node 2 bench/bench_parallel.py --preset tiny --device cpu --batch-sizes 1,4 --new-tokens 8
        (a CPU smoke run over gloo)

Per batch size and mode (one = rank 0 alone while the others wait, if the whole model fits one device;
tp; ep): AR decode ms per step and tokens/s (CUDA graphs on GPUs), speculative tokens/s with chain:4 from a
CONTROLLED-ACCEPTANCE drafter (bench/controlled.py, alpha --alpha, a random 2-layer Qwen3-0.6B-shaped draft
model replicated on every rank for the cost), and the collectives one decode step makes: count x the
measured time of one such collective (all-reduce of bs x h activations for TP, two per layer; all-gather of
N x bs x h for EP, one per MoE layer), against bytes / the bus bandwidth measured in the same run.
Random weights: every rank builds its shard directly (no full copy). Rank 0 prints the table and writes
bench/results/parallel_<preset>_<device>_<date>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import common  # noqa: E402
from controlled import ControlledDrafter  # noqa: E402
from specmoe_ext.models import build_preset, get_preset  # noqa: E402
from specmoe_ext.models.loader import resolve_dtype  # noqa: E402
from specmoe_ext.models.parallel import Comm, ParallelConfig, empty_local_model  # noqa: E402
from specmoe_ext.speculative import SpecEngine, generate  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def collective_us(comm: Comm, kind: str, numel: int, dtype, dev, iters: int = 30) -> float:
    """Median microseconds of one all-reduce (numel elements) or all-gather (numel per rank)."""
    x = torch.randn(numel, device=dev).to(dtype)
    ts = []
    for i in range(iters + 3):
        dist.barrier()
        sync(dev)
        t = time.perf_counter()
        if kind == "all_reduce":
            comm.all_reduce(x)
        else:
            comm.gather(x)
        sync(dev)
        if i >= 3:
            ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def build(a, mode: str, comm: Comm, dev, dtype):
    p = get_preset(a.preset)
    if mode == "one":
        return build_preset(a.preset, dev, dtype, seed=a.seed, n_layers=a.layers)
    args = p.args()
    if a.layers:
        args = args.replace(n_layers=a.layers, moe_layers=args.moe_layers[:a.layers])
    cfg = ParallelConfig(**{mode: comm.world})
    return empty_local_model(args, cfg, comm, dev, dtype).init_random(std=0.02, seed=a.seed)


def run_mode(a, mode, comm, dev, dtype, prompts_all, draft) -> list[dict]:
    model = build(a, mode, comm, dev, dtype)
    rows = []
    for bs in a.bss:
        prompts = prompts_all[:bs]
        ref = generate(model, prompts, a.new_tokens + 6)            # warm-up, capture; the controlled reference
        ts = []
        for _ in range(a.repeats):
            sync(dev)
            ts.append(generate(model, prompts, a.new_tokens))
        ar = sorted(ts, key=lambda r: r.decode_s)[len(ts) // 2]
        refs = [list(p) + list(o) for p, o in zip(prompts, ref.tokens)]
        eng = SpecEngine(model, ControlledDrafter(draft, model, refs, a.alpha, seed=a.seed), "chain:4")
        eng.generate(prompts, a.new_tokens)
        sp = sorted((eng.generate(prompts, a.new_tokens) for _ in range(a.repeats)), key=lambda r: r.decode_s)[
            len(ts) // 2]
        dec = lambda r: (r.n_generated - bs) / r.decode_s if r.decode_s else None  # noqa: E731
        rows.append({"mode": mode, "ranks": 1 if mode == "one" else comm.world, "bs": bs,
                     "ar_step_ms": round(ar.decode_step_ms, 4), "ar_tokens_per_s": round(dec(ar), 2),
                     "spec_tokens_per_s": round(dec(sp), 2), "spec_accepted_per_step": sp.summary()["accepted_per_step"],
                     "spec_step_ms": round(1e3 * sp.decode_s / max(1, sp.decode_steps), 4),
                     "parameters_per_rank": model.num_parameters()})
    del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--modes", default="one,tp,ep", help="comma-separated: one (rank 0 alone), tp, ep")
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="override depth (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    a.bss = [int(x) for x in a.batch_sizes.split(",")]
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    comm = Comm(dist.get_rank(), dist.get_world_size())
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = resolve_dtype(a.dtype, dev)
    from bench_e2e import build_random_draft, make_prompts
    target_args = get_preset(a.preset).args()
    draft, _ = build_random_draft(type("T", (), {"args": target_args})(), dev, dtype, 2, a.seed)
    prompts = make_prompts(a.preset, max(a.bss), a.prompt_len, target_args.vocab_size, a.seed)
    rows = []
    for mode in a.modes.split(","):
        if mode == "one":
            if comm.rank == 0:
                rows += run_mode(a, "one", comm, dev, dtype, prompts, draft)
            dist.barrier()
        else:
            rows += run_mode(a, mode, comm, dev, dtype, prompts, draft)
    h = target_args.hidden_size
    L = target_args.n_layers if a.layers is None else a.layers
    L_moe = sum(target_args.moe_layers[:L])
    comms = []
    for bs in a.bss:
        ar_us = collective_us(comm, "all_reduce", bs * h, dtype, dev)
        ag_us = collective_us(comm, "all_gather", bs * h, dtype, dev)
        el = torch.empty((), dtype=dtype).element_size()
        comms.append({"bs": bs, "all_reduce_us": round(ar_us, 2), "all_gather_us": round(ag_us, 2),
                      "tp_decode_comm_ms": round(2 * L * ar_us / 1e3, 4),
                      "ep_decode_comm_ms": round(L_moe * ag_us / 1e3, 4),
                      "all_reduce_bus_GBps": round(2 * (comm.world - 1) / comm.world * bs * h * el / ar_us / 1e3, 3)})
    if comm.rank == 0:
        if a.out_dir:
            common.RESULTS_DIR = os.path.abspath(a.out_dir)
        path = common.write_results(f"parallel_{a.preset}", rows, {"preset": a.preset, "world": comm.world,
                                                                    "alpha": a.alpha, "acceptance": "controlled",
                                                                    "collectives": comms, "new_tokens": a.new_tokens})
        common.print_table(rows, [("mode", "mode", ""), ("ranks", "N", "d"), ("bs", "bs", "d"),
                                  ("ar_step_ms", "AR ms", ".3f"), ("ar_tokens_per_s", "AR tok/s", ".1f"),
                                  ("spec_tokens_per_s", "spec tok/s", ".1f"), ("spec_step_ms", "spec ms", ".3f")])
        common.print_table(comms, [("bs", "bs", "d"), ("all_reduce_us", "AR us", ".1f"),
                                   ("all_gather_us", "AG us", ".1f"), ("tp_decode_comm_ms", "TP comm ms", ".3f"),
                                   ("ep_decode_comm_ms", "EP comm ms", ".3f")])
        print(f"wrote {path}")
    from specmoe_ext.models.parallel import stop_watchdog
    stop_watchdog()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Verify-step ops: specmoe::tree_accept and specmoe::kv_compact vs the plain-PyTorch way (the vectorized
walks of reference.py: accept_greedy / accept_target_sampling with softmax + torch.rand uniforms; a gather +
scatter per cache tensor for the compaction), with the floor.

tree_accept: bf16 logits [bs, T, V = 151936]; greedy and sampled (temperature 0.8, top_p 0.9). The tree has
a designated path ([0, 2, 4] for T = 5, [0, 2, 5, 9, 14] for T = 16) whose tokens are the peaks of their
parents' logits (+30), so both rules accept it; other nodes hang off random earlier nodes.
kv_compact: the Qwen3-30B-A3B cache (48 layers, K and V: 96 tensors [bs, Hk = 4, S = 4096, d = 128] bf16)
and an accepted path of 4 ([0, 2, 5, 9, 14]). "both": tree_accept then kv_compact on its outputs.

Ours: per-call time inside a CUDA graph of 100 calls (common.time_graph); the logits cycle through enough
buffers that the L2 cache cannot serve them. kv_compact runs with a lengths reset (the op commits
lengths += n + 1 each call) whose own graph time is subtracted. Baselines are not graph-capturable (host
syncs): timed eagerly with CUDA events, median of 20. Floor = bytes read (+ written) / device-to-device
copy bandwidth measured in this run (logits once; 2 x the moved rows for kv_compact).

    python bench/bench_accept.py --out bench/results [--quick]
    python bench/bench_accept.py --plot-from bench/results/accept_<device>_<date>.json   (PNG only)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import measure_copy_bandwidth, print_table, time_graph, write_results  # noqa: E402

from specmoe_ext import ops, reference as R  # noqa: E402
from specmoe_ext.models.generate import SamplingParams  # noqa: E402
from specmoe_ext.models.kv_cache import KVCache  # noqa: E402
from specmoe_ext.speculative.verifier import target_probs  # noqa: E402


def torch_kv_compact(tensors, prefix: list[int], path, n: list[int]) -> None:
    """The PyTorch way (the baseline): validate on the host, then one gather + one scatter per cache tensor."""
    bs = len(prefix)
    D = path.shape[1] - 1
    p = path.cpu()
    j = torch.arange(1, D + 1)
    base = torch.tensor(prefix)[:, None]
    live = j[None, :] <= torch.tensor(n)[:, None]
    dst = torch.where(live, base + j, base).to(tensors[0].device)
    src = torch.where(live, base + p[:, 1:].clamp_min(0), base).to(tensors[0].device)
    rows = torch.arange(bs, device=tensors[0].device)[:, None]
    for buf in tensors:
        buf[rows, :, dst] = buf[rows, :, src]


def torch_accept(tokens, parent, valid, logits, sp):
    """The PyTorch way: the vectorized reference walks (greedy, or target sampling with torch.rand)."""
    if sp.temperature == 0:
        return R.accept_greedy(tokens, parent, valid, logits)
    p = target_probs(logits, sp)
    return R.accept_target_sampling(tokens, parent, valid, p, torch.rand(tokens.shape, device=logits.device))

V = 151936
QWEN3 = dict(layers=48, Hk=4, d=128, S=4096)
PATHS = {5: [0, 2, 4], 16: [0, 2, 5, 9, 14]}
KV_PATH = [0, 2, 5, 9, 14]
MODES = {"greedy": SamplingParams(temperature=0.0), "sampled": SamplingParams(temperature=0.8, top_p=0.9)}


def time_eager(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median microseconds per call, CUDA events around each (host syncs inside fn included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return statistics.median(out)


def make_tree(bs: int, T: int, g: torch.Generator):
    """tokens / parent / valid [bs, T] with the designated path, and R logits buffers peaked along it."""
    path = PATHS[T]
    on = set(path)
    parent = torch.zeros(bs, T, dtype=torch.long)
    parent[:, 0] = -1
    for i in range(1, T):
        if i in on:
            parent[:, i] = path[path.index(i) - 1]
        else:
            parent[:, i] = torch.randint(0, i, (bs,), generator=g)
    peak = torch.randint(0, V, (bs, T), generator=g)
    tokens = torch.randint(0, V, (bs, T), generator=g)
    for j in range(1, len(path)):
        tokens[:, path[j]] = peak[:, path[j - 1]]
    return tokens, parent, torch.ones(bs, T, dtype=torch.bool), peak


def make_logits(bs, T, peak, n_buf, g):
    bufs = []
    for _ in range(n_buf):
        x = torch.randn(bs, T, V, generator=g) * 2.0
        x.scatter_add_(2, peak[..., None], torch.full((bs, T, 1), 30.0))
        bufs.append(x.to(torch.bfloat16).cuda())
    return bufs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder for the JSON results")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-from", default=None, help="redraw the PNG of a results JSON and exit (no GPU)")
    args = ap.parse_args()
    if args.plot_from:
        import json
        with open(args.plot_from) as fh:
            res = json.load(fh)
        plot(res["rows"], res["device"], args.plot_from.replace(".json", ".png"))
        return
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    common.RESULTS_DIR = args.out
    bw = measure_copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw / 1e12:.2f} TB/s  V={V}")
    batch_sizes = [1, 16] if args.quick else [1, 4, 16, 64]
    Ts = [5, 16]
    g = torch.Generator().manual_seed(0)
    rows = []
    for bs in batch_sizes:
        # ---- kv_compact alone (Qwen3-30B-A3B cache) ----
        q = QWEN3
        cache = KVCache(q["layers"], bs, q["Hk"], q["d"], q["S"], torch.bfloat16, "cuda")
        tensors = cache.k + cache.v
        prefix = [1000 + 37 * b for b in range(bs)]
        kv_path = torch.full((bs, 16), -1, dtype=torch.long)
        kv_path[:, :len(KV_PATH)] = torch.tensor(KV_PATH)
        kv_path = kv_path.cuda()
        kv_n = torch.full((bs,), len(KV_PATH) - 1, dtype=torch.long, device="cuda")
        lengths0 = torch.tensor(prefix, dtype=torch.long, device="cuda")
        lengths = lengths0.clone()

        def kv_ours():
            lengths.copy_(lengths0)
            ops.kv_compact(tensors, lengths, kv_path, kv_n)

        reset = time_graph(lambda: lengths.copy_(lengths0))
        kv = time_graph(kv_ours)
        kv_us = kv["us_per_call"] - reset["us_per_call"]
        n_host = [len(KV_PATH) - 1] * bs
        kv_base = time_eager(lambda: torch_kv_compact(tensors, prefix, kv_path, n_host))
        kv_bytes = 2 * (len(KV_PATH) - 1) * len(tensors) * bs * q["Hk"] * q["d"] * 2
        for T in Ts:
            tokens, parent, valid, peak = make_tree(bs, T, g)
            per_buf = bs * T * V * 2
            n_buf = max(1, min(64, -(-96 * 2 ** 20 // per_buf)))
            bufs = make_logits(bs, T, peak, n_buf, g)
            tok_d, par_d, val_d = tokens.cuda(), parent.cuda(), valid.cuda()
            seed = torch.arange(bs, dtype=torch.long, device="cuda") * 7919 + 1
            offset = torch.zeros(bs, dtype=torch.long, device="cuda")
            for mode, sp in MODES.items():
                it = {"i": 0}

                def accept_ours():
                    lg = bufs[it["i"] % n_buf]
                    it["i"] += 1
                    return ops.tree_accept(lg, tok_d, par_d, val_d, temperature=sp.temperature, top_p=sp.top_p,
                                           top_k=sp.top_k, seed=seed, offset=offset)

                def both_ours():
                    path, n, _ = accept_ours()
                    lengths.copy_(lengths0)
                    ops.kv_compact(tensors, lengths, path, n)

                acc = time_graph(accept_ours)
                both = time_graph(both_ours)
                path, n, bonus = accept_ours()
                n_acc = n.float().mean().item()
                def accept_base():
                    lg = bufs[it["i"] % n_buf]
                    it["i"] += 1
                    return torch_accept(tok_d, par_d, val_d, lg, sp)

                def both_base():
                    path_b, n_b, _ = accept_base()
                    torch_kv_compact(tensors, prefix, path_b, n_b.tolist())

                acc_base = time_eager(accept_base)
                both_base_us = time_eager(both_base)
                moved = bs * (len(PATHS[T]) - 1) * len(tensors) * q["Hk"] * q["d"] * 2 * 2
                row = {"mode": mode, "bs": bs, "T": T, "V": V, "n_accepted_mean": n_acc,
                       "accept_us": acc["us_per_call"], "accept_single_replay_us": acc["us_single_replay"],
                       "accept_floor_us": per_buf / bw * 1e6, "accept_torch_us": acc_base,
                       "kv_us": kv_us, "kv_floor_us": kv_bytes / bw * 1e6, "kv_torch_us": kv_base,
                       "both_us": both["us_per_call"] - reset["us_per_call"],
                       "both_floor_us": (per_buf + moved) / bw * 1e6, "both_torch_us": both_base_us}
                row["accept_speedup"] = row["accept_torch_us"] / row["accept_us"]
                row["both_speedup"] = row["both_torch_us"] / row["both_us"]
                rows.append(row)
                print(f"  {mode:8s} bs={bs:3d} T={T:3d}: accept {row['accept_us']:8.2f} us (floor "
                      f"{row['accept_floor_us']:.2f}, torch {acc_base:.1f}), kv {kv_us:.2f} us, both "
                      f"{row['both_us']:.2f} us", flush=True)
            del bufs
        del cache, tensors
        torch.cuda.empty_cache()
    print_table(rows, [("mode", "mode", "s"), ("bs", "bs", "d"), ("T", "T", "d"),
                       ("n_accepted_mean", "n", ".1f"),
                       ("accept_us", "accept us", ".2f"), ("accept_floor_us", "floor", ".2f"),
                       ("accept_torch_us", "torch", ".1f"), ("accept_speedup", "x", ".1f"),
                       ("kv_us", "kv us", ".2f"), ("kv_floor_us", "kv floor", ".2f"),
                       ("kv_torch_us", "kv torch", ".1f"),
                       ("both_us", "both us", ".2f"), ("both_floor_us", "both floor", ".2f"),
                       ("both_torch_us", "both torch", ".1f"), ("both_speedup", "x", ".1f")])
    path = write_results("accept", rows, {"copy_bandwidth_Bps": bw, "vocab": V, "kv_cache": QWEN3,
                                          "kv_path": KV_PATH, "tree_paths": PATHS,
                                          "sampling": {k: vars(v) for k, v in MODES.items()}})
    print(f"wrote {path}")
    if not args.no_plot:
        plot(rows, torch.cuda.get_device_name(), path.replace(".json", ".png"))


def plot(rows, device, path):
    """Acceptance + compaction per verify step against batch size: ours, its floor, the PyTorch functions
    it replaces, and the issue's 10 us line; one panel per rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, T in enumerate(sorted({r["T"] for r in rows})):
            sel = sorted((r for r in rows if r["mode"] == mode and r["T"] == T), key=lambda r: r["bs"])
            bs = [r["bs"] for r in sel]
            ax.plot(bs, [r["both_us"] for r in sel], "o-", color=f"C{i}", label=f"specmoe T={T}")
            ax.plot(bs, [r["both_floor_us"] for r in sel], "--", color=f"C{i}", label=f"floor T={T}")
            ax.plot(bs, [r["both_torch_us"] for r in sel], "s:", color=f"C{i}", alpha=0.6, label=f"PyTorch T={T}")
        ax.axhline(10.0, color="k", lw=0.8, label="10 us target")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tree_accept + kv_compact per step (us)")
        ax.set_title(f"{mode}, V = {rows[0]['V']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Verify-step acceptance + KV compaction, bf16 logits, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

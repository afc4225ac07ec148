"""Routing + MoE-Spec budget + grouping (specmoe::route_budget) vs the equivalent chain of torch ops.

Both run inside CUDA graphs (100 calls per graph; per-call time = replay time / 100), side by side in
one run, with the physical floor (bytes read + written / measured copy bandwidth).
Target (issue 2): <= 5 us per call for T <= 64, E = 128, K = 8, and >= 5x faster than the torch chain.

    python bench/bench_routing.py [--budget 32] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_copy_bandwidth, print_table, time_graph, write_results  # noqa: E402

from specmoe_ext import ops  # noqa: E402


def torch_chain(logits: torch.Tensor, K: int, B: int):
    """What one writes with stock torch ops: softmax, natural top-K (for the root's protection),
    expert scores, top-B, masked re-pick, renormalize, argsort grouping (no host sync)."""
    T, E = logits.shape
    P = torch.softmax(logits.float(), dim=-1)
    natural = torch.topk(P, K, dim=-1).indices
    score = P.sum(0)
    score = score.index_fill(0, natural[0], float("inf"))  # protect the root token's experts
    kept = torch.topk(score, B).indices.sort().values
    keep = torch.zeros(E, dtype=torch.bool, device=logits.device).index_fill_(0, kept, True)
    w, ids = torch.topk(P.masked_fill(~keep, -1.0), K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    sorted_pairs = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0)
    return w, ids, kept, counts[kept], offsets, sorted_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    K, B = args.top_k, args.budget
    bw = measure_copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw / 1e12:.2f} TB/s  K={K} B={B}")
    Ts = [1, 8, 64, 512] if args.quick else [1, 8, 16, 32, 64, 128, 512, 2048]
    Es = [128] if args.quick else [64, 128, 256]
    rows = []
    for E in Es:
        for T in Ts:
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
            protect = torch.zeros(T, dtype=torch.bool, device="cuda")
            protect[0] = True
            ours = time_graph(lambda: ops.route_budget(logits, K, B, protect=protect))
            chain = time_graph(lambda: torch_chain(logits, K, B))
            nbytes = T * E * 2 + T + T * K * (4 + 4 + 4) + B * 12
            row = {"T": T, "E": E, "K": K, "B": B,
                   "ours_us": ours["us_per_call"], "ours_single_replay_us": ours["us_single_replay"],
                   "torch_chain_us": chain["us_per_call"],
                   "torch_chain_single_replay_us": chain["us_single_replay"],
                   "floor_us": nbytes / bw * 1e6, "bytes": nbytes}
            row["speedup_vs_torch"] = row["torch_chain_us"] / row["ours_us"]
            if T <= 64 and E == 128:
                row["target_met"] = row["ours_us"] <= 5.0 and row["speedup_vs_torch"] >= 5.0
            rows.append(row)
    print_table(rows, [("T", "T", "d"), ("E", "E", "d"), ("ours_us", "ours us", ".2f"),
                       ("ours_single_replay_us", "ours 1-call", ".2f"),
                       ("torch_chain_us", "torch us", ".2f"), ("speedup_vs_torch", "speedup", ".1f"),
                       ("floor_us", "floor us", ".3f"), ("target_met", "target", "")])
    path = write_results("routing", rows, {"copy_bandwidth_Bps": bw, "top_k": K, "budget": B})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

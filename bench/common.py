"""Shared benchmark plumbing: CUDA-graph timing, the measured copy-bandwidth ceiling, JSON results.

Every benchmark measures its baselines and the floor in the same run, on the same device.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def measure_copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (the floor's ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_()
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times)


def time_graph(fn: Callable[[], object], calls_per_graph: int = 100, replays: int = 30,
               warmup: int = 3) -> dict:
    """Captures `calls_per_graph` back-to-back calls of fn in one CUDA graph and times its replays.

    Returns per-call microseconds: median over replays of (graph time / calls), plus the time of a
    one-call graph replay (what a lone call costs including the graph launch)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def capture(n):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        return g

    def replay_times(g, n):
        g.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e3 / n)
        return out

    many = replay_times(capture(calls_per_graph), calls_per_graph)
    one = replay_times(capture(1), 1)
    return {"us_per_call": statistics.median(many), "us_single_replay": statistics.median(one),
            "us_per_call_min": min(many)}


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> str:
    """Writes bench/results/<name>_<device>_<date>.json and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dev = device_name()
    date = datetime.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in dev).strip("-").lower()
    path = os.path.join(RESULTS_DIR, f"{name}_{slug}_{date}.json")
    doc = {"benchmark": name, "device": dev, "date": date,
           "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
           "torch": torch.__version__, "cuda": torch.version.cuda, **(extra or {}), "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    print("  ".join(f"{h:>{max(len(h), 8)}}" for _, h, _ in columns))
    for r in rows:
        cells = []
        for key, h, fmt in columns:
            v = r.get(key)
            cells.append(f"{(format(v, fmt) if v is not None else '-'):>{max(len(h), 8)}}")
        print("  ".join(cells))

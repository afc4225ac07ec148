"""The graph runner: runs a step function for every engine (plain decoding and speculation alike), captured
in a CUDA graph per key from outside, and brings its packed record to the host asynchronously.

Shape legend: n the packed record's length (batch.py).

    runner = StepRunner(device, graphs=True)
    launch = runner.launch(key, fn)      # fn(mark) -> packed [n] int64, device tensors only
    values, times = runner.wait(launch)  # the one host read of that step (blocks until it is done)

CPU, or graphs off: fn runs eagerly; times are wall-clock. CUDA: the packed record is copied into pinned
host memory with non_blocking=True and an event is recorded, so the caller enqueues step i+1 before it
waits for step i. Step times come from CUDA events around the step, read late (no synchronize in the loop).
With graphs, the first launch of a key runs eagerly (it is a real step, and the warm-up: library handles,
allocator), the second captures the step twice into one shared memory pool and replays; later launches
replay the two graphs in turn, each with its own phase events (recorded inside the graph), so the host can
read step i's phase times after step i+1 was enqueued. A key whose capture fails runs eagerly, with a
warning. The runner must be dropped (or reset) when the tensors the step reads are reallocated.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import Tensor

PHASES = ("draft", "verify")      # marks inside a step; the phases are start..draft, draft..verify, verify..end


class _WallMarks:
    def __init__(self):
        self.t = [("start", time.perf_counter())]

    def mark(self, name: str) -> None:
        self.t.append((name, time.perf_counter()))

    def close(self) -> dict:
        self.mark("end")
        return _phases([x for _, x in self.t], lambda a, b: b - a)


class _EventMarks:
    def __init__(self, external: bool = False):
        self.external, self.events = external, []

    def mark(self, name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True, external=self.external)
        ev.record()
        self.events.append(ev)


def _phases(points: list, span) -> dict:
    """points = [start, draft, verify, end] (or [start, end]) -> seconds per phase."""
    out = {"step_s": span(points[0], points[-1])}
    if len(points) == 2 + len(PHASES):
        out.update(draft_s=span(points[0], points[1]), verify_s=span(points[1], points[2]),
                   accept_s=span(points[2], points[3]))
    return out


@dataclass
class Launch:
    host: Tensor                               # the packed record (pinned host copy on CUDA)
    done: "torch.cuda.Event | None" = None
    start: "torch.cuda.Event | None" = None
    end: "torch.cuda.Event | None" = None
    marks: list = field(default_factory=list)  # CUDA phase events inside the step
    times: dict | None = None                  # CPU: wall-clock phases
    replayed: bool = False                     # a CUDA graph replay (not an eager run)


@dataclass
class _Entry:
    seen: int = 0
    graphs: list = field(default_factory=list)     # [(graph, out, marks)]
    turn: int = 0
    eager: bool = False


class StepRunner:
    def __init__(self, device: torch.device, graphs: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.use_graphs = bool(graphs) and self.cuda
        self.entries: dict[Hashable, _Entry] = {}
        self.pool = None
        self.capture_s = 0.0
        self.replays = 0
        self.marks_in_graphs = True

    def reset(self) -> None:
        self.entries = {}

    def captured(self, key: Hashable) -> bool:
        e = self.entries.get(key)
        return e is not None and bool(e.graphs)

    # ---- launching -----------------------------------------------------------------------------------
    def launch(self, key: Hashable, fn: Callable[[Callable[[str], None]], Tensor]) -> Launch:
        if not self.cuda:
            marks = _WallMarks()
            out = fn(marks.mark)
            return Launch(out, times=marks.close())
        e = self.entries.setdefault(key, _Entry())
        if self.use_graphs and not e.eager and e.seen >= 1 and not e.graphs:
            self._capture(e, fn)
        e.seen += 1
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        if e.graphs:
            graph, out, marks = e.graphs[e.turn]
            e.turn = (e.turn + 1) % len(e.graphs)
            graph.replay()
            self.replays += 1
            events = marks.events if marks is not None else []
        else:
            m = _EventMarks()
            out = fn(m.mark)
            events = m.events
        end.record()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launch(host, done, start, end, events, replayed=bool(e.graphs))

    def wait(self, launch: Launch) -> tuple[list[int], dict]:
        """Block until the launched step is done -> (its packed record as Python ints, phase seconds)."""
        if launch.done is None:
            return launch.host.tolist(), launch.times
        launch.done.synchronize()
        span = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        times = _phases([launch.start, *launch.marks, launch.end], span)
        return launch.host.tolist(), times

    # ---- capture -------------------------------------------------------------------------------------
    def _capture(self, e: _Entry, fn) -> None:
        t0 = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            for _ in range(2):
                e.graphs.append(self._capture_one(fn))
        except Exception as err:      # an op of this configuration cannot be captured: stay eager, say so
            warnings.warn(f"speculative step could not be captured in a CUDA graph ({type(err).__name__}: "
                          f"{str(err)[:200]}); running it eagerly")
            e.graphs, e.eager = [], True
            self.pool = None          # a capture that failed may leave its pool recording: later keys get a new one
            torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0

    def _capture_one(self, fn):
        """One capture of the step; phase events inside the graph need `external` events (if this torch
        cannot record them in a capture, the graph is captured without phase marks: step times only)."""
        if self.marks_in_graphs:
            try:            # probed outside the capture: a failure inside one would leave its pool recording
                torch.cuda.Event(enable_timing=True, external=True)
            except TypeError as err:                      # this torch has no external events: no phase marks
                warnings.warn(f"CUDA graphs without phase events ({type(err).__name__}: {str(err)[:120]})")
                self.marks_in_graphs = False
        if self.marks_in_graphs:
            graph, marks = torch.cuda.CUDAGraph(), _EventMarks(external=True)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn(marks.mark)
            return graph, out, marks
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(lambda name: None)
        return graph, out, None

"""Suite-wide fixtures: GPU tests (marked `gpu`) run only with a CUDA device and the CUDA build."""
import contextlib

import pytest
import torch

import specmoe_ext

HAVE_GPU = torch.cuda.is_available() and specmoe_ext.cuda_kernels_available()
_gpu_skipped = []


def pytest_collection_modifyitems(config, items):
    if HAVE_GPU:
        return
    why = ("no CUDA device" if not torch.cuda.is_available()
           else "specmoe_ext was built without CUDA kernels")
    skip = pytest.mark.skip(reason=f"gpu test: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
            _gpu_skipped.append(item.nodeid)


_bad_input_cases = []


def pytest_collection_finish(session):
    for item in session.items:
        m = item.get_closest_marker("bad_input")
        if m is not None:
            _bad_input_cases.append(m.args[0] if m.args else 1)


def pytest_terminal_summary(terminalreporter):
    if _gpu_skipped:
        terminalreporter.write_line(f"GPU tests skipped (no GPU here): {len(_gpu_skipped)}")
    if _bad_input_cases:
        terminalreporter.write_line(f"bad-input cases covered (tests marked bad_input, weighted by their case "
                                    f"count): {sum(_bad_input_cases)} in {len(_bad_input_cases)} tests")


def devices():
    """Parametrization over the CPU and (marked gpu) CUDA implementations."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one thread, and one thread is immune to OpenMP spin-waiting when a
    2-core CI machine is busy. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny():
    """The embedded `tiny` target and its dense draft (CPU, float32), built once per session."""
    from specmoe_ext.models import build_draft, build_preset
    return build_preset("tiny"), build_draft("tiny")


@contextlib.contextmanager
def loop_without_syncs():
    """While the engine's step loop runs (`_Loop.run`), any synchronizing CUDA call raises
    (torch.cuda.set_sync_debug_mode("error")); the prefill before it may synchronize."""
    from specmoe_ext.speculative import engine as E
    run = E._Loop.run

    def strict(self):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    E._Loop.run = strict
    try:
        yield
    finally:
        E._Loop.run = run

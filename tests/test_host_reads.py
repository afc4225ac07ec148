"""One host read per step: the generation loop converts device data to host data once per step (the packed
record), for every drafter x tree kind x greedy / sampled, for plain decoding and under the controller.

Counted on the CPU, where the step is the same code as on the GPU: every tensor -> host conversion
(`item`, `tolist`, `__bool__`, `__int__`, `__float__`, `__index__`, `numpy`) and every tensor built from
Python data (`torch.tensor`, `torch.as_tensor`) while the loop runs (the prefill before it is excluded), and,
one level down, every aten op that reads device data on the host inside C++ (`_local_scalar_dense`, which
`x[t]` with a 0-d index tensor calls; `nonzero`, `masked_select`, `unique`, boolean-mask indexing): those
never reach the Python-level counters but synchronize on the GPU all the same.
The GPU side of the same claim (no synchronizing CUDA call at all) is test_spec_engine.py's
test_gpu_loop_never_synchronizes.

Shape legend: bs requests (3 here, prompts of different lengths), N new tokens.
"""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specmoe_ext.models import SamplingParams
from specmoe_ext.speculative import (Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine, generate,
                                     load_eagle3, save_random_eagle3)
from specmoe_ext.speculative import engine as engine_mod
from specmoe_ext.speculative.controller import CascadeController, make_candidates

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
BUILDERS = ("tensor", "as_tensor")
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5], [100, 200, 300], [17, 900, 17, 900]]


SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")


class _SyncingOps(TorchDispatchMode):
    """Counts the aten ops that read device data on the host (key "aten:<op>")."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING_OPS) or (name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            self.counts["aten:" + name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_loop_reads():
    """Counts conversions / builders made while `_Loop.run` (the step loop) runs -> Counter by name."""
    counts: collections.Counter = collections.Counter()
    active = [False]
    saved = []

    def wrap(owner, name):
        orig = getattr(owner, name)

        def f(*a, **k):
            if active[0]:
                counts[name] += 1
            return orig(*a, **k)
        saved.append((owner, name, orig))
        setattr(owner, name, f)

    for n in CONVERSIONS:
        wrap(torch.Tensor, n)
    for n in BUILDERS:
        wrap(torch, n)
    run = engine_mod._Loop.run

    def counted(self):
        active[0] = True
        try:
            with _SyncingOps(counts):
                return run(self)
        finally:
            active[0] = False
    engine_mod._Loop.run = counted
    try:
        yield counts
    finally:
        engine_mod._Loop.run = run
        for owner, name, orig in saved:
            setattr(owner, name, orig)


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny):
    return save_random_eagle3(tmp_path_factory.mktemp("eagle3"), tiny[0], draft_vocab_size=512, layer_ids=(0, 1, 2),
                              std=0.2, seed=3)


def _drafter(kind, target, draft, eagle_dir):
    return {"model": lambda: ModelDrafter(draft, target), "self": lambda: SelfDrafter(target, 4, refresh=2),
            "ngram": lambda: NGramDrafter(target.args.vocab_size, 3),
            "eagle": lambda: Eagle3Drafter(load_eagle3(eagle_dir, target), target)}[kind]()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("tree", ["chain:3", "static:2,2,1", "dynamic:topk=3,depth=3,tokens=8"])
@pytest.mark.parametrize("kind", ["model", "self", "ngram", "eagle"])
def test_one_host_read_per_speculative_step(tiny, eagle_dir, kind, tree, temperature):
    target, draft = tiny
    eng = SpecEngine(target, _drafter(kind, target, draft, eagle_dir), tree)
    sp = SamplingParams(temperature=temperature, seed=1)
    stop = generate(target, PROMPTS, 12).tokens[0][3]                 # greedy: request 0 stops early and leaves
    with counting_loop_reads() as counts:
        res = eng.generate(PROMPTS, 12, sp, stop_ids=[stop])
    steps = len(res.steps)
    assert steps >= 3
    if temperature == 0:
        assert res.finish_reasons[0] == "stop" and min(s.batch for s in res.steps) < 3
    assert counts == collections.Counter(tolist=steps), (dict(counts), steps)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_one_host_read_per_plain_decoding_step(tiny, temperature):
    with counting_loop_reads() as counts:
        res = generate(tiny[0], PROMPTS, 10, SamplingParams(temperature=temperature, seed=2))
    assert res.decode_steps == 9 and counts == collections.Counter(tolist=9), dict(counts)


@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_one_host_read_per_step_under_the_controller(tiny, eagle_dir, kind):
    """Speculation-off steps, lagged catch-ups and controller decisions add no reads."""
    target, draft = tiny
    eng = SpecEngine(target, _drafter(kind, target, draft, eagle_dir), "chain:4")
    with counting_loop_reads() as counts:
        res = eng.generate(PROMPTS, 30, controller=CascadeController(make_candidates(ks=(0, 1, 4)), test_steps=2))
    steps = len(res.steps)
    assert any(s.tree_nodes == 1 for s in res.steps) and any(s.tree_nodes > 1 for s in res.steps)
    assert counts == collections.Counter(tolist=steps), (dict(counts), steps)


@pytest.mark.parametrize("width", [None, 5])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_one_host_read_per_step_with_adaptive_verification(tiny, temperature, width):
    """Truncation, calibration, the activation-rate estimate and the compaction to `width` nodes all live on
    the device."""
    from test_adaptive import linear_profile
    target, draft = tiny
    eng = SpecEngine(target, ModelDrafter(draft, target), "static:2,2,1", verify="adaptive",
                     profile=linear_profile(1.0, 0.5), verify_width=width)
    with counting_loop_reads() as counts:
        res = eng.generate(PROMPTS, 16, SamplingParams(temperature=temperature, seed=3))
    steps = len(res.steps)
    assert res.summary()["nodes_verified_per_step"] < res.summary()["nodes_drafted_per_step"]
    assert counts == collections.Counter(tolist=steps), (dict(counts), steps)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("tree", ["chain:3", "static:2,2,1", "dynamic:topk=3,depth=3,tokens=8"])
def test_one_host_read_per_step_with_the_mtp_drafter(tree, temperature):
    """The MTP drafter (a DeepSeek-V3 target with an MTP layer: MLA, grouped routing, the latent caches) adds
    no host read: drafting, the commit of the step's pairs and the target step are device work only."""
    from test_families_new import family_checkpoint, prompts
    from specmoe_ext.models import load_model
    from specmoe_ext.speculative.mtp import MTPDrafter
    target = load_model(family_checkpoint("deepseek_v3+mtp")[0])
    plist = prompts(seed=2)
    eng = SpecEngine(target, MTPDrafter(target), tree)
    stop = generate(target, plist, 12).tokens[0][3]
    with counting_loop_reads() as counts:
        res = eng.generate(plist, 12, SamplingParams(temperature=temperature, seed=1), stop_ids=[stop])
    steps = len(res.steps)
    assert steps >= 3
    if temperature == 0:
        assert res.finish_reasons[0] == "stop" and min(s.batch for s in res.steps) < 3
    assert counts == collections.Counter(tolist=steps), (dict(counts), steps)


def test_the_counter_sees_host_reads_inside_aten():
    """`x[i]` with a 0-d index tensor and boolean-mask indexing read the device inside C++: counted."""
    counts: collections.Counter = collections.Counter()
    x = torch.randn(6)
    with _SyncingOps(counts):
        x[x.argmax()]
        x[x > 0]
        x.gather(0, x.argmax().reshape(1))          # the host-free spelling: not counted
    assert counts["aten:aten._local_scalar_dense.default"] == 1 and counts["aten:aten.index.Tensor"] == 1, counts

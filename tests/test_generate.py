"""Generation loop: sampling transforms vs transformers, seeds, stop tokens, batching, input errors, graphs.

Shape legend: bs prompts, V vocab, N draws.
"""
from __future__ import annotations


import pytest
import torch

from conftest_models import hf_checkpoint, prompts

from specmoe_ext.models import SamplingParams, load_model
from specmoe_ext.models.generate import process_logits
from specmoe_ext.speculative import generate

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    path, _ = hf_checkpoint("qwen3_moe")
    return load_model(path, "cpu", "float32")


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 20, 0.6), (1.0, 0, 0.05)])
def test_logit_processing_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                         TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ref = logits.clone()
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite])


def test_sampling_follows_the_distribution(model):
    """N requests of one prompt, one token each (drawn from the prefill logits by the acceptance op, one
    Philox stream per request): frequencies match the processed distribution (top-k 8, temperature 0.9;
    chi-square with 7 degrees of freedom, 99.9% quantile 24.3); nothing outside the top-k is drawn."""
    p = prompts((6,))[0]
    sp = SamplingParams(temperature=0.9, top_k=8, seed=0)
    N = 4000
    res = generate(model, [p] * N, 1, sp)
    draws = torch.tensor([t[0] for t in res.tokens])
    with torch.no_grad():
        logits = model(torch.tensor([p]), torch.arange(len(p))[None])[0][:, -1]
    probs = torch.softmax(process_logits(logits, sp), -1)[0].double()
    support = torch.nonzero(probs).flatten()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    assert counts.sum() == counts[support].sum() and support.numel() == 8
    expected = probs[support] * N
    chi2 = (((counts[support] - expected) ** 2) / expected).sum().item()
    assert chi2 < 24.3, chi2


def test_seeded_sampling_is_reproducible(model):
    plist = prompts((4, 6))
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = generate(model, plist, 10, sp).tokens
    b = generate(model, plist, 10, sp).tokens
    c = generate(model, plist, 10, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=124)).tokens
    assert a == b and a != c


def test_batch_equals_each_prompt_alone(model):
    plist = prompts((3, 9, 6, 1))
    batch = generate(model, plist, 8).tokens
    for p, toks in zip(plist, batch):
        assert generate(model, [p], 8).tokens[0] == toks


def test_stop_tokens_end_only_their_request(model):
    plist = prompts((5, 7))
    free = generate(model, plist, 10).tokens
    stop = free[0][3]                       # request 0 emits this at step 3
    res = generate(model, plist, 10, stop_ids=[stop])
    assert res.tokens[0] == free[0][:free[0].index(stop) + 1]
    assert res.finish_reasons[0] == "stop"
    if stop not in free[1]:
        assert res.tokens[1] == free[1] and res.finish_reasons[1] == "length"
    res1 = generate(model, plist, 1)
    assert [len(t) for t in res1.tokens] == [1, 1] and res1.decode_steps == 0


def test_on_step_callback_and_stats(model):
    seen = []
    res = generate(model, prompts((4,)), 6, on_step=lambda st, toks: seen.append((st.batch, st.tree_nodes, toks)))
    assert [t for _, _, t in seen] == [[[x]] for x in res.tokens[0][1:]]   # the first token is the prefill's
    assert all(b == 1 and n == 1 for b, n, _ in seen)
    assert res.decode_steps == 5 and res.tokens_per_s > 0 and not res.cuda_graph


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[]], max_new_tokens=4), "at least one token"),
    (dict(prompts=[[1, 5000]], max_new_tokens=4), "outside the vocabulary"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompts=[], max_new_tokens=4), "no prompts"),
    (dict(prompts=[[1, 2]], max_new_tokens=4, cuda_graph=True), "needs the model on a CUDA device"),
])
def test_generate_input_errors(model, kwargs, msg):
    p = kwargs.pop("prompts")
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError, match=msg):
        generate(model, p, n, **kwargs)


@pytest.mark.parametrize("bad,msg", [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"),
                                     (dict(top_k=-2), "top_k")])
def test_sampling_params_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**bad)


@gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "qwen3"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_cuda_graph_decode_equals_eager(family, dtype):
    """The captured step (the root-only speculative step) gives the same tokens as the eager one, greedy and
    sampled (same kernels in the same order; one Philox stream per request); a second call replays from its
    first step (buffers and graphs persist in the engine)."""
    path, _ = hf_checkpoint(family)
    model = load_model(path, "cuda", dtype)
    plist = prompts((5, 12, 9))
    for sp in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3)):
        eager = generate(model, plist, 16, sp, cuda_graph=False)
        graph = generate(model, plist, 16, sp)
        again = generate(model, plist, 16, sp)
        assert graph.cuda_graph and not eager.cuda_graph
        assert graph.tokens == eager.tokens == again.tokens
        assert all(s.replayed for s in again.steps)


@gpu
def test_gpu_greedy_generation_matches_cpu_fp32():
    path, _ = hf_checkpoint("olmoe")
    cpu = generate(load_model(path, "cpu", "float32"), prompts(), 12).tokens
    gpu_ = generate(load_model(path, "cuda", "float32"), prompts(), 12).tokens
    assert cpu == gpu_

"""Sampling through the whole engine is the target's distribution, and the test that says so has power.

Shape legend: N requests (copies of one prompt, one batch), V vocab (2048), k = top-k of the sampling (6).

Each request emits x1 (drawn from the prefill logits) and x2 (from the first speculative step: an accepted
draft or the bonus token). Their joint must be the target's exact autoregressive distribution
p(x1) p(x2 | x1) (36 cells under top-k 6), computed by brute force from the target; chi-square, p > 1e-3.

Power: the faults a lossless sampler can have are (a) an acceptance rule biased towards the draft (here: a
q-aware test that accepts with probability min(1, 1.1 p/q)), (b) and (c) the target distribution at a
wrong temperature (x 1.1, x 0.9). For each, the exact distribution of (x1, x2) under the fault is
computed (the biased rule from the draft model's q at the first drafted position), and the test's power at
N draws follows from the noncentral chi-square with lambda = N sum (p_fault - p)^2 / p: it must be >= 0.99
for all three at the chosen N. The same faults are then injected into the engine, which the test must
reject. (N = 1200, the former size, had a power of 1-4% against these faults.)
"""
from __future__ import annotations

import pytest
import torch

from specmoe_ext import ops
from specmoe_ext.models import SamplingParams, load_tokenizer
from specmoe_ext.models.generate import process_logits
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.speculative import ModelDrafter, SpecEngine
from specmoe_ext.speculative import verifier
from specmoe_ext.speculative.controller import CascadeController, make_candidates
from specmoe_ext.speculative.tree import draft_distribution
from test_spec_accept import chi2_pvalue

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 24000
SP = SamplingParams(temperature=0.8, top_k=6)
ALPHA = 1e-3                                   # the test's level: p > ALPHA passes


def _probs(model, seqs, sp) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor(seqs), torch.arange(len(seqs[0])).expand(len(seqs), -1))[0][:, -1]
    return torch.softmax(process_logits(logits, sp), -1).double()


def exact_joint(target, prompt, sp=SP, temperature=None, bias=None, draft=None) -> torch.Tensor:
    """[V * V] probability of (x1, x2): x1 ~ p(. | prompt) under sp; x2 | x1 from the target at
    `temperature` (default sp's), or, with `bias`, what the biased q-aware rule emits for a one-token chain
    drafted from the draft model's q (accept x w.p. min(1, bias p(x)/q(x)), else the residual)."""
    p1 = _probs(target, [prompt], sp)[0]
    x1s = torch.nonzero(p1).flatten()
    sp2 = sp if temperature is None else SamplingParams(temperature=temperature, top_k=sp.top_k, top_p=sp.top_p)
    ctx = [prompt + [int(x)] for x in x1s]
    p2 = _probs(target, ctx, sp2)
    if bias is not None:
        with torch.no_grad():
            q = draft_distribution(draft(torch.tensor(ctx), torch.arange(len(ctx[0])).expand(len(ctx), -1))[0][:, -1],
                                   sp).double()
        a = torch.where(q > 0, (bias * p2 / q.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(q))
        resid = (p2 - q).clamp_min(0)
        resid = resid / resid.sum(-1, keepdim=True)
        p2 = q * a + (1 - (q * a).sum(-1, keepdim=True)) * resid
    V = p1.numel()
    joint = torch.zeros(V, V, dtype=torch.float64)
    joint[x1s] = p1[x1s, None] * p2
    return joint.flatten()


def pair_counts(tokens: list[list[int]], V: int) -> torch.Tensor:
    pairs = torch.tensor([t[:2] for t in tokens])
    return torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()


def pvalue(counts: torch.Tensor, joint: torch.Tensor) -> float:
    assert float(counts[joint == 0].sum()) == 0, "tokens outside the support were emitted"
    keep = joint > 0
    return chi2_pvalue(counts[keep], counts.sum() * joint[keep])


def power(joint: torch.Tensor, fault: torch.Tensor, n: int) -> float:
    from scipy.stats import chi2, ncx2
    keep = joint > 0
    e = n * joint[keep]
    lam = float(((n * fault[keep] - e) ** 2 / e).sum())
    df = int(keep.sum()) - 1
    return float(ncx2.sf(chi2.ppf(1 - ALPHA, df), df, lam))


@pytest.fixture(scope="module")
def setup(tiny):
    target, draft = tiny
    prompt = load_tokenizer(TINY_DIR / "target").encode("Return a new")
    return target, draft, prompt, exact_joint(target, prompt)


def run(target, draft, prompt, tree="chain:1", rule="auto", n=N, seed=5, controller=None, new=2):
    sp = SamplingParams(temperature=SP.temperature, top_k=SP.top_k, seed=seed)
    eng = SpecEngine(target, ModelDrafter(draft, target), tree, rule=rule)
    return eng.generate([prompt] * n, new, sp, controller=controller)


@pytest.mark.parametrize("tree,rule", [("chain:1", "q"), ("dynamic:topk=2,depth=2,tokens=4", "target")])
def test_engine_samples_the_targets_distribution(setup, tree, rule):
    target, draft, prompt, joint = setup
    res = run(target, draft, prompt, tree, rule)
    p = pvalue(pair_counts(res.tokens, target.args.vocab_size), joint)
    assert p > ALPHA, p
    assert sum(a for s in res.steps for a in s.accepted) > 0.2 * N          # drafts were accepted


def test_the_sampling_test_catches_a_biased_rule_and_a_wrong_temperature(setup, monkeypatch):
    target, draft, prompt, joint = setup
    T = SP.temperature
    faults = {"draft-biased acceptance (10%)": exact_joint(target, prompt, bias=1.1, draft=draft),
              "temperature x 1.1": exact_joint(target, prompt, temperature=1.1 * T),
              "temperature x 0.9": exact_joint(target, prompt, temperature=0.9 * T)}
    for name, fault in faults.items():
        assert power(joint, fault, N) >= 0.99, (name, power(joint, fault, N))
        assert power(joint, fault, 1200) < 0.1, name                           # the former test was blind

    # the same faults injected into the engine's q-aware rule are rejected by the test
    uniform, probs = ops.philox_uniform, verifier.target_probs

    def biased(seed, offset, n, stream):              # accept tests u * q < 1.1 p  <=>  (u / 1.1) * q < p
        u = uniform(seed, offset, n, stream)
        return u / 1.1 if stream == verifier.ACCEPT_STREAM else u

    monkeypatch.setattr(ops, "philox_uniform", biased)
    p_bias = pvalue(pair_counts(run(target, draft, prompt).tokens, target.args.vocab_size), joint)
    monkeypatch.setattr(ops, "philox_uniform", uniform)
    out = {}
    for scale in (1.1, 0.9):
        monkeypatch.setattr(verifier, "target_probs", lambda logits, sp, s=scale: probs(
            logits, SamplingParams(temperature=s * sp.temperature, top_k=sp.top_k, top_p=sp.top_p)))
        out[scale] = pvalue(pair_counts(run(target, draft, prompt).tokens, target.args.vocab_size), joint)
    assert p_bias < ALPHA and out[1.1] < ALPHA and out[0.9] < ALPHA, (p_bias, out)


def test_controller_sampling_is_the_targets_distribution(setup):
    """--spec auto mixes speculation-off steps and chains of several lengths: the joint of the first three
    tokens is still the target's (216 cells), and the controller did use both kinds of step."""
    target, draft, prompt, _ = setup
    n = 6000
    res = run(target, draft, prompt, "chain:2", n=n, new=3, seed=9,
              controller=CascadeController(make_candidates(ks=(0, 1, 2)), test_steps=1))
    assert {s.tree_nodes for s in res.steps} >= {1, 2}
    V = target.args.vocab_size
    p12 = exact_joint(target, prompt).view(V, V)
    cells = torch.nonzero(p12)
    ctx = [prompt + [int(a), int(b)] for a, b in cells]
    joint3 = p12[cells[:, 0], cells[:, 1], None] * _probs(target, ctx, SP)   # [cells, V]
    row = {(int(a), int(b)): i for i, (a, b) in enumerate(cells)}
    toks = [t[:3] for t in res.tokens]
    assert all((t[0], t[1]) in row for t in toks), "a first pair outside the support"
    code = torch.tensor([row[(t[0], t[1])] * V + t[2] for t in toks])
    counts = torch.bincount(code, minlength=joint3.numel()).double()
    p = pvalue(counts, joint3.flatten())
    assert p > ALPHA, p


@pytest.mark.parametrize("tree,rule", [("chain:2", "q"), ("dynamic:topk=2,depth=2,tokens=4", "target")])
def test_adaptive_truncation_keeps_the_targets_distribution(setup, tree, rule):
    """Truncating trees before verification (a decision on draft-side values only; for the q-aware rule on
    the parent's confidence, never on the sampled token) leaves the emitted distribution the target's."""
    from test_adaptive import linear_profile
    target, draft, prompt, joint = setup
    n = 8000
    sp = SamplingParams(temperature=SP.temperature, top_k=SP.top_k, seed=13)
    # per-token cost 0.03 against a fixed cost of 0.4 n: nodes with a gain above ~0.07 pay, the others are cut
    eng = SpecEngine(target, ModelDrafter(draft, target), tree, rule=rule, verify="adaptive",
                     profile=linear_profile(0.4 * n, 0.03))
    res = eng.generate([prompt] * n, 2, sp)
    s = res.summary()
    assert s["nodes_verified_per_step"] < s["nodes_drafted_per_step"]        # the truncation did cut
    assert sum(a for st in res.steps for a in st.accepted) > 0.05 * n
    p = pvalue(pair_counts(res.tokens, target.args.vocab_size), joint)
    assert p > ALPHA, p


@pytest.mark.parametrize("tree,rule,width", [("static:2,1", "q", 3), ("dynamic:topk=2,depth=2,tokens=4", "target", 3)])
def test_compacted_verification_keeps_the_targets_distribution(setup, tree, rule, width):
    """Adaptive truncation capped at `width` nodes per request and verified as a width-node tree (siblings
    drawn i.i.d. are dropped by index, never by their sampled token): the emitted pairs keep the target's
    distribution."""
    from test_adaptive import linear_profile
    target, draft, prompt, joint = setup
    n = 8000
    sp = SamplingParams(temperature=SP.temperature, top_k=SP.top_k, seed=17)
    eng = SpecEngine(target, ModelDrafter(draft, target), tree, rule=rule, verify="adaptive",
                     profile=linear_profile(0.4 * n, 0.03), verify_width=width)
    res = eng.generate([prompt] * n, 2, sp)
    s = res.summary()
    assert s["nodes_verified_per_step"] <= width < s["nodes_drafted_per_step"]
    assert sum(a for st in res.steps for a in st.accepted) > 0.05 * n
    p = pvalue(pair_counts(res.tokens, target.args.vocab_size), joint)
    assert p > ALPHA, p

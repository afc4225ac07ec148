"""Drafters (dense model, self-assisted, n-gram, EAGLE-3) and the model-runtime hooks they use.

Shape legend: bs requests, T tokens, V vocab (2048 for the tiny pair), E experts (8), K experts per token (2),
h hidden (128), N = bs*T tokens seen by the router.

Each drafter's chain must equal what its own network predicts greedily when run plainly (catch-up,
positions, masks and rollback are then right); the hooks must not change anything they do not target.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from specmoe_ext.masks import causal_bits, causal_mask
from specmoe_ext.models import (Geometry, KVCache, MoEControl, SamplingParams, build_draft, build_preset,
                                load_tokenizer, prefill)
from specmoe_ext.models.loader import CheckpointError
from specmoe_ext.models.model import ExpertStats
from specmoe_ext.models.presets import TINY_DIR
from specmoe_ext.speculative import (DraftVocabError, Eagle3Drafter, ModelDrafter, NGramDrafter, SelfDrafter, SpecEngine,
                                     expert_affinity, generate, load_eagle3, make_drafter, save_random_eagle3)
from specmoe_ext.speculative.drafters import check_same_vocab


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(TINY_DIR / "target")
    return [tok.encode("Return a new"), tok.encode('def parse(text):\n    """Parse the'), tok.encode("The")]


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny):
    return save_random_eagle3(tmp_path_factory.mktemp("eagle3"), tiny[0], draft_vocab_size=512, layer_ids=(0, 1, 2),
                              std=0.2, seed=3)


def _chain_tokens(engine, batch):
    """The drafter's proposal for the batch as it stands (drafting again is idempotent: it writes only
    past the committed tokens)."""
    batch.prefix.copy_(batch.cache.lengths)
    with torch.no_grad():
        tree = engine.drafter.propose(batch, engine.plan(SamplingParams()))
    return tree.tokens[:, 1:].tolist()


def _decode(model, cache, tok, moe=None):
    """One plain decode step at position = slot = cache.lengths -> logits [bs, V]."""
    bs = tok.shape[0]
    geo = cache.tree_geometry(torch.zeros(bs, 1, dtype=torch.long), causal_bits(1).expand(bs, 1, 1))
    out = model(tok, geo, cache, moe)[0][:, 0]
    cache.advance(1)
    return out


# ---- dense draft model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", ["chain:4", "static:2,2,1"])
def test_model_drafter_chain_is_the_draft_models_greedy_continuation(tiny, prompts, tree):
    """First step (prompt prefilled, catch-up of 2 tokens) and after steps (accepted drafts compacted in the
    draft cache, catch-up of the last 2 committed tokens, rejected nodes overwritten): the best path equals
    greedy decoding of the draft alone."""
    target, draft = tiny
    eng = SpecEngine(target, ModelDrafter(draft, target), tree)
    cache = KVCache.for_model(target, 3, 128)
    batch = eng.start(prompts, SamplingParams(), 40, cache=cache)
    for step in range(4):
        got = [row[:1] for row in _chain_tokens(eng, batch)]
        want = generate(draft, [batch.context(b) for b in range(3)], 1, cuda_graph=False).tokens
        assert got == want, step
        if tree.startswith("chain"):
            want4 = generate(draft, [batch.context(b) for b in range(3)], 4, cuda_graph=False).tokens
            assert _chain_tokens(eng, batch) == want4, step
        eng.step(batch)                                   # drafts again (idempotent), verifies, commits


def test_vocabulary_mismatch_is_a_clear_error(tiny, tmp_path):
    target, draft = tiny
    from conftest_models import hf_checkpoint
    from specmoe_ext.models import load_model
    path, _ = hf_checkpoint("qwen3")                     # a dense Qwen3 with a 1000-token vocabulary
    other = load_model(path, "cpu", "float32")
    with pytest.raises(DraftVocabError, match=r"draft model vocabulary \(1000 tokens\) differs from the target's \(2048\)"):
        ModelDrafter(other, target)
    with pytest.raises(DraftVocabError, match="vocabulary"):
        make_drafter(f"model:{path}", target)
    # same size, different tokenizer: two tokens swap ids
    d2 = tmp_path / "draft"
    shutil.copytree(TINY_DIR / "draft", d2)
    tj = json.loads((d2 / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d2 / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(DraftVocabError, match=r"draft tokenizer .* differs from the target's .*: token '.*' has id 101 vs 100"):
        check_same_vocab(draft, target, d2, TINY_DIR / "target")
    check_same_vocab(draft, target, TINY_DIR / "draft", TINY_DIR / "target")      # the real pair is fine


@pytest.mark.parametrize("spec,msg", [
    ("model", "no bundled draft model"), ("self:x", "integer N"), ("self:1", r"in \[top_k=2, E=8\]"),
    ("ngram:y", "integer N"), ("eagle", "head folder"), ("eagle:/nonexistent/eagle", "does not exist"),
    ("medusa", "unknown drafter 'medusa'"),
])
def test_make_drafter_errors(tiny, spec, msg):
    with pytest.raises((ValueError, CheckpointError), match=msg):
        make_drafter(spec, tiny[0])


# ---- model-runtime hooks -----------------------------------------------------------------------------

def test_expert_map_equals_substituting_the_weights(tiny):
    """expert_map[e] = r runs expert r with the slot's weight: the same as a model whose expert e
    weights are replaced by expert r's."""
    target, _ = tiny
    import copy
    toks = torch.tensor([[5, 99, 300, 7, 1200, 42, 8]])
    pos = torch.arange(7)[None]
    E = target.args.n_experts
    emap = torch.arange(E)
    emap[[1, 4, 6]] = torch.tensor([0, 3, 3])
    maps = [emap] * target.args.n_layers
    clone = copy.deepcopy(target)
    with torch.no_grad():
        for layer in clone.layers:
            layer.ffn.w13.copy_(layer.ffn.w13[emap])
            layer.ffn.w2.copy_(layer.ffn.w2[emap])
        got = target(toks, pos, moe=MoEControl(expert_map=maps))[0]
        want = clone(toks, pos)[0]
        plain = target(toks, pos)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_token_mask_and_expert_stats(tiny):
    target, _ = tiny
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 2048, (2, 9), generator=g)
    pos = torch.arange(9).expand(2, 9)
    mask = torch.ones(18, dtype=torch.bool)
    mask[[3, 4, 12]] = False
    with torch.no_grad():
        s_all, s_masked = ExpertStats(), ExpertStats(mask=mask)
        plain = target(toks, pos, moe=MoEControl(stats=s_all))[0]
        rec: list = []
        masked = target(toks, pos, moe=MoEControl(token_mask=mask, stats=s_masked, record=rec))[0]
    # tokens are independent in the MoE, but attention mixes positions: compare the positions BEFORE the
    # first masked one in each row (row 0: < 3; row 1: < 3 as 12 = 9 + 3)
    torch.testing.assert_close(masked[:, :3], plain[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[0, 3], plain[0, 3], atol=1e-4)
    for _, r in rec:        # masked tokens route as their donor (token 0 by default), weight 0: no new expert
        assert (r.weights[~mask] == 0).all() and (r.ids[~mask] == r.ids[0]).all()
        assert set(r.ids[mask].flatten().tolist()) == set(r.ids.flatten().tolist())
    donor = torch.arange(2).repeat_interleave(9) * 9                   # each row's first token
    ident = [torch.arange(8)] * target.args.n_layers
    rec_d, rec_map = [], []
    with torch.no_grad():
        by_donor = target(toks, pos, moe=MoEControl(token_mask=mask, token_donor=donor, record=rec_d))[0]
        by_map = target(toks, pos, moe=MoEControl(token_mask=mask, expert_map=ident, record=rec_map))[0]
    torch.testing.assert_close(by_donor, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_map, masked, atol=1e-5, rtol=1e-5)   # the regrouping path: same outputs
    for (_, r), (_, q) in zip(rec_d, rec_map):
        assert (r.ids[12] == r.ids[9]).all() and (r.weights[~mask] == 0).all()
        assert (q.ids[~mask] == -1).all() and int(q.expert_offsets[-1]) == int(mask.sum()) * 2
    nat = s_all.natural()
    assert nat.shape == (4, 8) and int(nat.sum()) == 4 * 18 * 2
    assert int(s_masked.natural().sum()) == 4 * 15 * 2
    assert torch.equal(s_all.touched(), s_all.loaded())              # no budget: loaded == touched
    s_b = ExpertStats()
    with torch.no_grad():
        target(toks, pos, moe=MoEControl(budget=3, stats=s_b))
    # natural counts ignore the budget (layer 0 sees the same inputs; later layers see budgeted outputs)
    assert (s_b.loaded() <= 3).all() and torch.equal(s_b.natural()[0], nat[0])
    assert (s_b.touched() > 3).any()


def test_hidden_capture(tiny):
    target, _ = tiny
    toks, pos = torch.tensor([[1, 2, 3, 4]]), torch.arange(4)[None]
    with torch.no_grad():
        logits, out = target(toks, pos, hidden_layers=(1, 4, 0))
        x = target.tok_embeddings(toks)
        from specmoe_ext.models.rope import rope_cos_sin
        cos, sin = rope_cos_sin(pos, target.inv_freq, target.rope_scale, x.dtype)
        mask = causal_mask(pos, 4)
        h1 = target.layers[0](x, cos, sin, None, None, mask, MoEControl())
    assert len(out) == 3
    torch.testing.assert_close(out[0], h1)
    torch.testing.assert_close(out[2], x)
    torch.testing.assert_close(torch.nn.functional.linear(target.norm(out[1]), target.output_weight()), logits)
    with pytest.raises(ValueError, match="hidden_layers must lie in"):
        target(toks, pos, hidden_layers=(9,))


def test_keep_rows_moves_only_surviving_requests():
    c = KVCache(2, 4, 1, 3, 8, torch.float32, "cpu")
    for t in c.k + c.v:
        t.copy_(torch.randn_like(t))
    snap = [t.clone() for t in c.k + c.v]
    c.set_lengths([3, 5, 2, 7])
    c.keep_rows([1, 3])
    assert c.batch_size == 2 and c.host_lengths() == [5, 7] and c.lengths.tolist() == [5, 7]
    for t, s in zip(c.k + c.v, snap):
        assert torch.equal(t, s[[1, 3]])
    with pytest.raises(ValueError, match="strictly ascending"):
        c.keep_rows([1, 0])


# ---- self-assisted drafter ----------------------------------------------------------------------------

def test_affinity_and_resident_mapping(tiny):
    target, _ = tiny
    ffn = target.layers[0].ffn
    A = expert_affinity(ffn.w13, ffn.w2)
    torch.testing.assert_close(A.diagonal(), torch.ones(8))
    torch.testing.assert_close(A, A.t())
    W = torch.cat([ffn.w13.reshape(8, -1), ffn.w2.reshape(8, -1)], 1).double()
    Wn = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(A.double(), Wn @ Wn.t(), atol=1e-5, rtol=1e-5)
    d = SelfDrafter(target, n_resident=3, refresh=2)
    heat = torch.zeros(4, 8)
    heat[:, [6, 2, 5]] = torch.tensor([50.0, 40.0, 30.0])
    d.heat.copy_(heat)
    d._refresh()
    assert d.resident.tolist() == [[2, 5, 6]] * 4
    for j, layer in enumerate(d.moe_layers):
        m = d.maps[layer]
        assert m[[2, 5, 6]].tolist() == [2, 5, 6]
        for e in range(8):
            assert int(m[e]) in (2, 5, 6)
            assert float(d.affinity[j][e, m[e]]) == pytest.approx(float(d.affinity[j][e, [2, 5, 6]].max()))


def test_self_drafter_chain_is_the_restricted_targets_greedy_continuation(tiny, prompts):
    target, _ = tiny
    eng = SpecEngine(target, SelfDrafter(target, n_resident=3, refresh=1), "chain:3")
    batch = eng.start(prompts, SamplingParams(), 40, cache=KVCache.for_model(target, 3, 128))
    for step in range(3):
        got = _chain_tokens(eng, batch)
        # reference: the committed prefix with ALL experts (the drafter shares the target's exact KV), then
        # greedy decoding from the root with the resident-only expert map
        ctx = [batch.context(b) for b in range(3)]
        ref_cache = KVCache.for_model(target, 3, 128)
        moe = MoEControl(expert_map=eng.drafter.maps)
        with torch.no_grad():
            prefill(target, [c[:-1] for c in ctx], ref_cache)
            tok = torch.tensor([[c[-1]] for c in ctx])
            ref = []
            for _ in range(3):
                tok = _decode(target, ref_cache, tok, moe).argmax(-1, keepdim=True)
                ref.append(tok[:, 0].tolist())
        assert got == [list(r) for r in zip(*ref)], step
        eng.step(batch)                                    # refresh=1: residents follow each verification
    assert eng.drafter.heat.sum() > 0


def test_self_drafter_with_all_experts_resident_accepts_everything(tiny, prompts):
    target, _ = tiny
    res = SpecEngine(target, SelfDrafter(target, n_resident=8), "chain:3").generate(prompts[:1], 25)
    assert res.tokens == generate(target, prompts[:1], 25).tokens
    assert all(s.accepted == [3] for s in res.steps)


# ---- n-gram -----------------------------------------------------------------------------------------------

def _ngram_reference(ctx: list[int], tail: list[int], max_n: int, min_n: int, V: int) -> torch.Tensor:
    """The n-gram rule on the host, straight from its definition: the longest n (max_n down to min_n,
    n <= len(tail)) whose last n tail tokens occur earlier in ctx; every occurrence's next token counts,
    score log(count) + 1e-3 * last position / (latest position + 1)."""
    out = torch.full((V,), float("-inf"))
    for n in range(min(max_n, len(tail)), min_n - 1, -1):
        hits = [i for i in range(n, len(ctx)) if ctx[i - n:i] == tail[-n:]]
        if hits:
            latest = max(hits)
            for tok in set(ctx[i] for i in hits):
                occ = [i for i in hits if ctx[i] == tok]
                out[tok] = float(torch.tensor(float(len(occ))).log()) + 1e-3 * max(occ) / (latest + 1)
            return out
    return out


@pytest.mark.parametrize("seed", range(6))
def test_ngram_device_matcher_equals_the_host_rule(seed):
    """The device matcher (fixed shapes over the history buffer) gives the host rule's distribution for
    random short-alphabet contexts (many repeats) and tails that extend the context with path tokens."""
    g = torch.Generator().manual_seed(seed)
    V, S, max_n = 6, 40, 3
    d = NGramDrafter(V, max_n=max_n, min_n=1)
    bs, F = 3, 4
    hist = torch.randint(0, V, (bs, S), generator=g)
    clen = torch.randint(2, S - 1, (bs,), generator=g)
    tails = torch.randint(0, V, (bs, F, max_n), generator=g)
    tails[:, 0, :1] = -1                                  # a shorter context: the first tail token absent
    got = d.continuations(hist, clen, tails)
    for b in range(bs):
        ctx = hist[b, :int(clen[b])].tolist()
        for f in range(F):
            tail = [t for t in tails[b, f].tolist() if t >= 0]
            want = _ngram_reference(ctx, tail, max_n, 1, V)
            assert torch.equal(torch.isinf(got[b, f]), torch.isinf(want)), (b, f)
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[b, f][fin], want[fin], atol=1e-6, rtol=1e-6)


def test_ngram_drafter_proposes_the_continuation(tiny):
    target, _ = tiny
    d = NGramDrafter(2048, max_n=3)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    eng = SpecEngine(target, d, "chain:4")
    batch = eng.start([prompt], SamplingParams(), 30, cache=KVCache.for_model(target, 1, 64))
    L = int(batch.cache.lengths[0])
    batch.history[0, L] = 6                     # force the root (first generated token) for a known answer
    batch.history[0, L - 1] = 5
    batch.root.fill_(6)
    assert _chain_tokens(eng, batch) == [[7, 8, 9, 5]]


# ---- EAGLE-3 ------------------------------------------------------------------------------------------------

def test_eagle3_save_load_round_trip_and_layout(tiny, eagle_dir):
    target, _ = tiny
    from safetensors.torch import load_file
    sd = load_file(str(eagle_dir / "model.safetensors"))
    assert "midlayer.self_attn.q_proj.weight" in sd and sd["midlayer.self_attn.q_proj.weight"].shape == (128, 256)
    assert sd["fc.weight"].shape == (128, 384) and sd["lm_head.weight"].shape == (512, 128)
    head = load_eagle3(eagle_dir, target)
    assert head.capture_layers == (1, 2, 3) and head.draft_vocab == 512
    torch.testing.assert_close(head.q_proj.weight, sd["midlayer.self_attn.q_proj.weight"])
    torch.testing.assert_close(head.gate_proj.weight, sd["midlayer.mlp.gate_proj.weight"])
    assert torch.equal(head.d2t, sd["d2t"])
    assert torch.equal(torch.nonzero(sd["t2d"]).flatten(), sd["d2t"] + torch.arange(512))


def test_eagle3_drafter_chain_matches_a_sequential_reference(tiny, prompts, eagle_dir):
    """The drafter's chain equals running the head pair by pair: (target feature t, token t+1) at position
    t for the prompt, then (previous head output, drafted token) -- argmax over the draft vocabulary; and
    after steps (pairs fed in commit from the verification's features) the same holds for the context."""
    target, _ = tiny
    head = load_eagle3(eagle_dir, target)
    eng = SpecEngine(target, Eagle3Drafter(head, target), "chain:3")
    p = prompts[1]
    batch = eng.start([p], SamplingParams(), 30, cache=KVCache.for_model(target, 1, 64))
    for step in range(3):
        got = _chain_tokens(eng, batch)[0]
        ctx = batch.context(0)
        with torch.no_grad():
            _, hid = target(torch.tensor([ctx[:-1]]), torch.arange(len(ctx) - 1)[None], hidden_layers=head.capture_layers)
            feats = head.fuse(torch.cat(hid, -1))
            toks = ctx[1:]                                            # x_1 .. x_L (x_L = the root)
            cache = KVCache(1, 1, 2, 32, 64, torch.float32, "cpu")
            pos = torch.arange(len(toks))[None]
            out, logits = head(torch.tensor([toks]), feats, Geometry(pos, pos, causal_mask(pos, 64)), cache)
            h, nxt = out[:, -1:], int(logits[0, -1].argmax())
            want = [nxt]
            for i in range(2):
                s_ = torch.tensor([[len(toks) + i]])
                h, lg = head(torch.tensor([[nxt]]), h, Geometry(s_, s_, causal_mask(s_, 64)), cache)
                nxt = int(lg[0, -1].argmax())
                want.append(nxt)
        assert got == want, step
        assert set(got) <= set((head.d2t + torch.arange(512)).tolist())      # drafts stay in the draft vocabulary
        eng.step(batch)


@pytest.mark.parametrize("edit,msg", [
    (lambda cfg, sd: sd.pop("midlayer.hidden_norm.weight"), "missing EAGLE-3 tensors: midlayer.hidden_norm.weight"),
    (lambda cfg, sd: cfg.update(target_hidden_size=256), "target hidden size 256, target has 128"),
    (lambda cfg, sd: sd.update(d2t=sd["d2t"] + 5000), "d2t maps draft ids outside"),
    (lambda cfg, sd: sd.update({"fc.weight": torch.zeros(128, 100)}), r"shape mismatch: fc.weight \[128, 100\]"),
    (lambda cfg, sd: cfg.update(eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 9]}), "3 feature layers"),
    (lambda cfg, sd: sd.update({"midlayer.extra.weight": torch.zeros(1)}), "unexpected tensors"),
])
def test_eagle3_bad_checkpoints_are_clear_errors(tiny, eagle_dir, tmp_path, edit, msg):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "bad"
    shutil.copytree(eagle_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    edit(cfg, sd)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=msg):
        load_eagle3(d, tiny[0])


def test_eagle3_pytorch_bin_layout_loads(tiny, eagle_dir, tmp_path):
    """Published heads are often pytorch_model.bin: the same tensors load from there."""
    from safetensors.torch import load_file
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(eagle_dir / "config.json", d / "config.json")
    torch.save(load_file(str(eagle_dir / "model.safetensors")), d / "pytorch_model.bin")
    a, b = load_eagle3(eagle_dir, tiny[0]), load_eagle3(d, tiny[0])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

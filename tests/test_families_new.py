"""DeepSeek-V3 / DeepSeek-V2 (MLA, grouped routing, shared experts, MTP), GLM-4.5 (partial RoPE, grouped
sigmoid routing, MTP) and GPT-OSS (sinks, sliding windows, clamped SwiGLU experts): our runtime against
transformers 5.17 on small random configs, speculative == autoregressive with every drafter, the MTP drafter
against transformers' own MTP model, the latent KV cache, loader / config errors, presets. CPU; GPU marked.

Shape legend: bs prompts, T tokens, V vocab (512 here), S cache capacity, E experts, K experts per token,
h hidden, r kv_lora_rank, dr qk_rope_head_dim, L layers, W sliding window.

Checkpoints: transformers models with a fixed seed, their routing biases / sinks / expert biases randomized
(transformers initializes them to zero), saved with save_pretrained once per session. "+mtp" variants also
carry one random MTP layer (model.layers.L.*, as DeepSeek-V3 / GLM-4.5 checkpoints do; save_pretrained
drops MTP weights).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from specmoe_ext import reference  # noqa: E402
from specmoe_ext.models import KVCache, MoEControl, SamplingParams, load_model  # noqa: E402
from specmoe_ext.models.config import ModelArgs, UnsupportedModelError  # noqa: E402
from specmoe_ext.models.loader import CheckpointError  # noqa: E402
from specmoe_ext.speculative import BudgetConfig, SpecEngine, generate, make_drafter  # noqa: E402
from specmoe_ext.speculative.mtp import MTPDrafter, NoMTPLayerError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512
STD = 0.08
_ROOT = Path(tempfile.mkdtemp(prefix="specmoe_families_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

_COMMON = dict(vocab_size=VOCAB, initializer_range=STD, max_position_embeddings=256, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def _configs():
    T = transformers
    return {
        # MLA with q LoRA, YaRN (mscale in the softmax scale), interleaved RoPE, 1 dense + 2 MoE layers,
        # 16 experts in 4 groups (2 kept), top-4, scale 2.5, one shared expert
        "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
            routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24,
            qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
            norm_topk_prob=True, rope_parameters=_YARN, num_nextn_predict_layers=1, **_COMMON)),
        # MLA without q LoRA (kv_a / o_proj biases), softmax, group-limited greedy (group max), no
        # renormalization, scale 16
        "deepseek_v2": (T.DeepseekV2Config, T.DeepseekV2ForCausalLM, dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=2, n_routed_experts=16, routed_scaling_factor=16.0,
            kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=32,
            n_group=4, topk_group=2, topk_method="group_limited_greedy", num_experts_per_tok=3,
            first_k_dense_replace=1, attention_bias=True, **_COMMON)),
        # partial RoPE (half of d = 32), per-head q/k norm, q/k/v biases, 8 experts in 2 groups (1 kept)
        "glm4_moe": (T.Glm4MoeConfig, T.Glm4MoeForCausalLM, dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, attention_bias=True,
            use_qk_norm=True, partial_rotary_factor=0.5, num_nextn_predict_layers=1, **_COMMON)),
        # sinks, sliding / full layers (window W set per variant), YaRN without truncation, router bias
        "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM, dict(
            hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0},
            **_COMMON)),
    }


# variant name -> (family, config overrides, with an MTP layer)
VARIANTS = {"deepseek_v3": ("deepseek_v3", {}, False), "deepseek_v3+mtp": ("deepseek_v3", {}, True),
            "deepseek_v2": ("deepseek_v2", {}, False), "glm4_moe": ("glm4_moe", {}, False),
            "glm4_moe+mtp": ("glm4_moe", {}, True), "gpt_oss:w4": ("gpt_oss", {"sliding_window": 4}, False),
            "gpt_oss:w32": ("gpt_oss", {"sliding_window": 32}, False)}
LOGIT_VARIANTS = ["deepseek_v3", "deepseek_v2", "glm4_moe", "gpt_oss:w4", "gpt_oss:w32"]
PROMPT_LENS = (5, 11, 8)


def prompts(lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def _randomize(family: str, model) -> None:
    """The values transformers initializes to zero, made random so that the tests see them."""
    g = torch.Generator().manual_seed(7)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif name.endswith("self_attn.sinks"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif name.endswith(("gate_up_proj_bias", "down_proj_bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def _add_mtp_layer(path: Path, L: int) -> None:
    """Append one random MTP layer (checkpoint layer index L) shaped like the last decoder layer, plus enorm /
    hnorm / eh_proj / shared_head.norm and the copies of the embedding and LM head real checkpoints carry."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(11)
    src = f"model.layers.{L - 1}."
    dst = f"model.layers.{L}."
    h = sd["model.norm.weight"].shape[0]
    for k in [k for k in sd if k.startswith(src)]:
        t = sd[k]
        if k.endswith("norm.weight"):
            new = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif k.endswith("e_score_correction_bias"):
            new = 0.1 * torch.randn(t.shape, generator=g)
        else:
            new = STD * torch.randn(t.shape, generator=g)
        sd[dst + k[len(src):]] = new
    sd[dst + "enorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    sd[dst + "hnorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    sd[dst + "eh_proj.weight"] = STD * torch.randn(h, 2 * h, generator=g)
    sd[dst + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    sd[dst + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    sd[dst + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


@functools.lru_cache(maxsize=None)
def family_checkpoint(variant: str) -> tuple[Path, "torch.nn.Module"]:
    """(folder, transformers model in fp32 eval mode) of a variant, saved once per session."""
    family, over, mtp = VARIANTS[variant]
    C, M, kw = _configs()[family]
    torch.manual_seed(1234)
    model = M(C(**{**kw, **over})).eval()
    _randomize(family, model)
    path = _ROOT / variant.replace(":", "_").replace("+", "_")
    model.save_pretrained(path)
    if mtp:
        _add_mtp_layer(path, model.config.num_hidden_layers)
    return path, model


def _batched_logits(model, plist, capacity=64):
    """One forward over all prompts (right-padded into the cache) -> per-prompt logits [T_b, V] float32."""
    P = max(map(len, plist))
    cache = KVCache.for_model(model, len(plist), capacity)
    toks = torch.zeros(len(plist), P, dtype=torch.long)
    for b, p in enumerate(plist):
        toks[b, :len(p)] = torch.tensor(p)
    toks = toks.to(model.tok_embeddings.weight.device)
    with torch.no_grad():
        out, _ = model(toks, cache.append(P), cache)
    return [out[b, :len(p)].float() for b, p in enumerate(plist)]


def _hf_logits(hf, plist):
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0].float() for p in plist]


# ---- forward and generation against transformers ----------------------------------------------------------

@pytest.mark.parametrize("variant", LOGIT_VARIANTS)
def test_logits_match_transformers_fp32(variant):
    """Batched prompts of different lengths through the KV cache (right-padded slots) vs transformers on each
    prompt alone; also the cache-free forward. GPT-OSS: windows shorter (4) and longer (32) than the prompts."""
    path, hf = family_checkpoint(variant)
    model = load_model(path, "cpu", "float32")
    plist = prompts()
    refs = _hf_logits(hf, plist)
    for ours, ref in zip(_batched_logits(model, plist), refs):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        free = model(torch.tensor([plist[1]]), torch.arange(len(plist[1]))[None])[0][0]
    torch.testing.assert_close(free, refs[1], atol=2e-5, rtol=1e-4)


def test_sliding_window_changes_what_is_seen():
    """The window is live: GPT-OSS with W=4 and W=32 (same weights otherwise) agree on the first 4 tokens of a
    prompt and differ after, in our runtime as in transformers."""
    plist = prompts((11,))
    (p4, h4), (p32, h32) = family_checkpoint("gpt_oss:w4"), family_checkpoint("gpt_oss:w32")
    a, b = _batched_logits(load_model(p4), plist)[0], _batched_logits(load_model(p32), plist)[0]
    torch.testing.assert_close(a[:4], b[:4], atol=1e-5, rtol=1e-5)
    assert (a[4:] - b[4:]).abs().max() > 1e-3
    ra, rb = _hf_logits(h4, plist)[0], _hf_logits(h32, plist)[0]
    assert (ra[4:] - rb[4:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v2", "glm4_moe", "gpt_oss:w4"])
def test_greedy_generation_matches_transformers(variant):
    from transformers import GenerationConfig
    path, hf = family_checkpoint(variant)
    model = load_model(path, "cpu", "float32")
    plist = prompts()
    n = 10
    res = generate(model, plist, n, SamplingParams())              # one batch, prompts of different lengths
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    for p, ours in zip(plist, res.tokens):
        assert ours == hf.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist(), variant


def test_bf16_logits_close_to_transformers():
    """bf16 (the GPU dtype): our logits against transformers' fp32 truth within the bound transformers' own
    bf16 run sets (test_models' rule), for MLA and for sinks + windows."""
    from test_models import _assert_bf16_close
    import copy
    for variant in ("deepseek_v3", "gpt_oss:w4"):
        path, hf32 = family_checkpoint(variant)
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        plist = prompts()
        _assert_bf16_close(_batched_logits(load_model(path, "cpu", "bfloat16"), plist), _hf_logits(hf16, plist),
                           _hf_logits(hf32, plist), variant)


@pytest.mark.parametrize("variant,window", [("gpt_oss:w4", 4), ("gpt_oss:w4", 2), ("deepseek_v3", None),
                                            ("glm4_moe", None)])
def test_tree_forward_equals_root_to_leaf_paths(tmp_path, variant, window):
    """Tree verification (8 nodes, depth 3, after prefixes of 9 and 5 tokens; node i at slot prefix + i but
    position prefix + depth) equals running each root-to-leaf path causally after its prefix: sliding windows
    counted in positions, not slots (a window of 2, shorter than the tree, drops node 2 for node 7 although
    their slots are 5 apart), MLA and partial RoPE through the dense tree mask."""
    from specmoe_ext.models import prefill, tree_mask
    from specmoe_ext.models.kv_cache import Geometry
    path, _ = family_checkpoint(variant)
    if window is not None and window != 4:
        path = _copy(variant, tmp_path)
        _edit_config(path, sliding_window=window)
    model = load_model(path)
    assert window is None or model.args.layer_windows[0] == window
    parent = [-1, 0, 0, 1, 2, 2, 3, 4]       # node 7: depth 3 under node 2 (depth 1, slot offset 2)
    T = len(parent)
    anc = torch.zeros(T, T, dtype=torch.bool)
    depth = [0] * T
    for i in range(T):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
        depth[i] = 0 if parent[i] < 0 else depth[parent[i]] + 1
    leaves = [i for i in range(T) if i not in parent]
    prefixes = prompts((9, 5), seed=3)
    toks = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(7))
    cache = KVCache.for_model(model, 2, 40)
    with torch.no_grad():
        prefill(model, prefixes, cache)
        plens = torch.tensor(cache.host_lengths())
        slots = plens[:, None] + torch.arange(T)
        positions = plens[:, None] + torch.tensor(depth)[None, :]
        logits, _ = model(toks, Geometry(positions, slots, tree_mask(plens, slots, anc.expand(2, T, T), 40)), cache)
        for b in range(2):
            for leaf in leaves:
                pth, j = [], leaf
                while j >= 0:
                    pth.append(j)
                    j = parent[j]
                pth = pth[::-1]
                seq = prefixes[b] + toks[b, pth].tolist()
                ref = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0][0, len(prefixes[b]):]
                torch.testing.assert_close(logits[b, pth], ref, atol=3e-5, rtol=1e-4)


# ---- the MLA cache ---------------------------------------------------------------------------------------

def test_mla_cache_holds_the_latent():
    """The cache rows are the normalized latent + the rotated key part (L x (r + dr) values per token, no
    values tensor); memory per token as reported, against what expanded K/V would take."""
    path, _ = family_checkpoint("deepseek_v3")
    model = load_model(path)
    a, m = model.args, model.args.mla
    cache = KVCache.for_model(model, 2, 40)
    assert cache.v == [] and all(t.shape == (2, 1, 40, m.latent_dim) for t in cache.k)
    per_token = a.n_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 4
    assert cache.bytes_per_token() == per_token == 3 * 48 * 4
    assert a.kv_cache_bytes(2, 40, 4) == cache.nbytes() == 2 * 40 * per_token
    expanded = a.n_layers * a.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * 4
    print(f"MLA KV cache: {per_token} bytes per token (fp32) vs {expanded} for expanded K/V "
          f"({expanded / per_token:.1f}x)")
    assert expanded / per_token == pytest.approx(4 * 72 / 48)
    p = prompts((6, 9))
    toks = torch.zeros(2, 9, dtype=torch.long)
    for b, q in enumerate(p):
        toks[b, :len(q)] = torch.tensor(q)
    with torch.no_grad():
        geo = cache.append(9)
        model(toks, geo, cache)
        # layer 0's rows = [kv_a_norm(c), RoPE(k_rope)] of the layer's normed input, recomputed here
        from specmoe_ext.models.rope import rope_cos_sin
        x = model.layers[0].attention_norm(model.tok_embeddings(toks))
        cos, sin = rope_cos_sin(geo.positions, model.inv_freq, model.rope_scale, x.dtype)
        want = model.layers[0].attention.latent(x, cos, sin)
    for b, q in enumerate(p):
        torch.testing.assert_close(cache.k[0][b, 0, :len(q)], want[b, :len(q)], atol=1e-6, rtol=1e-6)
        assert cache.k[0][b, 0, 9:].abs().sum() == 0                     # nothing past what was written


# ---- speculative == autoregressive ---------------------------------------------------------------------

SPEC_CASES = [(v, d) for v in ("deepseek_v3+mtp", "deepseek_v2", "glm4_moe+mtp", "gpt_oss:w4", "gpt_oss:w32")
              for d in ("ngram", "self", "mtp") if d != "mtp" or v.endswith("+mtp")]
_AR: dict = {}


def _ar(variant, model, plist, n):
    key = (variant, n)
    if key not in _AR:
        _AR[key] = generate(model, plist, n).tokens
    return _AR[key]


@pytest.mark.parametrize("tree", ["chain:3", "dynamic:topk=2,depth=3,tokens=6"])
@pytest.mark.parametrize("variant,drafter", SPEC_CASES)
def test_greedy_speculative_equals_autoregressive(variant, drafter, tree):
    """Every family with the n-gram, self-assisted and (DeepSeek-V3 / GLM-4.5) MTP drafters, chains and
    trees, a batch of prompts of different lengths; GPT-OSS with windows shorter and longer than them."""
    path, _ = family_checkpoint(variant)
    model = load_model(path)
    plist = prompts(seed=1)
    n = 12
    ref = _ar(variant, model, plist, n)
    spec = {"self": "self:4" if model.args.n_experts <= 8 else "self:8"}.get(drafter, drafter)
    res = SpecEngine(model, make_drafter(spec, model), tree).generate(plist, n)
    assert res.tokens == ref, (variant, drafter, tree)
    assert all(s.touched == s.loaded for s in res.steps)
    if drafter == "self":          # the target itself drafts with half its experts: it gets drafts right
        assert sum(a for s in res.steps for a in s.accepted) > 0


def test_budget_and_grouped_routing_in_the_model():
    """MoEControl on DeepSeek-V3: budget B = E is plain routing; B = K bounds the experts read per layer and
    changes the logits; the reference router (the same grouped / biased / scaled maths in PyTorch) gives the
    same logits; the engine's verification budget holds (lossy, so only the bound is checked)."""
    path, _ = family_checkpoint("deepseek_v3")
    model = load_model(path)
    a = model.args
    toks, pos = torch.tensor([prompts((10,))[0]]), torch.arange(10)[None]
    with torch.no_grad():
        rec: list = []
        plain = model(toks, pos, moe=MoEControl(record=rec))[0]
        torch.testing.assert_close(model(toks, pos, moe=MoEControl(budget=a.n_experts))[0], plain, atol=0, rtol=0)
        rec_b: list = []
        budgeted = model(toks, pos, moe=MoEControl(budget=a.top_k, record=rec_b))[0]
        ref = model(toks, pos, moe=MoEControl(router=reference.route_budget))[0]
    assert [layer for layer, _ in rec] == [1, 2]
    assert all(int(r.experts_loaded()) <= a.top_k for _, r in rec_b)
    assert any(int(r.experts_loaded()) > a.top_k for _, r in rec) and not torch.allclose(budgeted, plain)
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-5)
    gs = a.n_experts // a.router.n_group
    for _, r in rec:                                                   # every token within topk_group groups
        assert all(len(set((row // gs).tolist())) <= a.router.topk_group for row in r.ids)
        torch.testing.assert_close(r.weights.sum(1), torch.full((10,), a.router.scale), atol=1e-5, rtol=0)
    res = SpecEngine(model, make_drafter("ngram", model), "chain:3", BudgetConfig(a.top_k)).generate(prompts(), 10)
    assert all(max(s.loaded) <= a.top_k for s in res.steps if s.loaded)


# ---- the MTP drafter -----------------------------------------------------------------------------------

def _hf_mtp(variant):
    """transformers' own MTP model over our checkpoint's MTP layer (its main model drops those weights)."""
    from transformers.modeling_layers import MtpModel
    path, _ = family_checkpoint(variant)
    C, M, kw = _configs()[VARIANTS[variant][0]]
    main = M.from_pretrained(path, dtype=torch.float32).eval()
    L = main.config.num_hidden_layers
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]       # where our layer sits
    return main, MtpModel.from_pretrained(main).eval()


@pytest.mark.parametrize("variant", ["deepseek_v3+mtp", "glm4_moe+mtp"])
def test_mtp_draft_logits_match_transformers_mtp_model(variant):
    """After the prefill, the drafter's root logits (MTP layer on (last target state, first token)) equal
    transformers' MtpModel's draft logits for the same prompt, per prompt of a batch of different lengths."""
    from transformers.cache_utils import MtpCache
    path, _ = family_checkpoint(variant)
    model = load_model(path)
    main, hf_mtp = _hf_mtp(variant)
    plist = prompts()
    eng = SpecEngine(model, MTPDrafter(model), "chain:2")
    batch = eng.start(plist, SamplingParams(), 8)
    for b, p in enumerate(plist):
        x = torch.tensor([p + [int(batch.root[b])]])
        with torch.no_grad():
            hid = main(x[:, :-1], output_hidden_states=True).hidden_states[-1]     # final-norm states
            _, logits, _ = hf_mtp(input_ids=x[:, 1:], last_hidden_states=hid, attention_mask=torch.ones_like(x[:, 1:]),
                                  position_ids=torch.arange(1, x.shape[1])[None],
                                  mtp_cache=MtpCache(config=main.config.get_mtp_config()))
        torch.testing.assert_close(eng.drafter.root[b], logits[0, -1].float(), atol=2e-5, rtol=1e-4)


def test_mtp_chain_is_the_sequential_mtp_rollout():
    """The drafted chain equals rolling the MTP layer out by hand (no cache): prompt pairs, then (own output,
    drafted token) D times; after verification steps (pairs fed in commit) too."""
    from specmoe_ext.masks import causal_mask
    from specmoe_ext.models.kv_cache import Geometry
    path, _ = family_checkpoint("deepseek_v3+mtp")
    model = load_model(path)
    d = MTPDrafter(model)
    eng = SpecEngine(model, d, "chain:3")
    batch = eng.start([prompts((7,))[0]], SamplingParams(), 30, cache=KVCache.for_model(model, 1, 64))
    for step in range(3):
        batch.prefix.copy_(batch.cache.lengths)
        with torch.no_grad():
            got = d.propose(batch, eng.plan(SamplingParams())).tokens[0, 1:].tolist()
            ctx = batch.context(0)
            _, hid = model(torch.tensor([ctx[:-1]]), torch.arange(len(ctx) - 1)[None],
                           hidden_layers=(model.args.n_layers,))
            feats = d.head.fuse(hid[0])
            toks = ctx[1:]
            from specmoe_ext.speculative.mtp import mtp_cache
            cache = mtp_cache(model, 1, 64)
            pos = torch.arange(len(toks))[None]
            out, logits = d.head(torch.tensor([toks]), feats, Geometry(pos, pos, causal_mask(pos, 64)), cache)
            h, nxt = out[:, -1:], int(logits[0, -1].argmax())
            want = [nxt]
            for i in range(2):
                s_ = torch.tensor([[len(toks) + i]])
                h, lg = d.head(torch.tensor([[nxt]]), h, Geometry(s_, s_, causal_mask(s_, 64)), cache)
                nxt = int(lg[0, -1].argmax())
                want.append(nxt)
        assert got == want, step
        eng.step(batch)


@pytest.mark.bad_input(4)
def test_mtp_without_mtp_weights_is_a_clear_error():
    """A DeepSeek-V3 / GLM export without MTP weights (what save_pretrained writes), and families without MTP."""
    for variant in ("deepseek_v3", "glm4_moe"):
        model = load_model(family_checkpoint(variant)[0])
        assert model.args.n_mtp_layers == 0 and not hasattr(model, "mtp")
        with pytest.raises(NoMTPLayerError, match=r"no MTP layer weights \(expected tensors model\.layers\.3\.eh_proj"):
            make_drafter("mtp", model)
    for variant in ("deepseek_v2", "gpt_oss:w4"):
        with pytest.raises(NoMTPLayerError, match="has no multi-token-prediction layers"):
            make_drafter("mtp", load_model(family_checkpoint(variant)[0]))
    m = load_model(family_checkpoint("deepseek_v3+mtp")[0])
    assert m.args.n_mtp_layers == 1 and len(m.mtp) == 1
    with pytest.raises(ValueError, match="mtp takes no argument"):
        make_drafter("mtp:2", m)


# ---- loader and config errors -------------------------------------------------------------------------

def _copy(variant, tmp_path):
    src, _ = family_checkpoint(variant)
    dst = tmp_path / variant.replace(":", "_").replace("+", "_")
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path / "model.safetensors"))
    save_file(fn(sd), str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **kw):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))


def _drop(*names):
    def f(sd):
        for n in names:
            sd.pop(n)
        return sd
    return f


TENSOR_ERRORS = [  # (variant, edit of the state dict, message)
    ("deepseek_v3", _drop("model.layers.1.self_attn.kv_a_layernorm.weight"),
     r"missing tensors for DeepseekV3ForCausalLM: model\.layers\.1\.self_attn\.kv_a_layernorm\.weight"),
    ("deepseek_v3", _drop("model.layers.2.mlp.gate.e_score_correction_bias"),
     r"missing tensors .*model\.layers\.2\.mlp\.gate\.e_score_correction_bias"),
    ("deepseek_v3", lambda sd: {**sd, "model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(3, 32)},
     r"shape mismatch: model\.layers\.1\.self_attn\.kv_b_proj\.weight \[3, 32\] \(expected \[224, 32\]\)"),
    ("deepseek_v3+mtp", _drop("model.layers.3.eh_proj.weight"), r"missing tensors .*model\.layers\.3\.eh_proj\.weight"),
    ("deepseek_v2", _drop("model.layers.0.self_attn.q_proj.weight"), r"missing tensors .*layers\.0\.self_attn\.q_proj"),
    ("glm4_moe", _drop("model.layers.1.self_attn.q_proj.bias"),
     r"missing tensors .*layers\.1\.self_attn\.q_proj\.bias"),
    ("gpt_oss:w4", _drop("model.layers.0.self_attn.sinks"), r"missing tensors .*model\.layers\.0\.self_attn\.sinks"),
    ("gpt_oss:w4", lambda sd: {**sd, "model.layers.1.mlp.experts.down_proj_bias": torch.zeros(8, 3)},
     r"shape mismatch: model\.layers\.1\.mlp\.experts\.down_proj_bias \[8, 3\]"),
    # MXFP4 expert weights (the published gpt-oss layout): the conversion recipe
    ("gpt_oss:w4", lambda sd: {**{k: v for k, v in sd.items() if not k.endswith("gate_up_proj")},
                               "model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(8, 128, 2, 16,
                                                                                           dtype=torch.uint8),
                               "model.layers.0.mlp.experts.gate_up_proj_scales": torch.zeros(8, 128, 2,
                                                                                           dtype=torch.uint8)},
     r"MXFP4-quantized expert weights .*Mxfp4Config\(dequantize=True\)"),
    # FP8 block-quantized weights with their scales (DeepSeek-V3's published layout)
    ("deepseek_v3", lambda sd: {**sd, "model.layers.1.self_attn.kv_b_proj.weight_scale_inv": torch.ones(2, 1)},
     r"FP8 block-quantized weights \(model\.layers\.1\.self_attn\.kv_b_proj\.weight_scale_inv"),
]


@pytest.mark.bad_input(len(TENSOR_ERRORS))
@pytest.mark.parametrize("variant,edit,msg", TENSOR_ERRORS)
def test_checkpoint_errors_are_named(tmp_path, variant, edit, msg, monkeypatch):
    from specmoe_ext.models import loader
    d = _copy(variant, tmp_path)
    _rewrite(d, edit)
    monkeypatch.setattr(loader, "empty_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("allocated")))
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)


@pytest.mark.bad_input(1)
def test_mtp_weights_the_config_does_not_declare_are_unexpected(tmp_path):
    d = _copy("deepseek_v3+mtp", tmp_path)
    _edit_config(d, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.3\."):
        load_model(d)


CONFIG_ERRORS = [  # (family, config edit, message)
    ("deepseek_v3", dict(n_group=3), r"'n_group'=3 must divide n_routed_experts=16"),
    ("deepseek_v3", dict(topk_group=1, num_experts_per_tok=5), r"topk_group=1 groups of 4 experts hold fewer than "
                                                               r"num_experts_per_tok=5"),
    ("deepseek_v3", dict(topk_group=9), r"'topk_group'=9 must be in \[1, n_group=4\]"),
    ("deepseek_v3", dict(scoring_func="softmax"), r"scoring_func='softmax' .* not supported"),
    ("deepseek_v3", dict(n_routed_experts=1024, n_group=8), r"n_routed_experts=1024 exceeds the 512 experts"),
    ("deepseek_v3", dict(qk_rope_head_dim=15), r"'qk_rope_head_dim'=15 must be even"),
    ("deepseek_v3", dict(kv_lora_rank="32"), r"config key 'kv_lora_rank' must be an integer"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), r"'topk_method'='noaux_tc' is not supported"),
    ("deepseek_v2", dict(norm_topk_prob=True), r"norm_topk_prob=true is not supported"),
    ("glm4_moe", dict(partial_rotary_factor=0.01), r"partial_rotary_factor=0.01 .* rotary dims"),
    ("gpt_oss", dict(layer_types=["sliding_attention", "local"]), r"'layer_types' must list"),
    ("gpt_oss", dict(num_experts_per_tok=17), r"num_experts_per_tok=17 must be in"),
    ("gpt_oss", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
]


@pytest.mark.bad_input(len(CONFIG_ERRORS))
@pytest.mark.parametrize("family,edit,msg", CONFIG_ERRORS)
def test_config_errors_name_the_key(family, edit, msg):
    path, _ = family_checkpoint({"gpt_oss": "gpt_oss:w4"}.get(family, family))
    cfg = {**json.loads((path / "config.json").read_text()), **edit}
    if family == "glm4_moe":
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "partial_rotary_factor": edit["partial_rotary_factor"]}
    with pytest.raises(UnsupportedModelError, match=msg):
        ModelArgs.from_hf_config(cfg)


def test_config_parsing_of_the_published_shapes():
    """The presets' configs (DeepSeek-V2-Lite, GPT-OSS-20B and a V3-architecture one) parse into the
    structure transformers builds: defaults, nulls, layer types and windows, MLA scale with YaRN mscale."""
    from specmoe_ext.models.presets import PRESETS
    a = PRESETS["deepseek-v2-lite"].args()
    assert a.mla.q_lora_rank is None and a.mla.latent_dim == 576 and a.router.n_group == 1
    assert a.moe_layers == (False,) + (True,) * 26 and a.shared_expert_intermediate_size == 2 * 1408
    m = 0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1
    assert a.mla.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    g = PRESETS["gpt-oss-20b"].args()
    assert g.layer_windows == (128, None) * 12 and g.attn_sinks and g.rope.rope_type == "yarn" and not g.rope.truncate
    assert g.n_experts == 32 and g.top_k == 4 and g.expert_act == "gpt_oss" and not g.tree_kernel_ok


# ---- presets -----------------------------------------------------------------------------------------------

_PRESET_HF = {"gpt-oss-20b": ("GptOssForCausalLM", 20.9), "deepseek-v2-lite": ("DeepseekV2ForCausalLM", 15.7),
              "deepseek-v3-lite": ("DeepseekV3ForCausalLM", 15.7)}


@pytest.mark.parametrize("name", list(_PRESET_HF))
def test_presets_match_transformers_parameter_count(name):
    """Built on the meta device: the parameter count of transformers' model for the same config (MTP layers
    apart, which transformers does not build), the published size, and it fits one H200 in bf16."""
    from specmoe_ext.models.presets import PRESETS, build_preset
    p = PRESETS[name]
    ours = build_preset(name, "meta")
    n_ours = sum(t.numel() for n, t in ours.named_parameters() if not n.startswith("mtp."))
    cls_name, size_b = _PRESET_HF[name]
    hf_cls = getattr(transformers, cls_name)
    with torch.device("meta"):
        hf = hf_cls(hf_cls.config_class(**{k: v for k, v in p.hf_config.items() if k != "architectures"}))
    n_hf = sum(t.numel() for t in hf.parameters())
    n_hf += sum(t.numel() for n, t in hf.named_buffers() if n.endswith("e_score_correction_bias"))  # ours: a parameter
    assert n_ours == n_hf
    assert abs(n_hf / 1e9 - size_b) < 0.15, n_hf
    assert ours.num_parameters() * 2 < 139 * 2**30                    # bf16 weights fit one H200
    if name == "deepseek-v3-lite":
        assert ours.args.n_mtp_layers == 1 and len(ours.mtp) == 1


def test_specmoe_models_lists_the_new_presets_and_architectures(capsys):
    from specmoe_ext.cli import main
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in out["presets"]}
    assert {"gpt-oss-20b", "deepseek-v2-lite", "deepseek-v3-lite"} <= set(names)
    assert names["gpt-oss-20b"]["architecture"] == "GptOssForCausalLM" and names["gpt-oss-20b"]["experts"] == 32
    assert {"DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeForCausalLM", "GptOssForCausalLM"} <= \
        set(out["architectures"])


def test_mtp_drafter_on_the_v3_preset_and_its_memory_accounting():
    """The V3-architecture preset, shape only (meta: what `specmoe generate` builds first for its checks):
    --draft mtp builds on it, and the run's memory account counts the MTP cache (one latent layer) and no
    draft weights (the MTP layer is part of the target's)."""
    from specmoe_ext.cli import _run_bytes
    from specmoe_ext.models.presets import build_preset
    model = build_preset("deepseek-v3-lite", "meta")
    eng = SpecEngine(model, make_drafter("mtp", model), "chain:3")
    need = eng.capacity_for(100, 50)
    parts = dict(_run_bytes([eng], 2, [need]))
    cap = -(-need // 128) * 128
    assert parts["KV cache"] == 27 * 2 * 576 * cap * 4
    assert parts["draft weights"] == 0
    assert parts["draft KV cache"] == 2 * 576 * (cap + eng.drafter.extra_capacity(eng.spec)) * 4


# ---- GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("variant", LOGIT_VARIANTS)
def test_gpu_bf16_logits_close_to_transformers(variant):
    """CUDA, bf16: MLA, sinks and windows through the dense-mask path (the tree kernel does not take them),
    routing and experts through the CUDA ops, against transformers (CUDA bound of test_models' rule)."""
    import copy
    from test_models import _assert_bf16_close
    path, hf32 = family_checkpoint(variant)
    model = load_model(path, "cuda", "bfloat16")
    hf16 = copy.deepcopy(hf32).to(device="cuda", dtype=torch.bfloat16)
    plist = prompts()
    with torch.no_grad():
        ref16 = [hf16(torch.tensor([p], device="cuda")).logits[0].float().cpu() for p in plist]
    ours = [t.cpu() for t in _batched_logits(model, plist)]
    _assert_bf16_close(ours, ref16, _hf_logits(hf32, plist), variant, device="cuda")


@gpu
@pytest.mark.parametrize("variant,drafter,tree", [("deepseek_v3+mtp", "mtp", "chain:3"),
                                                  ("glm4_moe+mtp", "mtp", "dynamic:topk=2,depth=3,tokens=6"),
                                                  ("gpt_oss:w4", "self", "chain:3"),
                                                  ("deepseek_v2", "ngram", "chain:3")])
def test_gpu_graph_speculative_equals_autoregressive(variant, drafter, tree):
    """float32 on CUDA: the captured step (drafting with the MTP layer included) replays and commits exactly
    the autoregressive tokens; a second run replays every step."""
    path, _ = family_checkpoint(variant)
    model = load_model(path, "cuda", "float32")
    plist = prompts(seed=1)
    ref = generate(model, plist, 16, cuda_graph=False).tokens
    spec = "self:4" if drafter == "self" else drafter
    eng = SpecEngine(model, make_drafter(spec, model), tree)
    res = eng.generate(plist, 16)
    assert res.tokens == ref and res.cuda_graph
    again = eng.generate(plist, 16)
    assert again.tokens == ref and all(s.replayed for s in again.steps)

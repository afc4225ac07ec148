"""KVCache: per-request lengths, geometry with capacity checks before any write, rows leaving, compaction.

Shape legend: L layers, bs requests, Hk kv heads, S capacity, d head dim, T tokens, n moved entries.
"""
from __future__ import annotations

import pytest
import torch

from conftest_models import hf_checkpoint, prompts

from specmoe_ext import ops
from specmoe_ext.masks import causal_bits
from specmoe_ext.models import CacheCapacityError, Geometry, KVCache, load_model, prefill, tree_mask
from specmoe_ext.speculative import generate


def _filled_cache(bs=2, S=10, L=2, Hk=2, d=4):
    c = KVCache(L, bs, Hk, d, S, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for t in c.k + c.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return c


def _snapshot(c):
    return [t.clone() for t in c.k + c.v], c.lengths.clone(), c.host_lengths()


def _assert_unchanged(c, snap):
    bufs, lengths, host = snap
    assert all(torch.equal(a, b) for a, b in zip(c.k + c.v, bufs))
    assert torch.equal(c.lengths, lengths) and c.host_lengths() == host


def test_geometry_gives_per_request_slots_and_advance_commits():
    c = _filled_cache()
    c.set_lengths([3, 7])
    geo = c.append(2)
    assert geo.slots.tolist() == [[3, 4], [7, 8]] and torch.equal(geo.positions, geo.slots)
    assert geo.mask.shape == (2, 2, 9) and geo.mask[1, 0, :8].all() and not geo.mask[1, 0, 8:].any()   # slots < 9 attended
    depth = torch.tensor([[0, 1, 1], [0, 1, 2]])
    bits = torch.tensor([[[1], [3], [5]], [[1], [3], [7]]], dtype=torch.int32)   # a star and a chain
    t = c.tree_geometry(depth, bits)
    assert t.slots.tolist() == [[3, 4, 5], [7, 8, 9]] and t.positions.tolist() == [[3, 4, 4], [7, 8, 9]]
    assert t.mask.dense(10)[0, 2].tolist() == [True] * 3 + [True, False, True] + [False] * 4
    w = c.tree_geometry(torch.arange(2).expand(2, 2), causal_bits(2).expand(2, 2, 1), prefix=c.lengths - 1, offset=1)
    assert w.slots.tolist() == [[3, 4], [7, 8]] and w.positions.tolist() == [[2, 3], [6, 7]]
    c.advance([1, 2])
    assert c.host_lengths() == [4, 9] and c.lengths.tolist() == [4, 9]
    c.advance(1)
    assert c.lengths.tolist() == [5, 10]


def test_capacity_error_before_any_write_leaves_cache_untouched():
    c = _filled_cache()
    c.set_lengths([3, 8])
    snap = _snapshot(c)
    with pytest.raises(CacheCapacityError, match=r"request 1 .*needs 11 slots but its capacity is 10"):
        c.append(3)
    with pytest.raises(CacheCapacityError, match="request 1"):
        c.advance([0, 3])
    with pytest.raises(CacheCapacityError):
        c.set_lengths([3, 11])
    with pytest.raises(CacheCapacityError):
        c.set_length(0, 11)
    _assert_unchanged(c, snap)


def test_generate_with_too_small_cache_fails_before_writing():
    path, _ = hf_checkpoint("qwen3")
    model = load_model(path, "cpu", "float32")
    c = KVCache.for_model(model, 2, 12)
    for t in c.k + c.v:
        t.fill_(7.0)
    c.set_lengths([4, 4])
    snap = _snapshot(c)
    with pytest.raises(CacheCapacityError, match="capacity 12, need batch 2 / capacity 16"):
        generate(model, prompts((5, 3)), 10, cache=c)
    _assert_unchanged(c, snap)
    with pytest.raises(CacheCapacityError):      # the forward-level protocol: geometry before writing
        c.append(9)
    _assert_unchanged(c, snap)


def test_keep_rows_and_reset_rows_keep_addresses():
    """Rows leaving move in place and leave views of the same buffers (graph-stable addresses); reset_rows
    brings back the whole batch."""
    c = _filled_cache(bs=4)
    c.set_lengths([1, 2, 3, 4])
    before = [t.clone() for t in c.k + c.v]
    ptrs = [t.data_ptr() for t in c.k + c.v] + [c.lengths.data_ptr()]
    c.keep_rows([1, 3])
    assert c.batch_size == 2 and c.host_lengths() == [2, 4] and c.lengths.tolist() == [2, 4]
    for old, new in zip(before, c.k + c.v):
        assert torch.equal(new[0], old[1]) and torch.equal(new[1], old[3])
    assert [t.data_ptr() for t in c.k + c.v] + [c.lengths.data_ptr()] == ptrs
    with pytest.raises(ValueError, match="strictly ascending"):
        c.keep_rows([1, 0])
    c.reset_rows()
    assert c.batch_size == 4 and c.full_batch_size == 4 and c.lengths.tolist() == [0] * 4


def test_accepted_tree_path_compaction_then_decode_matches_causal():
    """The speculative flow: verify a tree after the prefix, keep one root-to-leaf path, compact its
    entries to the slots right after the prefix, commit, then decode: logits equal plain causal decoding
    of prefix + path."""
    path, _ = hf_checkpoint("qwen2_moe")
    model = load_model(path, "cpu", "float32")
    parent = [-1, 0, 0, 1, 2, 4]
    T = len(parent)
    anc = torch.zeros(T, T, dtype=torch.bool)
    depth = torch.zeros(T, dtype=torch.long)
    for i in range(T):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
        depth[i] = anc[i].sum() - 1
    accepted = [0, 2, 4, 5]                       # a root-to-leaf path
    prefix = prompts((7,), seed=5)[0]
    tree = torch.randint(3, 1000, (1, T), generator=torch.Generator().manual_seed(9))
    nxt = 17
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        prefill(model, [prefix], cache)
        L = cache.host_lengths()[0]
        slots = L + torch.arange(T)[None]
        mask = tree_mask(torch.tensor([L]), slots, anc[None], cache.capacity)
        model(tree, Geometry(torch.tensor([L]) + depth[None], slots, mask), cache)
        path = torch.tensor([accepted + [-1] * (T - len(accepted))])
        ops.kv_compact(cache.k + cache.v, cache.lengths, path, torch.tensor([len(accepted) - 1]))
        cache.note_device_advance([L + len(accepted)])
        geo = cache.tree_geometry(torch.zeros(1, 1, dtype=torch.long), causal_bits(1)[None])
        got = model(torch.tensor([[nxt]]), geo, cache)[0][0, 0]
        seq = prefix + tree[0, accepted].tolist() + [nxt]
        ref = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0][0, -1]
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)


def test_context_limit_from_config_is_enforced_at_allocation():
    """Sliding-window models are exact only up to their window: a longer cache is refused up front."""
    from specmoe_ext.models import UnsupportedModelError
    from specmoe_ext.models.loader import empty_model
    from specmoe_ext.models.config import ModelArgs
    import transformers
    cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     sliding_window=16).to_dict()
    cfg["architectures"] = ["MixtralForCausalLM"]
    model = empty_model(ModelArgs.from_hf_config(cfg), "cpu", torch.float32).init_random()
    KVCache.for_model(model, 1, 16)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention .*window 16"):
        KVCache.for_model(model, 1, 17)

"""specmoe::tree_accept, specmoe::kv_compact and specmoe::philox_uniform: CPU op vs plain-PyTorch references
(reference.py: the per-node scalar rules and the vectorized walks), the device q-aware rule vs its reference,
a chi-square test of the sampled rule, argument errors on every backend (meta included; one argument on meta
and the rest on the CPU raises), kv_compact's aliasing and path checks, and (marked gpu) CUDA == CPU bit for bit,
CUDA-graph replay."""
import random

import pytest
import torch

from conftest import devices
from specmoe_ext import ops, reference as R
from specmoe_ext.models.generate import SamplingParams, process_logits
from specmoe_ext.models.kv_cache import KVCache

SHAPES = ["chain", "star", "random", "padded"]


def make_parent(kind: str, T: int, rng: random.Random) -> "tuple[list[int], list[bool]]":
    if kind == "chain":
        return [-1] + list(range(T - 1)), [True] * T
    if kind == "star":
        return [-1] + [0] * (T - 1), [True] * T
    par = [-1] + [rng.randrange(i) for i in range(1, T)]
    # unbalanced: bias towards the most recent nodes (deep branches) half the time
    par = [-1] + [(i - 1 if rng.random() < 0.5 else p) for i, p in enumerate(par) if i > 0]
    if kind == "random":
        return par, [True] * T
    n_real = rng.randint(1, T)          # padded: the tail are padding nodes hanging off the root
    return par[:n_real] + [0] * (T - n_real), [True] * n_real + [False] * (T - n_real)


def make_batch(bs, T, V, kind, seed, dtype=torch.float32, device="cpu", scale=3.0):
    """Random logits + a random tree per request whose tokens often equal their parent's argmax (so that
    greedy paths get accepted) and which contains duplicate siblings."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(bs, T, V, generator=g) * scale).to(dtype)
    am = logits.float().argmax(-1)
    tokens = torch.zeros(bs, T, dtype=torch.long)
    parent = torch.zeros(bs, T, dtype=torch.long)
    valid = torch.zeros(bs, T, dtype=torch.bool)
    for b in range(bs):
        par, val = make_parent(kind, T, rng)
        parent[b] = torch.tensor(par)
        valid[b] = torch.tensor(val)
        for i in range(1, T):
            if val[i]:
                tokens[b, i] = int(am[b, par[i]]) if rng.random() < 0.7 else rng.randrange(V)
    return (logits.to(device), tokens.to(device), parent.to(device), valid.to(device))


def seeds_offsets(bs, device="cpu", base=0):
    return (torch.tensor([(1234567 * (b + 1) + base) * 2654435761 % (1 << 62) - (b << 40) for b in range(bs)],
                         dtype=torch.long, device=device),
            torch.tensor([b * 7 + base for b in range(bs)], dtype=torch.long, device=device))


def pad_path(path, T):
    out = torch.full((path.shape[0], T), -1, dtype=torch.long)
    out[:, :path.shape[1]] = path.cpu()
    return out


# ---- Philox -------------------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123 known-answer vectors for philox4x32_10
    assert R.philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert R.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                      0x6D5451FD]
    assert R.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _philox_ref(seed, offset, n, stream):
    out = torch.empty(len(seed), n)
    for b, (sd, o) in enumerate(zip(seed.tolist(), offset.tolist())):
        sd, o = sd & 0xFFFFFFFFFFFFFFFF, o & 0xFFFFFFFFFFFFFFFF
        for i in range(n):
            out[b, i] = (R.philox4x32_10((o, o >> 32, i, stream), (sd, sd >> 32))[0] >> 8) * 2.0 ** -24
    return out


@pytest.mark.parametrize("device", devices())
def test_philox_uniform_matches_the_reference(device):
    seed = torch.tensor([0, 12345, -7, (1 << 62) + 3], device=device)
    off = torch.tensor([0, 1, 1 << 33, 99], device=device)
    u = ops.philox_uniform(seed, off, 37, 3)
    assert u.shape == (4, 37) and u.dtype == torch.float32 and u.device.type == device
    assert torch.equal(u.cpu(), _philox_ref(seed.cpu(), off.cpu(), 37, 3))
    assert bool((u >= 0).all() and (u < 1).all())
    assert not torch.equal(u, ops.philox_uniform(seed, off, 37, 4))          # streams are independent
    assert torch.equal(ops.philox_uniform(seed, off, 0, 1), torch.empty(4, 0, device=device))
    # counter 0 of tree_accept's stream 0 is never produced here: stream 0 is refused
    with pytest.raises(RuntimeError, match="stream must be in"):
        ops.philox_uniform(seed, off, 3, 0)


PHILOX_BAD = [
    (lambda seed, off: (seed.int(), off, 4, 1), "seed must be int64"),
    (lambda seed, off: (seed, off[:2], 4, 1), "offset has 2"),
    (lambda seed, off: (seed, off, -1, 1), "n must be in"),
    (lambda seed, off: (seed[None], off, 4, 1), "seed must be int64 \\[bs\\]"),
    (lambda seed, off: (seed, torch.zeros(3, dtype=torch.long, device="cpu" if seed.is_meta else "meta"), 4, 1),
     "offset is on (meta|cpu) but seed is on (cpu|meta)"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", range(len(PHILOX_BAD)))
def test_philox_uniform_errors(device, case):
    """The same error on the CPU and the meta (fake) kernel; the last case mixes meta with the CPU."""
    make, msg = PHILOX_BAD[case]
    with pytest.raises(RuntimeError, match=msg):
        ops.philox_uniform(*make(torch.arange(3, device=device), torch.zeros(3, dtype=torch.long, device=device)))


def test_philox_uniform_fake_kernel():
    seed, off = torch.arange(3), torch.zeros(3, dtype=torch.long)
    m = ops.philox_uniform(seed.to("meta"), off.to("meta"), 5, 2)
    assert m.shape == (3, 5) and m.dtype == torch.float32 and m.is_meta
    torch.library.opcheck(torch.ops.specmoe.philox_uniform.default, (seed, off, 5, 1))


# ---- greedy -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("bs,T,V", [(1, 1, 5), (3, 7, 5), (3, 7, 1000), (1, 37, 1000), (3, 37, 5)])
def test_greedy_matches_accept_greedy(kind, bs, T, V):
    for rep in range(3):
        logits, tokens, parent, valid = make_batch(bs, T, V, kind, seed=rep * 100 + T + V)
        seed, off = seeds_offsets(bs)
        path, n, bonus = ops.tree_accept(logits, tokens, parent, valid, temperature=0.0, seed=seed, offset=off)
        ref_path, ref_n, ref_bonus = R.accept_greedy(tokens, parent, valid, logits)
        assert torch.equal(path, pad_path(ref_path, T))
        assert torch.equal(n, ref_n)
        assert torch.equal(bonus, ref_bonus)
        r2 = R.tree_accept(logits, tokens, parent, valid, 0.0, 1.0, 0, seed, off)
        assert all(torch.equal(a, b) for a, b in zip((path, n, bonus), r2))
        assert torch.equal(off, seeds_offsets(bs)[1] + 1)


def test_greedy_dtypes_and_ties():
    # integer logits: many exact ties; the lowest index wins as in torch.argmax
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        logits, tokens, parent, valid = make_batch(3, 7, 50, "random", seed=5, dtype=dt)
        logits = logits.float().round().clamp(-2, 2).to(dt)
        seed, off = seeds_offsets(3)
        got = ops.tree_accept(logits, tokens, parent, valid, temperature=0.0, seed=seed, offset=off)
        ref = R.accept_greedy(tokens, parent, valid, logits)
        assert torch.equal(got[0], pad_path(ref[0], 7)) and torch.equal(got[2], ref[2])


# ---- sampled ------------------------------------------------------------------------------------------

SAMPLING = [(0.8, 0.9, 0), (1.0, 1.0, 0), (0.7, 0.5, 20), (1.3, 1.0, 5), (0.5, 0.95, 3), (2.0, 0.3, 1)]


def draw_friendly_tokens(logits, tokens, parent, valid, seed, off, temperature, top_p, top_k, rng):
    """Rewrites tokens so that children often carry their parent's draw (long accepted paths)."""
    bs, T, _ = logits.shape
    tokens = tokens.clone()
    for b in range(bs):
        for i in range(1, T):
            p = int(parent[b, i])
            if valid[b, i] and rng.random() < 0.7:
                tokens[b, i] = R.node_draw(logits[b, p], temperature, top_p, top_k,
                                           R.philox_bits24(int(seed[b]), int(off[b]), p))
    return tokens


@pytest.mark.parametrize("temperature,top_p,top_k", SAMPLING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", SHAPES)
def test_sampled_matches_reference(temperature, top_p, top_k, dtype, kind):
    rng = random.Random(11)
    for bs, T, V in [(1, 1, 5), (3, 7, 1000), (3, 37, 5)]:
        logits, tokens, parent, valid = make_batch(bs, T, V, kind, seed=T * V, dtype=dtype)
        seed, off = seeds_offsets(bs, base=T)
        tokens = draw_friendly_tokens(logits, tokens, parent, valid, seed, off, temperature, top_p, top_k, rng)
        ref = R.tree_accept(logits, tokens, parent, valid, temperature, top_p, top_k, seed, off)
        off0 = off.clone()
        got = ops.tree_accept(logits, tokens, parent, valid, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, offset=off)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
        assert torch.equal(off, off0 + 1)
        # the walk is the vectorized reference's: give it one-hot p at each node's draw
        ys = torch.tensor([[R.node_draw(logits[b, i], temperature, top_p, top_k,
                                        R.philox_bits24(int(seed[b]), int(off0[b]), i))
                            for i in range(T)] for b in range(bs)])
        p = torch.nn.functional.one_hot(ys, V).float()
        acc = R.accept_target_sampling(tokens, parent, valid, p, torch.rand(bs, T))
        assert torch.equal(got[0], pad_path(acc[0], T))
        assert torch.equal(got[1], acc[1]) and torch.equal(got[2], acc[2])


def test_sampled_ties_at_the_boundaries():
    """Heavily tied logits: top-k and top-p keep every token tied at the boundary (CPU op == reference)."""
    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randint(-3, 3, (4, 3, 64), generator=g).to(dt)
        tokens = torch.zeros(4, 3, dtype=torch.long)
        parent = torch.tensor([[-1, 0, 1]] * 4)
        valid = torch.ones(4, 3, dtype=torch.bool)
        for tp, tk in [(0.5, 0), (1.0, 3), (0.9, 10), (0.2, 2)]:
            seed, off = seeds_offsets(4)
            ref = R.tree_accept(logits, tokens, parent, valid, 1.0, tp, tk, seed, off)
            got = ops.tree_accept(logits, tokens, parent, valid, temperature=1.0, top_p=tp, top_k=tk,
                                  seed=seed, offset=off)
            assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_offset_advances_and_seeds_reproduce():
    logits, tokens, parent, valid = make_batch(2, 1, 1000, "chain", seed=1)
    seed, off = seeds_offsets(2)
    bon = []
    for _ in range(20):
        bon.append(ops.tree_accept(logits, tokens, parent, valid, temperature=1.0, seed=seed, offset=off)[2])
    assert torch.equal(off, seeds_offsets(2)[1] + 20)
    assert len({tuple(b.tolist()) for b in bon}) > 10            # fresh numbers each call
    seed2, off2 = seeds_offsets(2)
    again = [ops.tree_accept(logits, tokens, parent, valid, temperature=1.0, seed=seed2, offset=off2)[2]
             for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(bon, again))


def _first_token_counts(logits_row, temperature, top_p, top_k, n_req=2500, calls=8):
    """Histogram of the first emitted token over n_req * calls steps of a 3-node tree (root with two
    children carrying tokens 0 and 1): lossless acceptance emits y_root either way."""
    V = logits_row.shape[0]
    logits = logits_row.expand(n_req, 3, V).contiguous()
    tokens = torch.tensor([[0, 0, 1]] * n_req)
    parent = torch.tensor([[-1, 0, 0]] * n_req)
    valid = torch.ones(n_req, 3, dtype=torch.bool)
    seed = torch.arange(n_req, dtype=torch.long) * 1000003 + 17
    off = torch.zeros(n_req, dtype=torch.long)
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(calls):
        path, n, bonus = ops.tree_accept(logits, tokens, parent, valid, temperature=temperature, top_p=top_p,
                                         top_k=top_k, seed=seed, offset=off)
        first = torch.where(n > 0, tokens.gather(1, path[:, 1:2].clamp_min(0))[:, 0], bonus)
        counts += torch.bincount(first, minlength=V)
    return counts


def _chi2_p(counts, probs):
    from scipy.stats import chisquare
    support = probs > 0
    assert int(counts[~support].sum()) == 0, "tokens outside the support were drawn"
    ps = probs[support].double()
    exp = ps / ps.sum() * float(counts.sum())
    return float(chisquare(counts[support].double().numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.5, 1.0, 5),
                                                     (0.8, 0.8, 6)])
def test_chi_square_first_token(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(7)
    logits_row = torch.randn(12, generator=g) * 1.5
    counts = _first_token_counts(logits_row, temperature, top_p, top_k)
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    probs = torch.softmax(process_logits(logits_row[None], sp), -1)[0]
    assert _chi2_p(counts, probs) > 1e-3
    # a deliberately wrong rule (temperature ignored, no filtering) is rejected by the same test
    wrong = torch.softmax(logits_row * 1.0, -1) if temperature != 1.0 or top_p < 1 or top_k else \
        torch.softmax(logits_row * 0.8, -1)
    with pytest.raises(AssertionError):
        assert _chi2_p(counts, wrong) > 1e-3


# ---- argument errors ------------------------------------------------------------------------------------

def accept_args(device):
    """A valid (logits, tokens, parent, valid) + seed / offset of 2 requests x 3 nodes, on `device`."""
    logits, tokens, parent, valid = make_batch(2, 3, 10, "chain", seed=0)
    seed, off = seeds_offsets(2)
    return [t.to(device) for t in (logits, tokens, parent, valid)], dict(seed=seed.to(device), offset=off.to(device))


ACCEPT_BAD = [  # (args, kwargs) -> bad (args, kwargs), the message
    (lambda a, kw: (a, dict(kw, temperature=-0.1)), "temperature"),
    (lambda a, kw: (a, dict(kw, temperature=float("nan"))), "temperature"),
    (lambda a, kw: (a, dict(kw, temperature=1.0, top_p=0.0)), "top_p"),
    (lambda a, kw: (a, dict(kw, temperature=1.0, top_p=1.5)), "top_p"),
    (lambda a, kw: (a, dict(kw, temperature=1.0, top_k=-1)), "top_k"),
    (lambda a, kw: ([a[0][0]] + a[1:], kw), "logits"),
    (lambda a, kw: ([a[0].to(torch.float64)] + a[1:], kw), "logits"),
    (lambda a, kw: ([a[0].transpose(0, 1)] + [t.t().contiguous() for t in a[1:]], kw), "contiguous"),
    (lambda a, kw: ([a[0], a[1].int()] + a[2:], kw), "tokens"),
    (lambda a, kw: (a[:2] + [a[2][:, :2], a[3]], kw), "parent"),
    (lambda a, kw: (a[:3] + [a[3].long()], kw), "valid"),
    (lambda a, kw: (a, dict(kw, offset=kw["offset"][:1])), "offset"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("device", devices() + ["meta"])
@pytest.mark.parametrize("case", range(len(ACCEPT_BAD)))
def test_tree_accept_errors(device, case):
    """The same error on every backend (the meta kernel runs the very checks), before anything runs."""
    args, kw = accept_args(device)
    off0 = kw["offset"].clone()
    make, word = ACCEPT_BAD[case]
    bad_args, bad_kw = make(args, kw)
    with pytest.raises(RuntimeError, match=word):
        ops.tree_accept(*bad_args, **bad_kw)
    if device != "meta":
        assert torch.equal(kw["offset"], off0)           # nothing ran


@pytest.mark.bad_input
@pytest.mark.parametrize("odd", ["logits", "tokens", "parent", "valid", "seed", "offset"])
def test_tree_accept_meta_mixed_with_cpu_raises(odd):
    """One argument on meta, the rest on the CPU (before: offset on meta returned a garbage path)."""
    (logits, tokens, parent, valid), kw = accept_args("cpu")
    named = dict(logits=logits, tokens=tokens, parent=parent, valid=valid, **kw)
    named[odd] = named[odd].to("meta")
    message = "is on cpu but logits is on meta" if odd == "logits" else f"{odd} is on meta but logits is on cpu"
    with pytest.raises(RuntimeError, match=message):
        ops.tree_accept(named["logits"], named["tokens"], named["parent"], named["valid"], seed=named["seed"],
                        offset=named["offset"])


def test_tree_accept_meta_kernel():
    args, kw = accept_args("cpu")
    real = ops.tree_accept(*args, **kw)
    meta_args, meta_kw = accept_args("meta")
    for r, m in zip(real, ops.tree_accept(*meta_args, **meta_kw)):
        assert m.is_meta and m.shape == r.shape and m.dtype == r.dtype
    torch.library.opcheck(torch.ops.specmoe.tree_accept.default, (*args, 0.0, 1.0, 0, kw["seed"], kw["offset"]))


# ---- kv_compact -------------------------------------------------------------------------------------------

def random_accept(bs, T, P, rng, kind="random"):
    """Random trees and an accepted root path in each: (path [bs, P] -1 padded, n [bs])."""
    path = torch.full((bs, P), -1, dtype=torch.long)
    n = torch.zeros(bs, dtype=torch.long)
    for b in range(bs):
        par, val = make_parent(kind, T, rng)
        node = rng.choice([i for i in range(T) if val[i]])
        chain = []
        while node > 0:
            chain.append(node)
            node = par[node]
        chain = [0] + chain[::-1]
        path[b, :len(chain)] = torch.tensor(chain)
        n[b] = len(chain) - 1
    return path, n


def make_cache(L, bs, Hk, d, S, dtype, device="cpu", seed=0):
    c = KVCache(L, bs, Hk, d, S, dtype, device)
    g = torch.Generator().manual_seed(seed)
    for t in c.k + c.v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", SHAPES)
def test_kv_compact_matches_reference(dtype, kind):
    rng = random.Random(hash(kind) % 1000)
    for bs, T, d in [(1, 1, 8), (3, 7, 16), (4, 37, 6)]:
        S = 64
        L, Hk = 3, 2
        prefix = [rng.randrange(0, S - T) for _ in range(bs)]
        path, n = random_accept(bs, T, T, rng, kind)
        ours = make_cache(L, bs, Hk, d, S, dtype, seed=bs)
        lengths = torch.tensor(prefix, dtype=torch.long)
        r_cache, r_len = R.kv_compact(ours.k + ours.v, lengths, path, n)
        ops.kv_compact(ours.k + ours.v, lengths, path, n)
        for a, c in zip(ours.k + ours.v, r_cache):
            assert torch.equal(a, c)
        assert lengths.tolist() == r_len.tolist()


def kv_args(device="cpu"):
    """A 2-layer cache (K and V: 4 tensors [2, 2, 16, 8]) on `device`, lengths [3, 4], a valid path / n."""
    c = make_cache(2, 2, 2, 8, 16, torch.float32)
    return ([t.to(device) for t in c.k + c.v], torch.tensor([3, 4], device=device),
            torch.tensor([[0, 1, 3, -1, -1], [0, 2, 4, -1, -1]], device=device), torch.tensor([2, 2], device=device))


KV_BAD = [  # every backend (meta included): (cache, lengths, path, n) -> bad arguments, the message
    (lambda c, l, p, n: (c[:1] + [c[1][:, :1].contiguous()], l, p, n), "cache\\[1\\]"),
    (lambda c, l, p, n: (c[:1] + [c[1].half()], l, p, n), "cache\\[1\\]"),
    (lambda c, l, p, n: (c[:1] + [c[1].transpose(2, 3)], l, p, n), "cache\\[1\\]"),
    (lambda c, l, p, n: (c, l.int(), p, n), "lengths"),
    (lambda c, l, p, n: (c, l[:1], p, n), "lengths"),
    (lambda c, l, p, n: (c, l, p.int(), n), "path"),
    (lambda c, l, p, n: (c, l, p[0], n), "path"),
    (lambda c, l, p, n: (c, l, p, n[:1]), "n_accepted"),
    (lambda c, l, p, n: ([], l, p, n), "cache"),
    (lambda c, l, p, n: (c * 65, l, p, n), "cache"),
    # the same tensor twice would be compacted twice (before: silently corrupted)
    (lambda c, l, p, n: (c + c[2:3], l, p, n), "cache\\[2\\] and cache\\[4\\] share memory"),
    (lambda c, l, p, n: ([c[0], c[0][:, :, :]], l, p, n), "cache\\[0\\] and cache\\[1\\] share memory"),
    (lambda c, l, p, n: (overlapping_pair(c[0]), l, p, n), "cache\\[0\\] and cache\\[1\\] share memory"),
    (lambda c, l, p, n: (c, l, p, l), "lengths and n_accepted share memory"),
]


def overlapping_pair(t):
    """Two cache-shaped views of one buffer that overlap by all but one row."""
    buf = torch.empty(t.numel() + t.shape[-1], dtype=t.dtype, device=t.device)
    return [buf[:t.numel()].view(t.shape), buf[t.shape[-1]:].view(t.shape)]


KV_VALUE_BAD = [  # the CPU reads the values (CUDA skips such moves instead): (lengths, path, n), the message
    (lambda l, p, n: (l, p, torch.tensor([2, 5])), "n_accepted"),
    (lambda l, p, n: (l, torch.tensor([[0, 1, 3, -1, -1], [0, 0, 4, -1, -1]]), n), "path"),
    (lambda l, p, n: (l, torch.tensor([[1, 1, 3, -1, -1], [0, 2, 4, -1, -1]]), n), "path"),
    (lambda l, p, n: (torch.tensor([3, 14]), p, n), "capacity"),
    (lambda l, p, n: (torch.tensor([3, 9]), torch.tensor([[0, 1, 3, -1, -1], [0, 2, 9, -1, -1]]), n), "path"),
    (lambda l, p, n: (torch.tensor([-1, 4]), p, n), "capacity"),
    # a node visited twice by a path (before: accepted, its K/V copied twice)
    (lambda l, p, n: (l, torch.tensor([[0, 3, 3, -1, -1], [0, 2, 4, -1, -1]]), n),
     "request 0: node 3 appears twice in path"),
    (lambda l, p, n: (l, torch.tensor([[0, 4, 2, 4, -1], [0, 2, 4, -1, -1]]), torch.tensor([3, 2])),
     "request 0: node 4 appears twice in path"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("device", devices() + ["meta"])
@pytest.mark.parametrize("case", range(len(KV_BAD)))
def test_kv_compact_errors(device, case):
    """The same error on every backend; a bad call leaves the cache and lengths untouched."""
    cache, lengths, path, n = kv_args(device)
    before = [t.clone() for t in cache + [lengths]]
    make, word = KV_BAD[case]
    with pytest.raises(RuntimeError, match=word):
        ops.kv_compact(*make(cache, lengths, path, n))
    if device != "meta":
        assert all(torch.equal(t, b) for t, b in zip(cache + [lengths], before))


@pytest.mark.bad_input
@pytest.mark.parametrize("case", range(len(KV_VALUE_BAD)))
def test_kv_compact_value_errors_leave_cache_untouched(case):
    cache, lengths, path, n = kv_args()
    make, word = KV_VALUE_BAD[case]
    lengths, path, n = make(lengths, path, n)
    before = [t.clone() for t in cache + [lengths]]
    with pytest.raises(RuntimeError, match=word):
        ops.kv_compact(cache, lengths, path, n)
    assert all(torch.equal(t, b) for t, b in zip(cache + [lengths], before))


@pytest.mark.bad_input
@pytest.mark.parametrize("odd", ["lengths", "path", "n_accepted", "cache[1]"])
def test_kv_compact_meta_mixed_with_cpu_raises(odd):
    """One argument on meta, the rest on the CPU (before: lengths on meta did nothing, silently)."""
    cache, lengths, path, n = kv_args()
    named = dict(lengths=lengths, path=path, n_accepted=n)
    if odd == "cache[1]":
        cache[1] = cache[1].to("meta")
        message = "cache\\[1\\] is on meta but cache\\[0\\] is on cpu"
    else:
        named[odd] = named[odd].to("meta")
        message = f"{odd} is on meta but cache\\[0\\] is on cpu"
    with pytest.raises(RuntimeError, match=message):
        ops.kv_compact(cache, named["lengths"], named["path"], named["n_accepted"])


def test_kv_compact_views_of_one_buffer_and_slots_in_place():
    """Disjoint views of one buffer are separate tensors; path[b, j] == j is a slot already in place and may
    repeat a moving node (a drafter's never-fed leaf: drafters.compact_fed_path)."""
    cache, lengths, path, n = kv_args()
    buf = torch.stack(cache)                                    # one storage, 4 disjoint views
    views = list(buf.unbind(0))
    fed = torch.tensor([[0, 2, 2, -1, -1], [0, 3, 4, 3, -1]])   # request 0: node 2 moves to 1, slot 2 stays
    n3 = torch.tensor([2, 3])
    r_cache, r_len = R.kv_compact(cache, lengths, fed, n3)
    ops.kv_compact(views, lengths, fed, n3)
    assert all(torch.equal(a, b) for a, b in zip(views, r_cache)) and torch.equal(lengths, r_len)
    meta = [t.to("meta") for t in cache]
    ops.kv_compact(meta, lengths.to("meta"), path.to("meta"), n.to("meta"))   # the meta kernel: checks only
    torch.library.opcheck(torch.ops.specmoe.kv_compact.default, (cache, lengths.clone(), path, n))


# ---- GPU ------------------------------------------------------------------------------------------------

def _cpu_and_cuda(logits, tokens, parent, valid, temperature, top_p, top_k, seed, off):
    oc = off.clone()
    cpu = ops.tree_accept(logits, tokens, parent, valid, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, offset=oc)
    og = off.cuda()
    gpu = ops.tree_accept(logits.cuda(), tokens.cuda(), parent.cuda(), valid.cuda(), temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=seed.cuda(), offset=og)
    assert torch.equal(og.cpu(), oc)
    return cpu, tuple(t.cpu() for t in gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("V", [151936, 151937, 1000, 5])
def test_cuda_greedy_equals_cpu(dtype, V):
    for kind in SHAPES:
        logits, tokens, parent, valid = make_batch(3, 7, V, kind, seed=V % 97, dtype=dtype)
        seed, off = seeds_offsets(3)
        cpu, gpu = _cpu_and_cuda(logits, tokens, parent, valid, 0.0, 1.0, 0, seed, off)
        assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("temperature,top_p,top_k", SAMPLING + [(0.6, 0.9, 50), (1.0, 0.999, 0)])
@pytest.mark.parametrize("V", [151936, 151937, 1000])
def test_cuda_sampled_equals_cpu(dtype, temperature, top_p, top_k, V):
    rng = random.Random(V)
    logits, tokens, parent, valid = make_batch(2, 5, V, "random", seed=V % 89, dtype=dtype, scale=4.0)
    seed, off = seeds_offsets(2)
    # children often carry their parent's draw (exercise accepted paths)
    tokens = draw_friendly_tokens(logits, tokens, parent, valid, seed, off, temperature, top_p, top_k, rng)
    cpu, gpu = _cpu_and_cuda(logits, tokens, parent, valid, temperature, top_p, top_k, seed, off)
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", ["1", "2", "4", "8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_every_cluster_size_equals_cpu(cluster, dtype, monkeypatch):
    """The kernel splits a node's vocabulary over 1-8 CTAs (automatic by batch size); force each."""
    monkeypatch.setenv("SPECMOE_ACCEPT_CLUSTER", cluster)
    rng = random.Random(int(cluster))
    for temperature, top_p, top_k in [(0.0, 1.0, 0), (0.8, 0.9, 0), (0.7, 0.5, 20), (1.0, 1.0, 0), (1.2, 0.95, 40)]:
        for V in (151936, 3001, 300):
            logits, tokens, parent, valid = make_batch(2, 5, V, "random", seed=V, dtype=dtype, scale=3.0)
            seed, off = seeds_offsets(2)
            if temperature > 0:
                tokens = draw_friendly_tokens(logits, tokens, parent, valid, seed, off, temperature, top_p, top_k,
                                              rng)
            cpu, gpu = _cpu_and_cuda(logits, tokens, parent, valid, temperature, top_p, top_k, seed, off)
            assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


@pytest.mark.gpu
def test_cuda_sampled_ties_and_nonfinite():
    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randint(-3, 3, (4, 3, 4096 + 13), generator=g).to(dt)
        logits[0, 0, 5] = float("-inf")
        logits[1, 0, :] = float("-inf")                 # no finite logit: the argmax (index 0)
        logits[2, 1, 7] = float("nan")
        tokens = torch.zeros(4, 3, dtype=torch.long)
        parent = torch.tensor([[-1, 0, 1]] * 4)
        valid = torch.ones(4, 3, dtype=torch.bool)
        for temperature, tp, tk in [(1.0, 0.5, 0), (1.0, 1.0, 3), (0.9, 0.9, 10), (2.0, 0.2, 2), (0.0, 1.0, 0)]:
            seed, off = seeds_offsets(4)
            cpu, gpu = _cpu_and_cuda(logits, tokens, parent, valid, temperature, tp, tk, seed, off)
            assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_replay(temperature):
    bs, T, V = 4, 16, 151936
    logits, tokens, parent, valid = make_batch(bs, T, V, "random", seed=2, dtype=torch.bfloat16)
    seed, off = seeds_offsets(bs)
    args = [t.cuda() for t in (logits, tokens, parent, valid)]
    seed_d, off_d = seed.cuda(), off.cuda()
    kw = dict(temperature=temperature, top_p=0.9, top_k=0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.tree_accept(*args, **kw, seed=seed_d, offset=off_d)          # warm-up (advances offset)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.tree_accept(*args, **kw, seed=seed_d, offset=off_d)
    torch.cuda.synchronize()
    start = off_d.clone()                                    # capture does not run the kernels
    for r in range(3):
        g.replay()
        torch.cuda.synchronize()
        o = (start + r).cpu()
        ref = ops.tree_accept(logits, tokens, parent, valid, **kw, seed=seed, offset=o)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(out, ref))
        assert torch.equal(off_d.cpu(), start.cpu() + r + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 6),
                                     (torch.bfloat16, 3)])
def test_cuda_kv_compact_equals_cpu(dtype, d):
    rng = random.Random(d)
    bs, T, S, L, Hk = 5, 37, 96, 3, 4
    cpu = make_cache(L, bs, Hk, d, S, dtype, seed=1)
    gpu = [t.cuda() for t in cpu.k + cpu.v]
    prefix = torch.tensor([rng.randrange(0, S - T) for _ in range(bs)])
    path, n = random_accept(bs, T, T, rng)
    lc = prefix.clone()
    ops.kv_compact(cpu.k + cpu.v, lc, path, n)
    lg = prefix.cuda()
    ops.kv_compact(gpu, lg, path.cuda(), n.cuda())
    torch.cuda.synchronize()
    for a, b in zip(cpu.k + cpu.v, gpu):
        assert torch.equal(a, b.cpu())
    assert torch.equal(lg.cpu(), lc)


@pytest.mark.gpu
def test_cuda_kv_compact_graph_and_out_of_range():
    bs, S = 2, 16
    c = make_cache(2, bs, 2, 8, S, torch.bfloat16, device="cuda")
    cache = c.k + c.v
    before = [t.clone() for t in cache]
    lengths = torch.tensor([3, 14], device="cuda")
    # request 1 points outside the cache: skipped on the device, no fault; its length is capped at S
    path = torch.tensor([[0, 1, 3, -1], [0, 2, 7, -1]], device="cuda")
    n = torch.tensor([2, 2], device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.kv_compact(cache, lengths, path, n)
    g.replay()
    torch.cuda.synchronize()
    assert lengths.tolist() == [6, 16]
    for t, b in zip(cache, before):
        assert torch.equal(t[0, :, 4], b[0, :, 4]) and torch.equal(t[0, :, 5], b[0, :, 6])
        assert torch.equal(t[1], b[1])

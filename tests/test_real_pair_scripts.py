"""CPU smoke tests of issue 21's real-pair pipeline: scripts/make_corpus.py (on a small local subset, with the
embedded tiny tokenizer), scripts/train_pair.py --smoke (loaded back with load_model and transformers),
bench/bench_real_pair.py --smoke, and the SentencePiece -> tokenizers conversion (on a synthetic model against
an independent implementation of SentencePiece's BPE encoding)."""
from __future__ import annotations

import json
import lzma
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

import make_corpus  # noqa: E402
import train_pair  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_TOK = ROOT / "python" / "specmoe_ext" / "assets" / "tiny" / "target"


# ---- SentencePiece conversion ---------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, value) -> bytes:
    key = _varint(num << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 5:
        return key + value
    return key + _varint(len(value)) + value


def synthetic_sp_model(pieces: list[tuple[str, float, int]], model_type: int = 2, remove_ws: int = 0) -> bytes:
    """A SentencePiece ModelProto: BPE (model_type 2), byte fallback, identity normalizer with the dummy
    prefix, whitespace kept (remove_extra_whitespaces = remove_ws)."""
    body = b"".join(_field(1, 2, _field(1, 2, p.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, t))
                    for p, s, t in pieces)
    trainer = _field(3, 0, model_type) + _field(35, 0, 1)
    norm = _field(1, 2, b"identity") + _field(3, 0, 1) + _field(4, 0, remove_ws)
    return body + _field(2, 2, trainer) + _field(3, 2, norm)


def sp_bpe_reference(text: str, pieces: list[tuple[str, float, int]]) -> list[int]:
    """SentencePiece's BPE encoding, written from its description: '▁' prefix + spaces escaped, start from
    characters, repeatedly merge the adjacent pair whose concatenation is the best-scoring normal piece
    (leftmost on ties), then unknown symbols fall back to their UTF-8 bytes."""
    if not text:
        return []                                   # SentencePiece encodes "" as nothing (no dummy prefix)
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    score = {p: s for p, s, t in pieces if t == 1}
    sym = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(sym) - 1):
            s = score.get(sym[i] + sym[i + 1])
            if s is not None and (best is None or s > best[0]):
                best = (s, i)
        if best is None:
            break
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    out = []
    for s in sym:
        out += [ids[s]] if s in score else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


SYN_PIECES = ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
              # scores out of id order (as Mixtral's "▁▁" at id 259 with score -1e9): merges go by score
              + [(p, -float(s), 1) for p, s in zip(
                  ["ab", "\u2581a", "bc", "\u2581ab", "abc", "cd", "\u2581\u2581", "dd", "\u2581c", "abcd", "bcd",
                   "\u2581b", "ca", "\u2581\u2581\u2581\u2581", "da"], [3, 9, 1, 4, 12, 2, 15, 6, 8, 5, 14, 7, 10, 11, 13])]
              + [(c, -100.0 - i, 1) for i, c in enumerate(["\u2581", "a", "b", "c", "d"])])


def test_sentencepiece_conversion_matches_the_bpe_algorithm():
    tok = make_corpus.sentencepiece_tokenizer(synthetic_sp_model(SYN_PIECES))
    sp = make_corpus.parse_sentencepiece(synthetic_sp_model(SYN_PIECES))
    assert (sp.model_type, sp.byte_fallback, sp.add_dummy_prefix, sp.remove_extra_whitespaces) == (2, True, True, False)
    assert [p for p, _, _ in sp.pieces] == [p for p, _, _ in SYN_PIECES]
    assert sp.pieces[-1][1] == pytest.approx(-104.0)
    rng = random.Random(0)
    texts = ["", "ab", " abcd", "abc  dd", "é", "x\ty", "<s>ab</s>"] + [
        "".join(rng.choice("abcd  é") for _ in range(rng.randrange(1, 14))) for _ in range(300)]
    tok.encode_special_tokens = True               # literal "<s>" is text, as in SentencePiece
    for t in texts:
        got = tok.encode(t, add_special_tokens=False).ids
        assert got == sp_bpe_reference(t, SYN_PIECES), t
        assert tok.decode(got) == t, t             # byte fallback and the dummy prefix round-trip
    tok.encode_special_tokens = False
    assert tok.encode("ab").ids[0] == 1            # the post-processor adds <s>, like Mixtral's HF tokenizer
    assert tok.decode(tok.encode("ab ab").ids) == "ab ab"   # <s> is special: skipped on decode


def test_sentencepiece_conversion_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="BPE"):
        make_corpus.sentencepiece_tokenizer(synthetic_sp_model(SYN_PIECES, model_type=1))      # unigram
    with pytest.raises(ValueError, match="remove_extra_whitespaces"):
        make_corpus.sentencepiece_tokenizer(synthetic_sp_model(SYN_PIECES, remove_ws=1))


# ---- make_corpus ------------------------------------------------------------------------------------------

PROSE = ("The expert budget caps how many experts a verification forward may read per layer. "
         "Each document here is prose written for this test, long enough to pass the size filter.\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    (src / "prose").mkdir()
    for i, topic in enumerate(["routing", "trees", "caches", "drafts"]):
        (src / "prose" / f"{topic}.md").write_text("".join(f"{topic} {j}: {PROSE}" for j in range(12 + 6 * i)))
    (src / "prose" / "copy.md").write_text((src / "prose" / "routing.md").read_text())     # exact duplicate
    (src / "prose" / "gen.md").write_text("This file is automatically generated.\n" + PROSE * 5)
    (src / "code").mkdir()
    (src / "code" / "table.c").write_text("static const int t[] = {\n" + "0x1f, 0x2e, 0x3d, 0x4c,\n" * 80 + "};\n")
    out = tmp_path_factory.mktemp("corpus")
    rc = make_corpus.main(["--sources", "pystdlib", "--code-mib", "0.35", "--local", f"prose={src / 'prose'}",
                           "--local", f"code={src / 'code'}", "--local-license", "test fixture (CC0)",
                           "--tokenizer", str(TINY_TOK), "--heldout-frac", "0.2", "--out", str(out)])
    assert rc == 0
    return out


def _docs(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_make_corpus_filters_dedups_and_splits_by_subsystem(corpus):
    m = json.loads((corpus / "manifest.json").read_text())
    dropped = m["filters_and_dedup_dropped"]
    assert dropped["local prose: exact duplicate"] == 1
    assert dropped["local prose: generated"] == 1
    assert dropped["local code: hex table"] == 1
    assert m["sources"]["pystdlib"]["license"].startswith("PSF-2.0")
    assert m["sources"]["local"]["license"] == "test fixture (CC0)"
    train, held = _docs(corpus / "train.jsonl.xz"), _docs(corpus / "heldout.jsonl.xz")
    assert m["sizes"]["train"]["documents"] == len(train) and m["sizes"]["heldout"]["documents"] == len(held)
    tsubs, hsubs = {d["subsystem"] for d in train}, {d["subsystem"] for d in held}
    assert tsubs.isdisjoint(hsubs), "a subsystem is in both splits"
    assert {d["kind"] for d in held} == {"code", "prose"} == {d["kind"] for d in train}
    for group, g in m["split"]["groups"].items():
        assert 0 < g["heldout_bytes"] < g["total_bytes"], group
    assert all(d["license"] for d in train + held)
    texts = [d["text"] for d in train + held]
    assert len(texts) == len(set(texts))
    assert sum(len(d["text"].encode()) for d in train if d["source"] == "pystdlib") <= 0.35 * 2**20 + 300_000
    tok = json.loads((corpus / "tokenizer" / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|endoftext|>" and m["tokenizer"]["vocab_size"] == 2048
    # the token counts are those of the tokenizer written beside the corpus (+ the EOS per document)
    tok, bos, eos = train_pair.corpus_tokenizer(corpus)
    ids = train_pair.tokenize_docs(tok, [d["text"] for d in held if d["kind"] == "code"], bos, eos)
    assert m["sizes"]["heldout"]["tokens"]["code/pystdlib"] == ids.size


# ---- train_pair -------------------------------------------------------------------------------------------

def test_fast_forward_equals_the_library_forward_in_logits_and_gradients():
    from specmoe_ext.models.config import ModelArgs
    from specmoe_ext.models.model import MoEControl, Transformer
    from specmoe_ext.models.presets import _MIXTRAL_8X7B
    mixtral = dict(_MIXTRAL_8X7B, vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    for cfg in (train_pair.target_config(300, 1, 2, smoke=True), train_pair.draft_config(300, 1, 2, smoke=True),
                mixtral):
        m = Transformer(ModelArgs.from_hf_config(cfg)).init_random(std=0.05, seed=3)
        x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))

        def run(fn):
            m.zero_grad(set_to_none=True)
            out = fn()
            out.square().mean().backward()
            return out.detach(), [p.grad.clone() for p in m.parameters()]

        ref, gref = run(lambda: m(x, torch.arange(40).expand(3, 40),
                                  moe=MoEControl(router=train_pair._RecordingRouter(), impl="loop"))[0])
        for mode in ("grouped", "capacity"):
            got, g = run(lambda: train_pair.fast_forward(m, x, mode, capacity_factor=4.0))
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
            for a, b in zip(g, gref):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-3)
    # a small capacity drops pairs (and says so); the grouped dispatch never does
    m = Transformer(ModelArgs.from_hf_config(train_pair.target_config(300, 1, 2, smoke=True))).init_random(seed=3)
    stats: dict = {}
    train_pair.fast_forward(m, x, "capacity", 0.5, stats)
    assert all(float(d) > 0.3 for d in stats["dropped"])
    check = train_pair.check_grouped_dispatch(m, x)
    assert check["ok"] and check["grad_rel_diff"] < 1e-5


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pair")
    assert train_pair.main(["--corpus", str(corpus), "--out", str(out), "--smoke", "--steps-target", "40",
                            "--steps-draft", "12", "--threads", "1"]) == 0
    return out


def test_train_pair_smoke_learns_saves_and_is_deterministic(corpus, trained, tmp_path):
    from specmoe_ext.models import load_model, load_tokenizer
    info = json.loads((trained / "training.json").read_text())
    t = info["target"]
    assert t["steps"] == 40 and not t["stopped_early"] and t["forward"] == "grouped"
    ce = info["heldout_ce_16x256"]
    assert ce["target_code"] < 7.62 - 0.5 and ce["draft_code"] < 7.62 - 0.2, ce   # ln(2048) = 7.62: uniform
    assert info["grouped_dispatch_check"]["ok"]
    target, draft = load_model(trained / "target"), load_model(trained / "draft")
    assert (info["target_parameters"], info["draft_parameters"]) == (target.num_parameters(), draft.num_parameters())
    assert info["target_active_parameters"] < info["target_parameters"]
    assert target.args.architecture == "Qwen3MoeForCausalLM" and target.args.n_experts == 8 and target.args.top_k == 2
    assert draft.args.architecture == "Qwen3ForCausalLM" and draft.args.vocab_size == target.args.vocab_size
    tok = load_tokenizer(trained / "target")
    assert 0 in tok.eos_token_ids
    # the saved (bf16) target gives held-out CE close to what training measured on the float32 weights
    held = torch.from_numpy(train_pair.corpus_tokens(corpus, None)["heldout/code"])
    assert abs(train_pair.eval_ce(target, held, 64, 16, fast=True) - ce["target_code"]) < 0.05
    # same seed and arguments: the same bytes
    again = tmp_path / "again"
    assert train_pair.main(["--corpus", str(corpus), "--out", str(again), "--smoke", "--steps-target", "40",
                            "--steps-draft", "12", "--threads", "1"]) == 0
    for name in ("target", "draft"):
        assert (again / name / "model.safetensors").read_bytes() == (trained / name / "model.safetensors").read_bytes()
    # a finished run is not redone
    stamp = (trained / "training.json").stat().st_mtime_ns
    assert train_pair.main(["--corpus", str(corpus), "--out", str(trained), "--smoke", "--steps-target", "40",
                            "--steps-draft", "12", "--threads", "1"]) == 0
    assert (trained / "training.json").stat().st_mtime_ns == stamp


def test_trained_folder_is_a_standard_hf_checkpoint(trained):
    transformers = pytest.importorskip("transformers")
    from specmoe_ext.models import load_model
    ours = load_model(trained / "target")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(trained / "target"), dtype=torch.float32).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x, torch.arange(24).expand(2, 24))[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---- bench_real_pair --------------------------------------------------------------------------------------

def test_bench_real_pair_smoke(corpus, trained, tmp_path, monkeypatch):
    import bench_real_pair
    import common
    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)   # --out-dir sets it: restored afterwards
    out = tmp_path / "results"
    assert bench_real_pair.main(["--smoke", "--target", str(trained / "target"), "--draft", str(trained / "draft"),
                                 "--corpus", str(corpus), "--out-dir", str(out)]) == 0
    (path,) = out.glob("realpair_*.json")
    doc = json.loads(path.read_text())
    assert not doc["partial"]
    rows = doc["rows"]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    by = lambda s: [r for r in rows if r["section"] == s]  # noqa: E731
    ppl = {r["kind"]: r for r in by("ppl")}
    assert set(ppl) == {"code", "prose"}
    for r in ppl.values():
        assert 1 < r["target_ppl"] < 2048 and 1 < r["draft_ppl"] < 4096 and 0 <= r["draft_target_top1_agreement"] <= 1
    acc = by("accept")
    cells = {(r["kind"], r["temperature"], r["drafter"], r["tree"]) for r in acc}
    trees = ["chain:4", "static:3,2,1", "dynamic:topk=4,depth=5,tokens=16"]
    assert cells == {(k, t, d, tr) for k in ("code", "prose") for t in (0.0, 1.0) for d in ("model", "self", "ngram")
                     for tr in trees}
    for r in acc:
        assert 1.0 <= r["acceptance_length"] <= 1 + bench_real_pair.TreeSpec.parse(r["tree"]).max_depth
        if r["temperature"] == 0.0:        # float32 on the CPU: every drafter and tree is lossless
            assert r["matches_autoregressive"], r
    bud = by("budget")
    assert {(r["kind"], r["policy"], r["budget"]) for r in bud} == {
        (k, p, b) for k in ("code", "prose") for p, b in [(None, None), ("substitute", 2), ("truncate", 2)]}
    for r in bud:
        assert 0 <= r["token_agreement"] <= 1 and r["acceptance_ratio"] > 0
        if r["budget"] is not None:
            assert 0 <= r["fraction_before_divergence"] <= r["token_agreement"] + 1e-9
            assert r["experts_loaded_mean"] <= 2 + 1e-9            # B = 2 experts read per layer
    ad = by("adaptive")
    assert len(ad) == 4 and all(r["nodes_verified_per_step"] <= r["nodes_drafted_per_step"] for r in ad)
    assert doc["summary"]["acceptance_length_code_dynamic16"] == next(
        r["acceptance_length"] for r in acc if (r["kind"], r["temperature"], r["drafter"], r["tree"])
        == ("code", 0.0, "model", trees[2]))
    pytest.importorskip("matplotlib")
    assert Path(str(path)[:-5] + "_budget.png").stat().st_size > 10_000


def test_h200_script_has_the_realpair_stage():
    text = (ROOT / "scripts" / "h200_run.sh").read_text()
    assert "realpair|realpair-train|realpair-bench)" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "h200_run.sh")]).returncode == 0

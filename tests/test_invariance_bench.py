"""bench/bench_invariance.py on the CPU: the comparison is exact where the shapes agree, and it names the first
component that differs where they do not."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_invariance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(tmp_path, *args):
    assert bench_invariance.main(["--device", "cpu", "--out-dir", str(tmp_path), "--prompt-len", "9", *args]) == 0
    (path,) = tmp_path.glob("invariance_*.json")
    return json.loads(path.read_text())


def test_same_shapes_are_bitwise_equal(tmp_path):
    """bs = 1, T = 1: the verify forward IS a decode step, and decoding alone IS the batch: every component of
    every layer equal bit for bit (a control: the comparison itself adds no difference)."""
    doc = _run(tmp_path, "--batch-size", "1", "--tokens", "1")
    s = doc["summary"]
    assert s["verify_vs_decode_first_difference"] is None and s["batch_vs_alone_first_difference"] is None
    assert s["verify_vs_decode_logits_bitwise"] and s["verify_vs_decode_argmax_agreement"] == 1.0
    comps = [r["component"] for r in doc["rows"] if r["comparison"] == "verify_vs_decode"]
    assert comps[:5] == ["L0.attention_norm", "L0.qkv_proj", "L0.attention_core", "L0.o_proj", "L0.attention"]
    assert "L0.router" in comps and comps[-2:] == ["final_norm", "logits"]
    assert all(r["bitwise_equal"] and r["max_abs_diff"] == 0 for r in doc["rows"])


def test_reports_where_verification_differs(tmp_path):
    """T = 6 tokens in one forward: the rows are consistent (bitwise_equal <=> max |diff| = 0), the summary's
    first difference is the first unequal component in forward order, and the embedding's RMSNorm (a per-row
    op on identical rows) is never where it starts."""
    doc = _run(tmp_path, "--batch-size", "3", "--tokens", "6")
    rows = [r for r in doc["rows"] if r["comparison"] == "verify_vs_decode"]
    assert all(r["bitwise_equal"] == (r["max_abs_diff"] == 0) for r in rows)
    first = next((r["component"] for r in rows if not r["bitwise_equal"]), None)
    assert doc["summary"]["verify_vs_decode_first_difference"] == first and first != "L0.attention_norm"
    assert doc["summary"]["verify_vs_decode_argmax_agreement"] > 0.9


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        bench_invariance.main(["--device", "cpu", "--tokens", "0"])

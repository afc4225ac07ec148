"""The `specmoe` command (also `python -m specmoe_ext`).

Shape legend: bs prompts in one batch (one per --prompt), P tokens of the longest prompt, N generated tokens
per prompt (<= --max-new-tokens), S KV-cache slots per request.

    specmoe generate [--model DIR | --preset NAME] [--prompt TEXT ...] [--max-new-tokens N]
                     [--temperature T] [--top-p P] [--top-k K] [--seed S] [--dtype D] [--device DEV]
                     [--threads N] [--check-weights] [--allow-long-context]
                     [--no-cuda-graph] [--json] [--no-progress]
                     [--draft model|model:DIR|self[:N]|ngram[:N]|eagle:DIR|mtp] [--tree SPEC] [--accept RULE]
                     [--budget B[,B...]] [--budget-policy substitute|truncate] [--budget-weights uniform|path]
                     [--no-protect-root] [--spec fixed|auto] [--spec-candidates 'k=0,1,2,4;budget=none,32']
                     [--spec-test-steps N] [--profile profile.json] [--profile-alpha A]
    specmoe plan     [--model DIR | --preset NAME] [--draft-model DIR] [--device DEV] [--dtype D] [--threads N]
                     [--max-bs N] [--n-toks 1,4,8] [--budgets none,B,...] [--ctx N] [--repeats R]
                     [--ridge-point RP] [--out profile.json] [--plot plan.png] [--json]
    specmoe demo     autoregressive vs speculative vs speculative + expert budget on the embedded `tiny` pair
    specmoe models   list the presets and the supported checkpoint architectures
    specmoe --version

With no --model/--preset, `generate` runs the embedded `tiny` MoE model (CPU is fine). Several --prompt
flags make one batch. Random-weight presets have no tokenizer: their prompt is encoded with the tiny
model's tokenizer (its ids are valid in every preset's vocabulary) and only token ids are reported.
--draft turns on speculative decoding (speculative/engine.py); `--draft model` means the preset's bundled draft
model (the `tiny` preset has one), `model:DIR` any checkpoint folder sharing the target's vocabulary.

`--spec auto` (with --draft): a Cascade controller (speculative/controller.py) picks every step's chain length K
(0 = a plain autoregressive step through the same engine and cache; greedy output stays autoregressive) and
expert budget from --spec-candidates, by measured step throughput; --json reports the settings over time and
the per-candidate utilities. `specmoe plan` measures ~20 points of the MoESD performance model
(speculative/perf_model.py) on the real model, fits it, and saves the profile that `--profile` warm-starts from.

Bad input is a one-line `specmoe <cmd>: ...` error naming the flag, key or file, raised before the model is
loaded: every run first reads the config and tokenizer only, builds its engines on a shape-only ("meta")
copy of the target (that checks --tree / --draft / --budget / --spec-candidates / --profile with the
library's own checks), checks the positions (prompt + --max-new-tokens <= max_position_embeddings, unless
--allow-long-context), the cache capacity (sliding-window limits) and the memory the run allocates (weights +
KV caches vs free GPU memory or the host's MemAvailable), and only then loads. CPU threads: --threads N, else
OMP_NUM_THREADS when set, else 1 for models under 100M parameters (loader.default_cpu_threads).

Structure: each subcommand is an (add_arguments, run) pair in COMMANDS; later features add flags to a
subparser through `build_parser()` (e.g. --draft/--tree/--budget on generate) or add subcommands.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from . import __version__

if TYPE_CHECKING:
    from .models import ModelArgs, Tokenizer

EXIT_USAGE = 2
DEFAULT_PROMPT = "Return a new"
DEFAULT_CANDIDATES = "k=0,1,2,4"
DEFAULT_TREE = "chain:4"
DTYPES = ["auto", "float32", "bfloat16", "float16"]


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default (unless None / False, or the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "(default" in text):
            return text
        return f"{text} (default: %(default)s)"


def _fail(cmd: str, why: Any) -> NoReturn:
    raise SystemExit(f"specmoe {cmd}: {why}")


# ---- flags ----------------------------------------------------------------------------------------------

def _add_source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder")
    src.add_argument("--preset", metavar="NAME", help="named model (see `specmoe models`; default: tiny)")


def _add_runtime_args(p: argparse.ArgumentParser, seed_help: str) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, metavar="S", help=seed_help)
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: OMP_NUM_THREADS if set, else 1 for models under 100M "
                        "parameters, whose steps are too small to split, else torch's default, the machine's cores)")
    p.add_argument("--check-weights", action="store_true",
                   help="refuse a checkpoint with NaN or Inf weights (one more pass over the target's tensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")


def _add_length_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"prompt text; repeat for a batch (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--allow-long-context", action="store_true",
                   help="run past the model's max_position_embeddings (prompt + --max-new-tokens) with a "
                        "warning instead of refusing")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    _add_length_args(p)
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy; finite, >= 0")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus probability mass in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely tokens; 0 = off")
    _add_runtime_args(p, seed_help="one Philox stream per request: the same seed, prompts, batch and flags give the "
                                   "same tokens on every run (on the CPU, eagerly on the GPU and in CUDA graphs, in "
                                   "float32); sampled --spec auto runs are not repeatable")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step and the speculative verify step eagerly on CUDA")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a token's projections do not depend on how many tokens share the forward (models/"
                        "invariant.py): greedy speculation reproduces greedy decoding bit for bit on the CPU, "
                        "bf16 included; on CUDA the attention and expert kernels are not invariant yet")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    _add_spec_args(p, draft_default=None)
    _add_offload_args(p)
    _add_parallel_args(p)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes / GPUs (models/parallel.py; launch with torchrun "
                             "--nproc-per-node N -m specmoe_ext generate ...)")
    g.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism over N processes (heads, "
                   "FFN widths, experts' widths and the LM head split; one all-reduce per attention and FFN)")
    g.add_argument("--ep", type=int, default=1, metavar="N", help="expert parallelism over N processes (experts "
                   "split, uneven counts allowed; attention, dense layers and LM head replicated)")
    g.add_argument("--budget-balance", default="global", choices=["global", "rank"],
                   help="with --ep and --budget B: global (the batch-wide budget) or rank (at most ceil(B / N) "
                        "experts per rank: the slowest rank sets the step time)")
    g.add_argument("--dist-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a collective may wait before the run fails")


def _parallel_config(a: argparse.Namespace, cmd: str, args=None):
    """--tp / --ep -> ParallelConfig or None; checked against the model's shapes (every rank refuses the
    same configuration with the same message, before any process group or memory)."""
    if a.tp == 1 and a.ep == 1:
        if a.budget_balance != "global":
            _fail(cmd, "--budget-balance applies to --ep: add --ep N")
        return None
    from .models.parallel import ParallelConfig, check_config
    try:
        cfg = ParallelConfig(tp=a.tp, ep=a.ep, budget_balance=a.budget_balance, timeout_s=a.dist_timeout)
        if args is not None:
            check_config(args, cfg)
    except ValueError as e:
        _fail(cmd, e)
    if getattr(a, "offload_experts", False):
        _fail(cmd, "--offload-experts with --tp / --ep is not supported")
    return cfg


def _add_spec_args(p: argparse.ArgumentParser, draft_default: str | None, budget_default: str | None = None) -> None:
    g = p.add_argument_group("speculative decoding" + (" (on when --draft is given)" if draft_default is None else ""))
    g.add_argument("--draft", metavar="SPEC", default=draft_default,
                   help="drafter: 'model' = the preset's bundled draft model (tiny has one); 'model:DIR' = a "
                        "checkpoint folder sharing the target's vocabulary; 'self' or 'self:N' = the target itself "
                        "with N resident experts per MoE layer (E/2 without N; SpecMoE); 'ngram' or 'ngram:N' = "
                        "prompt lookup of the longest recent suffix (up to N=4 tokens); 'eagle:DIR' = an EAGLE-3 "
                        "head folder (published layout); 'mtp' = the checkpoint's own multi-token-prediction layer "
                        "(DeepSeek-V3 / GLM-4.5 checkpoints with num_nextn_predict_layers)")
    g.add_argument("--tree", metavar="SPEC", default=DEFAULT_TREE,
                   help="draft tree: 'chain:G' (G tokens in a line), 'static:b1,b2,...' (b_d children per node at "
                        "depth d), 'dynamic:topk=K,depth=D,tokens=M' (EAGLE-2: expand the K best nodes per level, "
                        "keep the M best overall)")
    g.add_argument("--accept", default="auto", choices=["auto", "target", "q"],
                   help="acceptance at temperature > 0: 'target' (exact for any tree), 'q' (q-aware, for sampled "
                        "chain/static drafts), auto = q for chain/static, target for dynamic; "
                        "temperature 0 is always greedy")
    g.add_argument("--budget", metavar="B", default=budget_default,
                   help="MoE-Spec expert budget in the verifier: at most B experts per MoE layer for the whole "
                        "batch of draft trees, top_k <= B <= E (a B above the layer's E experts is refused: it "
                        "would be no budget); one number, or one per layer: 32,32,16,16; 'none' = no budget for a "
                        "layer; lossy" + ("" if budget_default else "; off by default"))
    g.add_argument("--budget-policy", default="substitute", choices=["substitute", "truncate"],
                   help="tokens whose experts were cut: re-pick top-K among the kept experts (substitute) or drop "
                        "those slots (truncate)")
    g.add_argument("--budget-weights", default="uniform", choices=["uniform", "path"],
                   help="token weights of the expert scores: uniform or the draft path probability")
    g.add_argument("--no-protect-root", action="store_true",
                   help="let the budget cut the committed root token's own experts (protected by default)")
    if draft_default is None:           # generate only
        g.add_argument("--spec", default="fixed", choices=["fixed", "auto"],
                       help="fixed: every step uses --tree/--budget; auto: a Cascade controller picks "
                            "each step's chain length K (0 = plain autoregressive step) and expert budget from "
                            "--spec-candidates by measured throughput (--budget-policy/--budget-weights apply)")
        g.add_argument("--spec-candidates", metavar="SPEC", default=DEFAULT_CANDIDATES,
                       help="--spec auto candidates: 'k=K1,K2,...[;budget=B1,...]' ('none' = no budget; k=0 "
                            "always included)")
        g.add_argument("--spec-test-steps", type=int, default=4, metavar="N",
                       help="--spec auto: steps each candidate runs per test phase")
        g.add_argument("--verify", default="full", choices=["full", "adaptive"],
                       help="full: verify every drafted node; adaptive: each step verifies only the cost-effective "
                            "prefix of each tree (lossless; needs --profile; not yet measured to pay on a GPU, "
                            "hence not the default)")
        g.add_argument("--verify-width", type=int, default=None, metavar="W",
                       help="--verify adaptive: keep at most W nodes per request and verify them as a W-node tree, "
                            "so the verify forward costs W tokens per request, not the drafted tree's size "
                            "(tree depth + 1 <= W <= tree nodes)")
        g.add_argument("--profile", metavar="FILE",
                       help="a `specmoe plan` profile JSON: the cost model of --verify adaptive, and for "
                            "--spec auto the warm start (candidates predicted below 0.9x autoregressive are "
                            "pruned, the rest tested best-first)")
        g.add_argument("--profile-alpha", type=float, default=0.7, metavar="A",
                       help="--profile: per-token acceptance rate assumed by the warm start")


def _add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading (models/offload.py)")
    g.add_argument("--offload-experts", action="store_true",
                   help="keep every expert in host memory (page-locked on CUDA) and an expert cache per MoE layer "
                        "on the device; needs --resident-experts or --gpu-memory")
    g.add_argument("--resident-experts", type=int, metavar="N", help="cache slots per MoE layer, top_k <= N <= E")
    g.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="device memory for the run (GiB): the most resident experts that fit besides the "
                        "non-expert weights and KV caches")
    g.add_argument("--offload-eviction", default="lru", choices=["lru", "heat"], help="cache eviction policy")
    g.add_argument("--offload-prefetch", default="router", choices=["router", "heat", "none"],
                   help="prefetch of the next layer's experts: its router on the current hidden state, or "
                        "recent-step heat")
    g.add_argument("--residency-aware-budget", type=float, nargs="?", const=0.05, default=None, metavar="MARGIN",
                   help="with --budget: prefer resident experts whose score is within MARGIN x the top score "
                        "(default 0.05); reports routing mass lost and bytes saved")


def _offload_config(a: argparse.Namespace, cmd: str):
    """The --offload-experts flags -> OffloadConfig or None (checked: nothing loaded yet)."""
    from .models.offload import OffloadConfig, OffloadError
    used = [f for f, v in (("--resident-experts", a.resident_experts), ("--gpu-memory", a.gpu_memory),
                           ("--residency-aware-budget", a.residency_aware_budget)) if v is not None]
    used += [f for f, v, d in (("--offload-eviction", a.offload_eviction, "lru"),
                                ("--offload-prefetch", a.offload_prefetch, "router")) if v != d]
    if not a.offload_experts:
        if used:
            _fail(cmd, f"{', '.join(used)} apply to expert offloading: add --offload-experts")
        return None
    if a.residency_aware_budget is not None and not getattr(a, "budget", None) and cmd == "generate":
        _fail(cmd, "--residency-aware-budget acts on an expert budget: add --budget B")
    cfg = OffloadConfig(resident_experts=a.resident_experts, gpu_memory_gb=a.gpu_memory,
                        eviction=a.offload_eviction, prefetch=a.offload_prefetch,
                        residency_aware_budget=a.residency_aware_budget is not None,
                        residency_margin=a.residency_aware_budget if a.residency_aware_budget is not None else 0.05)
    try:
        cfg.check()
    except OffloadError as e:
        _fail(cmd, e)
    return cfg


# ---- before anything is loaded: what the flags name, and whether the run fits -------------------------------

@dataclass
class _Source:
    """The model --model / --preset names, read without loading it: config, tokenizer, folders."""

    name: str
    args: "ModelArgs"
    tok: "Tokenizer"
    has_text: bool                  # False: a random-weight preset (token ids only)
    path: Path | None               # checkpoint folder (None: random weights)
    draft_dir: Path | None          # the bundled draft model, if any


def _source(a: argparse.Namespace, cmd: str) -> _Source:
    from .models import load_tokenizer
    from .models.loader import load_args
    from .models.presets import DEFAULT_PRESET, TINY_DIR, get_preset
    try:
        if getattr(a, "model", None):
            return _Source(a.model, load_args(a.model), load_tokenizer(a.model), True, Path(a.model), None)
        name = getattr(a, "preset", None) or DEFAULT_PRESET
        p = get_preset(name)
        tok = load_tokenizer(TINY_DIR / "target" if p.random else p.path)
        return _Source(name, p.args(), tok, not p.random, p.path, p.draft_path)
    except ValueError as e:                           # CheckpointError, UnsupportedModelError, unknown preset
        _fail(cmd, e)


def _device_dtype(a: argparse.Namespace, cmd: str):
    """--device, --dtype, --threads -> (torch.device, torch.dtype), checked."""
    from .models.loader import CheckpointError, resolve_device, resolve_dtype
    if a.threads is not None and a.threads < 1:
        _fail(cmd, f"--threads {a.threads}: must be >= 1")
    try:
        device = resolve_device(a.device)
        if device.type == "meta":
            raise CheckpointError(f"unknown device {a.device!r}: expected auto, cpu, cuda or cuda:N")
        return device, resolve_dtype(a.dtype, device)
    except CheckpointError as e:
        _fail(cmd, f"--device: {e}")


def _encode_prompts(a: argparse.Namespace, src: _Source, cmd: str) -> tuple[list[str], list[list[int]]]:
    from .models import check_prompts
    if a.max_new_tokens < 1:
        _fail(cmd, "--max-new-tokens must be >= 1")
    prompts = a.prompt or [DEFAULT_PROMPT]
    ids = [src.tok.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        _fail(cmd, "a prompt encodes to zero tokens")
    try:
        check_prompts(ids, src.args.vocab_size, a.max_new_tokens)
    except ValueError as e:
        _fail(cmd, f"{e} (the tokenizer does not match the model's vocab_size {src.args.vocab_size})")
    _check_positions(a, src, max(map(len, ids)), cmd)
    return prompts, ids


def _check_positions(a: argparse.Namespace, src: _Source, P: int, cmd: str) -> None:
    """prompt + --max-new-tokens beyond max_position_embeddings: refused, or a warning with --allow-long-context."""
    from .models.config import ContextLengthError
    try:
        src.args.check_positions(P + a.max_new_tokens)
    except ContextLengthError as e:
        why = f"the longest prompt ({P} tokens) + --max-new-tokens {a.max_new_tokens}: {e} of {src.name}"
        if not a.allow_long_context:
            _fail(cmd, f"{why}; lower --max-new-tokens, or pass --allow-long-context to run past it")
        print(f"specmoe {cmd}: warning: {why} (--allow-long-context: quality past it is not guaranteed)",
              file=sys.stderr)


def _shape_only(src: _Source, dtype, cmd: str, offload=None):
    """The target on the meta device (a checkpoint's files and tensor headers checked, nothing read): its
    engines run every flag's check and size every buffer, for free. offload: an OffloadConfig (its plan's
    errors name the flag)."""
    from .models.loader import empty_model, load_model
    from .models.offload import empty_offloaded_model
    try:
        if offload is not None and src.path is None:
            return empty_offloaded_model(src.args, "meta", dtype, offload)
        return empty_model(src.args, "meta", dtype) if src.path is None else load_model(src.path, "meta", dtype,
                                                                                        offload=offload)
    except ValueError as e:
        _fail(cmd, e)


def _check_capacity(engines: list, P: int, N: int, cmd: str) -> list[int]:
    """The KV slots per request each engine needs, refused where the target or the draft model is not exact
    that far (the checks SpecEngine.generate makes, before anything is allocated)."""
    needs = []
    for e in engines:
        need = e.capacity_for(P, N)
        try:
            e.target.args.check_context(need)
            if e.drafter is not None:
                e.drafter.check(need, e.spec)
        except ValueError as err:
            _fail(cmd, f"the longest prompt ({P} tokens) + --max-new-tokens {N} needs {need} cache slots: {err}")
        needs.append(need)
    return needs


def _module_bytes(m) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _run_bytes(engines: list, bs: int, needs: list[int]) -> list[tuple[str, int]]:
    """(what, bytes) the engines allocate: the target's weights once, each engine's target KV cache (its capacity
    rounded up to a multiple of 128 slots: the most the engine rounds up), the draft models' / EAGLE heads'
    weights and caches."""
    from .speculative import Eagle3Drafter
    target = engines[0].target
    elem = target.tok_embeddings.weight.element_size()
    weights, kv, draft_w, draft_kv = _module_bytes(target), 0, 0, 0
    for e, need in zip(engines, needs):
        cap = -(-need // 128) * 128
        kv += target.args.kv_cache_bytes(bs, cap, elem)
        module = getattr(e.drafter, "model", None) or getattr(e.drafter, "head", None)
        if module is not None:
            dargs = module.args.replace(n_layers=1) if isinstance(e.drafter, Eagle3Drafter) else module.args
            draft_w += _module_bytes(module)
            draft_kv += dargs.kv_cache_bytes(bs, cap + e.drafter.extra_capacity(e.spec), elem)
    return [("weights", weights), ("KV cache", kv), ("draft weights", draft_w), ("draft KV cache", draft_kv)]


def _check_memory(cmd: str, src: _Source, device, dtype, parts: list[tuple[str, int]]) -> None:
    """Refuse a run whose weights + caches exceed the device's available memory (nothing allocated yet)."""
    from .models.loader import GiB, NotEnoughMemoryError, check_device_memory
    total = sum(b for _, b in parts)
    detail = " + ".join(f"{what} {b / GiB:.2f} GiB" for what, b in parts if b)
    dt = str(dtype).replace("torch.", "")
    try:
        check_device_memory(total, device, src.name, f"memory ({detail}, {dt})")
    except NotEnoughMemoryError as e:
        kv = sum(b for what, b in parts if "KV" in what)
        hint = ("lower --max-new-tokens or the number of prompts" if kv > total / 2 else
                "try --dtype bfloat16 (half the bytes of float32)" if dt == "float32" else
                "use a smaller model")
        _fail(cmd, f"{e}; {hint}, or a device with more memory")


def _set_threads(a: argparse.Namespace, n_params: int, device) -> int:
    """--threads, else OMP_NUM_THREADS (when set), else loader.default_cpu_threads on the CPU -> torch threads."""
    import torch
    from .models.loader import default_cpu_threads
    if a.threads is not None:
        n = a.threads
    elif device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        n = default_cpu_threads(n_params)
    else:
        n = torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def _preflight(a: argparse.Namespace, cmd: str, src: _Source, device, dtype, ids: list[list[int]],
               engines_for: Callable) -> int:
    """Every check of a run on the shape-only target, then the thread count -> threads. engines_for(target)
    builds the engines the run uses (the same call runs again on the loaded target)."""
    cfg = a.offload = _offload_config(a, cmd)
    meta = _shape_only(src, dtype, cmd, cfg)
    engines = engines_for(meta)
    P = max(map(len, ids))
    needs = _check_capacity(engines, P, a.max_new_tokens, cmd)
    parts = _run_bytes(engines, len(ids), needs)
    if getattr(a, "parallel", None) is not None:
        parts = _parallel_parts(a, src, dtype, parts)
    if cfg is not None:
        parts = _offload_parts(a, cmd, src, device, dtype, parts)
        if a.offload.resident_experts != cfg.resident_experts:          # --gpu-memory: N derived; engines again
            engines_for(_shape_only(src, dtype, cmd, a.offload))
    _check_memory(cmd, src, device, dtype, parts)
    return _set_threads(a, meta.num_parameters(), device)


def _parallel_parts(a: argparse.Namespace, src: _Source, dtype, parts: list) -> list:
    """--tp / --ep: what this rank allocates: its shard of the weights and its heads' KV cache (drafts are
    replicated)."""
    import torch
    from .models.parallel import Comm, local_args, local_meta_model
    local = local_meta_model(src.args, a.parallel, Comm(a.rank, a.parallel.world))
    elem = torch.empty((), dtype=dtype).element_size()
    kv_share = local_args(src.args, a.parallel).n_kv_heads / src.args.n_kv_heads
    out = []
    for what, b in parts:
        b = local.num_parameters() * elem if what == "weights" else int(b * kv_share) if what == "KV cache" else b
        out.append((f"{what} (rank {a.rank})" if what in ("weights", "KV cache") else what, b))
    return out


def _offload_parts(a: argparse.Namespace, cmd: str, src: _Source, device, dtype, parts: list) -> list:
    """--offload-experts: resolve N (--gpu-memory: what fits besides the KV caches and drafts), set
    a.offload to the resolved config, check the host store against the host's memory -> the device parts."""
    from dataclasses import replace
    from .models.loader import NotEnoughMemoryError, check_device_memory
    from .models.offload import OffloadError, plan_offload
    reserve = sum(b for what, b in parts if what != "weights")
    try:
        plan = plan_offload(src.args, dtype, a.offload, reserve)
    except OffloadError as e:
        _fail(cmd, e)
    a.offload = replace(a.offload, resident_experts=plan.resident, gpu_memory_gb=None)
    if device.type == "cuda":
        try:
            check_device_memory(plan.host_bytes, "cpu", src.name, "host memory (offloaded experts)")
        except NotEnoughMemoryError as e:
            _fail(cmd, f"--offload-experts: {e}")
        host = []
    else:
        host = [("offloaded experts", plan.host_bytes)]
    return [("non-expert weights + expert cache", plan.device_bytes)] + host + [p for p in parts if p[0] != "weights"]


def _check_output_path(cmd: str, flag: str, path: str | None) -> None:
    """An output file's folder must exist and be writable (checked before any measurement)."""
    if path is None:
        return
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        _fail(cmd, f"{flag} {path}: is a folder; give a file name")
    if not folder.is_dir():
        _fail(cmd, f"{flag} {path}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        _fail(cmd, f"{flag} {path}: folder {str(folder)!r} is not writable")


# ---- loading and engines --------------------------------------------------------------------------------

def _load_target(a: argparse.Namespace, src: _Source, device, dtype, cmd: str):
    from .models.loader import load_model
    from .models.offload import build_offloaded_preset, expert_offload
    from .models.presets import build_preset
    cfg = getattr(a, "offload", None)
    par = getattr(a, "parallel", None)
    try:
        if par is not None:
            from .models.parallel import resolve_comm, shard_model
            comm = resolve_comm(par, None, device)
            if src.path is not None:        # this rank's slices of the files only
                model = load_model(src.path, device, dtype, check_finite=a.check_weights, parallel=par, comm=comm)
            else:                           # random weights: the same seeded full model, then this rank's shard
                model = shard_model(build_preset(src.name, device, dtype, seed=a.seed), par, comm)
        elif src.path is not None:
            model = load_model(src.path, device, dtype, check_finite=a.check_weights, offload=cfg)
        elif cfg is not None:
            model = build_offloaded_preset(src.name, device, dtype, cfg, seed=a.seed)
        else:
            model = build_preset(src.name, device, dtype, seed=a.seed)
    except ValueError as e:
        _fail(cmd, e)
    if getattr(a, "batch_invariant", False):
        from .models.invariant import set_batch_invariant
        set_batch_invariant(model)
    off = expert_offload(model)
    if off is not None and device.type == "cuda" and not off.capturable and not getattr(a, "no_cuda_graph", False):
        print(f"specmoe {cmd}: note: expert fetches use the '{off.backend}' copy (Triton missing), which "
              f"synchronizes: steps run eagerly (no CUDA graph)", file=sys.stderr)
        a.no_cuda_graph = True
    return model


def _budget_style(a: argparse.Namespace) -> dict:
    return dict(policy=a.budget_policy, weights=a.budget_weights, protect_root=not a.no_protect_root)


def _budget(text, args, flag: str = "--budget", **style):
    """A --budget text (or a candidate's B) -> the checked BudgetConfig: top_k <= B <= E per MoE layer.
    B > E is refused, not clamped: such a budget keeps every expert, i.e. it is no budget."""
    from .speculative import BudgetConfig
    cfg = BudgetConfig.parse(str(text), **style)        # its errors name --budget
    try:
        cfg.validate(args)
        per = [cfg.budget] if isinstance(cfg.budget, int) else cfg.budget
        over = [b for b in per if b is not None and b > args.n_experts]
        if over:
            raise ValueError(f"expert budget {over[0]} exceeds the {args.n_experts} experts per MoE layer (it "
                             f"would keep every expert: give 'none' for no budget)")
    except ValueError as e:
        raise ValueError(f"{flag} {text}: {e}") from None
    return cfg


def _spec_engine(a: argparse.Namespace, target, src: _Source, dtype, cmd: str, budget: str | None = None,
                 tree: str | None = None):
    """The SpecEngine the --draft/--tree/--budget flags describe (tree: instead of --tree)."""
    from .speculative import SpecEngine, TreeSpec, make_drafter
    try:
        spec = TreeSpec.parse(tree or a.tree)
        bcfg = _budget(budget, target.args, **_budget_style(a)) if budget else None
        drafter = make_drafter(a.draft, target, default_draft_dir=src.draft_dir, target_dir=src.path, dtype=dtype)
        verify = getattr(a, "verify", "full")
        profile = _load_profile(a, cmd) if verify == "adaptive" else None
        return SpecEngine(target, drafter, spec, bcfg, a.accept, cuda_graph=not getattr(a, "no_cuda_graph", False),
                          verify=verify, profile=profile, verify_width=getattr(a, "verify_width", None))
    except ValueError as e:                           # CheckpointError, TreeSpecError, DraftVocabError, ...
        _fail(cmd, e)


def _load_profile(a: argparse.Namespace, cmd: str):
    from .speculative.perf_model import PerfProfile
    try:
        return PerfProfile.from_json(a.profile)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _fail(cmd, f"--profile {a.profile}: {e}")


def _check_auto_flags(a: argparse.Namespace) -> None:
    if a.tree != DEFAULT_TREE:
        _fail("generate", "--tree is chosen by --spec auto (chains of the --spec-candidates lengths): drop --tree")
    if a.budget:
        _fail("generate", "with --spec auto give budgets as candidates, e.g. --spec-candidates "
                          "'k=0,2,4;budget=none,32', not --budget")
    if a.spec_test_steps < 1:
        _fail("generate", "--spec-test-steps must be >= 1")
    if not 0.0 <= a.profile_alpha <= 1.0:
        _fail("generate", "--profile-alpha must be in [0, 1]")


def _spec_controller(a: argparse.Namespace, target, src: _Source, dtype, bs: int):
    """--spec auto: (engine over the longest candidate chain, CascadeController, budget style)."""
    from .speculative import BudgetConfig
    from .speculative.controller import CascadeController, parse_candidates
    try:
        cands = parse_candidates(a.spec_candidates)
        for c in cands:
            if c.budget is not None:
                _budget(c.budget, target.args, "--spec-candidates budget", **_budget_style(a))
    except ValueError as e:
        _fail("generate", e)
    kmax = max(c.k for c in cands)
    if kmax == 0:
        _fail("generate", "--spec-candidates needs some k >= 1")
    engine = _spec_engine(a, target, src, dtype, "generate", None, tree=f"chain:{kmax}")
    ctl = CascadeController(cands, test_steps=a.spec_test_steps)
    if a.profile:
        ctl.warm_start(_load_profile(a, "generate"), bs=bs, alpha=a.profile_alpha)
    style = BudgetConfig(0, **_budget_style(a))
    return engine, ctl, style


def _generate_engine(a: argparse.Namespace, target, src: _Source, dtype, bs: int):
    """(engine, controller or None, budget style or None) of a generate run: plain decoding is the engine
    with no drafter (root-only steps: what speculative.generate runs)."""
    from .speculative import SpecEngine
    if a.draft is None:
        return SpecEngine(target, None, cuda_graph=not a.no_cuda_graph), None, None
    if a.spec == "auto":
        return _spec_controller(a, target, src, dtype, bs)
    return _spec_engine(a, target, src, dtype, "generate", a.budget), None, None


def _spec_json(res) -> dict:
    return {"spec": "auto" if "controller" in res.config else "fixed", **res.config, **res.summary()}


# ---- generate -------------------------------------------------------------------------------------------

def _check_generate_flags(a: argparse.Namespace):
    """Flags that need no model -> SamplingParams."""
    from .models import SamplingParams
    try:
        sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    except ValueError as e:                           # "temperature must be ...", "top_p ...", "top_k ..."
        name = str(e).split()[0]
        _fail("generate", f"--{name.replace('_', '-')}: {e}" if name in ("temperature", "top_p", "top_k") else e)
    if a.draft is None:
        used = [f for f, v in (("--budget", a.budget), ("--no-protect-root", a.no_protect_root),
                               ("--profile", a.profile)) if v]
        used += [f for f, v, d in (("--tree", a.tree, DEFAULT_TREE), ("--accept", a.accept, "auto"),
                                    ("--verify", a.verify, "full"),
                                    ("--spec", a.spec, "fixed"), ("--spec-candidates", a.spec_candidates,
                                                                  DEFAULT_CANDIDATES),
                                    ("--budget-policy", a.budget_policy, "substitute"),
                                    ("--budget-weights", a.budget_weights, "uniform")) if v != d]
        if used:
            _fail("generate", f"{', '.join(used)} apply to speculative decoding: add --draft")
    if a.verify == "adaptive" and not a.profile:
        _fail("generate", "--verify adaptive needs --profile: the cost profile `specmoe plan` measures for this "
                          "model and device")
    if a.verify_width is not None:
        if a.verify != "adaptive":
            _fail("generate", "--verify-width applies to --verify adaptive")
        from .speculative import TreeSpec
        try:
            spec = TreeSpec.parse(a.tree)
        except ValueError as e:
            _fail("generate", f"--tree {a.tree!r}: {e}")
        if not spec.max_depth + 1 <= a.verify_width <= spec.max_nodes:
            _fail("generate", f"--verify-width {a.verify_width}: must be in [{spec.max_depth + 1}, {spec.max_nodes}] "
                              f"for --tree {a.tree} (depth {spec.max_depth}, {spec.max_nodes} nodes)")
    if a.spec == "fixed":
        ignored = [f for f, v in (("--profile", a.profile and a.verify != "adaptive"),
                                  ("--spec-candidates", a.spec_candidates != DEFAULT_CANDIDATES),
                                  ("--spec-test-steps", a.spec_test_steps != 4),
                                  ("--profile-alpha", a.profile_alpha != 0.7)) if v]
        if ignored:
            _fail("generate", f"{', '.join(ignored)} apply to --spec auto")
    else:
        _check_auto_flags(a)
    return sampling


def _run_generate(a: argparse.Namespace) -> int:
    sampling = _check_generate_flags(a)
    device, dtype = _device_dtype(a, "generate")
    src = _source(a, "generate")
    a.parallel = _parallel_config(a, "generate", src.args)
    if a.parallel is not None:
        from .models.parallel import resolve_comm
        try:
            a.rank = resolve_comm(a.parallel, None, device).rank          # torchrun's process group
        except ValueError as e:
            _fail("generate", e)
        if a.rank != 0:
            a.no_progress = True
    prompts, ids = _encode_prompts(a, src, "generate")
    engines_for = lambda target: [_generate_engine(a, target, src, dtype, len(ids))[0]]  # noqa: E731
    threads = _preflight(a, "generate", src, device, dtype, ids, engines_for)

    t0 = time.perf_counter()
    model = _load_target(a, src, device, dtype, "generate")
    engine, ctl, style = _generate_engine(a, model, src, dtype, len(ids))
    load_s = time.perf_counter() - t0
    stop = () if a.ignore_eos or not src.has_text else tuple(sorted(src.tok.eos_token_ids))
    bar = None
    if not a.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=a.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False,
                   disable=None)
        bar.update(1)                                  # the first token comes from the prefill
    # the bar follows the request that is furthest along (one update per step, from the step's record)
    progress = (lambda st, toks: bar.update(max(map(len, toks), default=0))) if bar is not None else None
    from .models.offload import expert_offload
    if expert_offload(model) is not None:
        expert_offload(model).reset_stats()          # bucket "prefill" = this run's prefill, then its steps
    try:
        res = engine.generate(ids, a.max_new_tokens, sampling, stop, controller=ctl, budget_style=style,
                              on_step=progress)
    except ValueError as e:
        _fail("generate", e)
    if bar is not None:
        bar.close()
    return _report_generate(a, src, model, device, dtype, prompts, ids, res, engine, load_s, threads)


def _report_generate(a, src: _Source, model, device, dtype, prompts, ids, res, engine, load_s, threads) -> int:
    if getattr(a, "rank", 0) != 0:                   # parallel: rank 0 reports (every rank holds the same tokens)
        return 0
    outputs = []
    for p, i, t, r in zip(prompts, ids, res.tokens, res.finish_reasons):
        outputs.append({"prompt": p, "text": src.tok.decode_continuation(i, t) if src.has_text else None,
                        "tokens": t, "finish_reason": r})
    speculative = engine.drafter is not None
    stats = {
        "generated_tokens": res.n_generated, "tokens_per_s": round(res.tokens_per_s, 2),
        "prefill_ms": round(1e3 * res.prefill_s, 3), "decode_steps": res.decode_steps,
        "decode_step_ms": round(res.decode_step_ms, 3),
        "decode_tokens_per_s": round(len(ids) / (res.decode_step_ms / 1e3), 2) if res.decode_steps else None,
        "cuda_graph": res.cuda_graph, "graph_capture_ms": round(1e3 * res.extra.get("capture_s", 0.0), 1),
        "load_s": round(load_s, 3), "threads": threads,
    }
    spec = None
    if speculative:
        spec = _spec_json(res)
        stats["decode_tokens_per_s"] = round((res.n_generated - len(ids)) / res.decode_s, 2) if res.decode_s else None
        stats["accepted_per_step"] = spec["accepted_per_step"]
        stats["tokens_per_step"] = spec["tokens_per_step"]
    dt = str(dtype).replace("torch.", "")
    from .models.offload import expert_offload
    off = expert_offload(model)
    offload = None if off is None else off.report(steps=res.decode_steps, tokens=res.n_generated - len(ids),
                                                  decode_s=res.decode_s)
    if a.json:
        doc = {"model": src.name, "architecture": model.args.architecture, "device": str(device),
               "dtype": dt, "parameters": model.num_parameters(),
               "sampling": {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "seed": a.seed},
               "max_new_tokens": a.max_new_tokens, "outputs": outputs, "stats": stats}
        if spec is not None:
            doc["speculative"] = spec
        if offload is not None:
            doc["offload"] = offload
        if getattr(a, "parallel", None) is not None:
            doc["parallel"] = {**a.parallel.describe(), "world": a.parallel.world,
                               "parameters_per_rank": model.num_parameters()}
        print(json.dumps(doc, indent=2))
        return 0
    for o in outputs:
        if src.has_text:
            print(o["prompt"] + o["text"])
        else:
            print(f"[random-weight preset {src.name}: token ids] {o['tokens']}")
        print("-" * 72)
    how = (f"decode {res.decode_step_ms:.2f} ms/step x {res.decode_steps}" if spec is None else
           f"{res.decode_steps} speculative steps, {spec['tokens_per_step']} tokens/step, drafter {spec['drafter']}, "
           f"tree {spec['tree']}" + (f", budget {spec['budget']['budget']}" if spec["budget"] else ""))
    print(f"{res.n_generated} tokens in {res.prefill_s + res.decode_s:.2f} s: {res.tokens_per_s:.1f} tokens/s "
          f"(prefill {1e3 * res.prefill_s:.1f} ms, {how}, batch {len(ids)}, {model.args.architecture} on "
          f"{device} {dt}{', CUDA graph' if res.cuda_graph else ''})", file=sys.stderr)
    if spec is not None and "controller" in spec:
        runs = " ".join(f"k={k}{'' if b is None else f',B={b}'}x{n}" for k, b, n in spec["controller"]["settings_over_time"])
        util = " ".join(f"{c}:{u:g}" for c, u in spec["controller"]["utilities"].items())
        print(f"--spec auto settings over time (setting x steps): {runs}; last utilities: {util}", file=sys.stderr)
    if spec is not None and spec["experts_touched_per_layer"]:
        pairs = " ".join(f"{t:g}->{l:g}" for t, l in zip(spec["experts_touched_per_layer"],
                                                         spec["experts_loaded_per_layer"]))
        print(f"experts per MoE layer and step, touched -> loaded: {pairs}", file=sys.stderr)
    if offload is not None:
        st, cfg = offload["steps"], offload["config"]
        fetch = f", fetch {st['fetch_s']:.3f} s" if st["fetch_s"] is not None else ""
        print(f"expert offload: {cfg['resident_experts']}/{cfg['experts']} experts resident per MoE layer, hit rate "
              f"{st['hit_rate']}, {st['bytes_moved'] / 2**20:.1f} MiB moved in the steps "
              f"({st.get('bytes_per_token', 0) / 2**20:.2f} MiB/token){fetch}; prefill "
              f"{offload['prefill']['bytes_moved'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


# ---- demo -----------------------------------------------------------------------------------------------

def _add_demo_args(p: argparse.ArgumentParser) -> None:
    _add_length_args(p)
    _add_runtime_args(p, seed_help="accepted for symmetry with generate (tiny's weights are fixed, the runs greedy)")
    p.add_argument("--no-progress", action="store_true", help="(accepted for symmetry with generate)")
    p.add_argument("--repeats", type=int, default=5, metavar="R",
                   help="timed runs per mode after one warm-up run; tokens/s is their median")
    _add_spec_args(p, draft_default="model")
    _add_offload_args(p)


DEMO_AUTO = "speculative, --spec auto"       # the demo run driven by a CascadeController


def _demo_engines(a: argparse.Namespace, target, src: _Source, dtype) -> dict:
    """label -> engine of the demo's four runs (plain decoding, speculative, + budget, --spec auto)."""
    from .speculative import SpecEngine
    from .speculative.controller import parse_candidates
    E = target.args.n_experts
    budget = a.budget or str(max(target.args.top_k, E // 2))
    kmax = max(c.k for c in parse_candidates(DEFAULT_CANDIDATES))
    return {"autoregressive": SpecEngine(target, None),
            "speculative": _spec_engine(a, target, src, dtype, "demo"),
            f"speculative + budget B={budget}": _spec_engine(a, target, src, dtype, "demo", budget),
            DEMO_AUTO: _spec_engine(a, target, src, dtype, "demo", tree=f"chain:{kmax}")}


def _run_demo(a: argparse.Namespace) -> int:
    """The embedded tiny pair, greedy: autoregressive, speculative, speculative + expert budget, --spec auto;
    each timed --repeats times after a warm-up (median tokens/s), with a verdict on whether speculation pays."""
    from .speculative.controller import CascadeController, parse_candidates

    if a.repeats < 1:
        _fail("demo", "--repeats must be >= 1")
    device, dtype = _device_dtype(a, "demo")
    a.model, a.preset = None, "tiny"
    src = _source(a, "demo")
    prompts, ids = _encode_prompts(a, src, "demo")
    threads = _preflight(a, "demo", src, device, dtype, ids, lambda t: list(_demo_engines(a, t, src, dtype).values()))
    model = _load_target(a, src, device, dtype, "demo")
    engines = _demo_engines(a, model, src, dtype)
    cands = parse_candidates(DEFAULT_CANDIDATES)
    N = a.max_new_tokens
    results = {}
    for label, engine in engines.items():             # greedy, no stop tokens; warm-up, then the timed runs
        controller = (lambda: CascadeController(cands, test_steps=2)) if label == DEMO_AUTO else (lambda: None)
        runs = [engine.generate(ids, N, controller=controller()) for _ in range(1 + a.repeats)][1:]
        timed = sorted(runs, key=lambda r: r.tokens_per_s)
        results[label] = (timed[len(timed) // 2], [r.tokens_per_s for r in timed])
        from .models.offload import expert_offload
        if expert_offload(model) is not None:          # one more run for its expert-fetch statistics
            expert_offload(model).reset_stats()
            r = engine.generate(ids, N, controller=controller())
            results[label][0].extra["offload"] = expert_offload(model).report(
                steps=r.decode_steps, tokens=r.n_generated - len(ids), decode_s=r.decode_s)
    return _report_demo(a, src, model, device, dtype, prompts, ids, results, threads)


def _report_demo(a, src: _Source, model, device, dtype, prompts, ids, results, threads) -> int:
    import statistics
    name, tok, E, N = src.name, src.tok, model.args.n_experts, a.max_new_tokens
    ar = results["autoregressive"][0]

    def agreement(res) -> dict:
        tot = sum(len(t) for t in ar.tokens)
        same = 0
        first = None
        for x, y in zip(res.tokens, ar.tokens):
            k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            same += k
            if k < len(y) and (first is None or k < first):
                first = k
        return {"matches_autoregressive": res.tokens == ar.tokens, "tokens_before_divergence": same,
                "tokens": tot, "first_divergence": first}

    rows = []
    for label, (res, tps) in results.items():
        row = {"run": label, "tokens_per_s": round(statistics.median(tps), 2),
               "tokens_per_s_runs": [round(x, 2) for x in tps], "generated_tokens": res.n_generated,
               "seconds": round(res.prefill_s + res.decode_s, 4)}
        if label != "autoregressive":
            spec = _spec_json(res)
            row.update({"tokens_per_step": spec["tokens_per_step"], "accepted_per_step": spec["accepted_per_step"],
                        "experts_touched_per_layer": spec["experts_touched_per_layer"],
                        "experts_loaded_per_layer": spec["experts_loaded_per_layer"], **agreement(res),
                        "config": {k: spec[k] for k in ("drafter", "tree", "rule", "budget")}})
            if "controller" in spec:
                row["settings_over_time"] = spec["controller"]["settings_over_time"]
        if "offload" in res.extra:
            st = res.extra["offload"]["steps"]
            row["offload"] = {k: st.get(k) for k in ("hit_rate", "bytes_moved", "bytes_per_step", "bytes_per_token",
                                                     "fetch_s", "misses_per_layer", "hits_per_layer")}
        rows.append(row)
    ar_tps, spec_tps = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    auto_row = rows[-1]
    picked: dict = {}
    for k, b, n in auto_row.get("settings_over_time", []):
        key = f"k={k}" + (f",B={b}" if b is not None else "")
        picked[key] = picked.get(key, 0) + n
    verdict = {"speculative_over_autoregressive": round(spec_tps / ar_tps, 3) if ar_tps else None,
               "speculation_pays": spec_tps > ar_tps, "auto_over_autoregressive":
                   round(auto_row["tokens_per_s"] / ar_tps, 3) if ar_tps else None,
               "auto_steps_per_setting": picked}
    a_ = model.args
    head = {"model": name, "architecture": a_.architecture, "layers": a_.n_layers, "experts": E,
            "top_k": a_.top_k, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "prompts": prompts, "max_new_tokens": N, "draft": a.draft, "tree": a.tree, "repeats": a.repeats,
            "threads": threads}
    if a.json:
        print(json.dumps({**head, "runs": rows, "verdict": verdict, "text": [tok.decode_continuation(i, t) for i, t in zip(ids, ar.tokens)]},
                         indent=2))
        return 0
    print(f"specmoe demo: {name} ({a_.architecture}, {a_.n_layers} layers, {E} experts top-{a_.top_k}) on "
          f"{device} {head['dtype']}; draft {a.draft}, tree {a.tree}; {len(ids)} prompt(s) x {N} new tokens, greedy; "
          f"median of {a.repeats} runs")
    print(f"text (autoregressive): {(prompts[0] + tok.decode_continuation(ids[0], ar.tokens[0]))!r}")
    print()
    print(f"{'run':34s} {'tokens/s':>9s} {'min-max':>15s} {'tok/step':>9s} {'accepted/step':>14s}  {'same as AR':>12s}")
    for r in rows:
        same = "-"
        if "matches_autoregressive" in r:
            same = "yes" if r["matches_autoregressive"] else f"no ({r['tokens_before_divergence']}/{r['tokens']})"
        span = f"{min(r['tokens_per_s_runs']):.0f}-{max(r['tokens_per_s_runs']):.0f}"
        print(f"{r['run']:34s} {r['tokens_per_s']:9.1f} {span:>15s} {r.get('tokens_per_step') or 1.0:9.2f} "
              f"{r.get('accepted_per_step') if r.get('accepted_per_step') is not None else '-':>14}  {same:>12s}")
    print()
    print("experts per MoE layer and verification step, touched (the tree's natural routing) -> loaded (read):")
    for r in rows[1:3]:
        pairs = "  ".join(f"L{i}: {t:.2f}->{l:.2f}" for i, (t, l) in
                          enumerate(zip(r["experts_touched_per_layer"], r["experts_loaded_per_layer"])))
        print(f"  {r['run']:32s} {pairs}")
    print("(the budget is lossy: 'same as AR' counts the tokens before the first divergence)")
    steps = ", ".join(f"{k} x{n}" for k, n in picked.items())
    if verdict["speculation_pays"]:
        print(f"speculation pays here: {verdict['speculative_over_autoregressive']:.2f}x autoregressive tokens/s; "
              f"--spec auto ran {steps} ({verdict['auto_over_autoregressive']:.2f}x)")
    else:
        print(f"speculation does NOT pay here: {verdict['speculative_over_autoregressive']:.2f}x autoregressive "
              f"tokens/s (the tiny draft costs a large share of the tiny target's step on this device); "
              f"--spec auto ran {steps} ({verdict['auto_over_autoregressive']:.2f}x)")
    return 0




# ---- plan -----------------------------------------------------------------------------------------------

def _int_list(text: str, what: str, none_ok: bool = False) -> list:
    try:
        return [None if none_ok and v.strip().lower() == "none" else int(v) for v in text.split(",")]
    except ValueError:
        _fail("plan", f"{what} {text!r}: expected a comma list of integers" + (" ('none' = no budget)" if none_ok else ""))


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    p.add_argument("--draft-model", metavar="DIR",
                   help="draft checkpoint for the draft points (default: the preset's bundled draft; none: skipped)")
    _add_runtime_args(p, seed_help="seed of the random tokens and logits measured")
    p.add_argument("--max-bs", type=int, default=None, metavar="N",
                   help="largest batch size, a power of two (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--n-toks", default="1,4,8", metavar="N,N,...", help="tokens per request of the target forwards")
    p.add_argument("--budgets", default="none", metavar="B,B,...",
                   help="expert budgets measured besides none (e.g. none,32)")
    p.add_argument("--ctx", type=int, default=16, help="committed tokens in the cache before each forward")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per point, median (default 20 CUDA, 5 CPU); a warning names the points whose "
                        "runs disagree by more than 30%% when they are over a quarter of all")
    p.add_argument("--ridge-point", type=float, default=None, metavar="RP",
                   help="peak FLOP/s / peak bytes/s of the device (default 295 on CUDA = H100 bf16, 10 on CPU)")
    p.add_argument("--out", metavar="FILE", default="profile.json", help="profile JSON")
    p.add_argument("--plot", metavar="PNG", help="predicted vs measured plot (needs matplotlib)")


@dataclass
class _PlanSetup:
    max_bs: int
    n_toks: list[int]
    budgets: list[int | None]
    repeats: int
    RP: float


def _plan_setup(a: argparse.Namespace, device) -> _PlanSetup:
    """The plan flags, checked (the output paths too: before anything is measured)."""
    from .speculative import plan as planlib
    cuda = device.type == "cuda"
    max_bs = a.max_bs if a.max_bs is not None else (64 if cuda else 16)
    if max_bs < 1 or max_bs & (max_bs - 1):
        _fail("plan", f"--max-bs {max_bs} must be a power of two")
    n_toks = _int_list(a.n_toks, "--n-toks")
    budgets = _int_list(a.budgets, "--budgets", none_ok=True)
    if any(n < 1 for n in n_toks) or a.ctx < 1:
        _fail("plan", "--n-toks and --ctx must be >= 1")
    repeats = a.repeats if a.repeats is not None else (20 if cuda else 5)
    if repeats < 1:
        _fail("plan", "--repeats must be >= 1")
    _check_output_path("plan", "--out", a.out)
    _check_output_path("plan", "--plot", a.plot)
    RP = a.ridge_point if a.ridge_point is not None else planlib.DEFAULT_RP["cuda" if cuda else "cpu"]
    return _PlanSetup(max_bs, n_toks, budgets, repeats, RP)


def _plan_draft(a: argparse.Namespace, src: _Source, device, dtype):
    """The draft model of the draft points (None: skipped), on `device` ("meta": checks and shapes only)."""
    from .models.loader import load_model
    path = a.draft_model or src.draft_dir
    try:
        return None if path is None else load_model(path, device, dtype)
    except ValueError as e:
        _fail("plan", f"--draft-model: {e}" if a.draft_model else e)


def _plan_preflight(a: argparse.Namespace, src: _Source, device, dtype, ps: _PlanSetup) -> int:
    """Every check of a plan run before loading -> threads: MoE target, budgets, draft, memory."""
    from .speculative import perf_model as pm
    if not src.args.is_moe:
        _fail("plan", f"the performance model is for MoE targets ({src.args.architecture} has no experts)")
    for B in ps.budgets:
        if B is not None:
            try:
                _budget(B, src.args, "--budgets")
            except ValueError as e:
                _fail("plan", e)
    meta, draft = _shape_only(src, dtype, "plan"), _plan_draft(a, src, "meta", dtype)
    elem = meta.tok_embeddings.weight.element_size()
    cap = a.ctx + max(max(ps.n_toks), 5) + 1                        # plan._Bench's cache per (model, bs)
    sizes = sorted({bs for _, bs, _, _ in pm.default_plan(ps.max_bs, ps.n_toks, ps.budgets)})
    parts = [("weights", _module_bytes(meta)), ("KV caches", sum(meta.args.kv_cache_bytes(b, cap, elem) for b in sizes))]
    if draft is not None:
        parts += [("draft weights", _module_bytes(draft)),
                  ("draft KV caches", sum(draft.args.kv_cache_bytes(b, cap, elem) for b in sizes))]
    _check_memory("plan", src, device, dtype, parts)
    return _set_threads(a, meta.num_parameters(), device)


def _run_plan(a: argparse.Namespace) -> int:
    """Measure ~20 points of the MoESD model on the real model, fit, print, save the profile."""
    import torch
    from .speculative import plan as planlib

    device, dtype = _device_dtype(a, "plan")
    ps = _plan_setup(a, device)
    src = _source(a, "plan")
    threads = _plan_preflight(a, src, device, dtype, ps)
    model = _load_target(a, src, device, dtype, "plan")
    draft = _plan_draft(a, src, device, dtype)
    t0 = time.perf_counter()
    meta = {"model": src.name, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        res = planlib.plan(model, draft, ps.max_bs, ps.n_toks, ps.budgets, ps.RP, a.ctx, repeats=ps.repeats,
                           seed=a.seed, meta=meta)
    except ImportError as e:
        _fail("plan", e)
    secs = time.perf_counter() - t0
    res.profile.to_json(a.out)
    plotted = planlib.plot(res, a.plot) if a.plot else None
    if res.unreliable:
        shown = "; ".join(res.noisy[:6]) + (f"; ... ({len(res.noisy)} in all)" if len(res.noisy) > 6 else "")
        print(f"specmoe plan: warning: the repeated runs of {len(res.noisy)} of {len(res.points)} points disagree "
              f"by more than {100 * planlib.NOISY_SPREAD:.0f}% (spread, (max - min) / median: {shown}): the fit is "
              f"unreliable; measure on a quiet machine, with --threads 1 for a small model", file=sys.stderr)
    return _report_plan(a, src, device, ps, res, plotted, secs, threads)


def _report_plan(a, src: _Source, device, ps: _PlanSetup, res, plotted, secs: float, threads: int) -> int:
    rows = res.rows()
    if a.json:
        print(json.dumps({"model": src.name, "device": str(device), "profile": a.out, "points": rows,
                          "mape_train_pct": round(res.mape_train, 3),
                          "mape_held_out_pct": None if res.mape_held_out is None else round(res.mape_held_out, 3),
                          "skipped": res.skipped, "noisy_points": res.noisy, "threads": threads,
                          "plot": a.plot if plotted else None, "seconds": round(secs, 2),
                          "params": res.profile.params}, indent=2))
        return 0
    print(f"specmoe plan: {src.name} on {device} ({len(rows)} points, median of {ps.repeats}, RP {ps.RP:g}, "
          f"{threads} thread(s))")
    print(f"{'kind':7s} {'bs':>4s} {'n_tok':>5s} {'budget':>6s} {'measured ms':>12s} {'predicted ms':>13s} "
          f"{'err %':>7s}  set")
    for r in rows:
        print(f"{r['kind']:7s} {r['bs']:4d} {r['n_tok']:5d} {str(r['budget'] or '-'):>6s} {r['measured_ms']:12.4f} "
              f"{r['predicted_ms']:13.4f} {r['error_pct']:7.2f}  {'held-out' if r['held_out'] else 'fit'}")
    ho = f"{res.mape_held_out:.2f}%" if res.mape_held_out is not None else "n/a"
    print(f"MAPE: fit points {res.mape_train:.2f}%, held-out points {ho}")
    for s_ in res.skipped:
        print(f"skipped: {s_}")
    print(f"profile (refitted on all points) -> {a.out}")
    if a.plot:
        print(f"plot -> {a.plot}" if plotted else "plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


# ---- models ---------------------------------------------------------------------------------------------

def _add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (machine-readable) only")


def _run_models(a: argparse.Namespace) -> int:
    from .models.config import SUPPORTED_ARCHITECTURES
    from .models.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        args = p.args()
        rows.append({"name": name, "architecture": args.architecture, "layers": args.n_layers,
                     "hidden": args.hidden_size, "experts": args.n_experts, "top_k": args.top_k,
                     "random_weights": p.random, "description": p.description})
    if a.json:
        print(json.dumps({"presets": rows, "architectures": list(SUPPORTED_ARCHITECTURES)}, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:16s} {r['architecture']:22s} L={r['layers']:<3d} h={r['hidden']:<5d} "
              f"E={r['experts']:<4d} K={r['top_k']:<2d} {r['description']}")
    print("checkpoint architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return 0


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("generate text with an MoE model (autoregressive, or speculative with --draft)",
                 _add_generate_args, _run_generate),
    "demo": ("autoregressive vs speculative vs speculative + expert budget on the embedded tiny pair",
             _add_demo_args, _run_demo),
    "plan": ("measure and fit the MoESD performance model (profile JSON for `generate --spec auto --profile`)",
             _add_plan_args, _run_plan),
    "models": ("list presets and supported checkpoint architectures", _add_models_args, _run_models),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="specmoe", description="Speculative decoding for MoE LLMs.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}
    for name, (help_, add, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)
        add(sp)
        sp.set_defaults(_run=run)
        subs[name] = sp
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    import torch
    parser, _ = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    threads = torch.get_num_threads()
    try:
        return a._run(a)
    except BaseException as e:                      # parallel: every rank stops with this rank's message
        _report_parallel_failure(a, e)
        raise
    finally:
        torch.set_num_threads(threads)              # --threads is this command's, not the caller's
        _end_parallel(a)


def _report_parallel_failure(a: argparse.Namespace, e: BaseException) -> None:
    if getattr(a, "parallel", None) is None or (isinstance(e, SystemExit) and not e.code):
        return
    from .models.parallel import report_failure
    a.parallel_failed = True
    report_failure(getattr(a, "rank", -1), str(e) or type(e).__name__)


def _end_parallel(a: argparse.Namespace) -> None:
    if getattr(a, "parallel", None) is None:
        return
    import torch.distributed as dist
    from .models.parallel import stop_watchdog
    stop_watchdog()
    if dist.is_initialized():
        if not getattr(a, "parallel_failed", False):   # after a failure the other ranks are ending on their own
            try:          # no rank tears the group (rank 0 hosts its store) down while another still uses it
                dist.barrier()
            except Exception:   # noqa: BLE001 - a peer gone: nothing to wait for, and nothing to mask
                pass
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

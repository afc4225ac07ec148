"""Load a local Hugging Face checkpoint folder into `model.Transformer`; save one back; tokenizers.

Shape legend: h hidden, V vocab, Hq/Hk heads, d head dim, E experts, f expert FFN, fs shared-expert FFN.

Folder contract (never any network): config.json; model.safetensors, or model.safetensors.index.json
plus the shards it names; tokenizer files (tokenizer.json, or whatever transformers' AutoTokenizer reads).

Expert weights are accepted in both layouts found in the wild:
  hub / `save_pretrained` layout   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
                                   (Mixtral: block_sparse_moe.experts.{e}.{w1,w3,w2}.weight)
  fused (transformers>=5 memory)   model.layers.{i}.mlp.experts.gate_up_proj [E, 2f, h], .down_proj [E, h, f]
and are stacked per layer into w13 [E, 2f, h] (gate rows, then up rows) and w2 [E, h, f]; q/k/v
projections are fused into wqkv [(Hq+2Hk)d, h], gate/up of dense MLPs into w13 [2f, h].

Every check -- folder and files (symlink loops, folders where files belong, shard paths that leave the
folder), architecture, tensor names (missing / unexpected, by name), shapes, dtypes, device memory (free
GPU memory on CUDA, MemAvailable on the CPU) -- runs on config.json and the safetensors headers before any
device allocation. Then the model is allocated once on the target device in the target dtype and each
tensor is copied from the memory-mapped file straight into its slot (one source tensor in host memory at a
time; `check_finite=True` also refuses NaN / Inf weights, by name). On the "meta" device only the checks
run and the shapes are built (nothing is read: planning, dry runs).

Host resources, for the checks a run makes before it allocates (the CLI's messages build on them):
    available_memory(device)        (available, total) bytes: free GPU memory, or the CPU's MemAvailable
    check_device_memory(n, device)  NotEnoughMemoryError when n bytes do not fit
    default_cpu_threads(n_params)   torch threads for a model of n_params parameters on the CPU
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .config import ModelArgs, SUPPORTED_ARCHITECTURES, UnsupportedModelError, token_ids
from .model import Transformer

SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


class CheckpointError(ValueError):
    """The checkpoint folder cannot be loaded as asked; the message names the file / tensor / value."""


class NotEnoughMemoryError(CheckpointError):
    """The weights (and caches) of a run do not fit the device's available memory."""


def _parse_device(name: str | torch.device) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "meta"):
        raise CheckpointError(f"unknown device {str(name)!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N", or "meta" (shapes only) -> the
    device; CheckpointError naming the value for anything else, or a CUDA device this machine lacks."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {str(name)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """None/"auto": bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in SUPPORTED_DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if _parse_device(device).type == "cuda" else torch.float32
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
    if name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[name]


# ---- files ----------------------------------------------------------------------------------------

def _file_problem(p: Path) -> str | None:
    """None if p is a regular file (through symlinks), else what it is instead: 'is missing', ..."""
    try:
        st = p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        if p.is_symlink():
            return f"is a broken symlink (to {os.readlink(p)!r})"
        return "is missing" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    return None if stat.S_ISREG(st.st_mode) else "is not a regular file"


def _present(p: Path) -> bool:
    """Something (a file, a folder, a symlink, even a broken one) has this name."""
    return p.is_symlink() or p.exists()


def _checked_file(p: Path) -> Path:
    problem = _file_problem(p)
    if problem is not None:
        raise CheckpointError(f"{p} {problem}")
    return p


def _read_json_file(p: Path, what: str = "") -> Any:
    try:
        return json.loads(_checked_file(p).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON{what}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None


def _read_json_object(p: Path) -> dict[str, Any]:
    doc = _read_json_file(p)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p} must hold a JSON object (key: value pairs), got a {type(doc).__name__}")
    return doc


def _checked_folder(path: Path, what: str = "checkpoint folder") -> Path:
    if path.is_dir():
        return path
    problem = _file_problem(path)
    if problem is None:
        raise CheckpointError(f"{what} {str(path)!r} is not a folder")
    if problem == "is missing":
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    raise CheckpointError(f"{what} {str(path)!r} {problem}")


# ---- config ---------------------------------------------------------------------------------------

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = _checked_folder(Path(path))
    cfg_file = path / "config.json"
    if not _present(cfg_file):
        raise CheckpointError(f"{str(path)!r} has no config.json (files: {_listing(path)})")
    return _read_json_object(cfg_file)


def load_args(path: str | os.PathLike) -> ModelArgs:
    cfg = read_config(path)
    try:
        return ModelArgs.from_hf_config(cfg)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} files)" if len(names) > limit else "") or "none"


# ---- weight name mapping --------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor and where it goes: dst_param[index] = tensor (index into the stacked param)."""

    key: str
    shape: tuple[int, ...]
    param: str
    index: tuple = ()


def weight_plan(args: ModelArgs, available: set[str] | None = None) -> list[Piece]:
    """The checkpoint tensors this architecture needs, and where each goes. `available` (the keys present)
    picks between the per-expert and the fused expert layouts, and Mixtral's two module names. DeepSeek,
    GLM-4.5 and GPT-OSS checkpoints: families.weight_plan."""
    from . import families
    if args.family in families.FAMILIES:
        return families.weight_plan(args, available)
    avail = available or set()
    h, V, d = args.hidden_size, args.vocab_size, args.head_dim
    q, kv = args.q_size, args.kv_size
    pl: list[Piece] = [Piece("model.embed_tokens.weight", (V, h), "tok_embeddings.weight"),
                       Piece("model.norm.weight", (h,), "norm.weight")]
    if not args.tie_word_embeddings:
        pl.append(Piece("lm_head.weight", (V, h), "output.weight"))
    for i in range(args.n_layers):
        P, M = f"model.layers.{i}.", f"layers.{i}."
        A = P + "self_attn."
        pl += [Piece(P + "input_layernorm.weight", (h,), M + "attention_norm.weight"),
               Piece(P + "post_attention_layernorm.weight", (h,), M + "ffn_norm.weight"),
               Piece(A + "q_proj.weight", (q, h), M + "attention.wqkv.weight", (slice(0, q),)),
               Piece(A + "k_proj.weight", (kv, h), M + "attention.wqkv.weight", (slice(q, q + kv),)),
               Piece(A + "v_proj.weight", (kv, h), M + "attention.wqkv.weight", (slice(q + kv, q + 2 * kv),)),
               Piece(A + "o_proj.weight", (h, q), M + "attention.wo.weight")]
        if args.qkv_bias:
            pl += [Piece(A + "q_proj.bias", (q,), M + "attention.wqkv.bias", (slice(0, q),)),
                   Piece(A + "k_proj.bias", (kv,), M + "attention.wqkv.bias", (slice(q, q + kv),)),
                   Piece(A + "v_proj.bias", (kv,), M + "attention.wqkv.bias", (slice(q + kv, q + 2 * kv),))]
        if args.o_bias:
            pl.append(Piece(A + "o_proj.bias", (h,), M + "attention.wo.bias"))
        if args.qk_norm:
            nq, nk = (d, d) if args.qk_norm == "head" else (q, kv)
            pl += [Piece(A + "q_norm.weight", (nq,), M + "attention.q_norm.weight"),
                   Piece(A + "k_norm.weight", (nk,), M + "attention.k_norm.weight")]
        if args.moe_layers[i]:
            pl += _moe_pieces(args, P, M + "ffn.", avail)
        else:
            pl += _mlp_pieces(P + "mlp.", M + "ffn.", h, args.intermediate_size, args.mlp_bias)
    return pl


def _mlp_pieces(src: str, dst: str, h: int, f: int, bias: bool = False) -> list[Piece]:
    pl = [Piece(src + "gate_proj.weight", (f, h), dst + "w13.weight", (slice(0, f),)),
          Piece(src + "up_proj.weight", (f, h), dst + "w13.weight", (slice(f, 2 * f),)),
          Piece(src + "down_proj.weight", (h, f), dst + "w2.weight")]
    if bias:
        pl += [Piece(src + "gate_proj.bias", (f,), dst + "w13.bias", (slice(0, f),)),
               Piece(src + "up_proj.bias", (f,), dst + "w13.bias", (slice(f, 2 * f),)),
               Piece(src + "down_proj.bias", (h,), dst + "w2.bias")]
    return pl


def _moe_pieces(args: ModelArgs, P: str, dst: str, avail: set[str]) -> list[Piece]:
    E, h, f = args.n_experts, args.hidden_size, args.moe_intermediate_size
    if args.family == "mixtral" and (P + "mlp.gate.weight") not in avail:
        mod, names = P + "block_sparse_moe.", ("w1", "w3", "w2")        # hub names
    else:
        mod, names = P + "mlp.", ("gate_proj", "up_proj", "down_proj")
    pl = [Piece(mod + "gate.weight", (E, h), dst + "gate.weight")]
    if (mod + "experts.gate_up_proj") in avail or (mod + "experts.down_proj") in avail:
        pl += [Piece(mod + "experts.gate_up_proj", (E, 2 * f, h), dst + "w13"),
               Piece(mod + "experts.down_proj", (E, h, f), dst + "w2")]
    else:
        g, u, dn = names
        for e in range(E):
            X = f"{mod}experts.{e}."
            pl += [Piece(X + f"{g}.weight", (f, h), dst + "w13", (e, slice(0, f))),
                   Piece(X + f"{u}.weight", (f, h), dst + "w13", (e, slice(f, 2 * f))),
                   Piece(X + f"{dn}.weight", (h, f), dst + "w2", (e,))]
    if args.shared_expert_intermediate_size:
        fs = args.shared_expert_intermediate_size
        pl += _mlp_pieces(mod + "shared_expert.", dst + "shared.", h, fs)
        pl.append(Piece(mod + "shared_expert_gate.weight", (1, h), dst + "shared_gate.weight"))
    return pl


# ---- safetensors headers --------------------------------------------------------------------------

@dataclass
class _Header:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _weight_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if _present(index):
        return [path / s for s in _shard_names(path, index)]
    if _present(single):
        return [_checked_file(single)]
    other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    hint = f" (found {', '.join(sorted(other))}: only safetensors checkpoints are supported)" if other else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}; "
                          f"files: {_listing(path)}")


def _shard_names(path: Path, index: Path) -> list[str]:
    """The shard files model.safetensors.index.json names: relative paths inside the folder, present."""
    doc = _read_json_file(index, " (a safetensors index)")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names (a JSON object), "
                              f"got {type(wm).__name__ if wm is not None else 'none'}")
    bad = [f"{k!r}: {v!r}" for k, v in wm.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{index}: 'weight_map' values must be shard file names, got {', '.join(bad[:4])}")
    shards = sorted(set(wm.values()))
    outside = [s for s in shards if os.path.isabs(s) or os.path.normpath(s).split(os.sep)[0] == os.pardir]
    if outside:
        raise CheckpointError(f"{index}: shard paths must stay inside the checkpoint folder, got "
                              f"{', '.join(map(repr, outside))}")
    missing = [s for s in shards if not _present(path / s)]
    if missing:
        raise CheckpointError(f"{path}: shard files named in model.safetensors.index.json are missing: "
                              f"{', '.join(missing)}")
    for s in shards:
        _checked_file(path / s)
    return shards


def read_headers(files: Iterable[Path]) -> dict[str, _Header]:
    from safetensors import safe_open

    headers: dict[str, _Header] = {}
    for fp in files:
        try:
            with safe_open(str(fp), framework="pt", device="cpu") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    headers[k] = _Header(fp, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read safetensors file {fp}: {e}") from None
    return headers


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return s + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def validate(args: ModelArgs, headers: dict[str, _Header], where: str) -> list[Piece]:
    """All header-level checks; returns the plan. Raises CheckpointError naming the offending tensors."""
    plan = weight_plan(args, set(headers))
    need = {p.key for p in plan}
    missing = need - set(headers)
    if missing:
        raise CheckpointError(f"{where}: missing tensors for {args.architecture}: {_names(missing)}")
    from .families import shared_copies
    ignorable = {k for k in headers if k.endswith(_IGNORED_SUFFIXES)} | (shared_copies(args) & set(headers))
    if args.tie_word_embeddings:
        ignorable.add("lm_head.weight")   # tied: transformers uses the embedding too
    unexpected = set(headers) - need - ignorable
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors for {args.architecture} "
                              f"(config and weights disagree?): {_names(unexpected)}")
    bad_shape = [f"{p.key} {list(headers[p.key].shape)} (expected {list(p.shape)})"
                 for p in plan if headers[p.key].shape != p.shape]
    if bad_shape:
        raise CheckpointError(f"{where}: shape mismatch: {'; '.join(bad_shape[:6])}"
                              + (f"; ... ({len(bad_shape)} in all)" if len(bad_shape) > 6 else ""))
    bad_dtype = sorted({f"{p.key} ({headers[p.key].dtype})" for p in plan if headers[p.key].dtype not in _ST_DTYPES})
    if bad_dtype:
        raise CheckpointError(f"{where}: unsupported tensor dtype: {_names(bad_dtype, 4)}; supported: "
                              f"{', '.join(_ST_DTYPES)} (quantized checkpoints are not supported)")
    return plan


# ---- model construction ---------------------------------------------------------------------------

def empty_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """Allocate (uninitialized) parameters once, directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def param_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        m = Transformer(args)
    return m.num_parameters() * torch.empty((), dtype=dtype).element_size()


# ---- host resources ---------------------------------------------------------------------------------

GiB = 2**30
SMALL_MODEL_PARAMS = 100_000_000       # below this, one CPU thread is as fast as many (and immune to a busy core)


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device | str) -> tuple[int, int] | None:
    """(available, total) bytes on `device`: free GPU memory, or the host's MemAvailable / MemTotal for the
    CPU; None where unknown (the meta device, a host without /proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device} requested but CUDA is not available")
        return torch.cuda.mem_get_info(device)
    if device.type == "cpu":
        avail, total = _meminfo_bytes("MemAvailable"), _meminfo_bytes("MemTotal")
        return (avail, total) if avail is not None and total is not None else None
    return None


def check_device_memory(nbytes: int, device: torch.device | str, what: str, detail: str = "weights") -> None:
    """Raise NotEnoughMemoryError if nbytes (of `detail`) exceed what `device` has available."""
    device = torch.device(device)
    try:
        mem = available_memory(device)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if mem is None or nbytes <= mem[0]:
        return
    free, total = mem
    kind = "free" if device.type == "cuda" else "available (MemAvailable)"
    raise NotEnoughMemoryError(f"{what}: needs {nbytes / GiB:.1f} GiB of {detail} but {device} has only "
                               f"{free / GiB:.1f} GiB {kind} of {total / GiB:.1f} GiB")


def default_cpu_threads(n_params: int) -> int:
    """torch threads for a model of n_params parameters on the CPU: 1 for small models (their matmuls are
    too small to split, and OpenMP threads spin-wait when another process holds a core), else torch's
    default (the machine's cores)."""
    return 1 if n_params < SMALL_MODEL_PARAMS else torch.get_num_threads()


# ---- loading ----------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = None, check_finite: bool = False, offload=None,
               parallel=None, comm=None) -> Transformer:
    """Checkpoint folder -> eval-mode Transformer on `device` in `dtype` (None: bf16 on CUDA, fp32 on CPU).
    device "meta": every check, then the shapes only (no tensor is read). check_finite: refuse NaN / Inf
    weights (one more pass over each tensor while it is copied). offload: an `offload.OffloadConfig`: the
    MoE layers' experts are copied from the files straight into host memory (page-locked on CUDA), the
    rest and an expert cache go to `device` (models/offload.py); its errors name the setting, before
    anything is allocated. parallel: a `parallel.ParallelConfig` (tensor or expert parallelism): this
    rank's shard only, read as slices of the memory-mapped files (models/parallel.py; `comm`, or the
    initialized / torchrun process group)."""
    path = Path(path)
    device = resolve_device(device)
    tdtype = resolve_dtype(dtype, device)
    args = load_args(path)
    headers = read_headers(_weight_files(path))
    from .families import with_checkpoint_layers
    args = with_checkpoint_layers(args, headers)    # MTP layers: only those the files carry
    plan = validate(args, headers, str(path))
    rules: dict = {}
    if parallel is not None:
        if offload is not None:
            raise ValueError("expert offloading together with tensor / expert parallelism is not supported")
        from . import parallel as par
        comm = par.resolve_comm(parallel, comm, device)
        local = par.local_meta_model(args, parallel, comm)
        check_device_memory(local.num_parameters() * torch.empty((), dtype=tdtype).element_size(), device,
                            f"{path} (rank {comm.rank} of {comm.world})")
        model = par.empty_local_model(args, parallel, comm, device, tdtype)
        rules = model.parallel.rules
        with torch.device("meta"):
            full_shapes = {n: tuple(t.shape) for n, t in Transformer(args).named_parameters()}
    elif offload is not None:
        from .offload import check_offload_memory, empty_offloaded_model, plan_offload
        oplan = plan_offload(args, tdtype, offload)
        check_offload_memory(oplan, device, str(path), check_device_memory)
        model = empty_offloaded_model(args, device, tdtype, offload, oplan)
    else:
        check_device_memory(param_bytes(args, tdtype), device, str(path))
        model = empty_model(args, device, tdtype)
    if device.type == "meta":
        return model
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    by_file: dict[Path, list[Piece]] = {}
    for p in plan:
        by_file.setdefault(headers[p.key].file, []).append(p)
    not_finite: list[str] = []
    from safetensors import safe_open
    with torch.no_grad():
        for fp, pieces in by_file.items():
            with safe_open(str(fp), framework="pt", device="cpu") as f:  # memory-mapped
                for p in pieces:
                    dst = params[p.param]
                    rule = rules.get(p.param)
                    # this rank's parts of the piece (parallel: slices read from the mapped file)
                    parts = [((), p.index)] if rule is None else par.map_piece(p.index, p.shape, rule)
                    for src_index, dst_index in parts:
                        view = dst[dst_index] if dst_index else dst
                        src = f.get_slice(p.key)[src_index] if src_index else f.get_tensor(p.key)
                        if check_finite and not bool(torch.isfinite(src).all()):
                            not_finite.append(p.key)
                        view.copy_(src)
                        filled[p.param] = filled.get(p.param, 0) + view.numel()
    if not_finite:
        raise CheckpointError(f"{path}: tensors with NaN or Inf values: {_names(not_finite)}")
    want = {n: (t.numel() if n not in rules else par.rule_numel(rules[n], full_shapes[n])) for n, t in params.items()}
    unfilled = [n for n in params if filled.get(n, 0) != want[n]]
    if unfilled:  # a bug in weight_plan, not a user error
        raise AssertionError(f"weight plan left parameters (partly) unfilled: {unfilled}")
    return model


# ---- saving (HF format, hub layout) ---------------------------------------------------------------

def hf_state_dict(model: Transformer, fused_experts: bool = False) -> dict[str, Tensor]:
    """Our parameters under HF names, as views (no copies). fused_experts=False: hub / save_pretrained
    layout (per-expert tensors); True: transformers>=5 in-memory names (`mlp.experts.gate_up_proj` ...,
    Mixtral under `mlp.`), usable with `load_state_dict(..., assign=True)` to share our tensors."""
    args = model.args
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    if fused_experts and args.expert_act != "gpt_oss":   # GPT-OSS's plan already is its fused layout
        # Fused layout: stacked expert tensors are the same objects as ours.
        for i in range(args.n_layers):
            if args.moe_layers[i]:
                P, M = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
                out[P + "gate.weight"] = params[M + "gate.weight"]
                out[P + "experts.gate_up_proj"] = params[M + "w13"]
                out[P + "experts.down_proj"] = params[M + "w2"]
    avail = set(out)
    for p in weight_plan(args, avail if fused_experts else None):
        if p.key in out:
            continue
        src = params[p.param]
        out[p.key] = src[p.index] if p.index else src
    return out


def save_checkpoint(model: Transformer, path: str | os.PathLike, hf_config: dict[str, Any],
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (hub layout) that both this loader and transformers load."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype else v).detach().contiguous().clone().cpu()
          for k, v in hf_state_dict(model).items()}
    cfg = dict(hf_config)
    if dtype is not None:
        cfg["dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---- tokenizer --------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> ids from the checkpoint folder's own files, offline.

    tokenizer.json is read with the `tokenizers` library (the file transformers' fast tokenizers use);
    folders without one fall back to transformers' AutoTokenizer with local_files_only=True.
    eos_token_ids: union of generation_config.json / config.json eos ids and the tokenizer's eos token.
    A file that is present but unreadable (bad JSON, a non-integer eos id) is an error, never skipped.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        tcfg = _optional_json(path / "tokenizer_config.json")
        self._hf = None
        self._tok = None
        if _present(path / "tokenizer.json"):
            from tokenizers import Tokenizer as _Tok
            tj = _checked_file(path / "tokenizer.json")
            try:
                self._tok = _Tok.from_file(str(tj))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise CheckpointError(f"{tj} is not a valid tokenizer file: {e}") from None
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise CheckpointError(f"{path}: no tokenizer.json, and transformers (needed to read other "
                                      f"tokenizer formats) is not installed") from None
            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot load a tokenizer from the folder's files: {e}") from None
        eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos.update(_token_ids(_optional_json(path / name), "eos_token_id", path / name))
        tok_eos = _token_str(tcfg.get("eos_token"))
        if tok_eos is not None and self.token_to_id(tok_eos) is not None:
            eos.add(self.token_to_id(tok_eos))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        bos = _token_str(tcfg.get("bos_token"))
        self.bos_token_id = self.token_to_id(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else len(self._hf)

    def token_to_id(self, token: str) -> int | None:
        if self._tok is not None:
            return self._tok.token_to_id(token)
        i = self._hf.convert_tokens_to_ids(token)
        return None if i == self._hf.unk_token_id and token != self._hf.unk_token else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_continuation(self, prompt: Iterable[int], ids: Iterable[int]) -> str:
        """The text `ids` add after `prompt`: decode(prompt + ids) past the text decode(prompt) gives, so
        that word boundaries survive (decoders that join words with spaces, or merge bytes, across tokens)."""
        prompt = list(prompt)
        head, full = self.decode(prompt), self.decode(prompt + list(ids))
        return full[len(os.path.commonprefix([head, full])):]


def _optional_json(p: Path) -> dict[str, Any]:
    """A JSON object file that may be absent ({}); present, it must parse as an object."""
    return _read_json_object(p) if _present(p) else {}


def _token_ids(doc: dict[str, Any], key: str, where: Path) -> set[int]:
    """doc[key]: a token id, a list of them, or absent/null -> the ids."""
    try:
        return set(token_ids(doc.get(key), key))
    except UnsupportedModelError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _token_str(t: Any) -> str | None:
    if isinstance(t, dict):  # AddedToken serialized form
        return t.get("content")
    return t


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = _checked_folder(Path(path), "tokenizer folder")
    if not any(_present(path / n) for n in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                            "tokenizer_config.json")):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json)")
    return Tokenizer(path)


__all__ = ["load_model", "load_args", "load_tokenizer", "Tokenizer", "save_checkpoint", "hf_state_dict",
           "weight_plan", "CheckpointError", "NotEnoughMemoryError", "SUPPORTED_ARCHITECTURES", "resolve_device",
           "resolve_dtype",
           "empty_model", "param_bytes", "available_memory", "check_device_memory", "default_cpu_threads"]

"""Fused CPU kernels for the LLM engine: decode step, prompt attention, (residual add +) RMSNorm
and LayerNorm, SwiGLU gate, greedy argmax, and three linears: bf16 on Intel AMX tiles, fp32 and
bf16 on AVX-512, fp32 on AVX2 + FMA.

Why: on the CPU, a batch-64 decode step spends as long outside the matmuls as in them. torch runs
RoPE, the KV-cache write (`index_put_`, ~170 us a call), the attention and RMSNorm as a dozen small
ops each, and its attention paths for these shapes are slow: SDPA's CPU flash kernel reaches ~60
GFLOP/s on 128-token prompts, and a one-query decode attention is bound by reading the KV cache,
which torch's paths do at well under the memory bandwidth. The kernels here (AVX-512 or AVX2, fp32
accumulation, OpenMP) do each of those in one pass; `csrc/cpu_kernels.cpp` has them, written over
the 16-lane vector layer of `csrc/vec16.h`.

The source is compiled on first use with the system's g++ (a few seconds; ~20 s for the AVX2
build) into a per-user cache keyed by the source's hash and the CPU's instruction sets
(`-march=native`: a cache shared by different machines must not hand one a library built for
another). Without g++, without AVX2 and FMA, or when the build fails, `available()` is False and
the model keeps its torch paths. GENMILL_CPU_KERNELS=avx2 builds the AVX2 kernels on an AVX-512 CPU
too; GENMILL_CPU_KERNELS=off leaves the kernels out. Each kernel is a torch custom op
(`genmill::...`), so a compiled (inductor) graph calls it as an opaque kernel; eager code calls the
kernel directly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCE = _CSRC / "cpu_kernels.cpp"
HEADERS = tuple(
    _CSRC / name
    for name in ("vec16.h", "amx_linear.h", "amx_attention.h", "fma_linear.h", "avx512_linear.h", "logit_screen.h", "int8_screen.h")
)
HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# -ffp-contract=off: a * b + c stays two roundings where torch rounds twice (RoPE, residuals)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]
# GENMILL_CPU_KERNELS: "auto" (default: the widest instruction set the CPU has), "avx2" (the AVX2
# build on an AVX-512 CPU too: to compare the two, or where AVX-512 lowers the clock), "off"
_CHOICES = ("auto", "avx2", "off")


def _choice() -> str:
    choice = os.environ.get("GENMILL_CPU_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"GENMILL_CPU_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def _flags() -> list[str]:
    return [*_FLAGS, "-mno-avx512f"] if instruction_set() == "avx2" else _FLAGS


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genmill" / "kernels"


def _build() -> Path | None:
    """Compile the kernels once per source version (and machine: -march=native); None on failure."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    sources = "".join(path.read_text() for path in (SOURCE, *HEADERS))
    key = sources + " ".join(_flags()) + os.uname().machine + " ".join(sorted(_cpu_flags()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        lib = Path(tmp) / "kernels.so"
        command = [cxx, *_flags(), str(SOURCE), "-o", str(lib)]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            log.info("CPU kernels not built (%s): %s", cxx, result.stderr[-2000:])
            return None
        os.replace(lib, target)  # atomic: concurrent workers never load a half-written file
    return target


_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "genmill_decode_step": [_INT, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
    + [_I64] * 5
    + [_F32, _F32],
    "genmill_prefill_step": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR]
    + [_I64] * 6
    + [_F32, _F32],
    "genmill_rms_norm": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32],
    "genmill_layer_norm": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32],
    "genmill_silu_mul": [_INT, _PTR, _PTR, _I64, _I64],
    "genmill_argmax": [_INT, _PTR, _PTR, _I64, _I64],
    "genmill_screened_argmax": [_PTR, _I64, _PTR, _PTR, _F32, _I64, _I64, _I64, _PTR, _PTR],
    "genmill_int8_screen": [_PTR, _I64] + [_PTR] * 7 + [_F32, _I64, _I64, _I64, _INT, _INT, _PTR, _PTR],
    "genmill_isa": [],
    "genmill_amx_available": [],
    "genmill_amx_linear": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT],
    "genmill_amx_argmax": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "genmill_fma_linear": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT],
    "genmill_avx512_linear": [_INT, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT],
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def instruction_set() -> str | None:
    """The vector instructions the kernels are built for here: "avx512", "avx2", or None (not
    built: the CPU has neither, or GENMILL_CPU_KERNELS=off)."""
    flags, choice = _cpu_flags(), _choice()
    if choice == "off":
        return None
    if choice == "auto" and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if instruction_set() is None:
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path)) if path is not None else None
    except OSError as exc:  # e.g. no permission to write the cache directory
        log.info("CPU kernels unavailable: %s", exc)
        return None
    if lib is not None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


def built_for() -> str | None:
    """The instruction set of the loaded library ("avx512" or "avx2"), None when not built."""
    lib = _library()
    return None if lib is None else {512: "avx512", 256: "avx2"}[lib.genmill_isa()]


def _kernel_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function as the torch custom op `genmill::name`, which compiled
    graphs call as an opaque kernel; eager callers get the function itself (the custom-op
    dispatcher costs ~8 us a call, ~50 calls a decode step). `.op` is the custom op
    (`.op.register_fake`)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(f"genmill::{name}", mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        call.op = op
        return call

    return wrap


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _check(status: int, what: str, head_dim: int) -> None:
    if status != 0:
        raise RuntimeError(f"{what} does not support head_dim {head_dim}")


# ---- decode step ----


@_kernel_op("decode_step", mutates_args=("k_cache", "v_cache"))
def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_scale: float,
    scale: float,
) -> Tensor:
    """New tokens, each its own item b: rotate q and k (RoPE, when `cos`/`sin` `[S, D]` float32
    are not empty), write k and v to slot `pos[b]` of cache row `rows[b]`, and attend over that
    row's slots 0..pos[b]. A decode step is one token per row; a few consecutive tokens of a row
    (speculative verification, short prompts) are items of the same row: every item's k/v is
    written before any item attends, so each sees exactly the slots up to its own position.

    q `[N, H*D]`, k/v `[N, H_kv*D]` (rows may be strided, e.g. column slices of one qkv output);
    caches `[B', H_kv, S, D]` contiguous; `q_scale` scales the rotated query in the model dtype
    first (OPT), `scale` the scores. Returns `[N, H*D]`.
    """
    n = q.shape[0]
    h_kv, s, d = k_cache.shape[1:]
    h = q.shape[1] // d
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rows, pos = rows.to(torch.int64).contiguous(), pos.to(torch.int64).contiguous()
    out = torch.empty(n, h * d, dtype=q.dtype)
    status = _library().genmill_decode_step(
        _DTYPES[q.dtype], q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr(), pos.data_ptr(), _ptr(cos), _ptr(sin),
        out.data_ptr(), n, h, h_kv, s, d, q_scale, scale,
    )  # fmt: skip
    _check(status, "decode_step", d)
    return out


@decode_step.op.register_fake
def _(q, k, v, k_cache, v_cache, rows, pos, cos, sin, q_scale, scale) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1])


# ---- prompt chunk ----


@_kernel_op("prefill_step", mutates_args=("k_cache", "v_cache"))
def prefill_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    start: int,
    cos: Tensor,
    sin: Tensor,
    q_scale: float,
    scale: float,
) -> Tensor:
    """A prompt chunk: every row's T tokens sit at positions start..start+T-1. Rotates q and k
    (RoPE, when `cos`/`sin` are not empty), writes k and v to slots start..start+T-1 of cache rows
    `rows [B]`, and attends causally over slots 0..start+T-1 (query i sees 0..start+i).

    q `[B, T, H*D]`, k/v `[B, T, H_kv*D]` (strided rows allowed, e.g. column slices of one qkv
    output); caches `[B', H_kv, S, D]` contiguous. Returns `[B, T, H*D]`.
    """
    b, t = q.shape[:2]
    h_kv, s, d = k_cache.shape[1:]
    h = q.shape[2] // d
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    strides = torch.tensor([q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)])
    rows = rows.to(torch.int64).contiguous()
    out = torch.empty(b, t, h * d, dtype=q.dtype)
    status = _library().genmill_prefill_step(
        _DTYPES[q.dtype], q.data_ptr(), strides.data_ptr(), k.data_ptr(), strides.data_ptr() + 16,
        v.data_ptr(), strides.data_ptr() + 32, k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr(), start,
        _ptr(cos), _ptr(sin), out.data_ptr(), b, h, h_kv, t, s, d, q_scale, scale,
    )  # fmt: skip
    _check(status, "prefill_step", d)
    return out


@prefill_step.op.register_fake
def _(q, k, v, k_cache, v_cache, rows, start, cos, sin, q_scale, scale) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2])


# ---- RMSNorm ----


@_kernel_op("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm in one pass: weight * T(x / sqrt(mean(x^2) + eps)), fp32 inside."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    _library().genmill_rms_norm(_DTYPES[x.dtype], x.data_ptr(), None, weight.contiguous().data_ptr(), None,
                                y.data_ptr(), n, c, eps)  # fmt: skip
    return y


@rms_norm.op.register_fake
def _(x, weight, eps) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_kernel_op("add_rms_norm")
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rms_norm(s)) with s = x + residual: a block's residual add and the next norm in one pass."""
    x, residual = x.contiguous(), residual.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    _library().genmill_rms_norm(_DTYPES[x.dtype], x.data_ptr(), residual.data_ptr(),
                                weight.contiguous().data_ptr(), s.data_ptr(), y.data_ptr(), n, c, eps)  # fmt: skip
    return s, y


@add_rms_norm.op.register_fake
def _(x, residual, weight, eps) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- LayerNorm ----


def _layer_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor | None, Tensor]:
    # contiguous copies held in locals: they must outlive the call that reads them
    x, residual, weight, bias = (None if t is None else t.contiguous() for t in (x, residual, weight, bias))
    s = None if residual is None else torch.empty_like(x)
    y = torch.empty_like(x)
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    _library().genmill_layer_norm(
        _DTYPES[x.dtype], x.data_ptr(), _ptr(residual), _ptr(weight), _ptr(bias), _ptr(s), y.data_ptr(),
        n, c, eps,
    )  # fmt: skip
    return s, y


@_kernel_op("layer_norm")
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """torch's LayerNorm over the last dim in one pass (fp32 inside, one rounding); weight and bias
    in x's dtype, or None."""
    return _layer_norm(x, None, weight, bias, eps)[1]


@layer_norm.op.register_fake
def _(x, weight, bias, eps) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_kernel_op("add_layer_norm")
def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(s, layer_norm(s)) with s = x + residual (rounded to x's dtype, as torch's add)."""
    return _layer_norm(x, residual, weight, bias, eps)


@add_layer_norm.op.register_fake
def _(x, residual, weight, bias, eps) -> tuple[Tensor, Tensor]:
    like = torch.contiguous_format
    return torch.empty_like(x, memory_format=like), torch.empty_like(x, memory_format=like)


# ---- SwiGLU gate ----


@_kernel_op("silu_mul")
def silu_mul(h: Tensor) -> Tensor:
    """silu(a) * b for h = [a | b] along the last dim (a fused gate/up projection's output)."""
    h = h.contiguous()
    i = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], i)
    _library().genmill_silu_mul(_DTYPES[h.dtype], h.data_ptr(), y.data_ptr(), h.numel() // h.shape[-1], i)
    return y


@silu_mul.op.register_fake
def _(h) -> Tensor:
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


# ---- greedy pick ----


def supports_argmax(logits: Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype in _DTYPES and logits.dim() == 2


@_kernel_op("argmax")
def argmax(logits: Tensor) -> Tensor:
    """Index of each row's first maximum of `logits [B, V]` (NaN counts as the maximum, as in
    torch.max): one pass, ~10x faster than torch's max().indices on bf16 logits."""
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _library().genmill_argmax(_DTYPES[logits.dtype], logits.data_ptr(), out.data_ptr(), *logits.shape)
    return out


@argmax.op.register_fake
def _(logits) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def screened_argmax(x: Tensor, approx: Tensor, weight: Tensor, wmax: float) -> tuple[Tensor, Tensor]:
    """The argmax of `x @ weight.T` as `avx512_linear` computes it in fp32 (first maximum), found from
    `approx`, the same logits from bf16 copies of x and weight (`avx512_linear` in bf16), and
    recomputed exactly only where the approximation's error bound leaves a doubt (see
    csrc/logit_screen.h). x `[M, K]` fp32, approx `[M, N]` bf16, weight `[N, K]` fp32 row-major,
    `wmax` >= every row norm of weight. Returns ids `[M]` (-1 where a value is not finite: the
    caller computes those rows in full) and how many logits each row recomputed."""
    m, k = x.shape
    n = weight.shape[0]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or approx.dtype != torch.bfloat16:
        got = f"{x.dtype}, {approx.dtype}, {weight.dtype}"
        raise TypeError(f"screened_argmax takes fp32 x, bf16 approx and fp32 weight, got {got}")
    if approx.shape != (m, n) or weight.shape[1] != k:
        got = f"x {tuple(x.shape)}, approx {tuple(approx.shape)}, weight {tuple(weight.shape)}"
        raise ValueError(f"screened_argmax: shapes do not fit: {got}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    approx, weight = approx.contiguous(), weight.contiguous()
    ids, counts = torch.empty(m, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
    done = _library().genmill_screened_argmax(
        x.data_ptr(), x.stride(0), approx.data_ptr(), weight.data_ptr(), wmax, m, n, k, ids.data_ptr(),
        counts.data_ptr(),
    )  # fmt: skip
    if not done:
        raise RuntimeError("screened_argmax needs AVX512_BF16 (not built here)")
    return ids, counts


@dataclass(frozen=True)
class Int8Head:
    """The int8 copy of a bf16 or fp32 LM head `[N, K]` that `int8_screened_argmax` reads (csrc/int8_screen.h):
    W ~ scale * wq per column, wq packed in `avx512_linear`'s panels of 4-byte K steps (or, `amx`,
    in `amx_linear`'s blocks of 32 columns and 64-byte K steps, summed on AMX tiles: for a bf16 head on
    AMX tiles, or an fp32 head on a CPU with them), and the error bound's terms, per panel (or block)."""

    wq: Tensor  # int8, flat
    colsum: Tensor  # int32 [N]: 128 x each column's int8 sum
    scale: Tensor  # fp32 [N]
    # per panel of 48 columns (block of 32), rounded up: the largest scale, sum |W_v| and
    # |W_v - scale_v wq_v|_2
    scale_max: Tensor
    l1: Tensor
    err2: Tensor
    tiny: float  # covers the bf16 products VDPBF16PS (TDPBF16PS) flushes to zero
    n: int
    k: int
    amx: bool = False
    dtype: torch.dtype = torch.bfloat16  # the head's


@functools.cache
def int8_screen_available(amx: bool = False) -> bool:
    """Whether `int8_screened_argmax` runs here: the AVX-512 build on a CPU with AVX512_VNNI and
    AVX512_BF16 (`amx`: for a head on AMX tiles, which the CPU has too)."""
    lib = _library()
    if lib is None or not avx512_linear_available(torch.bfloat16) or (amx and not amx_available()):
        return False
    head = int8_screen_pack(torch.ones(1, 4, dtype=torch.bfloat16), amx=amx)
    x = w = torch.ones(1, 4, dtype=torch.bfloat16)
    return _int8_screen(x, head, w)[0] == 0


def int8_screen_pack(weight: Tensor, amx: bool = False, block: int = 4096) -> Int8Head:
    """A bf16 (K even) or fp32 head `[N, K]` -> its `Int8Head` (per-column symmetric int8, the bound
    terms in float64 and rounded up to fp32; `block` rows at a time); `amx`: summed on AMX tiles."""
    n, k = weight.shape
    if weight.dtype not in (torch.bfloat16, torch.float32) or (weight.dtype == torch.bfloat16 and k % 2):
        got = f"{weight.dtype} {(n, k)}"
        raise ValueError(f"int8_screen_pack takes a bf16 weight with an even K or an fp32 one, got {got}")
    kq = -(-k // 4) * 4
    panel = AMX_BLOCK if amx else AVX512_PANEL
    parts: dict[str, list[Tensor]] = {"q": [], "scale": [], "l1": [], "err2": []}
    wmax = 0.0
    for w in weight.split(block):
        w = w.double()  # exactly
        amax = w.abs().amax(dim=1)
        wmax = max(wmax, amax.max().item())
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float()
        q = torch.round(w / scale.double()[:, None]).clamp(-127, 127)
        parts["q"].append(q.to(torch.int8))
        parts["scale"].append(scale)
        parts["l1"].append(float32_up(w.abs().sum(dim=1)))
        parts["err2"].append(float32_up((w - scale.double()[:, None] * q).norm(dim=1)))
    q = torch.cat(parts["q"])
    if amx:
        # [nb][ks][t][quad][c][e] = q[nb*32 + t*16 + c, ks*64 + 4*quad + e], N to 32 and K to 64 zero-padded
        np_, kp = -(-n // AMX_BLOCK) * AMX_BLOCK, -(-k // 64) * 64
        w = torch.nn.functional.pad(q, (0, kp - k, 0, np_ - n))
        packed = w.view(np_ // 32, 2, 16, kp // 64, 16, 4).permute(0, 3, 1, 4, 2, 5).contiguous().view(-1)
    else:  # avx512_linear's panels of 4-byte K steps
        w = torch.nn.functional.pad(q, (0, kq - k))
        packed = torch.cat([p.view(p.shape[0], -1, 4).transpose(0, 1).reshape(-1) for p in w.split(panel)])
    scale = torch.cat(parts["scale"])
    # the bound's rounding term scales with |a'| <= Kq 127^2 scale: 0 for an all-zero column (its scale,
    # 1, multiplies a zero sum), which must not set its panel's term
    nonzero = torch.cat([(p != 0).any(dim=1) for p in parts["q"]])

    def per_panel(values: Tensor) -> Tensor:
        return torch.stack([p.max() for p in values.split(panel)]).contiguous()

    return Int8Head(
        wq=packed,
        colsum=(q.sum(dim=1, dtype=torch.int32) * 128).contiguous(),
        scale=scale,
        scale_max=per_panel(torch.where(nonzero, scale, 0)),
        l1=per_panel(torch.cat(parts["l1"])),
        err2=per_panel(torch.cat(parts["err2"])),
        tiny=float(float32_up(torch.tensor(2.0**-100 * k * (1 + wmax), dtype=torch.float64))),
        n=n,
        k=k,
        amx=amx,
        dtype=weight.dtype,
    )


def int8_screened_argmax(x: Tensor, head: Int8Head, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax of `x @ weight.T` as the engine's head computes it (first maximum): in bf16 on
    `avx512_linear` (`head.amx`: on `amx_linear`), or in fp32 on `avx512_linear`; found from `head`,
    the int8 copy of `weight`, and recomputed exactly only where the copy's error bound leaves a
    doubt (see csrc/int8_screen.h). x `[M, K]` and weight `[N, K]` row-major in the head's dtype
    (under 2 GiB: the exact pass addresses it with 32-bit offsets). Returns ids `[M]` (-1 where a
    value is not finite or too many logits were in doubt: the caller computes those rows in full)
    and how many logits each row recomputed."""
    if x.dtype != head.dtype or weight.dtype != head.dtype or x.dim() != 2:
        got = f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype}"
        raise TypeError(f"int8_screened_argmax takes {head.dtype} x [M, K] and weight, got {got}")
    if x.shape[1] != head.k or weight.shape != (head.n, head.k) or weight.numel() * weight.itemsize >= 2**31:
        got = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, head {head.n}x{head.k}"
        raise ValueError(f"int8_screened_argmax: shapes do not fit: {got}")
    status, ids, kept = _int8_screen(x, head, weight.contiguous())
    if status != 0:
        need = "AMX tiles, " if head.amx else ""
        raise RuntimeError(f"int8_screened_argmax needs {need}AVX512_VNNI and AVX512_BF16 (not built here)")
    return ids, kept


def _int8_screen(x: Tensor, head: Int8Head, weight: Tensor) -> tuple[int, Tensor, Tensor]:
    x = x if x.stride(-1) == 1 else x.contiguous()
    m = x.shape[0]
    ids, kept = torch.empty(m, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
    status = _library().genmill_int8_screen(
        x.data_ptr(), x.stride(0), head.wq.data_ptr(), head.colsum.data_ptr(), head.scale.data_ptr(),
        head.scale_max.data_ptr(), head.l1.data_ptr(), head.err2.data_ptr(), weight.data_ptr(), head.tiny, m,
        head.n, head.k, int(head.dtype == torch.bfloat16), int(head.amx), ids.data_ptr(), kept.data_ptr(),
    )  # fmt: skip
    return status, ids, kept


def float32_up(value: Tensor) -> Tensor:
    """float64 values -> the smallest float32 values >= them (bounds stay bounds in fp32)."""
    f = value.float()
    return torch.where(f.double() < value, torch.nextafter(f, torch.tensor(math.inf)), f)


# ---- linears: shared by the three kernels below ----


def _check_bias(name: str, bias: Tensor | None, out_features: int) -> None:
    if bias is not None and (
        bias.dtype != torch.float32 or bias.shape != (out_features,) or not bias.is_contiguous()
    ):
        got = f"{bias.dtype} {tuple(bias.shape)}"
        raise ValueError(f"{name}: bias must be a contiguous fp32 [{out_features}], got {got}")


def _rows(x: Tensor, pad_to_even: bool = False) -> Tensor:
    """x `[..., K]` as rows `[M, K]` with unit column stride (a column slice keeps its row stride);
    `pad_to_even`: an odd K gets a zero column."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if pad_to_even and k % 2:
        return torch.nn.functional.pad(x2, (0, 1))
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _run_linear(
    kernel: Any, x: Tensor, x2: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, relu: bool,
    *lead: int,
) -> tuple[int, Tensor]:
    """`kernel(*lead, x, row stride, packed, bias, y, M, N, K, relu)` into a new output in x's dtype;
    its status (0: done) and the output shaped like x."""
    out = torch.empty(x2.shape[0], out_features, dtype=x.dtype)
    status = 0
    if x2.shape[0] > 0:
        status = kernel(
            *lead, x2.data_ptr(), x2.stride(0), packed.data_ptr(), _ptr(bias), out.data_ptr(),
            x2.shape[0], out_features, x2.shape[1], int(relu),
        )  # fmt: skip
    return status, out.view(*x.shape[:-1], out_features)


# ---- bf16 linear on AMX tiles ----

AMX_BLOCK = 32  # output columns per packed block, and K values per tile step


@functools.cache
def amx_available() -> bool:
    """Whether `amx_linear` runs here: an AMX CPU (built with -march=native) whose OS grants the
    process the tile registers. GENMILL_CPU_KERNELS=avx2 or off leaves it out."""
    lib = _library()
    return lib is not None and bool(lib.genmill_amx_available())


def amx_pack(weight: Tensor) -> Tensor:
    """`[N, K]` bf16 -> the flat layout `amx_linear` streams (see csrc/amx_linear.h): N and K
    zero-padded to multiples of 32, blocks of 32 output columns, each a run of 32-wide K steps of
    two VNNI B tiles."""
    n, k = weight.shape
    np_, kp = -(-n // AMX_BLOCK) * AMX_BLOCK, -(-k // AMX_BLOCK) * AMX_BLOCK
    w = torch.nn.functional.pad(weight.to(torch.bfloat16), (0, kp - k, 0, np_ - n))
    # row nb*32 + t*16 + c, column ks*32 + 2*p + e  ->  [nb][ks][t][p][c][e]
    w = w.view(np_ // 32, 2, 16, kp // 32, 16, 2).permute(0, 3, 1, 4, 2, 5)
    return w.contiguous().view(-1)


@_kernel_op("amx_linear")
def amx_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, relu: bool) -> Tensor:
    """`x @ W.T + bias` (then ReLU if `relu`) for bf16 `x` `[..., K]`, W packed by `amx_pack`,
    bias float32 or None: fp32 accumulation in a fixed order per output, one rounding to bf16."""
    if x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16:
        raise TypeError(f"amx_linear takes bf16 inputs and weights, got {x.dtype} and {packed.dtype}")
    _check_bias("amx_linear", bias, out_features)
    status, out = _run_linear(_library().genmill_amx_linear, x, _rows(x), packed, bias, out_features, relu)
    if status != 0:
        raise RuntimeError(f"amx_linear failed (status {status}): AMX tiles unavailable or out of memory")
    return out


@amx_linear.op.register_fake
def _(x, packed, bias, out_features, relu) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def amx_argmax(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """`argmax(amx_linear(x, packed, bias, out_features, False))` for bf16 `x` `[M, K]` (rows may be
    strided): the same ids `[M]`, without writing the logits (csrc/amx_linear.h, `amx::argmax`)."""
    if x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)} and {packed.dtype}"
        raise TypeError(f"amx_argmax takes 2-d bf16 inputs and weights, got {got}")
    _check_bias("amx_argmax", bias, out_features)
    x = _rows(x)
    (m, k), ids = x.shape, torch.empty(x.shape[0], dtype=torch.int64)
    if m > 0:
        status = _library().genmill_amx_argmax(
            x.data_ptr(), x.stride(0), packed.data_ptr(), _ptr(bias), ids.data_ptr(), m, out_features, k
        )
        if status != 0:
            raise RuntimeError(f"amx_argmax failed (status {status}): AMX tiles unavailable or out of memory")
    return ids


# ---- fp32 linear on AVX2 + FMA ----

FMA_PANEL = 16  # output columns per packed panel


@functools.cache
def fma_linear_available() -> bool:
    """Whether `PackedLinear` runs fp32 through `fma_linear` here: the kernels are built and the
    CPU has no AVX-512, where oneDNN's fp32 kernels (twice the vector width) are the faster ones.
    (`fma_linear` itself runs wherever the kernels are built.)"""
    return available() and "avx512f" not in _cpu_flags()


def fma_pack(weight: Tensor) -> Tensor:
    """`[N, K]` -> fp32 panels of 16 output columns `[ceil(N/16), K, 16]` (N zero-padded), the
    layout `fma_linear` streams (see csrc/fma_linear.h)."""
    n, k = weight.shape
    np_ = -(-n // FMA_PANEL) * FMA_PANEL
    w = torch.nn.functional.pad(weight.float(), (0, 0, 0, np_ - n))
    return w.view(np_ // FMA_PANEL, FMA_PANEL, k).transpose(1, 2).contiguous()


@_kernel_op("fma_linear")
def fma_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, relu: bool) -> Tensor:
    """`x @ W.T + bias` (then ReLU if `relu`) for fp32 `x` `[..., K]`, W packed by `fma_pack`:
    each output sums K in order, then the bias, so a row's result does not depend on the row count."""
    if x.dtype != torch.float32 or packed.dtype != torch.float32:
        raise TypeError(f"fma_linear takes fp32 inputs and weights, got {x.dtype} and {packed.dtype}")
    k = x.shape[-1]
    if packed.dim() != 3 or packed.shape[1] != k or packed.shape[0] * FMA_PANEL < out_features:
        shape = tuple(packed.shape)
        raise ValueError(f"fma_linear: weight panels {shape} do not fit K={k}, N={out_features}")
    _check_bias("fma_linear", bias, out_features)
    return _run_linear(_library().genmill_fma_linear, x, _rows(x), packed, bias, out_features, relu)[1]


@fma_linear.op.register_fake
def _(x, packed, bias, out_features, relu) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


# ---- fp32 and bf16 linear on AVX-512 ----

AVX512_PANEL = 48  # output columns per packed panel


@functools.cache
def avx512_linear_available(dtype: torch.dtype) -> bool:
    """Whether `avx512_linear` runs `dtype` here: the AVX-512 build, and for bf16 a CPU with
    AVX512_BF16 (VDPBF16PS). GENMILL_CPU_KERNELS=avx2 or off leaves it out."""
    lib = _library()
    if lib is None or dtype not in _DTYPES:
        return False
    x, w, y = torch.zeros(1, 2, dtype=dtype), torch.zeros(2, dtype=dtype), torch.empty(1, 1, dtype=dtype)
    status = lib.genmill_avx512_linear(
        _DTYPES[dtype], x.data_ptr(), 2, w.data_ptr(), None, y.data_ptr(), 1, 1, 2, 0
    )
    return status == 0


def avx512_pack(weight: Tensor) -> Tensor:
    """`[N, K]` fp32 or bf16 -> the flat layout `avx512_linear` streams (csrc/avx512_linear.h):
    panels of 48 output columns (the last one narrower, so nothing is padded), each K steps of its
    columns: fp32 `[K, n]`; bf16 `[K/2, n, 2]`, K pairs as VDPBF16PS reads them (K padded to even)."""
    n, k = weight.shape
    if weight.dtype == torch.bfloat16:
        w = torch.nn.functional.pad(weight, (0, k % 2)).view(n, -1, 2)  # [N, K/2, 2]
        return torch.cat([p.transpose(0, 1).reshape(-1) for p in w.split(AVX512_PANEL)])
    w = weight.float()
    return torch.cat([p.t().reshape(-1) for p in w.split(AVX512_PANEL)])


@_kernel_op("avx512_linear")
def avx512_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, relu: bool) -> Tensor:
    """`x @ W.T + bias` (then ReLU if `relu`) for fp32 or bf16 `x` `[..., K]`, W packed by
    `avx512_pack` in the same dtype, bias fp32 or None: fp32 accumulation, each output summed over
    K in one order whatever the row count, one rounding to x's dtype."""
    if x.dtype != packed.dtype or x.dtype not in _DTYPES:
        got = f"{x.dtype} and {packed.dtype}"
        raise TypeError(f"avx512_linear takes fp32 or bf16 inputs and weights alike, got {got}")
    k = x.shape[-1]
    if packed.dim() != 1 or packed.numel() != out_features * (k + k % 2 if x.dtype == torch.bfloat16 else k):
        shape = tuple(packed.shape)
        raise ValueError(f"avx512_linear: packed weight {shape} does not fit K={k}, N={out_features}")
    _check_bias("avx512_linear", bias, out_features)
    # bf16 with an odd K: a zero column completes the last pair (the packed weights have one too)
    x2 = _rows(x, pad_to_even=x.dtype == torch.bfloat16)
    kernel = _library().genmill_avx512_linear
    status, out = _run_linear(kernel, x, x2, packed, bias, out_features, relu, _DTYPES[x.dtype])
    if status != 0:
        raise RuntimeError(f"avx512_linear does not run {x.dtype} here (no AVX-512 or no AVX512_BF16)")
    return out


@avx512_linear.op.register_fake
def _(x, packed, bias, out_features, relu) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)

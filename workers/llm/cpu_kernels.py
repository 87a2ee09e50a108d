"""Fused CPU kernels for the LLM engine: decode step, prefill attention, (residual add +) RMSNorm.

Why: on the CPU, a batch-64 decode step spends as long outside the matmuls as in them. torch runs
RoPE, the KV-cache write (`index_put_`, ~170 us a call), the attention and RMSNorm as a dozen small
ops each, and its attention paths for these shapes are slow: SDPA's CPU flash kernel reaches ~60
GFLOP/s on 128-token prompts, and a one-query decode attention is bound by reading the KV cache,
which torch's paths do at well under the memory bandwidth. The kernels here (AVX-512, fp32
accumulation, OpenMP) do each of those in one pass; `csrc/cpu_kernels.cpp` has them.

The source is compiled on first use with the system's g++ (about two seconds) into a per-user cache
keyed by the source's hash. Without g++, without AVX-512, or when the build fails, `available()`
is False and the model keeps its torch paths. Each kernel is a torch custom op
(`genmill::...`), so a compiled (inductor) graph calls it as an opaque kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# -ffp-contract=off: a * b + c stays two roundings where torch rounds twice (RoPE, residuals)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genmill" / "kernels"


def _build() -> Path | None:
    """Compile the kernels once per source version (and machine: -march=native); None on failure."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    source = SOURCE.read_text()
    digest = hashlib.sha256((source + " ".join(_FLAGS) + os.uname().machine).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        lib = Path(tmp) / "kernels.so"
        result = subprocess.run([cxx, *_FLAGS, str(SOURCE), "-o", str(lib)], check=False, capture_output=True, text=True)
        if result.returncode != 0:
            log.info("CPU kernels not built (%s): %s", cxx, result.stderr[-2000:])
            return None
        os.replace(lib, target)  # atomic: concurrent workers never load a half-written file
    return target


_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "genmill_decode_step": [_INT, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
    + [_I64] * 5
    + [_F32, _F32],
    "genmill_prefill_attention": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR] + [_I64] * 6 + [_F32],
    "genmill_rms_norm": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32],
    "genmill_silu_mul": [_INT, _PTR, _PTR, _I64, _I64],
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    if not all(f in flags for f in ("avx512f", "avx512bw", "avx512vl")):
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


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _check(status: int, what: str, head_dim: int) -> None:
    if status != 0:
        raise RuntimeError(f"{what} does not support head_dim {head_dim}")


# ---- decode step ----


def supports_decode(q: Tensor, k_cache: Tensor) -> bool:
    """Whether `decode_step` can run on queries q `[B, H*D]`-like rows and this cache: CPU, fp32 or
    bf16, a contiguous `[B', H_kv, S, D]` cache of the same dtype. Metadata only (traceable by
    torch.compile); check `available()` once beforehand."""
    return (
        q.device.type == "cpu"
        and q.dtype in _DTYPES
        and k_cache.dtype == q.dtype
        and k_cache.dim() == 4
        and k_cache.shape[-1] in HEAD_DIMS
        and k_cache.is_contiguous()
    )


@torch.library.custom_op("genmill::decode_step", mutates_args=("k_cache", "v_cache"))
def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_scale: float,
    scale: float,
) -> Tensor:
    """One new token per row: rotate q and k (RoPE, when `cos`/`sin` `[S, D]` float32 are not
    empty), write k and v to slot `pos[b]` of cache row b, and attend over slots 0..pos[b].

    q `[B, H*D]`, k/v `[B, H_kv*D]` (rows may be strided, e.g. column slices of one qkv output);
    caches `[B', H_kv, S, D]` contiguous with B' >= B; `q_scale` scales the rotated query in the
    model dtype first (OPT), `scale` the scores. Returns `[B, H*D]`.
    """
    b = q.shape[0]
    h_kv, s, d = k_cache.shape[1:]
    h = q.shape[1] // d
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pos = pos.to(torch.int64).contiguous()
    out = torch.empty(b, h * d, dtype=q.dtype)
    status = _library().genmill_decode_step(
        _DTYPES[q.dtype], q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(), pos.data_ptr(), _ptr(cos), _ptr(sin), out.data_ptr(),
        b, h, h_kv, s, d, q_scale, scale,
    )  # fmt: skip
    _check(status, "decode_step", d)
    return out


@decode_step.register_fake
def _(q, k, v, k_cache, v_cache, pos, cos, sin, q_scale, scale) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1])


# ---- prefill attention ----


def supports_prefill(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _DTYPES and q.shape[-1] in HEAD_DIMS


@torch.library.custom_op("genmill::prefill_attention", mutates_args=())
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of q `[B, H, Lq, D]` over k/v `[B, H_kv, Lk, D]` (Lk >= Lq): query i is at
    position Lk - Lq + i and sees keys 0..Lk-Lq+i, the same in every row (a prompt chunk prefilled
    after the earlier ones). Any strides with a contiguous last dim. Returns `[B, Lq, H*D]`, the
    layout the output projection reads."""
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    out = torch.empty(b, lq, h * d, dtype=q.dtype)
    status = _library().genmill_prefill_attention(
        _DTYPES[q.dtype], q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(),
        v.data_ptr(), strides[2].data_ptr(), out.data_ptr(), b, h, h_kv, lq, lk, d, scale,
    )  # fmt: skip
    _check(status, "prefill_attention", d)
    return out


@prefill_attention.register_fake
def _(q, k, v, scale) -> Tensor:
    b, h, lq, d = q.shape
    return q.new_empty(b, lq, h * d)


# ---- RMSNorm ----


def supports_norm(x: Tensor, weight: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype == x.dtype


@torch.library.custom_op("genmill::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm in one pass: weight * T(x / sqrt(mean(x^2) + eps)), fp32 inside."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    _library().genmill_rms_norm(_DTYPES[x.dtype], x.data_ptr(), None, weight.contiguous().data_ptr(), None,
                                y.data_ptr(), n, c, eps)  # fmt: skip
    return y


@rms_norm.register_fake
def _(x, weight, eps) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("genmill::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rms_norm(s)) with s = x + residual: a block's residual add and the next norm in one pass."""
    x, residual = x.contiguous(), residual.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    n, c = x.numel() // x.shape[-1], x.shape[-1]
    _library().genmill_rms_norm(_DTYPES[x.dtype], x.data_ptr(), residual.data_ptr(),
                                weight.contiguous().data_ptr(), s.data_ptr(), y.data_ptr(), n, c, eps)  # fmt: skip
    return s, y


@add_rms_norm.register_fake
def _(x, residual, weight, eps) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- SwiGLU gate ----


@torch.library.custom_op("genmill::silu_mul", mutates_args=())
def silu_mul(h: Tensor) -> Tensor:
    """silu(a) * b for h = [a | b] along the last dim (a fused gate/up projection's output)."""
    h = h.contiguous()
    i = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], i)
    _library().genmill_silu_mul(_DTYPES[h.dtype], h.data_ptr(), y.data_ptr(), h.numel() // h.shape[-1], i)
    return y


@silu_mul.register_fake
def _(h) -> Tensor:
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

"""glibc malloc settings for the LLM engines: reuse freed activation memory, or hand it back.

torch's CPU tensors come from malloc. glibc serves a block above its mmap threshold (dynamic, at
most 32 MiB) with a fresh mapping and unmaps it on free, so every such allocation page-faults
its memory back in, zero-filled by the kernel. A prefill chunk's widest activation easily passes
32 MiB (a Llama gate/up output of 4096 rows x 4096 columns in bf16), and each layer allocates it
anew: measured on a 2-core Xeon, those faults made the 7680 x 768 x 3072 bf16 matmul run at 950
GFLOP/s instead of 1550, and a 64-prompt Llama prefill take 1.5 s instead of 1.2. Raising the
thresholds keeps such blocks in the heap, where the next layer reuses them, as jemalloc or
tcmalloc would (the usual advice for torch CPU inference), without preloading another allocator.

The offloaded executor wants the opposite: with a disk tier, memory is the point, and a step that
allocates and frees a layer's weights must not leave them in RSS. Its setting wins for the rest of
the process, since a worker hosting both engines must keep the offloaded one within its budget.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# blocks up to this size come from the heap and are reused; larger ones (rarely activations: whole
# weight tensors) are still mapped and returned on free
REUSE_MMAP_THRESHOLD = 256 << 20
# free memory at the heap's top kept for reuse instead of trimmed (trimming would fault it back in)
REUSE_TRIM_THRESHOLD = 512 << 20
RETURN_MMAP_THRESHOLD = 128 << 10  # glibc's initial value, fixed (not raised as blocks are freed)
RETURN_TRIM_THRESHOLD = 128 << 10  # glibc's default: trim as soon as 128 KiB are free at the top

_state = {"mode": "default"}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - musl and other libcs have no mallopt
    except (OSError, AttributeError):
        return None
    return libc


def _set(**params: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    names = {"mmap": M_MMAP_THRESHOLD, "trim": M_TRIM_THRESHOLD}
    return all(libc.mallopt(names[key], value) == 1 for key, value in params.items())


def reuse_freed_memory() -> str:
    """For the in-memory engine on the CPU: keep freed activation blocks for reuse. No effect once
    `return_freed_memory_promptly` ran in this process. Returns the mode in force."""
    if _state["mode"] == "default" and _set(mmap=REUSE_MMAP_THRESHOLD, trim=REUSE_TRIM_THRESHOLD):
        _state["mode"] = "reuse"
        log.debug("malloc: blocks up to %d MiB reused from the heap", REUSE_MMAP_THRESHOLD >> 20)
    return _state["mode"]


def return_freed_memory_promptly() -> str:
    """For the offloaded executor's disk tiers: fix glibc's mmap threshold at 128 KiB. By default it
    rises to the largest block freed so far (up to 32 MiB), after which layer-sized buffers come
    from the heap and freed ones stay in RSS; a streaming loop that allocates and frees a layer
    per step then grows RSS by several layers."""
    if _set(mmap=RETURN_MMAP_THRESHOLD, trim=RETURN_TRIM_THRESHOLD):
        _state["mode"] = "return"
    return _state["mode"]


def mode() -> str:
    """The mode in force: "default" (glibc's own), "reuse" or "return" (what an engine asked for)."""
    return _state["mode"]

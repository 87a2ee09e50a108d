"""Tiers for offloaded decoding: where a weight or a KV cache lives, and how it comes back to compute.

Three tiers, FlexLLMGen-style: "gpu" is the compute device (on a CPU-only machine, the CPU itself),
"cpu" is host memory (pinned when the compute device is CUDA), "disk" is a file read on demand.

When the compute device is the CPU, a disk read is a mapping, not a copy: the tensor's bytes
are mapped straight from the page cache (`DiskIO.map`), one window per tensor that is unmapped when
the last view of it dies, so only the windows in use count against the process's RSS. Copying them
instead (`pread` into a host buffer) costs a core's worth of memory traffic that a 2-core machine
takes from compute. For a CUDA device a read is a `pread` into pinned staging memory, and on the CPU
the reads that mapping cannot serve (misaligned tensors, KV-cache parts with a non-zero fill) land
in host buffers reused through a small pool (`HostBuffers`). Weights come straight from the
checkpoint's safetensors files when they need no conversion, otherwise from per-layer safetensors
files written once into an offload folder. KV caches on disk are plain files, one per (layer, GPU
batch), laid out sequence-major so the first `n` positions are one contiguous read; on the CPU a
dense one is laid out like a cache in memory instead, mapped shared and attended in place, so a
step's new entries need no separate write.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor

from workers.llm.compression import CompressedTensor, CompressionConfig, compress, decompress

TIERS = ("gpu", "cpu", "disk")
MADV_POPULATE_READ = 22  # Linux 5.14+: fill a mapping's page tables, read-only, without copy-on-write

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are the same device (torch.device equality says otherwise)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _as_bytes(t: Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bfloat16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class HostBuffers:
    """Host buffers for disk reads, reused instead of allocated per read.

    Large blocks come from glibc as fresh mappings (the executor pins its mmap threshold low so
    freed layers leave RSS at once), and a read into fresh memory first faults in and zeroes every
    page: measured ~8x slower than a read into a reused buffer (1.2 vs 10 GB/s on a 2-core KVM
    guest), which on a small machine costs the compute as much CPU as the copy itself. Buffers
    are lent by `take` and come back by `give` when their reader is done; what is free is capped
    at a quarter over the most ever lent at once, oldest dropped first, so RSS stays at the
    executor's working set. Disabled (plain allocation) for pinned memory, which torch's host
    allocator already caches."""

    MIN_BYTES = 1 << 20  # smaller blocks come from glibc's heap, which reuses them anyway
    ROUND = 1 << 20  # capacity granularity: a KV read growing a position a step reuses its buffer

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._free: list[Tensor] = []  # flat uint8 buffers, oldest first
        self._lent: dict[int, Tensor] = {}  # by data pointer: strong references, so no reuse
        self._lent_bytes = self._peak_lent = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of `shape` and `dtype` (contiguous)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.enabled or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes + self.ROUND]
            if fits:
                flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                flat = torch.empty(-(-nbytes // self.ROUND) * self.ROUND, dtype=torch.uint8)
            self._lent[flat.data_ptr()] = flat
            self._lent_bytes += flat.numel()
            self._peak_lent = max(self._peak_lent, self._lent_bytes)
            self._trim()
        return flat[:nbytes].view(dtype).view(shape)

    def give(self, *tensors: Tensor | None) -> None:
        """Return buffers from `take` (views of them too); anything else is ignored."""
        with self._lock:
            for t in tensors:
                if t is None or t.device.type != "cpu" or not self._lent:
                    continue
                flat = self._lent.pop(t.untyped_storage().data_ptr(), None)
                if flat is not None:
                    self._lent_bytes -= flat.numel()
                    self._free.append(flat)
            self._trim()

    def _trim(self) -> None:
        free = sum(b.numel() for b in self._free)
        while self._free and free + self._lent_bytes > self._peak_lent * 5 // 4:
            free -= self._free.pop(0).numel()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._lent.clear()
            self._lent_bytes = self._peak_lent = 0


# mapped reads rely on Linux's madvise populate flags (the numbers mean other things elsewhere)
MAPPED_READS = sys.platform.startswith("linux")
if MAPPED_READS:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _populate(window: mmap.mmap) -> None:
    """Fill a mapping's page tables, read-only (no page is copied or dirtied), without holding the
    GIL, which `mmap.madvise` keeps for the whole call while compute threads wait for it. Older
    kernels (before 5.14) get a read-ahead hint instead and fault pages at first touch."""
    anchor = ctypes.c_char.from_buffer(window)
    address = ctypes.addressof(anchor)
    del anchor  # a live export would keep the mapping from closing
    if _libc.madvise(address, len(window), MADV_POPULATE_READ) != 0:
        _libc.madvise(address, len(window), mmap.MADV_WILLNEED)


class DiskIO:
    """pread/pwrite with one cached descriptor per file and byte counters (shared by all threads),
    the host buffers its reads land in, and (`zero_copy`, for a CPU compute device) mapped reads."""

    def __init__(self, buffers: HostBuffers | None = None, zero_copy: bool = False) -> None:
        self.buffers = buffers or HostBuffers(enabled=False)
        self.zero_copy = zero_copy and MAPPED_READS
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.read_bytes = 0
        self.write_bytes = 0
        self.mapped_bytes = self.peak_mapped_bytes = 0  # live mappings (they count in RSS)

    def _fd(self, path: str, writable: bool = False) -> int:
        key = f"{path}\0{int(writable)}"
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
                self._fds[key] = fd
            return fd

    def can_map(self, offset: int, dtype: torch.dtype) -> bool:
        return self.zero_copy and offset % dtype.itemsize == 0

    def map(
        self,
        path: str,
        offset: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        shared: bool = False,
    ) -> Tensor:
        """The file's bytes at `offset` as a CPU tensor of `shape`, without a copy.

        Private by default: writes to the tensor stay in this process and never reach the file.
        `shared`: writes go to the file's pages (a KV cache attended and extended in place). The
        page tables are filled up front, read-only, by the calling (loader) thread, so compute
        takes no page faults for reading and no page is copied. The mapping closes when the tensor
        and every view of it are gone (the tensor's storage holds the only reference)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(
            self._fd(path, writable=shared),
            offset + nbytes - start,
            flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        head = offset - start
        _populate(window)
        flat = torch.frombuffer(window, dtype=torch.uint8, count=nbytes, offset=head)
        size = len(window)
        with self._lock:
            self.read_bytes += nbytes
            self.mapped_bytes += size
            self.peak_mapped_bytes = max(self.peak_mapped_bytes, self.mapped_bytes)
        weakref.finalize(window, self._unmapped, size)
        return flat.view(dtype).view(shape)

    def _unmapped(self, size: int) -> None:
        with self._lock:
            self.mapped_bytes -= size

    def read_into(self, path: str, offset: int, out: Tensor) -> Tensor:
        view = _as_bytes(out)
        fd, done = self._fd(path), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: short read at byte {offset + done}")
            done += n
        with self._lock:
            self.read_bytes += done
        return out

    def write_from(self, path: str, offset: int, src: Tensor) -> None:
        view = _as_bytes(src.contiguous())
        fd, done = self._fd(path, writable=True), 0
        while done < len(view):
            done += os.pwritev(fd, [view[done:]], offset + done)
        with self._lock:
            self.write_bytes += done

    def forget(self, path: str) -> None:
        with self._lock:
            for key in [k for k in self._fds if k.startswith(f"{path}\0")]:
                os.close(self._fds.pop(key))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self.buffers.clear()


# ---- safetensors files, read without mmap ----


@dataclass(frozen=True)
class FileTensor:
    """Where one tensor's bytes sit in a safetensors file (row-major, so row ranges are contiguous)."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(path: str | Path) -> tuple[dict[str, FileTensor], dict[str, str]]:
    """The tensors of a safetensors file (by name) and its `__metadata__`."""
    path = str(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", None) or {}
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        entries[name] = FileTensor(
            path, base + info["data_offsets"][0], _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        )
    return entries, meta


# ---- weights ----


class Stored(Protocol):
    """One stored tensor (dense, or one part of a compressed one), in some tier."""

    tier: str
    nbytes: int
    shape: tuple[int, ...]

    def all(self, device: torch.device) -> Tensor: ...
    def rows(self, start: int, stop: int, device: torch.device) -> Tensor: ...
    def take(self, index: Tensor, device: torch.device) -> Tensor: ...


class MemoryStored:
    """A tensor held on the compute device ("gpu") or in host memory ("cpu")."""

    def __init__(self, tensor: Tensor, tier: str) -> None:
        self.tensor, self.tier = tensor, tier
        self.nbytes, self.shape = tensor_bytes(tensor), tuple(tensor.shape)

    def all(self, device: torch.device) -> Tensor:
        return self.tensor.to(device, non_blocking=True)  # no copy when it already lives there

    def rows(self, start: int, stop: int, device: torch.device) -> Tensor:
        return self.tensor[start:stop].to(device, non_blocking=True)

    def take(self, index: Tensor, device: torch.device) -> Tensor:
        return self.tensor[index.to(self.tensor.device)].to(device, non_blocking=True)


class DiskStored:
    """A tensor in a safetensors file, read on demand into a host buffer (pinned for CUDA)."""

    tier = "disk"

    def __init__(self, entry: FileTensor, io: DiskIO, pin: bool) -> None:
        self.entry, self.io, self.pin = entry, io, pin
        self.nbytes, self.shape = entry.nbytes, entry.shape

    def _empty(self, shape: tuple[int, ...]) -> Tensor:
        if self.pin:
            return torch.empty(shape, dtype=self.entry.dtype, pin_memory=True)
        return self.io.buffers.take(shape, self.entry.dtype)

    def _read(self, offset: int, shape: tuple[int, ...]) -> Tensor:
        if not self.pin and self.io.can_map(offset, self.entry.dtype):
            return self.io.map(self.entry.path, offset, shape, self.entry.dtype)
        return self.io.read_into(self.entry.path, offset, self._empty(shape))

    def all(self, device: torch.device) -> Tensor:
        return self._read(self.entry.offset, self.shape).to(device, non_blocking=True)

    def rows(self, start: int, stop: int, device: torch.device) -> Tensor:
        out = self._read(self.entry.offset + start * self.entry.row_bytes, (stop - start, *self.shape[1:]))
        return out.to(device, non_blocking=True)

    def take(self, index: Tensor, device: torch.device) -> Tensor:
        # an embedding lookup reads only the rows it needs: a decode step touches a few KB, not the table
        unique, inverse = torch.unique(index.cpu(), return_inverse=True)
        out = self._empty((unique.numel(), *self.shape[1:]))
        row = self.entry.row_bytes
        for i, r in enumerate(unique.tolist()):
            self.io.read_into(self.entry.path, self.entry.offset + r * row, out[i])
        rows = out.to(device, non_blocking=True)[inverse.to(device)]  # a new tensor: out is done
        self.io.buffers.give(out)
        return rows


class WeightHome:
    """A weight in its tier, dense or 4-bit compressed; hands back dense tensors on the compute device.

    Compressed weights are decompressed on use (per layer load, so once for all GPU batches)."""

    def __init__(
        self,
        parts: dict[str, Stored],
        dtype: torch.dtype,
        shape: tuple[int, ...],
        config: CompressionConfig | None = None,
    ) -> None:
        self.parts, self.dtype, self.shape, self.config = parts, dtype, shape, config
        self.tier = next(iter(parts.values())).tier
        disk = [p for p in parts.values() if isinstance(p, DiskStored)]
        self.buffers = disk[0].io.buffers if disk else None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def compressed(self) -> bool:
        return self.config is not None

    def is_resident_on(self, device: torch.device) -> bool:
        p = self.parts.get("dense")
        return (
            isinstance(p, MemoryStored)
            and same_device(p.tensor.device, device)
            and p.tensor.dtype == self.dtype
        )

    def _dense(self, parts: dict[str, Tensor], rows: int) -> Tensor:
        """The dense weight from its parts; read buffers that a conversion leaves behind go back
        to the disk reads' host buffers."""
        if self.config is None:
            dense = parts["dense"].to(self.dtype)
        else:
            ct = CompressedTensor(
                data=parts["data"],
                scale=parts["scale"],
                min=parts["min"],
                shape=torch.Size((rows, *self.shape[1:])),
                dtype=self.dtype,
                config=self.config,
            )
            dense = decompress(ct, self.dtype)
        if self.buffers is not None:
            self.buffers.give(*(t for t in parts.values() if t is not dense))
        return dense

    def fetch(self, device: torch.device) -> Tensor:
        return self._dense(
            {k: p.all(device) for k, p in self.parts.items()}, self.shape[0] if self.shape else 0
        )

    def fetch_rows(self, start: int, stop: int, device: torch.device) -> Tensor:
        # compressed groups run along dim 1, so a row range of every part is a row range of the weight
        return self._dense({k: p.rows(start, stop, device) for k, p in self.parts.items()}, stop - start)

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        flat = index.reshape(-1)
        rows = self._dense({k: p.take(flat, device) for k, p in self.parts.items()}, flat.numel())
        return rows.view(*index.shape, *self.shape[1:])


def compress_weight(t: Tensor, config: CompressionConfig) -> dict[str, Tensor]:
    ct = compress(t, config)
    return {"data": ct.data, "scale": ct.scale, "min": ct.min}


class OffloadFolder:
    """Per-group safetensors files for disk-tier weights that need converting (dtype or compression).

    Each file carries a fingerprint of its source and settings, so it is written once and reused by
    later loads; a stale file is rewritten (atomically, via a temporary name)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def path(self, group: str) -> Path:
        return self.folder / f"{group}-{self.fingerprint[:12]}.safetensors"

    def existing(self, group: str, names: list[str]) -> dict[str, FileTensor] | None:
        path = self.path(group)
        if not path.is_file():
            return None
        try:
            entries, meta = read_header(path)
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        if meta.get("fingerprint") != self.fingerprint or not set(names) <= set(entries):
            return None
        return entries

    def write(self, group: str, tensors: dict[str, Tensor]) -> dict[str, FileTensor]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"offload_dir {self.folder} is not writable ({exc}); set offload_dir") from exc
        path = self.path(group)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"fingerprint": self.fingerprint},
        )
        os.replace(tmp, path)
        return read_header(path)[0]


def fingerprint(sources: list[Path], settings: dict) -> str:
    """Identifies the checkpoint files (name, size, mtime) plus the conversion settings."""
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in sources:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---- KV cache ----


@dataclass(frozen=True)
class Component:
    """One array of a KV cache home: per (row, head, position) a vector of `width` values."""

    name: str
    width: int
    dtype: torch.dtype
    fill: float = 0.0  # initial value; a compressed scale starts at 1 so unwritten slots decode to 0


class SeqStore(Protocol):
    """A KV cache home for one (layer, GPU batch): components of shape [B, H, S, width].

    `in_place`: `read` hands out views of the home itself, so writes to them are the store."""

    tier: str
    nbytes: int
    in_place: bool

    def read(self, n: int, length: int, device: torch.device) -> dict[str, Tensor]: ...
    def write(self, pos: Tensor, values: dict[str, Tensor]) -> None: ...
    def close(self) -> None: ...


def write_positions(home: Tensor, pos: Tensor, values: Tensor) -> None:
    """`values [B, H, T, width]` into `home [B, H, S, width]` at per-row positions `pos [B, T]`
    (index_put_: scatter_ is far slower for bf16 on the CPU)."""
    rows = torch.arange(values.shape[0], device=home.device)[:, None]
    home[rows, :, pos.to(home.device)] = values.transpose(1, 2)


class MemorySeqStore:
    """Components as `[B, H, S, width]` tensors, like the model's static KVCache."""

    def __init__(
        self,
        comps: list[Component],
        b: int,
        h: int,
        s: int,
        device: torch.device,
        tier: str,
        pin: bool = False,
        in_place: bool = False,
    ) -> None:
        self.tier, self.in_place = tier, in_place
        self.tensors = {
            c.name: torch.full((b, h, s, c.width), c.fill, dtype=c.dtype, device=device, pin_memory=pin)
            for c in comps
        }
        self.nbytes = sum(tensor_bytes(t) for t in self.tensors.values())

    def read(self, n: int, length: int, device: torch.device) -> dict[str, Tensor]:
        """`[B, H, length, width]` per component (slots never written hold their fill value).

        A view, not a copy, when the home is on `device`: writes through it land in the home.
        `in_place`: the whole home `[B, H, S, width]`, contiguous (what the decode kernel takes)."""
        if self.in_place:
            return {k: t.to(device, non_blocking=True) for k, t in self.tensors.items()}
        return {k: t[:, :, :length].to(device, non_blocking=True) for k, t in self.tensors.items()}

    def write(self, pos: Tensor, values: dict[str, Tensor]) -> None:
        """Write `values[name] [B, H, T, width]` at per-row positions `pos [B, T]`."""
        for k, t in self.tensors.items():
            # host-bound copies block: the CPU index_put below must not read before the copy lands
            write_positions(t, pos, values[k].to(t.device, non_blocking=t.device.type != "cpu"))

    def close(self) -> None:
        self.tensors.clear()


class DiskSeqStore:
    """Components in one file, each region laid out `[S, B, H, width]`: a prefix of positions is one
    contiguous read, a prefill chunk one contiguous write, a decode step one small write per row.

    `in_place` (a dense cache, mapped reads): each region is laid out `[B, H, S, width]` instead and
    handed out whole as a shared mapping, the layout of a cache in memory: attention (the decode
    kernel included) reads it and writes a step's new entries into it, so no store follows."""

    tier = "disk"

    def __init__(
        self, comps: list[Component], b: int, h: int, s: int, path: Path, io: DiskIO, pin: bool = False
    ) -> None:
        self.comps, self.b, self.h, self.s = comps, b, h, s
        self.path, self.io, self.pin = str(path), io, pin
        self.offsets: dict[str, int] = {}
        offset = 0
        for c in comps:
            self.offsets[c.name] = offset
            offset += s * self._slot_bytes(c)
        self.nbytes = 0  # nothing resident
        self.disk_bytes = offset
        # mapped on the CPU: attention reads the file's pages and writes new entries into them, so
        # a read copies nothing and a step stores nothing (slots never written read as zeros)
        self.in_place = (
            not pin
            and all(c.fill == 0 for c in comps)
            and all(io.can_map(self.offsets[c.name], c.dtype) for c in comps)
        )
        with open(self.path, "wb") as f:
            f.truncate(offset)  # sparse zeros
        for c in comps:
            if c.fill != 0:  # small (scales only): written once, in one go
                io.write_from(
                    self.path, self.offsets[c.name], torch.full((s, b, h, c.width), c.fill, dtype=c.dtype)
                )

    def _slot_bytes(self, c: Component) -> int:
        return self.b * self.h * c.width * torch.empty((), dtype=c.dtype).element_size()

    def _home(self, c: Component) -> Tensor:
        """An in-place component's whole region, mapped shared: `[B, H, S, width]`."""
        shape = (self.b, self.h, self.s, c.width)
        return self.io.map(self.path, self.offsets[c.name], shape, c.dtype, shared=True)

    def read(self, n: int, length: int, device: torch.device) -> dict[str, Tensor]:
        """Positions [0, n) in one read into a `[length, B, H, width]` host buffer (the rest gets the
        fill value), handed out as a `[B, H, length, width]` view: attention takes it without a copy.
        `in_place`: the whole mapped region (positions never written read as zeros)."""
        if self.in_place:
            return {c.name: self._home(c).to(device, non_blocking=True) for c in self.comps}
        out = {}
        for c in self.comps:
            shape = (length, self.b, self.h, c.width)
            buf = (
                torch.empty(shape, dtype=c.dtype, pin_memory=True)
                if self.pin
                else self.io.buffers.take(shape, c.dtype)
            )
            if n:
                self.io.read_into(self.path, self.offsets[c.name], buf[:n])
            buf[n:].fill_(c.fill)
            out[c.name] = buf.to(device, non_blocking=True).permute(1, 2, 0, 3)
        return out

    def write(self, pos: Tensor, values: dict[str, Tensor]) -> None:
        pos = pos.cpu()
        if self.in_place:  # as MemorySeqStore.write, on the mapped region
            for c in self.comps:
                write_positions(self._home(c), pos, values[c.name].cpu())
            return
        t = pos.shape[1]
        start = int(pos[0, 0])
        uniform = bool((pos == torch.arange(start, start + t)).all())
        for c in self.comps:
            v = values[c.name].cpu().permute(2, 0, 1, 3)  # [T, B, H, width]
            base, slot = self.offsets[c.name], self._slot_bytes(c)
            if uniform:  # every row at the same positions: one contiguous block
                self.io.write_from(self.path, base + start * slot, v)
                continue
            row = slot // self.b
            for r in range(self.b):
                for i in range(t):
                    self.io.write_from(self.path, base + int(pos[r, i]) * slot + r * row, v[i, r])

    def close(self) -> None:
        self.io.forget(self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def cache_components(head_dim: int, dtype: torch.dtype, config: CompressionConfig | None) -> list[Component]:
    """k and v dense, or each as packed codes + per-group scale and min (groups along head_dim)."""
    if config is None:
        return [Component("k", head_dim, dtype), Component("v", head_dim, dtype)]
    groups = -(-head_dim // config.group_size)
    packed = config.group_size * config.num_bits // 8
    pdtype = config.param_dtype or dtype
    comps = []
    for name in ("k", "v"):
        comps += [
            Component(f"{name}_data", groups * packed, torch.uint8),
            Component(f"{name}_scale", groups, pdtype, fill=1.0),
            Component(f"{name}_min", groups, pdtype),
        ]
    return comps


def compress_kv(x: Tensor, config: CompressionConfig, name: str) -> dict[str, Tensor]:
    """`x [B, H, T, D]` -> the three components of `name`, each `[B, H, T, width]`."""
    ct = compress(x, config)  # data [B, H, T, G, packed], scale/min [B, H, T, G, 1]
    return {
        f"{name}_data": ct.data.flatten(-2),
        f"{name}_scale": ct.scale.flatten(-2),
        f"{name}_min": ct.min.flatten(-2),
    }


def decompress_kv(
    parts: dict[str, Tensor], name: str, head_dim: int, config: CompressionConfig, dtype: torch.dtype
) -> Tensor:
    """Inverse of `compress_kv` for the first n positions: `[B, H, n, head_dim]`, contiguous."""
    data = parts[f"{name}_data"]
    b, h, n, _ = data.shape
    groups = parts[f"{name}_scale"].shape[-1]
    ct = CompressedTensor(
        data=data.unflatten(-1, (groups, -1)),
        scale=parts[f"{name}_scale"].unsqueeze(-1),
        min=parts[f"{name}_min"].unsqueeze(-1),
        shape=torch.Size((b, h, n, head_dim)),
        dtype=dtype,
        config=config,
    )
    return decompress(ct, dtype)

"""Offloaded decoding, FlexLLMGen-style: weights, KV cache and activations split over compute device,
host memory and disk by a `Policy`, run layer by layer with the zig-zag block schedule.

Schedule: for each step (a prefill chunk or one decode token), for each layer j, for each GPU batch
k: compute (j, k). One weight load of layer j serves every GPU batch; while layer j computes, a
background worker loads layer j+1's weights, another loads the KV cache of the next (layer, batch)
and stores the one just computed (on CUDA the workers copy on their own streams and hand results
over with events). With `overlap=False` every load runs inline, just before its use. When the
compute device is the CPU a disk "load" maps the file's pages instead of copying them (see
`offload_store`): on a small machine the copy would take its core from compute.

"Layers" are: the input embedding, each Transformer block (model.py's `TransformerBlock`, run with
`torch.func.functional_call` on the loaded weights), the final norm, and the LM head in vocabulary
chunks, so a disk-resident head is never read whole at once.

Rows are right-padded and sit at their own positions, as in `generate.py`; a GPU batch keeps its
rows until all of them finish (finished rows repeat their last position, their output is final).

Registry (engine options of an LLM model; `OffloadedLLMEngine.load` takes them):

    [models.opt-30b]
    path = "/srv/models/opt-30b"
    offload = {gpu_batch_size = 8, num_gpu_batches = 4, w_gpu_percent = 0, w_cpu_percent = 0,
               cache_gpu_percent = 0, cache_cpu_percent = 0, compress_weight = false}
    offload_dir = "/fast-ssd/genmill-offload"   # 4-bit disk weights and KV cache files

`percent = [w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu]` is accepted as in FlexLLMGen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from workers.engine import EngineRun, ItemError, Metric, ProgressFn
from workers.llm import cpu_kernels, malloc
from workers.llm.compression import CompressionConfig
from workers.llm.engine import GenRequest, LLMEngine
from workers.llm.generate import DEFAULT_PREFILL_CHUNK_TOKENS, GenerationStats, RowOutput
from workers.llm.loader import eos_token_ids, hf_to_ours, read_config, resolve_dtype, safetensors_files
from workers.llm.model import (
    _NO_ROPE,
    FEW_QUERIES,
    OPT_POSITION_OFFSET,
    ModelArgs,
    RMSNorm,
    TransformerBlock,
    _attend_few,
    _rope_inv_freq,
    cpu_kernels_apply,
    onednn_linear,
    use_onednn_linears,
)
from workers.llm.offload_store import (
    DiskIO,
    DiskSeqStore,
    DiskStored,
    FileTensor,
    HostBuffers,
    MemorySeqStore,
    MemoryStored,
    OffloadFolder,
    SeqStore,
    WeightHome,
    cache_components,
    compress_kv,
    compress_weight,
    decompress_kv,
    fingerprint,
    read_header,
    same_device,
    write_positions,
)
from workers.llm.quantize import QUANT_SIDECAR
from workers.llm.sampling import BatchSampler, SamplingParams

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# policy

_PERCENT_PAIRS = (
    ("w_gpu_percent", "w_cpu_percent"),
    ("cache_gpu_percent", "cache_cpu_percent"),
    ("act_gpu_percent", "act_cpu_percent"),
)
_BOOLS = ("overlap", "pin_weight", "compress_weight", "compress_cache")


@dataclass(frozen=True)
class Policy:
    """Where things live and how the schedule runs (FlexLLMGen's Policy, without sep_layer,
    cpu_cache_compute and attn_sparsity). Percentages are of bytes; disk gets the remainder."""

    gpu_batch_size: int = 32
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    pin_weight: bool = True
    compress_weight: bool = False
    compress_cache: bool = False
    weight_group_size: int = 64  # 4-bit groups along a weight's input dim
    cache_group_size: int = 64  # 4-bit groups along the KV head dim

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for pair in _PERCENT_PAIRS:
            for name in pair:
                value = getattr(self, name)
                if not _is_number(value) or not 0 <= value <= 100:
                    raise ValueError(f"{name} must be a number in [0, 100], got {value!r}")
            a, b = (getattr(self, n) for n in pair)
            if a + b > 100:
                raise ValueError(f"{pair[0]} + {pair[1]} must be <= 100 (disk takes the rest), got {a} + {b}")
        if self.act_gpu_percent != 100 and self.act_cpu_percent != 100:
            raise ValueError(
                "act_gpu_percent / act_cpu_percent: activations live wholly on one tier; set one of them "
                f"to 100 (disk is not supported), got {self.act_gpu_percent} / {self.act_cpu_percent}"
            )
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                # ValueError like every other field: the registry reports config errors uniformly
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")  # noqa: TRY004
        for name in ("weight_group_size", "cache_group_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 2 or value % 2:
                raise ValueError(
                    f"{name} must be an even integer >= 2 (two 4-bit codes a byte), got {value!r}"
                )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, **defaults: Any) -> Policy:
        """Build from registry options, e.g. `offload = {w_gpu_percent = 0, w_cpu_percent = 0}`.

        `percent = [w_gpu, w_cpu, cache_gpu, cache_cpu, act_gpu, act_cpu]` is FlexLLMGen's shorthand.
        `defaults` fill fields the dict leaves out (e.g. gpu_batch_size from max_batch_size)."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"offload must be a table of policy fields, got {options!r}")  # noqa: TRY004
        opts = dict(options)
        if "percent" in opts:
            opts.update(_expand_percent(opts.pop("percent"), opts))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(
                f"unknown offload policy field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**{**{k: v for k, v in defaults.items() if v is not None}, **opts})

    @property
    def w_disk_percent(self) -> float:
        return 100 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_tier(self) -> str:
        return "gpu" if self.act_gpu_percent == 100 else "cpu"

    @property
    def block_size(self) -> int:
        """Rows served by one pass of the schedule."""
        return self.gpu_batch_size * self.num_gpu_batches

    def weight_config(self) -> CompressionConfig | None:
        # fp16 scale/min whatever the compute dtype: 36 bytes per 64 values, 28% of fp16
        if not self.compress_weight:
            return None
        return CompressionConfig(4, self.weight_group_size, group_dim=1, param_dtype=torch.float16)

    def cache_config(self) -> CompressionConfig | None:
        if not self.compress_cache:
            return None
        return CompressionConfig(4, self.cache_group_size, group_dim=-1, param_dtype=torch.float16)


_PERCENT_FIELDS = [name for pair in _PERCENT_PAIRS for name in pair]


def _expand_percent(percent: Any, opts: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(percent, (list, tuple)) or len(percent) != 6:
        raise ValueError(
            f"percent must be a list of 6 numbers ({', '.join(_PERCENT_FIELDS)}), got {percent!r}"
        )
    both = sorted(set(opts) & set(_PERCENT_FIELDS))
    if both:
        raise ValueError(f"percent: give either percent or {', '.join(both)}, not both")
    return dict(zip(_PERCENT_FIELDS, percent))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def midpoint_tiers(sizes: list[int], gpu_percent: float, cpu_percent: float) -> list[str]:
    """FlexLLMGen's placement rule: lay the tensors out by cumulative size over disk | cpu | gpu
    (in that order, disk taking 100 - gpu - cpu percent); a tensor goes where its midpoint falls."""
    total = sum(sizes)
    bounds = ((100 - gpu_percent - cpu_percent, "disk"), (100 - gpu_percent, "cpu"))
    tiers, cum = [], 0
    for size in sizes:
        mid = 100 * (cum + size / 2) / total if total else 0.0
        cum += size
        tiers.append(next((tier for bound, tier in bounds if mid < bound), "gpu"))
    return tiers


# ---------------------------------------------------------------------------------------------
# background workers (threads on CPU, + streams and events on CUDA)


class _Handle:
    """A pending load: `result()` waits for it (and on CUDA makes the compute stream wait too)."""

    def __init__(self, future: Future | None = None, thunk: Callable[[], Any] | None = None) -> None:
        self._future, self._thunk = future, thunk

    def result(self) -> Any:
        if self._thunk is not None:  # synchronous mode: run now, at the point of use
            thunk, self._thunk = self._thunk, None
            return thunk()
        value, event = self._future.result()
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in _tensors(value):  # memory made on the side stream is now used on this one
                t.record_stream(stream)
        return value


class _Worker:
    """One background thread (FIFO, so a cache store always lands before a later load of it)."""

    def __init__(self, name: str, overlap: bool, device: torch.device) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"genmill-offload-{name}") if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def submit(self, fn: Callable[..., Any], *args: Any, lazy: bool = True) -> _Handle:
        if self.pool is None:
            if lazy:
                return _Handle(thunk=lambda: fn(*args))
            fn(*args)
            return _Handle(thunk=lambda: None)
        ready = None
        if self.stream is not None:  # inputs made on the compute stream must be ready first
            ready = torch.cuda.Event()
            ready.record()
        return _Handle(self.pool.submit(self._run, fn, args, ready))

    def _run(self, fn: Callable[..., Any], args: tuple, ready: Any) -> tuple[Any, Any]:
        with torch.inference_mode():  # inference mode is per thread
            if self.stream is None:
                return fn(*args), None
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                value = fn(*args)
                done = torch.cuda.Event()
                done.record(self.stream)
            return value, done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, _CacheView):
        yield from (obj.k, obj.v)


# ---------------------------------------------------------------------------------------------
# KV cache


class _CacheView:
    """What `Attention.forward` sees as its `kv_cache` for one compute of one GPU batch: dense
    `[B, H, S, D]` k/v buffers whose first `kv_len` positions are the cache (the home itself when
    it is attended in place; S may then be longer), the batch's mask, and after the step the new
    entries (for the store)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v
        self.mask: Tensor | None = None  # [B, 1, T, kv_len], set before compute
        self.kernel = False  # decode steps may run in cpu_kernels.decode_step (set before compute)
        self.new: tuple[Tensor, Tensor, Tensor] | None = None

    def update(
        self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        # `rows` (model.py's cache_rows, continuous batching) is never passed by this executor
        assert rows is None, "the offloaded executor keeps batch row == cache row"
        write_positions(self.k, input_pos, k)
        write_positions(self.v, input_pos, v)
        self.new = (input_pos, k, v)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    def attend(self, input_pos: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q `[B, H, T, D]`, k/v `[B, H_kv, T, D]` (rotated, q scaled): write k/v at `input_pos`
        and attend; returns the attention output like q."""
        assert self.mask is not None, "the executor sets the batch's mask before compute"
        t, kv_len = q.shape[2], self.mask.shape[-1]
        if t <= FEW_QUERIES and self.kernel and self.k.is_contiguous() and self.v.is_contiguous():
            # the main engine's decode kernel: cache write and attention in one pass, no mask
            self.new = (input_pos, k, v)
            return _kernel_attend(q, k, v, self.k, self.v, input_pos, scale)
        kk, vv = self.update(input_pos, k, v, kv_len)
        if t <= FEW_QUERIES:
            return _attend_few(q, kk, vv, self.mask, scale)
        return F.scaled_dot_product_attention(
            q, kk, vv, attn_mask=self.mask, scale=scale, enable_gqa=q.shape[1] != kk.shape[1]
        )


def _kernel_attend(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float
) -> Tensor:
    """`cpu_kernels.decode_step` over a GPU batch's contiguous `[B, H_kv, S, D]` cache: each of the
    B x T tokens is an item (RoPE and q's scale are already applied, so the kernel applies none)."""
    b, h, t, d = q.shape
    h_kv = k.shape[1]

    def items(x: Tensor, heads: int) -> Tensor:
        return x.transpose(1, 2).reshape(b * t, heads * d)

    rows = torch.arange(b, device=q.device).repeat_interleave(t)
    y = cpu_kernels.decode_step(
        items(q, h), items(k, h_kv), items(v, h_kv), k_cache, v_cache, rows, input_pos.reshape(-1),
        _NO_ROPE, _NO_ROPE, 1.0, scale,
    )  # fmt: skip
    return y.view(b, t, h, d).transpose(1, 2)


class _CacheSlot:
    """The KV cache of one (layer, GPU batch) in its home tier, optionally 4-bit compressed."""

    def __init__(
        self,
        store: SeqStore,
        shape: tuple[int, int, int],
        config: CompressionConfig | None,
        dtype: torch.dtype,
        device: torch.device,
        buffers: HostBuffers | None = None,
    ) -> None:
        self.store, self.config, self.dtype, self.device = store, config, dtype, device
        self.buffers = buffers or HostBuffers(enabled=False)  # where a disk read's buffers go back
        self.rows, self.heads, self.head_dim = shape
        # a dense home on the compute device, or a mapped disk home, is attended in place: its
        # loads copy nothing and the step's new entries need no store
        self.direct = config is None and store.in_place
        self.filled = 0  # positions [0, filled) hold written entries (for some rows)

    def load(self, kv_len: int) -> _CacheView:
        """Dense, writable `[B, H, >= kv_len, D]` k/v: the home's first positions, zeros after them
        (the whole home when it is attended in place)."""
        n = min(self.filled, kv_len)
        parts = self.store.read(n, kv_len, self.device)
        if self.config is None:
            return _CacheView(parts["k"], parts["v"])
        k, v = (decompress_kv(parts, name, self.head_dim, self.config, self.dtype) for name in ("k", "v"))
        self.buffers.give(*parts.values())  # decompressed into new tensors: the reads are done
        return _CacheView(k, v)

    def store_new(self, view: _CacheView) -> None:
        if view.new is None:
            return
        pos, k, v = view.new
        self.filled = max(self.filled, int(pos.max()) + 1)
        if self.direct:
            return  # already written in place by update()
        if self.config is None:
            values = {"k": k, "v": v}
        else:
            values = {}
            for name, x in (("k", k), ("v", v)):
                values.update(compress_kv(x.to(self.dtype), self.config, name))
        self.store.write(pos, values)
        self.buffers.give(view.k, view.v)  # the view's read buffers (a disk home's) are done


class _GroupAttention:
    """The KV cache of one layer over several GPU batches merged into one compute (see
    `OffloadedGenerator._merge`): model.py's Attention hands it the projected queries, keys and
    values of all rows, and each GPU batch's rows attend over that batch's own cache view, fetched
    and stored through the executor's load pipeline in the usual (layer, batch) order."""

    def __init__(
        self,
        layer: _Layer,
        batches: list[_Batch],
        next_view: Callable[[_Layer, _Batch], _CacheView],
        store: Callable[[_Layer, _Batch, _CacheView], None],
    ) -> None:
        self.layer, self.batches, self.next_view, self.store = layer, batches, next_view, store

    def attend(self, input_pos: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q `[B, H, T, D]`, k/v `[B, H_kv, T, D]` (rotated, q scaled) -> attention output like q."""
        out, start = [], 0
        for b in self.batches:
            rows = slice(start, start + len(b.rows))
            start = rows.stop
            view = self.next_view(self.layer, b)
            out.append(view.attend(input_pos[rows], q[rows], k[rows], v[rows], scale))
            self.store(self.layer, b, view)
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# per-step state of a GPU batch


@dataclass
class _Call:
    """One generate() call: its requests, callbacks and running statistics."""

    rows: list[_Row]
    prompts: list[list[int]]
    params: list[SamplingParams]
    pad_id: int
    on_finish: Callable[[int], None] | None
    chunk_tokens: int
    on_logits: Callable[[list[int], Tensor], None] | None
    teacher: list[list[int]] | None
    stats: GenerationStats


@dataclass
class _Row:
    """One request's progress: same finish rules as generate.py (EOS, stop string, max_tokens)."""

    prompt_len: int
    params: SamplingParams
    eos_ids: frozenset[int]
    detokenize: Callable[[list[int]], str]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None

    @property
    def last_pos(self) -> int:
        """Position of the newest token (fed next); a finished row stays there."""
        return self.prompt_len + len(self.tokens) - 1

    def accept(self, token: int) -> bool:
        """Record a sampled token; True when the row has just finished."""
        self.tokens.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            self.text = self.detokenize(self.tokens[:-1])  # an EOS id need not be a special token
        elif self.params.stop and self._hit_stop():
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _hit_stop(self) -> bool:
        # the whole completion: a stop string may span tokens, and the text of a token prefix is not
        # always a prefix of the final text
        text = self.detokenize(self.tokens)
        hits = [i for i in (text.find(stop) for stop in self.params.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
        return bool(hits)

    def output(self) -> RowOutput:
        text = self.text if self.text is not None else self.detokenize(self.tokens)
        return RowOutput(list(self.tokens), text, self.finish_reason or "length")


@dataclass
class _Batch:
    rows: list[_Row]
    ids: list[int]  # request indices (into the generate() call)
    prompts: list[list[int]]
    sampler: BatchSampler
    chunks: list[tuple[int, int]]  # prefill time chunks [start, end)
    teacher: list[list[int]] | None = None
    slots: list[_CacheSlot] = field(default_factory=list)  # per Transformer block
    chunk: int = 0
    prefill_logits: Tensor | None = None
    # inputs and intermediates of the current step
    tokens: Tensor | None = None
    input_pos: Tensor | None = None
    logits_index: Tensor | None = None
    kv_len: int = 0
    mask: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    hidden: Tensor | None = None
    logits: Tensor | None = None

    @property
    def active(self) -> bool:
        return any(r.finish_reason is None for r in self.rows)

    @property
    def prefilling(self) -> bool:
        return self.chunk < len(self.chunks)


# ---------------------------------------------------------------------------------------------
# layers of the schedule


class _Layer:
    name = "layer"
    block: int | None = None  # Transformer block index (the layers with a KV cache)

    def load(self, device: torch.device) -> Any:
        raise NotImplementedError

    def compute(self, w: Any, batch: _Batch, cache: _CacheView | _GroupAttention | None) -> None:
        raise NotImplementedError


class _InputEmbed(_Layer):
    name = "embed"

    def __init__(self, homes: dict[str, WeightHome], opt: bool) -> None:
        self.homes, self.opt = homes, opt

    def load(self, device: torch.device) -> dict[str, Tensor]:
        # the tables are gathered row by row at compute time: a disk table is never read whole
        home = self.homes.get("project_in.weight")
        return {} if home is None else {"project_in": home.fetch(device)}

    def compute(self, w: dict[str, Tensor], batch: _Batch, cache: _CacheView | None) -> None:
        device = batch.tokens.device
        x = self.homes["tok_embeddings.weight"].gather(batch.tokens, device)
        if "project_in" in w:
            x = onednn_linear(x, w["project_in"])
        if self.opt:
            x = x + self.homes["pos_embeddings.weight"].gather(batch.input_pos + OPT_POSITION_OFFSET, device)
        batch.hidden = x


class _Block(_Layer):
    def __init__(self, index: int, homes: dict[str, WeightHome], args: ModelArgs) -> None:
        self.block, self.homes, self.name = index, homes, f"layer-{index:03d}"
        with torch.device("meta"):
            self.skeleton = TransformerBlock(args)  # model.py's block, run on the loaded weights
        use_onednn_linears(self.skeleton)  # weights arrive per step: no packing, but oneDNN

    def load(self, device: torch.device) -> dict[str, Tensor]:
        return {name: home.fetch(device) for name, home in self.homes.items()}

    def compute(
        self, w: dict[str, Tensor], batch: _Batch, cache: _CacheView | _GroupAttention | None
    ) -> None:
        attention = self.skeleton.attention
        attention.kv_cache = cache
        try:
            batch.hidden = functional_call(
                self.skeleton, w, (batch.hidden, batch.input_pos, batch.mask, batch.rope), strict=True
            )
        finally:
            attention.kv_cache = None


class _FinalNorm(_Layer):
    name = "norm"

    def __init__(self, homes: dict[str, WeightHome], args: ModelArgs, vocab: int) -> None:
        self.homes, self.vocab = homes, vocab
        self.norm: nn.Module | None = None
        if args.final_norm:
            with torch.device("meta"):
                self.norm = _norm_module(args)

    def load(self, device: torch.device) -> dict[str, Tensor]:
        return {name: home.fetch(device) for name, home in self.homes.items()}

    def compute(self, w: dict[str, Tensor], batch: _Batch, cache: _CacheView | None) -> None:
        x = batch.hidden
        x = x[torch.arange(x.shape[0], device=x.device), batch.logits_index]  # logits only where sampled
        if self.norm is not None:
            norm_w = {k.removeprefix("norm."): v for k, v in w.items() if k.startswith("norm.")}
            x = functional_call(self.norm, norm_w, (x,))
        if "project_out.weight" in w:
            x = onednn_linear(x, w["project_out.weight"])
        batch.hidden = x
        batch.logits = x.new_empty((x.shape[0], self.vocab))


class _HeadChunk(_Layer):
    def __init__(self, home: WeightHome, start: int, stop: int) -> None:
        self.home, self.start, self.stop = home, start, stop
        self.name = f"head-{start}"

    def load(self, device: torch.device) -> Tensor:
        if self.start == 0 and self.stop == self.home.shape[0]:
            return self.home.fetch(device)
        return self.home.fetch_rows(self.start, self.stop, device)

    def compute(self, w: Tensor, batch: _Batch, cache: _CacheView | None) -> None:
        batch.logits[:, self.start : self.stop] = onednn_linear(batch.hidden, w)


# ---------------------------------------------------------------------------------------------
# weights: checkpoint -> homes


def _weight_groups(args: ModelArgs, names: list[str]) -> list[tuple[str, list[str]]]:
    """Placement groups (FlexLLMGen applies the midpoint rule within each layer)."""
    embed = [n for n in names if n.split(".")[0] in ("tok_embeddings", "pos_embeddings", "project_in")]
    head = [n for n in names if n.split(".")[0] in ("norm", "project_out", "output")]
    groups = [("embed", embed)]
    for j in range(args.n_layers):
        groups.append((f"layer-{j:03d}", [n for n in names if n.startswith(f"layers.{j}.")]))
    groups.append(("head", head))
    return groups


def _checkpoint_entries(folder: Path, args: ModelArgs) -> dict[str, FileTensor]:
    entries: dict[str, FileTensor] = {}
    unknown: list[str] = []
    for path in safetensors_files(folder):
        for name, entry in read_header(path)[0].items():
            try:
                ours = hf_to_ours(name, args.arch)
            except KeyError:
                unknown.append(name)
                continue
            if ours is None or (ours == "output.weight" and args.tie_word_embeddings):
                continue  # tied LM head: the embedding is the one copy
            entries[ours] = entry
    if unknown:
        raise ValueError(f"unexpected parameters in checkpoint: {', '.join(unknown[:8])}")
    return entries


def _expected_names(args: ModelArgs) -> list[str]:
    """Our parameter names for `args`, in Transformer order, without building the model: a meta
    nn.Embedding runs normal_() on meta, whose first call imports torch's Python decompositions
    (~75 MB of RSS for the life of the process)."""
    with torch.device("meta"):
        block = list(TransformerBlock(args).state_dict())  # Linear/norm inits are native on meta
        norm = list(_norm_module(args).state_dict()) if args.final_norm else []
    names = ["tok_embeddings.weight"]
    names += ["pos_embeddings.weight"] if args.arch == "opt" else []
    names += ["project_in.weight"] if args.embed_dim != args.dim else []
    names += [f"layers.{j}.{n}" for j in range(args.n_layers) for n in block]
    names += [f"norm.{n}" for n in norm]
    names += ["project_out.weight"] if args.embed_dim != args.dim else []
    names += [] if args.tie_word_embeddings else ["output.weight"]
    return names


def _norm_module(args: ModelArgs) -> nn.Module:
    """model.py's final norm for `args` (its `_norm` helper is private)."""
    if args.arch == "opt":
        return nn.LayerNorm(args.dim, elementwise_affine=args.norm_affine)
    return RMSNorm(args.dim, args.norm_eps)


class _WeightPlacer:
    """Puts each checkpoint tensor into its tier (as the compute dtype, or 4-bit compressed)."""

    def __init__(
        self,
        folder: Path,
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        offload_dir: Path,
        io: DiskIO,
    ) -> None:
        self.policy, self.device, self.dtype, self.io = policy, device, dtype, io
        self.config = policy.weight_config()
        self.pin = device.type == "cuda"
        settings = {"format": 1, "dtype": str(dtype), "config": repr(self.config)}
        self.offload = OffloadFolder(offload_dir, fingerprint(safetensors_files(folder), settings))

    def place(self, group: str, names: list[str], entries: dict[str, FileTensor]) -> dict[str, WeightHome]:
        p = self.policy
        tiers = midpoint_tiers([math.prod(entries[n].shape) for n in names], p.w_gpu_percent, p.w_cpu_percent)
        homes: dict[str, WeightHome] = {}
        to_write: dict[str, dict[str, Tensor]] = {}
        packed = [n for n, t in zip(names, tiers) if t == "disk" and self._compressed(entries[n])]
        written = self.offload.existing(group, [f"{n}/data" for n in packed]) if packed else None
        for name, tier in zip(names, tiers):
            entry = entries[name]
            if tier == "disk" and not self._compressed(entry):
                # dense weights are read straight from the checkpoint (dtype converted on use)
                homes[name] = WeightHome(
                    {"dense": DiskStored(entry, self.io, self.pin)}, self.dtype, entry.shape
                )
            elif tier == "disk" and written is not None:
                homes[name] = self._disk_home(name, entry, written)
            else:
                parts = self._convert(entry)
                if tier == "disk":
                    to_write[name] = parts
                else:
                    homes[name] = self._memory_home(parts, tier, entry)
        if to_write:
            files = self.offload.write(
                group, {f"{n}/{k}": v for n, parts in to_write.items() for k, v in parts.items()}
            )
            for name in to_write:
                homes[name] = self._disk_home(name, entries[name], files)
        return homes

    def _compressed(self, entry: FileTensor) -> bool:
        return self.config is not None and len(entry.shape) == 2  # FlexLLMGen: vectors stay dense

    def _convert(self, entry: FileTensor) -> dict[str, Tensor]:
        t = self.io.read_into(entry.path, entry.offset, torch.empty(entry.shape, dtype=entry.dtype))
        t = t.to(self.dtype)
        return compress_weight(t, self.config) if self._compressed(entry) else {"dense": t}

    def _memory_home(self, parts: dict[str, Tensor], tier: str, entry: FileTensor) -> WeightHome:
        stored = {}
        for k, t in parts.items():
            if tier == "gpu":
                t = t.to(self.device)
            elif self.pin and self.policy.pin_weight:
                t = t.pin_memory()
            stored[k] = MemoryStored(t, tier)
        return WeightHome(stored, self.dtype, entry.shape, self.config if "data" in parts else None)

    def _disk_home(self, name: str, entry: FileTensor, files: dict[str, FileTensor]) -> WeightHome:
        parts = {k: DiskStored(files[f"{name}/{k}"], self.io, self.pin) for k in ("data", "scale", "min")}
        return WeightHome(parts, self.dtype, entry.shape, self.config)


# ---------------------------------------------------------------------------------------------
# the executor


@dataclass
class OffloadStats:
    weight_bytes: int = 0  # every stored weight byte (4-bit packed when compressed), all tiers
    weight_bytes_resident: int = 0  # ... of which on the compute device or in host memory
    weight_bytes_disk: int = 0
    cache_bytes: int = 0  # resident KV cache (device + host) of the largest block so far
    cache_bytes_disk: int = 0
    cache_bytes_fp16: int = 0  # what the same cache would take dense in fp16 (for compression ratios)


class OffloadedGenerator:
    """Generation (prefill + decode, greedy or sampled) under an offloading `Policy`."""

    def __init__(
        self,
        folder: str | Path,
        policy: Policy,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        offload_dir: str | Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.policy = policy
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        if (self.folder / QUANT_SIDECAR).is_file():
            raise ValueError(
                f"{self.folder} is a quantized folder (genmill quantize); offloading reads "
                "full-precision checkpoints (use compress_weight for 4-bit weights)"
            )
        self.args = ModelArgs.from_hf_config(config or read_config(self.folder))
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        # on the CPU, disk reads are mappings of the page cache, or land in reused host buffers; on
        # CUDA they are pinned staging memory, which torch's host allocator caches
        on_cpu = self.device.type == "cpu"
        self.io = DiskIO(HostBuffers(enabled=on_cpu), zero_copy=on_cpu)
        self.stats = OffloadStats()
        if policy.w_disk_percent > 0 or policy.cache_disk_percent > 0:
            malloc.return_freed_memory_promptly()  # memory is the point of a disk tier
        self.homes = self._place_weights()
        self.layers = self._build_layers()
        # decode-step attention in the main engine's CPU kernel, where the cache is attended in place
        self.kernels = cpu_kernels_apply(self.device, self.dtype, self.args)
        self.weight_worker = _Worker("weights", policy.overlap, self.device)
        self.cache_worker = _Worker("cache", policy.overlap, self.device)
        self._closed = False

    # ---- setup ----

    def _place_weights(self) -> dict[str, WeightHome]:
        entries = _checkpoint_entries(self.folder, self.args)
        expected = _expected_names(self.args)
        missing = [n for n in expected if n not in entries]
        extra = [n for n in entries if n not in expected]
        if missing or extra:
            raise ValueError(
                f"checkpoint does not match {self.args.arch}: missing {missing}, unexpected {extra}"
            )
        offload_dir = self.offload_dir or self.folder / ".genmill-offload"
        placer = _WeightPlacer(self.folder, self.policy, self.device, self.dtype, offload_dir, self.io)
        homes: dict[str, WeightHome] = {}
        for group, names in _weight_groups(self.args, expected):
            homes.update(placer.place(group, names, entries))
        s = self.stats
        s.weight_bytes = sum(h.nbytes for h in homes.values())
        s.weight_bytes_disk = sum(h.nbytes for h in homes.values() if h.tier == "disk")
        s.weight_bytes_resident = s.weight_bytes - s.weight_bytes_disk
        return homes

    def _build_layers(self) -> list[_Layer]:
        a, homes = self.args, self.homes
        embed = {
            k: h
            for k, h in homes.items()
            if k.split(".")[0] in ("tok_embeddings", "pos_embeddings", "project_in")
        }
        layers: list[_Layer] = [_InputEmbed(embed, a.arch == "opt")]
        block_bytes = 0
        for j in range(a.n_layers):
            prefix = f"layers.{j}."
            block = {k.removeprefix(prefix): h for k, h in homes.items() if k.startswith(prefix)}
            block_bytes = max(block_bytes, sum(h.nbytes for h in block.values()))
            layers.append(_Block(j, block, a))
        norm = {k: h for k, h in homes.items() if k.split(".")[0] in ("norm", "project_out")}
        layers.append(_FinalNorm(norm, a, a.vocab_size))
        head = homes["tok_embeddings.weight" if a.tie_word_embeddings else "output.weight"]
        layers += [_HeadChunk(head, lo, hi) for lo, hi in self._head_chunks(head, block_bytes)]
        return layers

    def _head_chunks(self, head: WeightHome, block_bytes: int) -> list[tuple[int, int]]:
        """One chunk when the head lives on the compute device; otherwise about a block's size each,
        so the head costs no more transient memory than a Transformer block."""
        vocab = head.shape[0]
        if head.is_resident_on(self.device) or head.nbytes <= block_bytes:
            return [(0, vocab)]
        rows = max(1, vocab * block_bytes // head.nbytes)
        return [(lo, min(vocab, lo + rows)) for lo in range(0, vocab, rows)]

    # ---- generation ----

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        eos_ids: frozenset[int],
        detokenize: Callable[[list[int]], str],
        pad_id: int = 0,
        on_finish: Callable[[int], None] | None = None,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        on_logits: Callable[[list[int], Tensor], None] | None = None,
        teacher: list[list[int]] | None = None,
    ) -> tuple[list[RowOutput], GenerationStats]:
        """Like `workers.llm.generate.generate`: outputs in prompt order. Rows run in blocks of
        `gpu_batch_size * num_gpu_batches`.

        on_logits(ids, logits): after each sampling, the request indices of the rows still running
            and their logits `[n, V]` (for accuracy measurements).
        teacher: per request, tokens to feed instead of the sampled ones (same logits, fixed inputs).
        """
        if self._closed:
            raise RuntimeError("generator is closed")
        if len(prompts) != len(params):
            raise ValueError("prompts and params differ in length")
        call = _Call(
            rows=[_Row(len(p), sp, eos_ids, detokenize) for p, sp in zip(prompts, params)],
            prompts=prompts, params=params, pad_id=pad_id, on_finish=on_finish,
            chunk_tokens=prefill_chunk_tokens, on_logits=on_logits, teacher=teacher,
            stats=GenerationStats(prompt_tokens=sum(len(p) for p in prompts)),
        )  # fmt: skip
        block = self.policy.block_size
        pending: _Handle | None = None  # the first layer's weights, prefetched by the previous block
        try:
            for start in range(0, len(prompts), block):
                ids = list(range(start, min(len(prompts), start + block)))
                pending = self._run_block(call, ids, pending)
        finally:
            self._drain()
        call.stats.generated_tokens = sum(len(r.tokens) for r in call.rows)
        return [r.output() for r in call.rows], call.stats

    def _run_block(self, call: _Call, ids: list[int], pending: _Handle | None) -> _Handle | None:
        """Generate for up to gpu_batch_size * num_gpu_batches rows, to the end; returns the
        prefetch of the first layer's weights for the next block."""
        batches = self._make_batches(call, ids)
        seq_len = max(len(call.prompts[i]) + call.params[i].max_tokens for i in ids)
        cache_dir = self._allocate_caches(batches, seq_len)
        rope = self._rope_table(seq_len)
        try:
            while active := [b for b in batches if b.active]:
                t0 = time.perf_counter()
                prefill = any(b.prefilling for b in active)
                for b in active:
                    self._prepare(b, call.pad_id, rope)
                pending = self._run_layers(active, pending)
                sampled = finished = 0
                for b in active:
                    n_sampled, n_finished = self._finish_step(b, call.on_logits)
                    sampled, finished = sampled + n_sampled, finished + n_finished
                if call.on_finish is not None and finished:
                    call.on_finish(finished)
                _sync(self.device)
                self._record_step(call.stats, prefill, sampled, time.perf_counter() - t0)
        finally:
            self._drain()  # no load or store may still touch a cache file being removed
            self._release_caches(batches, cache_dir)
        return pending

    def _make_batches(self, call: _Call, ids: list[int]) -> list[_Batch]:
        gbs, batches = self.policy.gpu_batch_size, []
        for lo in range(0, len(ids), gbs):
            part = ids[lo : lo + gbs]
            longest = max(len(call.prompts[i]) for i in part)
            step = max(1, call.chunk_tokens // len(part))  # prefill chunks of about chunk_tokens tokens
            batches.append(
                _Batch(
                    rows=[call.rows[i] for i in part],
                    ids=part,
                    prompts=[call.prompts[i] for i in part],
                    sampler=BatchSampler([call.params[i] for i in part], self.device),
                    chunks=[(s, min(longest, s + step)) for s in range(0, longest, step)],
                    teacher=None if call.teacher is None else [call.teacher[i] for i in part],
                )
            )
        return batches

    @staticmethod
    def _record_step(stats: GenerationStats, prefill: bool, sampled: int, seconds: float) -> None:
        if prefill:
            stats.prefill_s += seconds
            return
        stats.decode_s += seconds
        stats.decode_steps += 1
        stats.decode_tokens += sampled

    def _drain(self) -> None:
        """Wait until both workers are idle (they run in order, so a no-op marks the end)."""
        for worker in (self.weight_worker, self.cache_worker):
            worker.submit(lambda: None, lazy=False).result()

    def _run_layers(self, active: list[_Batch], pending: _Handle | None) -> _Handle:
        """One step: every layer over every active GPU batch, with the loads one unit ahead."""
        units = [(layer, b) for layer in self.layers if layer.block is not None for b in active]
        loads: dict[int, _Handle] = {}
        stores: list[_Handle] = []

        def load_cache(u: int) -> None:
            if u < len(units):
                layer, b = units[u]
                loads[u] = self.cache_worker.submit(b.slots[layer.block].load, b.kv_len)

        def next_view(layer: _Layer, b: _Batch) -> _CacheView:
            nonlocal u
            assert units[u] == (layer, b), "KV cache loads out of order"
            view = loads.pop(u).result()
            load_cache(u + 1)
            u += 1
            view.mask, view.kernel = b.mask, self.kernels
            return view

        def store(layer: _Layer, b: _Batch, view: _CacheView) -> None:
            stores.append(self.cache_worker.submit(b.slots[layer.block].store_new, view, lazy=False))

        load_cache(0)
        u = 0
        merged = self._merge(active)
        weights = pending or self.weight_worker.submit(self.layers[0].load, self.device)
        for j, layer in enumerate(self.layers):
            w = weights.result()
            # the next layer's weights (layer 0 of the next step after the last) load while this one runs
            weights = self.weight_worker.submit(self.layers[(j + 1) % len(self.layers)].load, self.device)
            if merged is not None:
                group = None if layer.block is None else _GroupAttention(layer, active, next_view, store)
                self._compute(layer, w, merged, group)
            else:
                for b in active:
                    view = None if layer.block is None else next_view(layer, b)
                    self._compute(layer, w, b, view)
                    if view is not None:
                        store(layer, b, view)
            self.io.buffers.give(*_tensors(w))  # every GPU batch is done with this layer's weights
            del w
        if merged is not None:
            self._split(merged, active)
        for handle in stores:
            handle.result()  # surfaces a failed store
        return weights

    def _merge(self, active: list[_Batch]) -> _Batch | None:
        """On the CPU, a decode step's GPU batches as one batch for everything but attention.

        A GPU batch bounds the KV cache that one compute holds; on a GPU it also fits the device.
        On the CPU, running each projection once per GPU batch streams the layer's weights from
        memory once per GPU batch, at a few rows each (measured: 8 x 4 rows ran a decode step
        ~3x slower than 32 rows at once). Merged, the projections and the LM head run once over
        all rows, while each GPU batch still attends over its own KV cache, loaded and stored one
        at a time as before. Prefill chunks (per batch lengths) stay per batch."""
        if self.device.type != "cpu" or len(active) < 2 or any(b.prefilling for b in active):
            return None
        kv_len = max(b.kv_len for b in active)
        masks = [F.pad(b.mask, (0, kv_len - b.kv_len)) for b in active]  # padded slots: masked
        rope = None
        if active[0].rope is not None:
            rope = (torch.cat([b.rope[0] for b in active]), torch.cat([b.rope[1] for b in active]))
        return _Batch(
            rows=[r for b in active for r in b.rows],
            ids=[i for b in active for i in b.ids],
            prompts=[],
            sampler=active[0].sampler,
            chunks=[],
            tokens=torch.cat([b.tokens for b in active]),
            input_pos=torch.cat([b.input_pos for b in active]),
            logits_index=torch.cat([b.logits_index for b in active]),
            kv_len=kv_len,
            mask=torch.cat(masks),
            rope=rope,
        )

    @staticmethod
    def _split(merged: _Batch, active: list[_Batch]) -> None:
        start = 0
        for b in active:
            b.logits = merged.logits[start : start + len(b.rows)]
            start += len(b.rows)

    def _compute(self, layer: _Layer, w: Any, b: _Batch, view: _CacheView | _GroupAttention | None) -> None:
        if b.hidden is not None:
            b.hidden = b.hidden.to(self.device, non_blocking=True)
        layer.compute(w, b, view)
        if self.policy.act_tier == "cpu":  # activations wait in host memory between layers
            b.hidden = b.hidden.to("cpu", non_blocking=True)

    def _prepare(self, b: _Batch, pad_id: int, rope: tuple[Tensor, Tensor] | None) -> None:
        dev, n = self.device, len(b.rows)
        if b.prefilling:
            start, end = b.chunks[b.chunk]
            tokens = torch.full((n, end - start), pad_id, dtype=torch.long)
            for r, prompt in enumerate(b.prompts):
                piece = prompt[start:end]
                tokens[r, : len(piece)] = torch.tensor(piece, dtype=torch.long)
            last = torch.tensor([len(p) - 1 for p in b.prompts])
            b.tokens = tokens.to(dev)
            b.input_pos = torch.arange(start, end, device=dev).expand(n, -1)
            b.logits_index = (last - start).clamp(0, end - start - 1).to(dev)
            b.kv_len = end
        else:
            last = [r.last_pos for r in b.rows]  # a finished row stays at its last position
            b.tokens = torch.tensor([r.tokens[-1] for r in b.rows], device=dev)[:, None]
            b.input_pos = torch.tensor(last, device=dev)[:, None]
            b.logits_index = torch.zeros(n, dtype=torch.long, device=dev)
            b.kv_len = max(last) + 1
        b.mask = self._mask(b.input_pos, b.kv_len)
        b.rope = (
            None
            if rope is None
            else (rope[0][b.input_pos][:, None].to(self.dtype), rope[1][b.input_pos][:, None].to(self.dtype))
        )
        b.hidden = None

    def _mask(self, input_pos: Tensor, kv_len: int) -> Tensor:
        """`[B, 1, T, kv_len]`: a query at position p sees its own row's slots 0..p (as model.py)."""
        slots = torch.arange(kv_len, device=input_pos.device)
        mask = slots[None, None, :] <= input_pos[:, :, None]
        if self.args.sliding_window:
            mask &= slots[None, None, :] > input_pos[:, :, None] - self.args.sliding_window
        return mask[:, None]

    def _rope_table(self, seq_len: int) -> tuple[Tensor, Tensor] | None:
        if self.args.arch == "opt":
            return None
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), _rope_inv_freq(self.args))
        emb = torch.cat((freqs, freqs), dim=-1).to(self.device)
        return emb.cos(), emb.sin()

    def _finish_step(
        self, b: _Batch, on_logits: Callable[[list[int], Tensor], None] | None
    ) -> tuple[int, int]:
        """Sample (after the last prefill chunk or a decode step); return (rows sampled, rows finished)."""
        logits = b.logits
        b.logits = b.hidden = None
        if b.prefilling:
            start, end = b.chunks[b.chunk]
            b.chunk += 1
            if b.prefill_logits is None:
                b.prefill_logits = logits
            else:
                last = torch.tensor([len(p) - 1 for p in b.prompts], device=logits.device)
                here = ((last >= start) & (last < end))[:, None]
                b.prefill_logits = torch.where(here, logits, b.prefill_logits)
            if b.prefilling:
                return 0, 0
            logits, b.prefill_logits = b.prefill_logits, None
        tokens = b.sampler.sample(logits).tolist()
        running = [r for r, row in enumerate(b.rows) if row.finish_reason is None]
        if on_logits is not None:
            on_logits([b.ids[r] for r in running], logits[running])
        finished = 0
        for r in running:
            row = b.rows[r]
            token = b.teacher[r][len(row.tokens)] if b.teacher is not None else tokens[r]
            finished += row.accept(token)
        return len(running), finished

    # ---- KV cache placement ----

    def _allocate_caches(self, batches: list[_Batch], seq_len: int) -> Path | None:
        """Give every (block, GPU batch) its KV cache home; tiers by the midpoint rule over the slots."""
        a, p = self.args, self.policy
        config = p.cache_config()
        slots = [(j, k) for j in range(a.n_layers) for k in range(len(batches))]
        tiers = midpoint_tiers(
            [len(batches[k].rows) for _, k in slots], p.cache_gpu_percent, p.cache_cpu_percent
        )
        cache_dir = None
        if "disk" in tiers:  # temporary files: in offload_dir when one is set, else the system temp dir
            if self.offload_dir is not None:
                self.offload_dir.mkdir(parents=True, exist_ok=True)
            cache_dir = Path(tempfile.mkdtemp(prefix="genmill-kv-", dir=self.offload_dir))
        for (j, k), tier in zip(slots, tiers):
            b = batches[k]
            shape = (len(b.rows), a.n_kv_heads, a.head_dim)
            path = cache_dir / f"layer{j}-batch{k}.kv" if tier == "disk" else None
            store = self._new_store(
                tier, shape, seq_len, cache_components(a.head_dim, self.dtype, config), path
            )
            b.slots.append(_CacheSlot(store, shape, config, self.dtype, self.device, self.io.buffers))
        self._record_cache_bytes([slot.store for b in batches for slot in b.slots], batches, seq_len)
        return cache_dir

    def _new_store(
        self, tier: str, shape: tuple[int, int, int], seq_len: int, comps: list, path: Path | None
    ) -> SeqStore:
        rows, heads, _ = shape
        cuda = self.device.type == "cuda"
        if tier == "disk":
            return DiskSeqStore(comps, rows, heads, seq_len, path, self.io, pin=cuda)
        where = self.device if tier == "gpu" else torch.device("cpu")
        dense = all(c.name in ("k", "v") for c in comps)  # not 4-bit parts
        return MemorySeqStore(
            comps, rows, heads, seq_len, where, tier, pin=tier == "cpu" and cuda,
            in_place=dense and same_device(where, self.device),
        )  # fmt: skip

    def _record_cache_bytes(self, stores: list[SeqStore], batches: list[_Batch], seq_len: int) -> None:
        s, a = self.stats, self.args
        resident = sum(st.nbytes for st in stores)
        disk = sum(getattr(st, "disk_bytes", 0) for st in stores)
        if resident + disk >= s.cache_bytes + s.cache_bytes_disk:  # keep the largest block's figures
            s.cache_bytes, s.cache_bytes_disk = resident, disk
            rows = sum(len(b.rows) for b in batches)
            s.cache_bytes_fp16 = 2 * 2 * a.n_layers * rows * a.n_kv_heads * seq_len * a.head_dim

    def _release_caches(self, batches: list[_Batch], cache_dir: Path | None) -> None:
        for b in batches:
            for slot in b.slots:
                slot.store.close()
            b.slots.clear()
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)

    # ---- teardown ----

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.weight_worker.close()
        self.cache_worker.close()
        self.io.close()
        self.homes.clear()
        self.layers.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a
    worker started by a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# engine

# engine options (LLMEngine's compile/packed_linears/max_batch_tokens do not apply to a layer-streaming run)
OPTIONS: dict[str, Any] = {
    "prefill_chunk_tokens": DEFAULT_PREFILL_CHUNK_TOKENS,
    "offload": None,  # the Policy, as a dict
    "offload_dir": None,  # converted (4-bit) disk weights and disk KV cache files
}


class OffloadedLLMEngine(LLMEngine):
    """`LLMEngine`'s API (load / generate / close, per-item errors, metrics) over an
    `OffloadedGenerator`. Request preparation, batching and retry-in-halves are LLMEngine's own."""

    kind = "llm"

    def __init__(
        self,
        generator: OffloadedGenerator,
        tokenizer: Any,
        eos_ids: frozenset[int],
        pad_id: int,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
    ) -> None:
        # LLMEngine.__init__ wants a loaded Transformer; set the attributes its methods use instead
        self.generator = generator
        self._loaded = generator  # "not closed" marker checked by LLMEngine.generate
        self.model = generator  # _check_ids reads model.args.vocab_size
        self.tokenizer = tokenizer
        self.max_context: int = generator.args.max_context
        self.max_batch_size = generator.policy.block_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.device = generator.device
        self.model_bytes = generator.stats.weight_bytes
        self._run_start = (0, 0)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int | None = None,
        **options: Any,
    ) -> OffloadedLLMEngine:
        """Options: `offload` (a Policy as a dict), `offload_dir`, `prefill_chunk_tokens`.
        `max_batch_size` is the default gpu_batch_size when the policy leaves it out."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown LLM engine option(s): {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        opts = {**OPTIONS, **options}
        if max_batch_size is not None and (not _is_int(max_batch_size) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        chunk = opts["prefill_chunk_tokens"]
        if not _is_int(chunk) or chunk < 1:
            raise ValueError(f"prefill_chunk_tokens must be an integer >= 1, got {chunk!r}")
        policy = Policy.from_dict(opts["offload"], gpu_batch_size=max_batch_size)
        resolve_dtype(dtype)
        from transformers import AutoTokenizer

        folder = Path(path)
        cfg = read_config(folder)
        safetensors_files(folder)  # the safetensors-only error before the slow tokenizer load
        tokenizer = AutoTokenizer.from_pretrained(folder)
        generator = OffloadedGenerator(folder, policy, device, dtype, opts["offload_dir"], config=cfg)
        pad = cfg.get("pad_token_id")
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(generator, tokenizer, eos_token_ids(folder, cfg, tokenizer), int(pad), chunk)

    def generate(self, requests: list[GenRequest], progress: ProgressFn | None = None) -> EngineRun:
        """One Completion or ItemError per request, in order (LLMEngine's contract)."""
        if self._loaded is None:
            raise RuntimeError("engine is closed")
        start = time.perf_counter()
        self._run_start = (self.generator.io.read_bytes, self.generator.io.write_bytes)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        outcomes: list[Any] = [None] * len(requests)
        items = []
        for i, req in enumerate(requests):
            prepared = self._prepare(i, req)  # LLMEngine's validation and tokenization
            if isinstance(prepared, ItemError):
                outcomes[i] = prepared
            else:
                items.append(prepared)
        if progress is not None and len(items) < len(requests):
            progress(len(requests) - len(items))
        stats = GenerationStats()
        items.sort(key=lambda it: len(it.ids))  # similar lengths share a GPU batch: less padding
        for b in range(0, len(items), self.max_batch_size):
            self._run_batch(items[b : b + self.max_batch_size], outcomes, stats, progress)
        return EngineRun(outcomes=outcomes, metrics=self._metrics(stats, time.perf_counter() - start))

    def _generate_batch(self, items: list[Any], on_finish: Any) -> tuple[list[Any], GenerationStats]:
        return self.generator.generate(
            [it.ids for it in items],
            [it.params for it in items],
            self.eos_ids,
            self._detokenize,
            pad_id=self.pad_id,
            on_finish=on_finish,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )

    def _metrics(self, s: GenerationStats, wall: float) -> list[Metric]:
        g = self.generator
        return super()._metrics(s, wall) + [
            Metric("weight_bytes_resident", g.stats.weight_bytes_resident, "bytes"),
            Metric("weight_bytes_disk", g.stats.weight_bytes_disk, "bytes"),
            Metric("cache_bytes", g.stats.cache_bytes, "bytes"),
            Metric("cache_bytes_disk", g.stats.cache_bytes_disk, "bytes"),
            Metric("disk_read_bytes", g.io.read_bytes - self._run_start[0], "bytes"),
            Metric("disk_write_bytes", g.io.write_bytes - self._run_start[1], "bytes"),
            Metric("peak_rss_bytes", peak_rss_bytes(), "bytes"),
        ]

    def close(self) -> None:
        if self._loaded is None:
            return
        self.generator.close()
        self._loaded = None
        self.model = None

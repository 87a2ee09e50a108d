"""Continuous batching over the static KV cache: rows that finish are replaced by waiting requests.

The cache holds up to `max_batch_size` rows. Waiting requests are admitted whenever rows are free:
they are prefilled (grouped by similar length, right-padded, logits only at each prompt's last token)
into the free cache rows, then every active row decodes one token per step at its own position.
Prompts sit at positions 0..len-1 exactly as if each ran alone (same RoPE / learned positions, same
attended keys), so greedy output does not depend on the batch. When no request waits, finished rows
are filled by moving the last rows down, so the decode batch shrinks instead of carrying holes.

`StepFunctions` holds the model's decode and prefill forwards, eager or `torch.compile`d over the
static cache (gpt-fast style; see its docstring for the CPU and CUDA shape policies); the engine
keeps one for its lifetime, so a graph is compiled once per worker and shape bucket and reused by
every job.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from workers.llm import cpu_kernels
from workers.llm.fast_decode import FastDecode
from workers.llm.model import Transformer
from workers.llm.sampling import RowRng, SamplingParams, sample

DEFAULT_PREFILL_CHUNK_TOKENS = 8192
COMPILE_MODES = ("decode", "all")
# A prefill group with this many real tokens already runs its matmuls near peak, so it is split by
# length rather than carry more than MAX_PREFILL_PADDING of padding.
MIN_SPLIT_TOKENS = 2048
MAX_PREFILL_PADDING = 0.04


@dataclass
class RowOutput:
    # every generated token, as vLLM reports them: a final EOS and the tokens of a matched stop
    # string are included; the text leaves them out
    token_ids: list[int]
    text: str  # decoded token_ids (special tokens skipped), cut before a matched stop string
    finish_reason: str  # "stop" (EOS or stop string) | "length"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # wall time of calls that compiled a new graph (inside prefill_s/decode_s)
    prompt_tokens: int = 0  # real prompt tokens (padding excluded)
    generated_tokens: int = 0  # every sampled token, EOS included
    decode_steps: int = 0  # forward passes after the prefill
    decode_tokens: int = 0  # tokens sampled by those passes

    def add(self, other: GenerationStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    detokenize: Callable[[list[int]], str]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    rng: RowRng | None = None

    def __post_init__(self) -> None:
        self.rng = None if self.params.greedy else RowRng(self.params.seed)
        # a stop string of n characters spans at most 4n tokens (byte-fallback pieces), plus margin
        # for the window's first tokens, which may decode differently without their left context
        longest = max((len(s) for s in self.params.stop), default=0)
        self._stop_window = 4 * longest + 8

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def last_pos(self) -> int:
        """Position of the most recently sampled token (the next one to feed the model)."""
        return self.prompt_len + len(self.tokens) - 1

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.params.max_tokens

    def accept(self, token: int) -> bool:
        """Record a sampled token; return True when the row is finished."""
        self.tokens.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            # an EOS id need not be a special token (generation_config may add any id): drop its text
            self.text = self.detokenize(self.tokens[:-1])
        elif self.params.stop and self._hit_stop():
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _hit_stop(self) -> bool:
        # Every earlier step found no stop string, so a new one must end in the newest token: decode
        # only the tail. Only on a hit, decode the whole completion: text of a token prefix is not
        # always a prefix of the final text (byte pieces, leading spaces), so cut there.
        tail = self.detokenize(self.tokens[-self._stop_window :])
        if not any(s in tail for s in self.params.stop):
            return False
        text = self.detokenize(self.tokens)
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
        return bool(hits)

    def output(self) -> RowOutput:
        text = self.text if self.text is not None else self.detokenize(self.tokens)
        return RowOutput(list(self.tokens), text, self.finish_reason or "length")


def ensure_caches(model: Transformer, batch: int, seq_len: int) -> None:
    """Reuse the model's static cache when it is big enough, else size it for exactly this batch.

    Not the union of past shapes: 32 short rows then 1 long row must not allocate 32 long rows.
    """
    if model.max_batch_size >= batch and model.max_seq_length >= seq_len:
        return
    param = next(model.parameters())
    model.setup_caches(batch, seq_len, param.dtype, param.device)


def batch_bucket(n: int, limit: int) -> int:
    """The padded batch size for n rows: the next power of two, at most `limit` (the cache's rows)."""
    return min(1 << (n - 1).bit_length(), limit)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepFunctions:
    """The model's prefill and decode forwards, eager or compiled, reused across `generate` calls.

    compile: None (eager), "decode" (compile the one-token step) or "all" (also the prefill).
    On CUDA (gpt-fast): mode "reduce-overhead" (CUDA graphs) wants fixed shapes, so decode batches are
    padded to power-of-two buckets and attend over the whole static cache, one graph per bucket.
    On the CPU there are no CUDA graphs to feed: one graph with a dynamic batch size and attended
    length serves every step (measured as fast as per-bucket static graphs here, within 2%, and it
    compiles once instead of once per bucket, ~30-60 s each on a 2-core machine). Only batches of
    one row are padded to two: a size-1 dimension would be specialised into a graph of its own.
    fast_decode: eager decode steps on the CPU kernels run as a flat list of kernel calls
    (workers.llm.fast_decode, same bits) where the model allows it; greedy_screen: their all-greedy
    steps pick from a cheaper copy of the LM head where one applies (workers.llm.logit_screen).
    """

    def __init__(
        self,
        model: Transformer,
        compile: str | None = None,
        fast_decode: bool = True,
        greedy_screen: bool = True,
    ) -> None:
        if compile not in (None, *COMPILE_MODES):
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {compile!r}")
        self.model = model
        self.compile = compile
        self.device = next(model.parameters()).device
        self.static_shapes = compile is not None and self.device.type == "cuda"
        self.compile_s = 0.0  # running total; generate() reports the part spent in its call
        self._decode = self._decode_eager
        self._prefill = self._prefill_eager
        self.fast_decode = fast_decode
        self.greedy_screen = greedy_screen
        self._fast: FastDecode | None = None
        self._fast_for = -1  # the model's cache_version that _fast (or its absence) was decided for
        if compile is not None:
            self._decode = _compiled(self._decode_eager, self.device, dynamic=not self.static_shapes)
            if compile == "all":
                self._prefill = _compiled(self._prefill_eager, self.device, dynamic=True)

    def decode_width(self, n: int) -> int:
        """Rows to run for n active rows: n, or padded so that a compiled graph is reused."""
        rows = self.model.max_batch_size
        if self.compile is None:
            return n
        if self.static_shapes:
            return batch_bucket(n, rows)
        return max(n, min(2, rows))

    def _decode_eager(self, tokens: Tensor, input_pos: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        # the attended length travels as a tensor's size so that a compiled graph can keep it dynamic
        zero = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return self._with_argmax(self.model(tokens, input_pos, logits_index=zero, kv_len=slots.shape[0]))

    def _with_argmax(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        # The greedy pick, inside the compiled graph. On the CPU kernels' path a one-pass kernel
        # (0.13 ms for [64, 32k] logits on 2 cores, torch's max().indices 0.6 ms; argmax is slower
        # still); all of them pick the first maximum.
        if self.model.kernels and cpu_kernels.supports_argmax(logits):
            return logits, cpu_kernels.argmax(logits)
        return logits, logits.max(dim=-1).indices

    def prepare_decode(self) -> None:
        """Build the flat decode plan for the model's current cache now, if it will be used."""
        if self.compile is None:
            self._fast_steps()

    def _fast_steps(self) -> FastDecode | None:
        """The FastDecode for the model's current KV cache (built when the cache is new), or None."""
        if not self.fast_decode or not self.model.kernels:
            return None
        if self.model.cache_version != self._fast_for:
            screen = None if self._fast is None else self._fast.screen
            plan = FastDecode.build(self.model, screen, greedy_screen=self.greedy_screen)
            self._fast, self._fast_for = plan, self.model.cache_version
        return self._fast

    def _prefill_eager(
        self, tokens: Tensor, input_pos: Tensor, index: Tensor, slots: Tensor, rows: Tensor
    ) -> Tensor:
        # prefill() feeds every row the same positions, ending at kv_len - 1
        return self.model(
            tokens, input_pos, logits_index=index, kv_len=slots.shape[0], cache_rows=rows, prompt_chunk=True
        )

    def decode(
        self, tokens: Tensor, input_pos: Tensor, kv_len: int, need_logits: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """Logits `[B, V]` and their argmax `[B]` for one token per row at `input_pos [B, 1]`.
        Eager steps run the flat kernel list where it covers the model (workers.llm.fast_decode).
        need_logits False (every row greedy): the logits may be None, where the flat decode step
        picks the tokens from a cheaper copy of the LM head, exactly (workers.llm.logit_screen)."""
        if self.static_shapes:
            kv_len = self.model.max_seq_length
        fast = self._fast_steps() if self.compile is None and tokens.shape[1] == 1 else None
        if fast is not None:
            if not need_logits and fast.screen is not None:
                return None, fast.greedy(tokens, input_pos)
            return self._with_argmax(fast(tokens, input_pos))
        return self._timed(self._decode, tokens, input_pos, self._slots(kv_len))

    def prefill(self, tokens: Tensor, input_pos: Tensor, index: Tensor, kv_len: int, rows: Tensor) -> Tensor:
        """Logits `[B, V]` at `index [B]` of `tokens [B, T]`, written to cache rows `rows [B]`."""
        return self._timed(self._prefill, tokens, input_pos, index, self._slots(kv_len), rows)

    def _slots(self, kv_len: int) -> Tensor:
        # eager calls only read the size: a meta tensor allocates nothing
        device = "meta" if self.compile is None else self.device
        return torch.empty(kv_len, dtype=torch.int8, device=device)

    def _timed(self, fn: Callable[..., Any], *args: Tensor) -> Any:
        """Call fn; when the call compiled a new graph, add its wall time to `compile_s`."""
        if self.compile is None:
            return fn(*args)
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        _sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if counters["stats"]["unique_graphs"] != graphs:
            _sync(self.device)
            self.compile_s += time.perf_counter() - start
        return out


def _compiled(fn: Callable[..., Any], device: torch.device, dynamic: bool) -> Callable[..., Any]:
    # Every shape bucket is one more graph for the same code object: lift dynamo's small default
    # recompile limit (8), or the later buckets would silently run eagerly.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic)


@torch.inference_mode()
def prefill(
    model: Transformer,
    prompts: list[list[int]],
    pad_id: int,
    chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
    cache_rows: list[int] | None = None,
    steps: StepFunctions | None = None,
) -> Tensor:
    """Write prompts to the cache (rows `cache_rows`, default 0..B-1); return the logits `[B, V]` at
    each prompt's last token.

    Long batches are fed in time chunks of about `chunk_tokens` tokens so activations stay bounded;
    chunk i attends to the cache the earlier chunks wrote.
    """
    steps = steps or StepFunctions(model)
    device = next(model.parameters()).device
    b, t = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    tokens = tokens.to(device)
    rows = torch.tensor(cache_rows if cache_rows is not None else list(range(b)), device=device)
    positions = torch.arange(t, device=device).expand(b, t)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    step = max(1, chunk_tokens // b)
    logits: Tensor | None = None
    for start in range(0, t, step):
        end = min(t, start + step)
        index = (last - start).clamp(0, end - start - 1)
        chunk_logits = steps.prefill(tokens[:, start:end], positions[:, start:end], index, end, rows)
        if logits is None:
            logits = chunk_logits
        else:
            here = ((last >= start) & (last < end))[:, None]
            logits = torch.where(here, chunk_logits, logits)
    return logits


def prefill_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split indices (ordered by length) into prefill groups of similar length.

    A group grows while its padded size stays within `max_tokens` (one prefill chunk); once it holds
    MIN_SPLIT_TOKENS real tokens it also stops at MAX_PREFILL_PADDING of padding. A long prompt alone
    still forms a group (chunked in time).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in order:
        padded = (len(group) + 1) * lengths[i]  # sorted ascending: the newest prompt is the longest
        too_padded = real >= MIN_SPLIT_TOKENS and padded - real - lengths[i] > MAX_PREFILL_PADDING * padded
        if group and (padded > max_tokens or too_padded):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    if group:
        groups.append(group)
    return groups


class _Batch:
    """The rows of one `generate` call: which request sits in which cache row, and the queue."""

    def __init__(self, rows: list[_Row], capacity: int) -> None:
        self.rows = rows
        self.capacity = capacity
        # longest first: long requests start early and short ones fill the rows freed at the end
        self.waiting = deque(sorted(range(len(rows)), key=lambda i: -rows[i].total_len))
        self.slots: list[int | None] = []  # cache row -> request index (None: a hole)

    @property
    def active(self) -> list[int]:
        return [i for i in self.slots if i is not None]

    def free_rows(self) -> list[int]:
        holes = [k for k, i in enumerate(self.slots) if i is None]
        return holes + list(range(len(self.slots), self.capacity))

    def place(self, request: int, cache_row: int) -> None:
        if cache_row == len(self.slots):
            self.slots.append(request)
        else:
            self.slots[cache_row] = request

    def retire(self, finished: set[int]) -> None:
        self.slots = [None if i in finished else i for i in self.slots]
        while self.slots and self.slots[-1] is None:
            self.slots.pop()

    def compact_moves(self) -> tuple[list[int], list[int]]:
        """Fill holes with the last rows; returns (src, dst) cache rows to copy."""
        src, dst = [], []
        while None in self.slots:
            hole = self.slots.index(None)
            last = len(self.slots) - 1
            src.append(last)
            dst.append(hole)
            self.slots[hole] = self.slots.pop()
            while self.slots and self.slots[-1] is None:
                self.slots.pop()
        return src, dst


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: frozenset[int],
    detokenize: Callable[[list[int]], str],
    pad_id: int = 0,
    on_finish: Callable[[int], None] | None = None,
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
    max_batch_size: int | None = None,
    steps: StepFunctions | None = None,
    cache_seq_len: int | None = None,
) -> tuple[list[RowOutput], GenerationStats]:
    """Generate for prompts (token ids, each non-empty); outputs in prompt order.

    At most `max_batch_size` rows (default: all) decode together; the others wait for a free row.
    `cache_seq_len` sizes the cache (default: the longest prompt + max_tokens). The caller guarantees
    len(prompt) + max_tokens <= the model's context for every row. `on_finish(n)` is called after
    each step in which n rows finished.
    """
    if len(prompts) != len(params):
        raise ValueError("prompts and params differ in length")
    if not prompts:
        return [], GenerationStats()
    steps = steps or StepFunctions(model)
    rows = [_Row(list(p), sp, eos_ids, detokenize) for p, sp in zip(prompts, params)]
    capacity = min(max_batch_size or len(rows), len(rows))
    ensure_caches(model, capacity, max(cache_seq_len or 0, max(r.total_len for r in rows)))
    # the flat decode plan's buffers, if the cache is new, before the prefill's big activations:
    # allocated between those blocks once they are freed, they would keep the heap from reusing them
    steps.prepare_decode()
    batch = _Batch(rows, capacity)
    stats = GenerationStats(prompt_tokens=sum(r.prompt_len for r in rows))
    compile_before = steps.compile_s
    while batch.waiting or batch.slots:
        if batch.waiting and len(batch.active) < capacity:
            _admit(model, steps, batch, pad_id, prefill_chunk_tokens, stats, on_finish)
            continue  # newcomers may all have finished at once; re-check before decoding
        src, dst = batch.compact_moves()
        if src:
            kv_len = max(rows[i].last_pos for i in batch.slots) + 1
            model.move_rows(_tensor(src, steps.device), _tensor(dst, steps.device), kv_len)
        _decode(steps, batch, pad_id, stats, on_finish)
    stats.compile_s = steps.compile_s - compile_before
    stats.generated_tokens = sum(len(r.tokens) for r in rows)
    return [r.output() for r in rows], stats


def _tensor(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _admit(
    model: Transformer,
    steps: StepFunctions,
    batch: _Batch,
    pad_id: int,
    chunk_tokens: int,
    stats: GenerationStats,
    on_finish: Callable[[int], None] | None,
) -> None:
    """Prefill waiting requests into the free cache rows and sample their first tokens."""
    free = batch.free_rows()
    newcomers = [batch.waiting.popleft() for _ in range(min(len(free), len(batch.waiting)))]
    rows = batch.rows
    _sync(steps.device)
    start = time.perf_counter()
    finished: set[int] = set()
    for group in prefill_groups([rows[i].prompt_len for i in newcomers], chunk_tokens):
        ids = [newcomers[g] for g in group]
        cache_rows = [free.pop(0) for _ in ids]
        logits = prefill(model, [rows[i].prompt for i in ids], pad_id, chunk_tokens, cache_rows, steps)
        tokens = sample(logits, [rows[i].params for i in ids], [rows[i].rng for i in ids]).tolist()
        for i, k, token in zip(ids, cache_rows, tokens):
            batch.place(i, k)
            if rows[i].accept(token):
                finished.add(i)
    _sync(steps.device)
    stats.prefill_s += time.perf_counter() - start
    _finish(batch, finished, on_finish)


def _decode(
    steps: StepFunctions,
    batch: _Batch,
    pad_id: int,
    stats: GenerationStats,
    on_finish: Callable[[int], None] | None,
) -> None:
    """One decode step for every active row (cache rows 0..n-1, padded when compiled)."""
    rows, active = batch.rows, batch.slots  # compacted: no holes
    n = len(active)
    pad = steps.decode_width(n) - n
    # padding rows decode a pad token at position 0 of their own (free) cache rows
    tokens = _tensor([rows[i].tokens[-1] for i in active] + [pad_id] * pad, steps.device)[:, None]
    last = [rows[i].last_pos for i in active]
    input_pos = _tensor(last + [0] * pad, steps.device)[:, None]
    params, rngs = [rows[i].params for i in active], [rows[i].rng for i in active]
    need_logits = any(rng is not None for rng in rngs)  # greedy rows take the argmax alone
    start = time.perf_counter()
    logits, greedy = steps.decode(tokens, input_pos, max(last) + 1, need_logits)
    next_tokens = sample(logits[:n] if need_logits else None, params, rngs, greedy[:n]).tolist()
    stats.decode_s += time.perf_counter() - start  # .tolist() synchronised the device
    stats.decode_steps += 1
    stats.decode_tokens += n
    finished = {i for i, token in zip(active, next_tokens) if rows[i].accept(token)}
    _finish(batch, finished, on_finish)


def _finish(batch: _Batch, finished: set[int], on_finish: Callable[[int], None] | None) -> None:
    if not finished:
        return
    batch.retire(finished)
    if on_finish is not None:
        on_finish(len(finished))

"""The LLM engine: requests in, completions (or per-item errors) out. No Celery, SQL or buckets here."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from workers.engine import EngineRun, ItemError, Metric, ProgressFn
from workers.llm import malloc
from workers.llm.generate import (
    COMPILE_MODES,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    GenerationStats,
    RowOutput,
    StepFunctions,
    generate,
)
from workers.llm.loader import LoadedModel, load_checkpoint, resolve_dtype
from workers.llm.loader import model_bytes as loader_model_bytes
from workers.llm.model import can_pack_linears, enable_cpu_kernels, fuse_projections, pack_linears
from workers.llm.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 65536
# cache lengths are rounded up to this, so later jobs reuse the cache (and CUDA's static graphs); on
# the CPU, where graphs are dynamic, finer: the decode kernel streams each row's keys and runs
# faster over a cache with fewer unused slots between rows
CACHE_SEQ_ROUND = {"cuda": 256, "cpu": 64}

# engine options the registry may pass through LLMEngine.load(**options), besides dtype and
# max_batch_size (see LLMEngine.load)
OPTIONS: dict[str, Any] = {
    "prefill_chunk_tokens": None,  # None: sized to the CPU's cache (see prefill_chunk_for), else 8192
    "max_batch_tokens": DEFAULT_MAX_BATCH_TOKENS,
    "compile": False,
    "packed_linears": True,
    "cpu_kernels": True,
    "fast_decode": True,
    "greedy_screen": True,
}


@dataclass
class GenRequest:
    prompt: str | None = None
    messages: list[dict] | None = None  # chat: rendered with the tokenizer's chat template
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # all generated tokens, including a final EOS (text omits it)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class _Item:
    index: int  # position in the request list
    ids: list[int]
    params: SamplingParams


class _ProgressError(Exception):
    """Wraps an exception raised by the caller's progress callback so it is never retried."""


class LLMEngine:
    """Batched text generation on one device. Build with `load`, reuse for many `generate` calls.

    `generate` never raises for a bad request: each one gets a Completion or an ItemError, in order.
    """

    kind = "llm"

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int = 32,
        prefill_chunk_tokens: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        compile: bool | str = False,
        packed_linears: bool = True,
        cpu_kernels: bool = True,
        fast_decode: bool = True,
        greedy_screen: bool = True,
    ) -> None:
        self._loaded: LoadedModel | None = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_context: int = loaded.args.max_context
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.eos_ids = loaded.eos_ids
        self.device = next(self.model.parameters()).device
        # counts quantized weights too (stored as buffers), so bandwidth is right for int8/int4 folders
        self.model_bytes = loader_model_bytes(self.model)
        fuse_projections(self.model)  # before packing: the fused matmuls get packed weights
        self.prefill_chunk_tokens = prefill_chunk_tokens or prefill_chunk_for(self.model)
        if packed_linears and can_pack_linears(self.model):
            pack_linears(self.model, batch_hint=max_batch_size)
            widened = sum(m.weight.numel() for m in self.model.modules() if getattr(m, "widened", False))
            if widened:
                log.info(
                    "bf16 linears run as fp32 on widened weights (this CPU has no bf16 matmul): "
                    "+%.0f MiB of weights; packed_linears=false keeps bf16 weights at ~10x slower matmuls",
                    widened * 2 / 2**20,
                )
        if cpu_kernels:
            enable_cpu_kernels(self.model)
        if self.device.type == "cpu":
            malloc.reuse_freed_memory()  # prefill activations past 32 MiB: no page faults per layer
        # compiled graphs live as long as the engine: once per worker and shape bucket, never per job
        self.steps = StepFunctions(
            self.model, _compile_mode(compile), fast_decode=fast_decode, greedy_screen=greedy_screen
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 32,
        **options: Any,
    ) -> LLMEngine:
        """Load an HF checkpoint folder (safetensors only).

        dtype: weights, activations and KV cache: "float32", "bfloat16" or "float16".
        max_batch_size: cache rows, i.e. requests decoding together (continuous batching refills them).
        options (see `OPTIONS`):
          prefill_chunk_tokens: tokens per prefill forward; default: on the CPU, as many as keep the
            widest activation within a quarter of the last-level cache (see `prefill_chunk_for`),
            elsewhere 8192.
          max_batch_tokens: cache rows x cache length at most; fewer rows decode together for long
            requests, so the KV cache stays bounded.
          compile: False, True / "decode" (torch.compile the decode step) or "all" (also prefill).
          packed_linears: on the CPU, run linears through oneDNN with pre-packed weights.
          cpu_kernels: on the CPU, decode steps (RoPE, KV-cache write and attention in one pass),
            prompt attention, RMSNorm and the SwiGLU gate run in `workers.llm.cpu_kernels` (built
            with g++ on first use; torch's paths where that fails).
          fast_decode: eager decode steps on those kernels run as a flat list of kernel calls over
            buffers allocated once (`workers.llm.fast_decode`; the same bits, without the modules'
            per-call Python), where the model's layers all run on GenMill's kernels; an all-greedy
            step also picks its tokens from a cheaper copy of the LM head, exactly, where one
            applies (`workers.llm.logit_screen`: bf16 for an fp32 head on an AVX512_BF16 CPU, int8
            for a bf16 head on an AVX512_VNNI CPU, on AMX tiles too), and a bf16 head on AMX tiles
            that int8 does not cover takes the argmax in its epilogue, without writing the logits.
          greedy_screen: False keeps the full LM head and its logits for all-greedy flat steps too
            (the same tokens; to compare the two, or where the copy's memory matters).
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown LLM engine option(s): {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        opts = {**OPTIONS, **options}
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        for name in ("prefill_chunk_tokens", "max_batch_tokens"):
            if name == "prefill_chunk_tokens" and opts[name] is None:
                continue
            if not _is_int(opts[name]) or opts[name] < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {opts[name]!r}")
        _compile_mode(opts["compile"])
        for name in ("packed_linears", "cpu_kernels", "fast_decode", "greedy_screen"):
            if not isinstance(opts[name], bool):
                raise ValueError(f"{name} must be a bool, got {opts[name]!r}")  # noqa: TRY004
        resolve_dtype(dtype)  # reject a bad dtype before the (slow) load
        loaded = load_checkpoint(path, device=device, dtype=dtype)
        return cls(loaded, max_batch_size=max_batch_size, **opts)

    # ---- requests -> token ids ----

    def _prompt_ids(self, req: GenRequest) -> list[int] | ItemError:
        given = [name for name in ("prompt", "messages", "prompt_ids") if getattr(req, name) is not None]
        if len(given) != 1:
            return ItemError(
                "invalid_request", f"give exactly one of prompt, messages, prompt_ids (got {given})"
            )
        if req.prompt is not None:
            if not isinstance(req.prompt, str):
                return ItemError("invalid_request", "prompt must be a string")
            if not req.prompt:
                return ItemError("empty_prompt", "prompt is empty")
            return list(self.tokenizer(req.prompt)["input_ids"])
        if req.messages is not None:
            return self._chat_ids(req.messages)
        return self._check_ids(req.prompt_ids)

    def _chat_ids(self, messages: list[dict]) -> list[int] | ItemError:
        if not getattr(self.tokenizer, "chat_template", None):
            return ItemError(
                "no_chat_template", "this model's tokenizer has no chat template; send a prompt instead"
            )
        if not isinstance(messages, list) or not messages:
            return ItemError("empty_prompt", "messages is empty")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, TypeError, KeyError, ValueError) as exc:  # breaks only this request
            return ItemError("invalid_messages", f"chat template failed: {exc}")
        # the template already holds BOS and friends, as transformers does for tokenize=True
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_ids(self, ids: Any) -> list[int] | ItemError:
        if not isinstance(ids, list) or not ids:
            return ItemError("empty_prompt", "prompt_ids is empty")
        vocab = self.model.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            return ItemError("invalid_prompt_ids", f"prompt_ids must be integers in [0, {vocab})")
        return list(ids)

    def _prepare(self, index: int, req: GenRequest) -> _Item | ItemError:
        if not isinstance(req.params, SamplingParams):
            return ItemError("invalid_params", "params must be a SamplingParams")
        try:
            req.params.validate()
        except ValueError as exc:
            return ItemError("invalid_params", str(exc))
        ids = self._prompt_ids(req)
        if isinstance(ids, ItemError):
            return ids
        if not ids:
            return ItemError("empty_prompt", "the prompt has no tokens")
        max_tokens = req.params.max_tokens
        if len(ids) + max_tokens > self.max_context:
            return ItemError(
                "prompt_too_long",
                f"prompt has {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the model's "
                f"context of {self.max_context}",
            )
        return _Item(index, ids, req.params)

    # ---- generation ----

    def generate(self, requests: list[GenRequest], progress: ProgressFn | None = None) -> EngineRun:
        if self._loaded is None:
            raise RuntimeError("engine is closed")
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        outcomes: list[Any] = [None] * len(requests)
        items: list[_Item] = []
        for i, req in enumerate(requests):
            prepared = self._prepare(i, req)
            if isinstance(prepared, ItemError):
                outcomes[i] = prepared
            else:
                items.append(prepared)
        if progress is not None and len(items) < len(requests):
            progress(len(requests) - len(items))

        stats = GenerationStats()
        for group in self._length_groups(items):
            self._run_batch(group, outcomes, stats, progress)
        return EngineRun(outcomes=outcomes, metrics=self._metrics(stats, time.perf_counter() - start))

    def _cache_len(self, total: int) -> int:
        step = CACHE_SEQ_ROUND.get(self.device.type, CACHE_SEQ_ROUND["cuda"])
        return min(self.max_context, -(-total // step) * step)

    def _cache_rows(self, total: int) -> int:
        """Cache rows for requests up to `total` tokens long: max_batch_size, fewer when
        max_batch_tokens says so."""
        return max(1, min(self.max_batch_size, self.max_batch_tokens // self._cache_len(total)))

    def _rows_for(self, items: list[_Item]) -> int:
        return min(self._cache_rows(max(_total(it) for it in items)), len(items))

    def _length_groups(self, items: list[_Item]) -> list[list[_Item]]:
        """Runs of similar prompt + max_tokens length, longest first, each at least one full batch.

        Within a run, rows are refilled from its queue (continuous batching); the cache is sized for
        the run's longest request, so short requests are not held to long requests' cache length.
        """
        groups: list[list[_Item]] = []
        for it in sorted(items, key=_total, reverse=True):
            group = groups[-1] if groups else None
            if group is None or (
                len(group) >= self._cache_rows(_total(group[0])) and 2 * _total(it) <= _total(group[0])
            ):
                groups.append([it])
            else:
                group.append(it)
        return groups

    def _run_batch(
        self, items: list[_Item], outcomes: list[Any], stats: GenerationStats, progress: ProgressFn | None
    ) -> None:
        """Generate one batch; on failure (e.g. out of memory) retry in halves, down to one item."""
        reported = 0

        def on_finish(n: int) -> None:
            nonlocal reported
            reported += n
            if progress is not None:
                try:
                    progress(n)
                except Exception as exc:
                    raise _ProgressError() from exc

        try:
            outputs, batch_stats = self._generate_batch(items, on_finish)
        except _ProgressError as exc:
            raise exc.__cause__ from None
        except Exception as exc:
            log.exception("LLM batch of %d failed", len(items))
            self._retry(items, outcomes, stats, _skip_first(progress, reported), exc)
            return
        stats.add(batch_stats)
        for it, out in zip(items, outputs):
            outcomes[it.index] = self._completion(it, out)

    def _generate_batch(self, items: list[_Item], on_finish: Callable[[int], None]) -> tuple[list[Any], Any]:
        """The one step subclasses replace (offloaded, speculative): generate for these items and
        return (outputs, GenerationStats); the retry and progress handling around it is shared."""
        return generate(
            self.model,
            [it.ids for it in items],
            [it.params for it in items],
            self.eos_ids,
            self._detokenize,
            pad_id=self._loaded.pad_id,
            on_finish=on_finish,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            max_batch_size=self._rows_for(items),
            steps=self.steps,
            cache_seq_len=self._cache_len(max(_total(it) for it in items)),
        )

    def _retry(
        self,
        items: list[_Item],
        outcomes: list[Any],
        stats: GenerationStats,
        progress: ProgressFn | None,
        exc: Exception,
    ) -> None:
        if len(items) == 1:
            outcomes[items[0].index] = ItemError("generation_failed", f"{type(exc).__name__}: {exc}")
            if progress is not None:
                progress(1)
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(items) // 2
        self._run_batch(items[:half], outcomes, stats, progress)
        self._run_batch(items[half:], outcomes, stats, progress)

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _completion(item: _Item, out: RowOutput) -> Completion:
        return Completion(
            text=out.text,
            token_ids=out.token_ids,
            prompt_tokens=len(item.ids),
            completion_tokens=len(out.token_ids),
            finish_reason=out.finish_reason,
        )

    def _metrics(self, s: GenerationStats, wall: float) -> list[Metric]:
        steps_per_s = s.decode_steps / s.decode_s if s.decode_s > 0 else 0.0
        metrics = [
            Metric("prompt_tokens", s.prompt_tokens, "tokens"),
            Metric("generated_tokens", s.generated_tokens, "tokens"),
            Metric("prefill_tokens_per_s", _rate(s.prompt_tokens, s.prefill_s), "tokens/s"),
            Metric("decode_tokens_per_s", _rate(s.decode_tokens, s.decode_s), "tokens/s"),
            Metric("tokens_per_s", _rate(s.generated_tokens, wall), "tokens/s"),
            Metric("wall_s", wall, "s"),
            Metric("peak_memory_bytes", self._peak_memory(), "bytes"),
            Metric("model_bytes", self.model_bytes, "bytes"),
            # every decode step reads all weights once: the memory-bandwidth figure gpt-fast reports
            Metric("bandwidth_bytes_per_s", self.model_bytes * steps_per_s, "bytes/s"),
        ]
        if s.compile_s > 0:
            metrics.append(Metric("compile_s", s.compile_s, "s"))
        return metrics

    def _peak_memory(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        # process-lifetime peak RSS; Linux reports KiB, macOS bytes
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(rss if sys.platform == "darwin" else rss * 1024)

    def close(self) -> None:
        if self._loaded is None:
            return
        self.model.release_caches()
        self._loaded = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def prefill_chunk_for(model: torch.nn.Module) -> int:
    """Tokens per prefill forward. On the CPU: as many as keep the widest activation (the widest
    projection's output; logits are taken at a few positions only) within a quarter of the
    last-level cache; smaller chunks lose nothing once they hold a few hundred rows. Elsewhere
    DEFAULT_PREFILL_CHUNK_TOKENS. (The bound was set when a 7616-row bf16 matmul into 4096 columns
    ran at 755 GFLOP/s against 985 at 3808 rows; much of that was its 62 MB output page-faulting
    in, past glibc's 32 MiB mmap ceiling, which `malloc.reuse_freed_memory` now removes. With it,
    a 2-core Xeon (480 MiB L3, so chunks of 8192) runs 64-prompt prefills as fast at 2048-token
    chunks as at 8192; CPUs with small caches keep the cache bound.)"""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return DEFAULT_PREFILL_CHUNK_TOKENS
    output = getattr(model, "output", None)
    widest = max(
        (m.out_features for m in model.modules() if hasattr(m, "out_features") and m is not output),
        default=1,
    )
    row_bytes = widest * param.element_size()
    return max(256, min(DEFAULT_PREFILL_CHUNK_TOKENS, _last_level_cache_bytes() // 4 // row_bytes))


def _last_level_cache_bytes() -> int:
    """The CPU's last-level cache (Linux sysfs; 32 MiB where it cannot be read)."""
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()  # e.g. "32768K"
        number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
        if number.isdigit():
            sizes.append(int(number) * unit)
    return max(sizes, default=32 << 20)


def _total(item: _Item) -> int:
    return len(item.ids) + item.params.max_tokens


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compile_mode(value: Any) -> str | None:
    """compile option -> StepFunctions mode: False -> None, True -> "decode", or "decode" / "all"."""
    if value is False:
        return None
    if value is True:
        return "decode"
    if value in COMPILE_MODES:
        return value
    raise ValueError(f"compile must be a bool or one of {', '.join(COMPILE_MODES)}, got {value!r}")


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _skip_first(progress: ProgressFn | None, n: int) -> ProgressFn | None:
    """A progress callback that drops the first `n` units (already reported by a failed attempt)."""
    if progress is None or n == 0:
        return progress
    remaining = n

    def wrapped(k: int) -> None:
        nonlocal remaining
        skip = min(k, remaining)
        remaining -= skip
        if k > skip:
            progress(k - skip)

    return wrapped

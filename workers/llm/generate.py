"""Batched generation over the static KV cache: one prefill for mixed-length prompts, then decode.

Prompts are right-padded, so every row's tokens sit at positions 0..len-1 exactly as if it ran
alone (same RoPE / learned positions, same attended keys): greedy output does not depend on the
batch. Rows then decode at their own positions. A row that finishes is dropped from the batch (KV
cache rows compacted), so the remaining rows stop paying for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from workers.llm.model import Transformer
from workers.llm.sampling import BatchSampler, SamplingParams

DEFAULT_PREFILL_CHUNK_TOKENS = 8192


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
    prompt_tokens: int = 0  # real prompt tokens (padding excluded)
    generated_tokens: int = 0  # every sampled token, EOS included
    decode_steps: int = 0  # forward passes after the prefill
    decode_tokens: int = 0  # tokens sampled by those passes

    def add(self, other: GenerationStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Row:
    prompt_len: int
    params: SamplingParams
    eos_ids: frozenset[int]
    detokenize: Callable[[list[int]], str]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None

    @property
    def last_pos(self) -> int:
        """Position of the most recently sampled token (the next one to feed the model)."""
        return self.prompt_len + len(self.tokens) - 1

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
        # decode the whole completion: a stop string can span tokens, and text of a token
        # prefix is not always a prefix of the final text (byte pieces, leading spaces)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(
    model: Transformer,
    prompts: list[list[int]],
    pad_id: int,
    chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
) -> Tensor:
    """Write all prompts to the cache; return the logits `[B, V]` at each prompt's last token.

    Long batches are fed in time chunks of about `chunk_tokens` tokens so activations stay bounded;
    chunk i attends to the cache the earlier chunks wrote.
    """
    device = next(model.parameters()).device
    b, t = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    tokens = tokens.to(device)
    positions = torch.arange(t, device=device).expand(b, t)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    step = max(1, chunk_tokens // b)
    logits: Tensor | None = None
    for start in range(0, t, step):
        end = min(t, start + step)
        index = (last - start).clamp(0, end - start - 1)
        chunk_logits = model(tokens[:, start:end], positions[:, start:end], logits_index=index, kv_len=end)
        if logits is None:
            logits = chunk_logits
        else:
            here = ((last >= start) & (last < end))[:, None]
            logits = torch.where(here, chunk_logits, logits)
    return logits


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
) -> tuple[list[RowOutput], GenerationStats]:
    """Generate for one batch of prompts (token ids, each non-empty); outputs in prompt order.

    The caller guarantees len(prompt) + max_tokens <= the model's context for every row.
    `on_finish(n)` is called after each step in which n rows finished.
    """
    if len(prompts) != len(params):
        raise ValueError("prompts and params differ in length")
    if not prompts:
        return [], GenerationStats()
    device = next(model.parameters()).device
    rows = [_Row(len(p), sp, eos_ids, detokenize) for p, sp in zip(prompts, params)]
    ensure_caches(model, len(rows), max(r.prompt_len + r.params.max_tokens for r in rows))
    sampler = BatchSampler(params, device)
    stats = GenerationStats(prompt_tokens=sum(r.prompt_len for r in rows))

    _sync(device)
    t0 = time.perf_counter()
    next_tokens = sampler.sample(prefill(model, prompts, pad_id, prefill_chunk_tokens)).tolist()
    active = _accept(rows, list(range(len(rows))), next_tokens, on_finish)
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0

    batch = list(range(len(rows)))  # row ids in current cache/batch order
    while active:
        if active != batch:
            _compact(model, sampler, rows, batch, active)
            batch = active
        last = [rows[i].last_pos for i in batch]
        tokens = torch.tensor([rows[i].tokens[-1] for i in batch], device=device)[:, None]
        input_pos = torch.tensor(last, device=device)[:, None]
        zero = torch.zeros(len(batch), dtype=torch.long, device=device)
        logits = model(tokens, input_pos, logits_index=zero, kv_len=max(last) + 1)
        next_tokens = sampler.sample(logits).tolist()
        stats.decode_steps += 1
        stats.decode_tokens += len(batch)
        active = _accept(rows, batch, next_tokens, on_finish)
    stats.decode_s = time.perf_counter() - t1
    stats.generated_tokens = sum(len(r.tokens) for r in rows)
    return [r.output() for r in rows], stats


def _accept(
    rows: list[_Row], batch: list[int], tokens: list[int], on_finish: Callable[[int], None] | None
) -> list[int]:
    """Feed each batch row its sampled token; return the row ids still generating."""
    still = [i for i, tok in zip(batch, tokens) if not rows[i].accept(tok)]
    if on_finish is not None and len(still) < len(batch):
        on_finish(len(batch) - len(still))
    return still


def _compact(
    model: Transformer, sampler: BatchSampler, rows: list[_Row], batch: list[int], active: list[int]
) -> None:
    """Drop finished rows: move the KV cache rows and sampler state of `active` to the front."""
    where = {row_id: k for k, row_id in enumerate(batch)}
    keep = [where[i] for i in active]
    device = next(model.parameters()).device
    model.keep_rows(torch.tensor(keep, device=device), max(rows[i].last_pos for i in active) + 1)
    sampler.keep_rows(keep)

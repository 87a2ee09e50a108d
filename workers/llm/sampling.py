"""Sampling parameters and batched, per-row sampling.

Each row draws from its own `torch.Generator` seeded by its request's seed, and consumes exactly one
vocabulary-sized draw per step, so a request's output depends on its seed and prompt only, never on
which other requests share its batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor

_MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts a single string too
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            # ValueError like every other field: callers turn it into a per-request error
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")  # noqa: TRY004

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BatchSampler:
    """Per-row sampling state for one batch; `keep_rows` follows the engine's batch compaction."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params = list(params)
        self.device = device
        self.generators = [self._generator(p) for p in self.params]
        self._refresh()

    def _generator(self, p: SamplingParams) -> torch.Generator | None:
        if p.greedy:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        return g

    def _refresh(self) -> None:
        ps = self.params
        self.all_greedy = all(p.greedy for p in ps)
        # greedy rows use temperature 1 so the division is harmless; their draw is an argmax anyway
        self.temperature = torch.tensor([p.temperature or 1.0 for p in ps], device=self.device)
        self.top_k = torch.tensor([p.top_k or 0 for p in ps], device=self.device)
        self.top_p = torch.tensor([p.top_p for p in ps], device=self.device)
        self.use_top_k = any(p.top_k is not None and not p.greedy for p in ps)
        self.use_top_p = any(p.top_p < 1 and not p.greedy for p in ps)

    def keep_rows(self, rows: list[int]) -> None:
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._refresh()

    def sample(self, logits: Tensor) -> Tensor:
        """Next token per row from `logits [B, V]`; returns `[B]` int64."""
        greedy_tokens = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy_tokens
        probs = self.probabilities(logits)
        tokens = greedy_tokens.clone()
        for row, g in enumerate(self.generators):
            if g is not None:
                tokens[row] = _draw(probs[row], g)
        return tokens

    def probabilities(self, logits: Tensor) -> Tensor:
        """Temperature, then top-k, then top-p (the order transformers uses), per row; `[B, V]` float32."""
        logits = logits.float() / self.temperature[:, None]
        if self.use_top_k or self.use_top_p:
            logits = self._truncate(logits)
        return torch.softmax(logits, dim=-1)

    def _truncate(self, logits: Tensor) -> Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        vocab = logits.shape[-1]
        if self.use_top_k:
            k = torch.where(self.top_k > 0, self.top_k.clamp(max=vocab), vocab)
            ranks = torch.arange(vocab, device=logits.device)
            remove |= ranks[None, :] >= k[:, None]
        if self.use_top_p:
            probs = torch.softmax(sorted_logits.masked_fill(remove, -math.inf), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # drop a token once the more likely ones already cover top_p; the top token always stays
            # rows at top_p == 1 skip this: rounding in cumsum must not trim their tail
            remove |= (mass_before >= self.top_p[:, None]) & (self.top_p < 1)[:, None]
        remove_unsorted = torch.zeros_like(remove).scatter(-1, order, remove)
        return logits.masked_fill(remove_unsorted, -math.inf)


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    # Exponential race (Gumbel-max): argmax(p / E), E ~ Exp(1), samples from p without a CPU sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax()

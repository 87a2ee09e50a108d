"""Sampling parameters and batched, per-row sampling.

Each sampled row draws one uniform per step from its own counter-based stream (`RowRng`, keyed by the
request's seed), and the whole batch is sampled by inverse CDF in one pass, so a request's output
depends on its seed and prompt only, never on which other requests share its batch.
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


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit hash with good avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class RowRng:
    """A counter-based uniform stream for one request: draw i is a hash of (seed, i).

    One uniform per sampled token is all inverse-CDF sampling needs, so drawing costs a few integer
    operations per row in Python instead of a vocabulary-sized draw per row, and the stream depends on
    the seed and the draw count only: never on the batch, the device, or other requests.
    """

    __slots__ = ("count", "key")

    def __init__(self, seed: int | None) -> None:
        seed = secrets.randbits(63) if seed is None else seed
        self.key = _mix64(seed * 0x9E3779B97F4A7C15 & _MASK64)
        self.count = 0

    def next_uniform(self) -> float:
        """A float in (0, 1]."""
        x = _mix64((self.key + self.count * 0x9E3779B97F4A7C15) & _MASK64)
        self.count += 1
        return ((x >> 11) + 1) * 2.0**-53


def probabilities(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature, then top-k, then top-p (the order transformers uses), per row; `[B, V]` float32."""
    device = logits.device
    # greedy rows use temperature 1 so the division is harmless; their pick is an argmax anyway
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    logits = logits.float() / temperature[:, None]
    use_top_k = any(p.top_k is not None and not p.greedy for p in params)
    use_top_p = any(p.top_p < 1 and not p.greedy for p in params)
    if use_top_k or use_top_p:
        top_k = torch.tensor([p.top_k or 0 for p in params], device=device) if use_top_k else None
        top_p = torch.tensor([p.top_p for p in params], device=device) if use_top_p else None
        logits = _truncate(logits, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def _truncate(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        ranks = torch.arange(vocab, device=logits.device)
        remove |= ranks[None, :] >= k[:, None]
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(remove, -math.inf), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # drop a token once the more likely ones already cover top_p; the top token always stays
        # rows at top_p == 1 skip this: rounding in cumsum must not trim their tail
        remove |= (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    remove_unsorted = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(remove_unsorted, -math.inf)


def sample(
    logits: Tensor | None,
    params: list[SamplingParams],
    rngs: list[RowRng | None],
    greedy: Tensor | None = None,
) -> Tensor:
    """Next token per row from `logits [B, V]`; returns `[B]` int64 on the logits' device.

    Greedy rows (rng None) take the argmax (`greedy`, when the caller has it already; then the logits
    may be None if every row is greedy). The other rows are drawn together by inverse CDF: one uniform
    per row from its own `RowRng`, one cumsum and one searchsorted for the whole batch.
    """
    if logits is None and (greedy is None or any(rng is not None for rng in rngs)):
        raise ValueError("sample needs the logits unless every row is greedy and their argmax is given")
    tokens = logits.argmax(dim=-1) if greedy is None else greedy
    sampled = [i for i, rng in enumerate(rngs) if rng is not None]
    if not sampled:
        return tokens
    device = logits.device
    index = torch.tensor(sampled, device=device)
    probs = probabilities(logits[index], [params[i] for i in sampled])
    # float64 cdf: a float32 running sum over a 100k-token vocabulary drifts by more than a rare
    # token's probability
    cdf = probs.double().cumsum(dim=-1)
    u = torch.tensor([rngs[i].next_uniform() for i in sampled], dtype=torch.float64, device=device)
    # first token whose cdf reaches u * total; zero-probability tokens have empty intervals (u > 0)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    return tokens.index_copy(0, index, drawn.clamp(max=logits.shape[-1] - 1))


class BatchSampler:
    """Per-row sampling state for one batch; `keep_rows` follows the engine's batch compaction."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params = list(params)
        self.device = device
        self.rngs = [None if p.greedy else RowRng(p.seed) for p in self.params]

    def keep_rows(self, rows: list[int]) -> None:
        self.params = [self.params[i] for i in rows]
        self.rngs = [self.rngs[i] for i in rows]

    def sample(self, logits: Tensor) -> Tensor:
        """Next token per row from `logits [B, V]`; returns `[B]` int64."""
        return sample(logits, self.params, self.rngs)

    def probabilities(self, logits: Tensor) -> Tensor:
        return probabilities(logits, self.params)

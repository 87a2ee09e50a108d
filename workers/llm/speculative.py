"""Speculative decoding with a draft model (Leviathan et al. 2023, Chen et al. 2023; gpt-fast style).

One round, for every row of the batch at its own position `pos` (`cur`, its last sampled token, not fed
to the models yet):

1. the draft proposes k tokens d1..dk autoregressively, each drawn from its distribution q_j;
2. the target scores [cur, d1..dk] at positions pos..pos+k in one forward, giving p_0..p_k;
3. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is
   drawn from normalise(max(p - q, 0)) and the rest is dropped; if all k are accepted a bonus token
   is drawn from p_k. Every emitted token is then distributed exactly as the target's; for greedy rows
   p and q are one-hot argmaxes, so the output is the target's greedy output.

Rollback is free with the static KV cache: slot == position, so a row's next round writes from its
new position on, overwriting rejected slots before any query can attend to them. The draft's first
forward of a round feeds two tokens, [prev, cur] at [pos-1, pos]: when all k were accepted the draft
never saw dk (now `prev`), and otherwise this rewrites an identical entry. That replaces gpt-fast's
extra draft forward after a full acceptance, which a batch (where rows differ) could not skip.

Batches: rows accept different counts, so after a round they sit at different positions. The model
takes per-row positions, so every row simply steps from its own position; no row waits for another
and no tokens are re-aligned. Finished rows are dropped (both caches compacted), as in `generate`.
Positions past the shared cache limit (rows near their end) are clamped to the last slot; such
tokens lie beyond what their row can still emit, so their garbage is never read by a needed query.

Randomness: a sampled row draws 2k + 1 uniforms per round from its own counter-based stream
(`_Row.rng`, as plain decoding does): k for the draft's draws (inverse CDF), k for the acceptance
tests, one for the correction or bonus token. Its output thus depends on its seed and prompt only,
never on the batch. Greedy rows use constants that turn every draw into an argmax.

Batches are plain (not continuous): `SpeculativeLLMEngine` runs up to `max_batch_size` requests
together and starts the next ones when all have finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engine import Metric, ProgressFn
from workers.llm.engine import LLMEngine, _Item
from workers.llm.generate import (
    DEFAULT_PREFILL_CHUNK_TOKENS,
    GenerationStats,
    RowOutput,
    _Row,
    ensure_caches,
    prefill,
)
from workers.llm.loader import build_model, model_bytes, read_config, resolve_dtype
from workers.llm.model import PackedLinear, Transformer, enable_cpu_kernels, fuse_projections, pack_linears
from workers.llm.sampling import SamplingParams, probabilities, sample

log = logging.getLogger(__name__)

MAX_SPECULATE_K = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class AcceptStats:
    """`counts[i]`: rounds in which exactly i of the k draft tokens were accepted (gpt-fast's histogram)."""

    counts: list[int]

    @property
    def k(self) -> int:
        return len(self.counts) - 1

    @property
    def rounds(self) -> int:
        return sum(self.counts)

    @property
    def accepted(self) -> int:
        return sum(i * c for i, c in enumerate(self.counts))

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.accepted / (self.k * self.rounds) if self.rounds else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted draft tokens per round (each round also emits one target token)."""
        return self.accepted / self.rounds if self.rounds else 0.0

    def add(self, other: AcceptStats) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]


# ---- the acceptance rule (pure tensors) ----


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """One draw per row from unnormalised `weights [B, V]` with uniforms `u [B]` in (0, 1].

    Zero-weight tokens have empty intervals; a one-hot row always gives its hot index (greedy).
    """
    # float64: a float32 running sum over a large vocabulary drifts by more than a rare token's mass
    cdf = weights.double().cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None]).squeeze(1)
    return drawn.clamp(max=weights.shape[-1] - 1)


def verify(
    draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, u_accept: Tensor, u_final: Tensor
) -> tuple[Tensor, Tensor]:
    """Accept/reject k draft tokens per row; return (accepted count `[B]`, next token `[B]`).

    draft_tokens `[B, k]` drawn from draft_probs `[B, k, V]` (q); target_probs `[B, k+1, V]` (p);
    u_accept `[B, k]` uniforms for the tests (0 for greedy rows); u_final `[B]` in (0, 1] for the
    correction or bonus draw.
    """
    b, k = draft_tokens.shape
    index = draft_tokens[..., None]
    p = target_probs[:, :k].gather(-1, index).squeeze(-1)
    q = draft_probs.gather(-1, index).squeeze(-1)
    # u < p/q written without the division; q > 0 for a token the draft actually drew
    accepted = u_accept * q < p
    n = accepted.long().cumprod(-1).sum(-1)  # length of the leading run of acceptances
    rows = torch.arange(b, device=draft_tokens.device)
    p_n = target_probs[rows, n]
    residual = (p_n - draft_probs[rows, n.clamp(max=k - 1)]).clamp_min(0)
    # all accepted: the bonus token comes from p_k itself; p == q leaves no residual mass: use p
    use_p = (n == k) | (residual.sum(-1) <= 0)
    return n, inverse_cdf(torch.where(use_p[:, None], p_n, residual), u_final)


# ---- per-round pieces ----


class _RoundDraws:
    """A round's uniforms per row, drawn up front so each row consumes exactly 2k + 1 per round."""

    def __init__(self, rows: list[_Row], k: int, device: torch.device) -> None:
        self.params = [r.params for r in rows]
        self.all_greedy = all(r.rng is None for r in rows)
        self.greedy = torch.tensor([r.rng is None for r in rows], device=device)
        # greedy rows: u = 1 picks the hot index of a one-hot row, u = 0 accepts iff the argmaxes agree
        draft, accept, final = [], [], []
        for r in rows:
            if r.rng is None:
                draft.append([1.0] * k)
                accept.append([0.0] * k)
                final.append(1.0)
            else:
                draft.append([r.rng.next_uniform() for _ in range(k)])
                accept.append([r.rng.next_uniform() for _ in range(k)])
                final.append(r.rng.next_uniform())
        self.draft = torch.tensor(draft, dtype=torch.float64, device=device)
        self.accept = torch.tensor(accept, dtype=torch.float64, device=device)
        self.final = torch.tensor(final, dtype=torch.float64, device=device)

    def probs(self, logits: Tensor) -> Tensor:
        """`[B, V]` sampling distributions; one-hot argmax for greedy rows (exact greedy equivalence)."""
        onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        if self.all_greedy:
            return onehot
        return torch.where(self.greedy[:, None], onehot, probabilities(logits, self.params))


def _propose(
    draft: Transformer,
    draws: _RoundDraws,
    prev: Tensor,
    cur: Tensor,
    pos: Tensor,
    max_pos: int,
    k: int,
    limit: int,
) -> tuple[Tensor, Tensor]:
    """Draft k tokens per row; returns tokens `[B, k]` and their distributions `[B, k, V]`."""
    b = cur.shape[0]
    tokens = torch.stack([prev, cur], dim=1)
    input_pos = torch.stack([pos - 1, pos], dim=1)
    last = torch.ones(b, dtype=torch.long, device=cur.device)
    logits = draft(tokens, input_pos, logits_index=last, kv_len=min(max_pos + 1, limit))
    out_tokens, out_probs = [], []
    for j in range(k):
        probs = draws.probs(logits)
        tok = inverse_cdf(probs, draws.draft[:, j])
        out_tokens.append(tok)
        out_probs.append(probs)
        if j == k - 1:
            break
        step_pos = (pos + j + 1).clamp(max=limit - 1)[:, None]
        logits = draft(tok[:, None], step_pos, logits_index=last * 0, kv_len=min(max_pos + j + 2, limit))
    return torch.stack(out_tokens, dim=1), torch.stack(out_probs, dim=1)


def _score(
    target: Transformer,
    draws: _RoundDraws,
    cur: Tensor,
    draft_tokens: Tensor,
    pos: Tensor,
    max_pos: int,
    limit: int,
) -> Tensor:
    """The target's distributions `[B, k+1, V]` after cur, d1, ..., dk: one forward, k+1 logits."""
    b, k = draft_tokens.shape
    steps = torch.arange(k + 1, device=cur.device)
    tokens = torch.cat([cur[:, None], draft_tokens], dim=1)
    input_pos = (pos[:, None] + steps).clamp(max=limit - 1)
    logits = target(tokens, input_pos, logits_index=steps.expand(b, -1), kv_len=min(max_pos + k + 1, limit))
    return torch.stack([draws.probs(logits[:, j]) for j in range(k + 1)], dim=1)


def speculative_round(
    target: Transformer,
    draft: Transformer,
    rows: list[_Row],
    prev: list[int],
    k: int,
    limit: int,
) -> tuple[list[int], list[list[int]]]:
    """One round for the batch `rows` (in cache-row order); `prev[i]` is the token before row i's last.

    Returns per row the accepted count and the tokens to emit (accepted + 1).
    """
    device = next(target.parameters()).device
    positions = [r.last_pos for r in rows]
    pos = torch.tensor(positions, device=device)
    cur = torch.tensor([r.tokens[-1] for r in rows], device=device)
    draws = _RoundDraws(rows, k, device)
    max_pos = max(positions)
    d_tokens, d_probs = _propose(draft, draws, torch.tensor(prev, device=device), cur, pos, max_pos, k, limit)
    t_probs = _score(target, draws, cur, d_tokens, pos, max_pos, limit)
    n, nxt = verify(d_tokens, d_probs, t_probs, draws.accept, draws.final)
    n_list, nxt_list, drafted = n.tolist(), nxt.tolist(), d_tokens.tolist()
    return n_list, [d[:m] + [t] for d, m, t in zip(drafted, n_list, nxt_list)]


# ---- the generation loop ----


def _feed(rows: list[_Row], batch: list[int], tokens: list[list[int]]) -> tuple[list[int], int]:
    """Give each row its emitted tokens until it finishes; return (row ids still active, tokens used)."""
    used, still = 0, []
    for i, toks in zip(batch, tokens):
        for tok in toks:
            used += 1
            if rows[i].accept(tok):
                break
        else:
            still.append(i)
    return still, used


def _compact(
    target: Transformer, draft: Transformer, rows: list[_Row], batch: list[int], active: list[int]
) -> None:
    """Drop finished rows: move both models' cache rows of `active` to the front."""
    where = {row_id: j for j, row_id in enumerate(batch)}
    index = torch.tensor([where[i] for i in active], device=next(target.parameters()).device)
    kv_len = max(rows[i].last_pos for i in active) + 1
    target.keep_rows(index, kv_len)
    draft.keep_rows(index, kv_len)


def _notify(on_finish: Callable[[int], None] | None, before: int, after: int) -> None:
    if on_finish is not None and after < before:
        on_finish(before - after)


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: frozenset[int],
    detokenize: Callable[[list[int]], str],
    speculate_k: int = 4,
    pad_id: int = 0,
    on_finish: Callable[[int], None] | None = None,
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
) -> tuple[list[RowOutput], GenerationStats, AcceptStats]:
    """`workers.llm.generate.generate` with a draft model; same contract, plus the acceptance histogram.

    The caller guarantees len(prompt) + max_tokens <= both models' context for every row.
    """
    if len(prompts) != len(params):
        raise ValueError("prompts and params differ in length")
    k = speculate_k
    accept = AcceptStats([0] * (k + 1))
    if not prompts:
        return [], GenerationStats(), accept
    rows = [_Row(list(p), sp, eos_ids, detokenize) for p, sp in zip(prompts, params)]
    needed = max(r.prompt_len + r.params.max_tokens for r in rows)
    # k + 1 spare slots let a row near its end still score a full round
    limit = min(needed + k + 1, target.args.max_context, draft.args.max_context)
    ensure_caches(target, len(rows), limit)
    ensure_caches(draft, len(rows), limit)
    stats = GenerationStats(prompt_tokens=sum(r.prompt_len for r in rows))

    t0 = time.perf_counter()
    logits = prefill(target, prompts, pad_id, prefill_chunk_tokens)
    first = sample(logits, [r.params for r in rows], [r.rng for r in rows]).tolist()
    prefill(draft, prompts, pad_id, prefill_chunk_tokens)
    batch = list(range(len(rows)))
    active, _ = _feed(rows, batch, [[t] for t in first])
    _notify(on_finish, len(batch), len(active))
    t1 = time.perf_counter()
    stats.prefill_s = t1 - t0

    while active:
        if active != batch:
            _compact(target, draft, rows, batch, active)
            batch = active
        live = [rows[i] for i in batch]
        prev = [r.tokens[-2] if len(r.tokens) > 1 else r.prompt[-1] for r in live]
        counts, emitted = speculative_round(target, draft, live, prev, k, limit)
        for n in counts:
            accept.counts[n] += 1
        active, used = _feed(rows, batch, emitted)
        _notify(on_finish, len(batch), len(active))
        stats.decode_steps += 1
        stats.decode_tokens += used
    stats.decode_s = time.perf_counter() - t1
    stats.generated_tokens = sum(len(r.tokens) for r in rows)
    return [r.output() for r in rows], stats, accept


# ---- engine ----


def load_draft(
    folder: str | Path, target: LLMEngine, device: str | torch.device, dtype: str | torch.dtype
) -> Transformer:
    """Build the draft (fp or quantized folder) and check it shares the target's vocabulary."""
    folder = Path(folder)
    cfg = read_config(folder)
    draft = build_model(folder, cfg, torch.device(device), resolve_dtype(dtype))
    want, got = target.model.args.vocab_size, draft.args.vocab_size
    if got != want:
        raise ValueError(
            f"draft model {folder} has vocabulary size {got}, the target {want}: the draft must share "
            "the target's tokenizer"
        )
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(folder).get_vocab() != target.tokenizer.get_vocab():
            raise ValueError(f"draft model {folder} has a different tokenizer vocabulary than the target")
    return draft


def _check_k(speculate_k: Any) -> int:
    if (
        not isinstance(speculate_k, int)
        or isinstance(speculate_k, bool)
        or not 1 <= speculate_k <= MAX_SPECULATE_K
    ):
        raise ValueError(f"speculate_k must be an integer in [1, {MAX_SPECULATE_K}], got {speculate_k!r}")
    return speculate_k


class SpeculativeLLMEngine(LLMEngine):
    """`LLMEngine` whose batches decode speculatively with a draft model; same requests and outcomes.

    Request preparation, batching, retries and progress are LLMEngine's; only the per-batch generation
    differs. Metrics add the acceptance histogram (`accept_count_{i}`), `acceptance_rate` and
    `accepted_tokens_per_step`, and count the draft's reads in `bandwidth_bytes_per_s`.
    """

    def __init__(
        self, loaded: Any, *args: Any, draft: Transformer | None = None, speculate_k: int = 4, **kwargs: Any
    ) -> None:
        super().__init__(loaded, *args, **kwargs)
        self.draft: Transformer | None = None
        self.speculate_k = _check_k(speculate_k)
        self._accept = AcceptStats([0] * (self.speculate_k + 1))
        # quantized layers keep their weights in buffers, which LLMEngine's parameter count misses
        self.model_bytes = model_bytes(self.model)
        self.draft_bytes = 0
        if draft is not None:
            self.attach_draft(draft)

    def attach_draft(self, draft: Transformer) -> None:
        # the draft runs on the same fast paths as the target
        fuse_projections(draft)
        if any(isinstance(m, PackedLinear) for m in self.model.modules()):
            pack_linears(draft, batch_hint=self.max_batch_size)
        if self.model.kernels:
            enable_cpu_kernels(draft)
        self.draft = draft
        self.draft_bytes = model_bytes(draft)
        self.max_context = min(self.max_context, draft.args.max_context)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        draft_model: str | Path | None = None,
        speculate_k: int = 4,
        **options: Any,
    ) -> SpeculativeLLMEngine:
        """Load the target like `LLMEngine.load` (same `options`) and the draft checkpoint folder."""
        if not draft_model:
            raise ValueError("draft_model (a checkpoint folder) is required for speculative decoding")
        _check_k(speculate_k)
        if options.get("compile"):
            # the rounds run the models eagerly; a compiled decode step would never be used
            raise ValueError("compile is not supported with speculative decoding (draft_model)")
        read_config(Path(draft_model))  # a bad draft path fails before the (slow) target load
        engine = super().load(path, device=device, dtype=dtype, **options)
        engine.speculate_k = speculate_k
        engine._accept = AcceptStats([0] * (speculate_k + 1))
        engine.attach_draft(load_draft(draft_model, engine, device, dtype))
        return engine

    def generate(self, requests: list, progress: ProgressFn | None = None) -> Any:
        if self.draft is None and self._loaded is not None:
            raise RuntimeError("no draft model attached")
        self._accept = AcceptStats([0] * (self.speculate_k + 1))
        return super().generate(requests, progress)

    def _run_batch(
        self, items: list[_Item], outcomes: list[Any], stats: GenerationStats, progress: ProgressFn | None
    ) -> None:
        """LLMEngine._run_batch with speculative_generate, `max_batch_size` requests at a time."""
        for start in range(0, len(items), self.max_batch_size):
            super()._run_batch(items[start : start + self.max_batch_size], outcomes, stats, progress)

    def _generate_batch(self, items: list[_Item], on_finish: Any) -> tuple[list[Any], GenerationStats]:
        outputs, batch_stats, accept = speculative_generate(
            self.model,
            self.draft,
            [it.ids for it in items],
            [it.params for it in items],
            self.eos_ids,
            self._detokenize,
            speculate_k=self.speculate_k,
            pad_id=self._loaded.pad_id,
            on_finish=on_finish,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )
        self._accept.add(accept)  # only a batch that succeeded counts
        return outputs, batch_stats

    def _metrics(self, s: GenerationStats, wall: float) -> list[Metric]:
        a = self._accept
        rounds_per_s = s.decode_steps / s.decode_s if s.decode_s > 0 else 0.0
        # a round reads the target once and the draft k times
        read_per_round = self.model_bytes + self.speculate_k * self.draft_bytes
        base = [m for m in super()._metrics(s, wall) if m.name != "bandwidth_bytes_per_s"]
        return [
            *base,
            Metric("bandwidth_bytes_per_s", read_per_round * rounds_per_s, "bytes/s"),
            Metric("draft_model_bytes", self.draft_bytes, "bytes"),
            Metric("speculate_k", self.speculate_k),
            Metric("acceptance_rate", a.acceptance_rate),
            Metric("accepted_tokens_per_step", a.accepted_per_step, "tokens"),
            *(Metric(f"accept_count_{i}", c) for i, c in enumerate(a.counts)),
        ]

    def close(self) -> None:
        if self.draft is not None:
            self.draft.release_caches()
            self.draft = None
        super().close()

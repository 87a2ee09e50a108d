"""Hibiki-style batch translation: Mimi codes in, one LM step per 80 ms frame, text + speech out.

The step loop (`LMGen`) reproduces moshi's ``LMGen`` semantics: a small ring of token columns holds
each stream at its own delay; the input (source speech) codebooks are written ``delay`` columns ahead,
the model reads column ``t`` (initial tokens while ``t <= delay``), samples text then the ``dep_q``
audio tokens, and returns a frame re-aligned across delays once ``max_delay`` steps have passed.

The batch procedure (`HibikiTranslator`) follows Kyutai's ``run_inference.py`` for Hibiki: the first
frame is fed twice, the input is followed by one frame of EOS codes (value = codec cardinality), then
silence, until each row emits the text EOS or reaches its cap. With ``cfg_coef != 1`` every row is
doubled with the "very_bad" description and logits are mixed as ``null + cfg * (cond - null)``.
Rows of different lengths share one batch; a row leaves the batch (and the KV caches) when done.

Mimi (transformers' ``MimiModel``) encodes in chunks of frames in lockstep with the step loop, its conv
and attention caches carrying the state, so the codes equal Kyutai's frame-by-frame encoding (checked
in the tests) and silence is encoded only as long as some row still needs it. Output speech is decoded
per row at the end.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.audio.lm import MoshiLM, load_lm

UNGENERATED = -2

# ---------------------------------------------------------------------------------------------------------
# Sampling


def sample_token(
    logits: torch.Tensor, temp: float, top_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, V] logits -> [B] ids. Greedy when temp <= 0; else top-k then Gumbel-max (probs / Exp(1))."""
    if temp <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temp, dim=-1)
    idx = None
    if 0 < top_k < probs.shape[-1]:
        probs, idx = probs.topk(top_k, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = (probs / noise).argmax(dim=-1)
    return choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------------
# The step loop


class LMGen:
    """Streaming generation for a batch of rows advancing together (one call per frame)."""

    def __init__(
        self,
        lm: MoshiLM,
        batch_size: int,
        *,
        temp: float = 0.8,
        temp_text: float = 0.7,
        top_k: int = 250,
        top_k_text: int = 25,
        cfg_coef: float = 1.0,
        condition: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        max_steps: int | None = None,
    ) -> None:
        cfg = lm.cfg
        self.lm = lm
        self.temp, self.temp_text, self.top_k, self.top_k_text = temp, temp_text, top_k, top_k_text
        self.cfg_coef = cfg_coef
        self.use_cfg = cfg_coef != 1.0
        rows = batch_size * (2 if self.use_cfg else 1)
        if self.use_cfg and condition is None:
            raise ValueError("cfg_coef != 1 needs a conditioned model (descriptions very_good / very_bad)")
        if condition is not None and condition.shape[0] != rows:
            raise ValueError(f"condition has {condition.shape[0]} rows, expected {rows}")
        self.condition = condition
        self.generator = generator
        dev = lm.device
        self.delays = torch.tensor(cfg.delays, device=dev)
        self.max_delay = cfg.max_delay
        self.columns = self.max_delay + 2
        self.cache = torch.full(
            (batch_size, cfg.n_q + 1, self.columns), UNGENERATED, dtype=torch.long, device=dev
        )
        self.initial = torch.tensor([cfg.text_card] + [cfg.card] * cfg.n_q, device=dev)
        capacity = cfg.context or max_steps or 4096
        self.kv = lm.transformer.new_caches(capacity)
        self.offset = 0

    @property
    def batch_size(self) -> int:
        return self.cache.shape[0]

    @torch.inference_mode()
    def step(self, input_tokens: torch.Tensor) -> torch.Tensor | None:
        """[B, n_q - dep_q] input tokens -> [B, 1 + dep_q] re-aligned frame; None while delays fill."""
        lm, cfg = self.lm, self.lm.cfg
        b, t = self.batch_size, self.offset
        if input_tokens.shape != (b, cfg.input_codebooks):
            raise ValueError(
                f"expected input tokens {(b, cfg.input_codebooks)}, got {tuple(input_tokens.shape)}"
            )
        first_in = cfg.dep_q + 1
        cols = (t + self.delays[first_in:]) % self.columns
        self.cache[:, first_in:, :].scatter_(
            2, cols.view(1, -1, 1).expand(b, -1, 1), input_tokens[:, :, None]
        )

        x = self.cache[:, :, t % self.columns]
        x = torch.where(t <= self.delays, self.initial, x)
        if self.use_cfg:
            x = x.repeat(2, 1)
        hidden, text_logits = lm.forward_text(x[:, :, None], self.condition, self.kv, offset=t)
        text_logits = self._mix(text_logits[:, 0].float())
        text = sample_token(text_logits, self.temp_text, self.top_k_text, self.generator)
        audio = self._depth(text, hidden)

        t += 1
        self.offset = t
        self.cache[:, 0, t % self.columns] = text
        self.cache[:, 1:first_in, t % self.columns] = audio
        if t <= self.max_delay:
            return None
        cols = (t - self.max_delay + self.delays[:first_in]) % self.columns
        return self.cache[:, :first_in, :].gather(2, cols.view(1, -1, 1).expand(b, -1, 1))[:, :, 0].clone()

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.use_cfg:
            return logits
        cond, null = logits.chunk(2)
        return null + (cond - null) * self.cfg_coef

    def _depth(self, text: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        caches = lm.depformer.new_caches(lm.cfg.dep_q)
        prev, tokens = text, []
        for k in range(lm.cfg.dep_q):
            inp = prev.repeat(2) if self.use_cfg else prev
            logits = self._mix(lm.depformer_step(k, inp, hidden, caches).float())
            prev = sample_token(logits, self.temp, self.top_k, self.generator)
            tokens.append(prev)
        return torch.stack(tokens, dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch): finished rows stop costing compute."""
        before = self.batch_size
        # with CFG the "very_bad" twin of row r sits at r + batch size in the LM batch
        lm_rows = torch.cat([rows, rows + before]) if self.use_cfg else rows
        self.cache = self.cache.index_select(0, rows)
        if self.condition is not None:
            self.condition = self.condition.index_select(0, lm_rows)
        for c in self.kv:
            c.select(lm_rows)


# ---------------------------------------------------------------------------------------------------------
# Mimi through transformers


class MimiCodec:
    """Mimi through transformers: streaming batch encode (exact) and chunked decode (left context)."""

    def __init__(
        self,
        model: Any,
        encode_chunk_frames: int = 25,
        decode_chunk_frames: int = 250,
        decode_context_frames: int = 64,
    ) -> None:
        self.model = model
        cfg = model.config
        self.sample_rate: int = cfg.sampling_rate
        self.frame_rate: float = float(cfg.frame_rate)
        self.frame_size = round(self.sample_rate / self.frame_rate)
        self.cardinality: int = cfg.codebook_size
        self.encode_chunk_frames = encode_chunk_frames
        self.decode_chunk_frames = decode_chunk_frames
        self.decode_context_frames = decode_context_frames
        # the streaming encoder's KV cache: `encoder_cache` in recent transformers 5 releases, earlier ones
        # called it `encoder_past_key_values` (argument and output field alike)
        params = inspect.signature(model.encode).parameters
        self.cache_arg = "encoder_cache" if "encoder_cache" in params else "encoder_past_key_values"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def stream(self, wavs: list[np.ndarray], num_codebooks: int) -> StreamingEncoder:
        return StreamingEncoder(self, wavs, num_codebooks)

    def encode(self, wavs: list[np.ndarray], num_codebooks: int, frames: list[int]) -> list[torch.Tensor]:
        """Encode each wave, zero-padded (silence) to ``frames[i]`` frames -> list of [K, frames[i]]."""
        enc = self.stream(wavs, num_codebooks)
        enc.ensure(max(frames))
        return [enc.codes[i][:, :n] for i, n in enumerate(frames)]

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """[K, T] codes -> float32 waveform of T frames; long outputs decode in chunks with left context."""
        t = codes.shape[1]
        if t == 0:
            return np.zeros(0, dtype=np.float32)
        codes = codes.to(next(self.model.parameters()).device)
        pieces = []
        chunk, ctx = self.decode_chunk_frames, self.decode_context_frames
        starts = [0] if t <= chunk + ctx else list(range(0, t, chunk))
        for s in starts:
            end = t if len(starts) == 1 else min(t, s + chunk)
            lo = max(0, s - ctx)
            wav = self.model.decode(codes[None, :, lo:end]).audio_values[0, 0]
            pieces.append(wav[(s - lo) * self.frame_size : (end - lo) * self.frame_size])
        return torch.cat(pieces).float().cpu().numpy()


class StreamingEncoder:
    """Encode a batch chunk by chunk as the step loop needs frames; each row is its audio then silence.

    transformers' conv padding cache and KV cache carry the state between chunks, so codes equal a
    one-shot encode. Rows that finish leave the batch (both caches keep the batch on dim 0).
    """

    def __init__(self, codec: MimiCodec, wavs: list[np.ndarray], num_codebooks: int) -> None:
        self.codec = codec
        self.wavs = wavs
        self.k = num_codebooks
        self.rows = list(range(len(wavs)))  # original row ids still encoded, in cache order
        dev = next(codec.model.parameters()).device
        self.codes = [torch.zeros(num_codebooks, 0, dtype=torch.long, device=dev) for _ in wavs]
        self.frames = 0
        self._pkv: Any = None
        self._pcache: Any = None

    @torch.inference_mode()
    def ensure(self, frames: int) -> None:
        codec, fs = self.codec, self.codec.frame_size
        dev = next(codec.model.parameters()).device
        while self.frames < frames and self.rows:
            n = codec.encode_chunk_frames
            lo, hi = self.frames * fs, (self.frames + n) * fs
            x = torch.zeros(len(self.rows), 1, n * fs, dtype=codec.dtype, device=dev)
            for j, i in enumerate(self.rows):
                piece = self.wavs[i][lo:hi]
                if len(piece):
                    x[j, 0, : len(piece)] = torch.from_numpy(
                        np.ascontiguousarray(piece, dtype=np.float32)
                    ).to(x)
            out = codec.model.encode(
                x,
                num_quantizers=self.k,
                padding_cache=self._pcache,
                use_streaming=True,
                **{codec.cache_arg: self._pkv},
            )
            self._pkv, self._pcache = getattr(out, codec.cache_arg), out.padding_cache
            for j, i in enumerate(self.rows):
                self.codes[i] = torch.cat([self.codes[i], out.audio_codes[j].long()], dim=1)
            self.frames += n

    def keep(self, rows: list[int]) -> None:
        """Keep encoding only the original rows ``rows``."""
        idx = torch.tensor([self.rows.index(i) for i in rows], device=self.codes[0].device)
        for layer in getattr(self._pkv, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    setattr(layer, name, t.index_select(0, idx))
        if self._pcache is not None:
            self._pcache.padding_cache = [
                t.index_select(0, idx) if isinstance(t, torch.Tensor) else t
                for t in self._pcache.padding_cache
            ]
        self.rows = list(rows)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folder (moshi format, as Kyutai releases Hibiki)

DEFAULT_NAMES = {
    "moshi_name": "model.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model",
}


def is_moshi_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    raw = json.loads(cfg.read_text())
    return "dep_q" in raw and "n_q" in raw


@dataclass
class HibikiCheckpoint:
    lm: MoshiLM
    codec: MimiCodec
    tokenizer: Any  # sentencepiece.SentencePieceProcessor
    model_type: str = "hibiki"
    gen_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        mimi_dtype: torch.dtype = torch.float32,
        mimi_path: str | Path | None = None,
    ) -> HibikiCheckpoint:
        import sentencepiece as spm

        from workers.audio.mimi_convert import build_mimi, mimi_config_from_moshi, reset_codebook_cache

        folder = Path(folder)
        raw = json.loads((folder / "config.json").read_text())
        names = {k: raw.get(k, v) for k, v in DEFAULT_NAMES.items()}
        tok = spm.SentencePieceProcessor(model_file=str(folder / names["tokenizer_name"]))
        lm = load_lm(raw, folder / names["moshi_name"], device=device, dtype=dtype)
        model_type = raw.get("model_type", "moshi")
        if model_type == "hibiki":
            # as Kyutai's loader: an EOS sampled before the input ends must act as padding
            pad = lm.cfg.existing_text_padding_id
            lm.text_emb.weight.data[tok.eos_id()] = lm.text_emb.weight.data[pad]

        converted = Path(mimi_path) if mimi_path else folder / "mimi"
        if (converted / "config.json").exists():
            from transformers import MimiModel

            mimi = MimiModel.from_pretrained(converted)
        else:
            cfg = None
            if raw.get("mimi_config_name"):
                cfg = mimi_config_from_moshi(json.loads((folder / raw["mimi_config_name"]).read_text()))
            mimi = build_mimi(folder / names["mimi_name"], cfg)
        mimi = mimi.to(device=device, dtype=mimi_dtype).eval().requires_grad_(False)
        reset_codebook_cache(mimi)  # a cached fp32 codebook would survive the dtype change
        if mimi.config.codebook_size != lm.cfg.card:
            raise ValueError(
                f"Mimi has {mimi.config.codebook_size} codes per codebook, the LM expects {lm.cfg.card}"
            )
        return cls(lm, MimiCodec(mimi), tok, model_type, dict(raw.get("lm_gen_config", {})))


# ---------------------------------------------------------------------------------------------------------
# Batch translation


@dataclass
class HibikiParams:
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    cfg_coef: float = 1.0
    condition: str = "very_good"
    negative_condition: str = "very_bad"
    seed: int | None = None
    # silence after the input before a row is cut off; None: max(10 s, half the input)
    max_tail_s: float | None = None
    repeat_first_frame: bool = True  # as Kyutai's script; the model was run that way

    @classmethod
    def from_dict(cls, *layers: dict[str, Any]) -> HibikiParams:
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update({k: v for k, v in layer.items() if k in cls.__dataclass_fields__ and v is not None})
        return cls(**merged)


@dataclass
class HibikiOutput:
    text: str
    segments: list[tuple[float, float, str]]
    tokens: list[tuple[int, int]]  # (output frame, text token id), padding removed
    audio: np.ndarray
    sample_rate: int
    frames: int
    finished: bool  # False: cut at the cap without emitting EOS


@dataclass
class HibikiStats:
    steps: int = 0
    step_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0


class HibikiTranslator:
    def __init__(self, ckpt: HibikiCheckpoint) -> None:
        self.ckpt = ckpt
        self.lm = ckpt.lm
        self.codec = ckpt.codec
        self.sp = ckpt.tokenizer

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    def _conditions(self, b: int, p: HibikiParams) -> torch.Tensor | None:
        lm = self.lm
        if lm.condition_provider is None or not lm.fuse_sum:
            if p.cfg_coef != 1.0:
                raise ValueError("this model has no description conditioning: cfg_coef must be 1")
            return None
        values = [p.condition] * b + ([p.negative_condition] * b if p.cfg_coef != 1.0 else [])
        return lm.condition_sum({name: values for name in lm.fuse_sum})

    def translate(
        self,
        wavs: list[np.ndarray],
        params: HibikiParams,
        progress: Callable[[int], None] | None = None,
        stats: HibikiStats | None = None,
    ) -> list[HibikiOutput]:
        """Translate mono waveforms at the codec rate as one batch."""
        lm, codec, cfg = self.lm, self.codec, self.lm.cfg
        stats = stats if stats is not None else HibikiStats()
        b = len(wavs)
        fs = codec.frame_size
        n_in = [max(1, math.ceil(len(w) / fs)) for w in wavs]
        tails = []
        for n in n_in:
            tail_s = (
                params.max_tail_s if params.max_tail_s is not None else max(10.0, 0.5 * n / codec.frame_rate)
            )
            tails.append(max(1, math.ceil(tail_s * codec.frame_rate)))

        # step layout per row: [first frame again] + n audio frames + one EOS frame + silence up to the cap
        rep = 1 if params.repeat_first_frame else 0
        eos_steps = [rep + n for n in n_in]
        last_steps = [rep + n + tail for n, tail in zip(n_in, tails, strict=True)]
        enc = codec.stream(wavs, cfg.input_codebooks)
        eos = torch.full((cfg.input_codebooks,), codec.cardinality, dtype=torch.long, device=lm.device)

        def frame_at(i: int, step: int) -> int:
            return max(0, step - rep - (1 if step > eos_steps[i] else 0))

        gen_rng = torch.Generator(device=lm.device)
        if params.seed is not None:
            gen_rng.manual_seed(params.seed)
        else:
            gen_rng.seed()
        gen = LMGen(
            lm,
            b,
            temp=params.temp,
            temp_text=params.temp_text,
            top_k=params.top_k,
            top_k_text=params.top_k_text,
            cfg_coef=params.cfg_coef,
            condition=self._conditions(b, params),
            generator=gen_rng,
            max_steps=max(last_steps) + 1,
        )
        eos_id = self.sp.eos_id()
        active = list(range(b))
        texts: list[list[int]] = [[] for _ in range(b)]
        audio: list[list[torch.Tensor]] = [[] for _ in range(b)]
        finished = [False] * b
        step = 0
        encode_before = stats.encode_s
        t0 = time.perf_counter()
        while active:
            t_enc = time.perf_counter()
            enc.ensure(max(frame_at(i, step) for i in active) + 1)
            stats.encode_s += time.perf_counter() - t_enc
            inp = torch.stack(
                [
                    eos if step == eos_steps[i] else enc.codes[i][:, frame_at(i, step)].to(lm.device)
                    for i in active
                ]
            )
            out = gen.step(inp)
            done: set[int] = set()
            if out is not None:
                out = out.cpu()
                for j, i in enumerate(active):
                    tok = int(out[j, 0])
                    texts[i].append(tok)
                    audio[i].append(out[j, 1:])
                    if tok == eos_id and step >= eos_steps[i]:
                        finished[i] = True
                        done.add(i)
            done.update(i for i in active if step >= last_steps[i])  # the cap: out of silence frames
            step += 1
            if done:
                keep = [j for j, i in enumerate(active) if i not in done]
                active = [active[j] for j in keep]
                if active:
                    gen.select(torch.tensor(keep, device=lm.device))
                    enc.keep(active)
                if progress is not None:
                    progress(len(done))
        stats.steps += step
        stats.step_s += time.perf_counter() - t0 - (stats.encode_s - encode_before)

        t0 = time.perf_counter()
        results = []
        for i in range(b):
            frames = len(texts[i])
            wav = codec.decode(torch.stack(audio[i], dim=1)) if frames else np.zeros(0, np.float32)
            results.append(self._output(texts[i], wav, finished[i], eos_steps[i]))
        stats.decode_s += time.perf_counter() - t0
        return results

    def _output(self, ids: list[int], wav: np.ndarray, finished: bool, eos_step: int) -> HibikiOutput:
        cfg, sp = self.lm.cfg, self.sp
        skip = {
            cfg.existing_text_padding_id,
            cfg.existing_text_end_padding_id,
            sp.eos_id(),
            sp.bos_id(),
            sp.pad_id(),
        }
        tokens = [(f, t) for f, t in enumerate(ids) if t not in skip and 0 <= t < sp.get_piece_size()]
        frame_s = 1.0 / self.codec.frame_rate
        words: list[list[Any]] = []
        for f, t in tokens:
            piece = sp.id_to_piece(t)
            if piece.startswith("\u2581") or not words:
                words.append([f, f, [t]])
            else:
                words[-1][1] = f
                words[-1][2].append(t)
        segments = [
            (round(s * frame_s, 3), round((e + 1) * frame_s, 3), sp.decode(w).strip()) for s, e, w in words
        ]
        text = sp.decode([t for _, t in tokens]).strip()
        return HibikiOutput(text, segments, tokens, wav, self.codec.sample_rate, len(ids), finished)

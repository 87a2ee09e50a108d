"""A Moshi-architecture LM: temporal transformer over frames, depth transformer over codebooks.

Written from the behaviour of kyutai-labs/moshi (``moshi/models/lm.py``, ``modules/transformer.py``,
``models/loaders.py``); parameter names follow moshi's ``LMModel`` state dict so the moshi-format
safetensors that Kyutai releases (Moshi, Hibiki) load as they are. The ``moshi`` package itself cannot
be installed next to torch 2.13, hence this reimplementation.

One frame holds ``1 + n_q`` streams: the text stream, ``dep_q`` generated audio codebooks, then the
``n_q - dep_q`` input (listened-to) codebooks. The temporal transformer sees the sum of the stream
embeddings (plus a conditioning vector) and predicts the text token; the depth transformer then
samples the ``dep_q`` audio tokens one codebook after the other.

Streaming state is plain: every row of a batch advances together (offline batch translation), so one
integer offset serves the whole batch, and rows can be dropped from the caches when they finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class LMConfig:
    """The moshi ``LMModel`` keyword arguments (the ``config.json`` Kyutai ships, minus file names)."""

    dim: int = 128
    text_card: int = 32000
    text_card_out: int | None = None
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 8
    dep_q: int = 8
    card: int = 1024
    delays: list[int] = field(default_factory=lambda: [0] * 9)
    num_heads: int = 8
    num_layers: int = 8
    hidden_scale: float = 4.0
    norm: str = "layer_norm"
    norm_emb: bool = False
    bias_proj: bool = False
    gating: str = "none"
    layer_scale: float | None = None
    context: int | None = None
    max_period: float = 10000.0
    positional_embedding: str = "sin"
    kv_repeat: int = 1
    causal: bool = True
    depformer_dim: int = 256
    depformer_num_heads: int | None = None
    depformer_num_layers: int | None = None
    depformer_dim_feedforward: int | list[int] | None = None
    depformer_multi_linear: bool = False
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: list[int] | None = None
    depformer_low_rank_embeddings: int | None = None
    depformer_pos_emb: str = "sin"
    depformer_norm: str | None = None
    depformer_gating: str | None = None
    depformer_layer_scale: float | None = None
    depformer_max_period: float | None = None
    depformer_kv_repeat: int | None = None
    conditioners: dict[str, Any] | None = None
    fuser: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LMConfig:
        """Accepts a moshi ``config.json``; file names and generation settings are ignored here."""
        known = {f.name for f in fields(cls)}
        ignored = {
            "moshi_name",
            "mimi_name",
            "tokenizer_name",
            "lora_name",
            "mimi_config_name",
            "model_type",
            "lm_gen_config",
            "tts_config",
            "stt_config",
            "model_id",
            "depformer_context",
            "depformer_causal",
            "extra_heads_num_heads",
            "extra_heads_dim",
            "cross_attention",
            "lora",
            "lora_rank",
            "lora_scaling",
        }
        unsupported = {
            "demux_second_stream": False,
            "demux_second_text_stream": False,
            "cross_attention": False,
            "lora": False,
            "quantize": False,
            "causal": True,
        }
        for key, ok_value in unsupported.items():
            if raw.get(key, ok_value) != ok_value:
                raise ValueError(f"LM config option {key}={raw[key]!r} is not supported")
        if raw.get("fuser") and any(raw["fuser"].get(m) for m in ("cross", "prepend")):
            raise ValueError("only 'sum' condition fusing is supported")
        unknown = set(raw) - known - ignored
        if unknown:  # an option that changes the weights' shapes still fails loudly when they load
            log.warning("ignoring unknown LM config keys: %s", sorted(unknown))
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        if len(cfg.delays) != cfg.n_q + 1:
            raise ValueError(f"expected {cfg.n_q + 1} delays, got {len(cfg.delays)}")
        return cfg

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def input_codebooks(self) -> int:
        """Codebooks of the listened-to stream (the source speech for Hibiki)."""
        return self.n_q - self.dep_q


# ---------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        var = self.eps + torch.mean(y * y, dim=-1, keepdim=True)
        return (y * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


class LayerNormF32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    # eps values are moshi's: the *_f32 variants were trained with 1e-8
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8)
    if kind == "rms_norm":
        return RMSNorm(dim, eps=1e-5)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, eps=1e-8, compute_dtype=torch.float32)
    raise ValueError(f"unknown norm {kind!r}")


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class Gating(nn.Module):
    """Gated FFN (GLU family): one input linear producing gate and value halves."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str) -> None:
        super().__init__()
        # moshi's sizing rule, needed to match checkpoint shapes
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        gate, value = h.chunk(2, dim=-1)
        return self.linear_out(self.activation(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, max_period: float, interleave: bool
):
    """RoPE on [B, H, T, D]; ``interleave`` rotates pairs (x0, x1), else halves (moshi's 'rope_concat')."""
    d = q.shape[-1]
    freqs = torch.exp(
        torch.arange(d // 2, device=q.device, dtype=torch.float32) * (-math.log(max_period) * 2 / d)
    )
    angles = positions.to(torch.float32).view(-1, 1) * freqs  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if interleave:
            xr, xi = x.float().unflatten(-1, (d // 2, 2)).unbind(-1)
        else:
            xr, xi = x.float().chunk(2, dim=-1)
        outr, outi = xr * cos - xi * sin, xr * sin + xi * cos
        out = torch.stack([outr, outi], dim=-1).flatten(-2) if interleave else torch.cat([outr, outi], dim=-1)
        return out.to(x.dtype)

    return rotate(q), rotate(k)


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float, dtype: torch.dtype) -> torch.Tensor:
    half = dim // 2
    adim = torch.arange(half, device=positions.device, dtype=torch.float32).view(1, -1)
    phase = positions.float().view(-1, 1) / (max_period ** (adim / (half - 1)))
    return torch.cat([phase.cos(), phase.sin()], dim=-1).to(dtype)  # [T, dim]


class KVCache:
    """Keys/values of one attention layer, shared offset for all rows; grows, then wraps at ``capacity``."""

    def __init__(self, capacity: int, initial: int = 256) -> None:
        self.capacity = capacity
        self.initial = min(initial, capacity)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.end = 0  # number of positions written so far

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store [B, H, T, D] and return (keys, values, key positions; -1 for empty slots)."""
        t = k.shape[2]
        if t > self.capacity:
            raise ValueError(f"cannot append {t} steps to a cache of capacity {self.capacity}")
        if self.k is None:
            size = max(self.initial, t)
            self.k = k.new_zeros(k.shape[0], k.shape[1], size, k.shape[3])
            self.v = v.new_zeros(self.k.shape)
        assert self.v is not None
        need = self.end + t
        if need > self.k.shape[2] and self.k.shape[2] < self.capacity:
            size = min(self.capacity, max(need, 2 * self.k.shape[2]))
            extra = size - self.k.shape[2]
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], extra, self.k.shape[3])], dim=2)
            self.v = torch.cat(
                [self.v, self.v.new_zeros(self.k.shape[0], self.v.shape[1], extra, self.v.shape[3])], dim=2
            )
        size = self.k.shape[2]
        if need <= size:  # no wrap yet: contiguous slice, no mask needed beyond causality
            self.k[:, :, self.end : need] = k
            self.v[:, :, self.end : need] = v
            self.end = need
            pos = torch.arange(need, device=k.device)
            return self.k[:, :, :need], self.v[:, :, :need], pos
        idx = torch.arange(self.end, need, device=k.device) % size
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        self.end = need
        slots = torch.arange(size, device=k.device)
        last = need - 1
        pos = last - ((last - slots) % size)
        return self.k, self.v, pos

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            assert self.v is not None
            self.k = self.k.index_select(0, rows)
            self.v = self.v.index_select(0, rows)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_repeat: int,
        mult: int,
        rope: tuple[float, bool] | None,
        context: int | None,
        schedule: list[int] | None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv_repeat = kv_repeat
        self.head_dim = dim // num_heads
        self.kv_heads = num_heads // kv_repeat
        out = dim + 2 * self.kv_heads * self.head_dim
        self.in_projs = nn.ModuleList([nn.Linear(dim, out, bias=False) for _ in range(mult)])
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(mult)])
        self.rope = rope
        self.context = context
        self.schedule = schedule

    def _proj(self, mods: nn.ModuleList, x: torch.Tensor, offset: int) -> torch.Tensor:
        if len(mods) == 1:
            return mods[0](x)
        # one set of weights per position (depth transformer): position offset + t
        outs = []
        for t in range(x.shape[1]):
            i = offset + t
            outs.append(mods[self.schedule[i] if self.schedule else i](x[:, t : t + 1]))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor, cache: KVCache | None, offset: int) -> torch.Tensor:
        b, t, dim = x.shape
        qkv = self._proj(self.in_projs, x, offset)
        q = qkv[..., :dim].view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        kv = qkv[..., dim:].view(b, t, 2, self.kv_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        q_pos = torch.arange(offset, offset + t, device=x.device)
        if self.rope is not None:
            q, k = apply_rope(q, k, q_pos, *self.rope)
        if cache is None:
            if offset:
                raise ValueError("a non-zero offset needs a cache")
            k_pos = q_pos
        else:
            k, v, k_pos = cache.append(k, v)
        if self.kv_repeat > 1:
            k = k.repeat_interleave(self.kv_repeat, dim=1)
            v = v.repeat_interleave(self.kv_repeat, dim=1)
        delta = q_pos.view(-1, 1) - k_pos.view(1, -1)
        mask: torch.Tensor | None = (k_pos.view(1, -1) >= 0) & (delta >= 0)
        if self.context is not None:
            mask = mask & (delta < self.context)
        if t == 1 and bool(mask.all()):
            mask = None  # the common decoding step: skip building a mask for SDPA
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, dim)
        return self._proj(self.out_projs, y, offset)


class TransformerLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int | list[int],
        norm: str,
        gating: str,
        layer_scale: float | None,
        context: int | None,
        rope: tuple[float, bool] | None,
        kv_repeat: int,
        weights_per_step: int,
        schedule: list[int] | None,
    ) -> None:
        super().__init__()
        mult = (max(schedule) + 1 if schedule else weights_per_step) if weights_per_step else 1
        self.schedule = schedule
        self.self_attn = Attention(dim, num_heads, kv_repeat, mult, rope, context, schedule)
        self.norm1 = make_norm(norm, dim)
        self.norm2 = make_norm(norm, dim)
        if gating == "none":
            if weights_per_step or isinstance(dim_feedforward, list):
                raise ValueError("weights per step need a gated FFN")
            self.linear1 = nn.Linear(dim, dim_feedforward, bias=False)
            self.linear2 = nn.Linear(dim_feedforward, dim, bias=False)
            self.gating: nn.Module | None = None
        elif weights_per_step:
            sizes = dim_feedforward if isinstance(dim_feedforward, list) else [dim_feedforward] * mult
            self.gating = nn.ModuleList([Gating(dim, s, gating) for s in sizes])
        else:
            assert isinstance(dim_feedforward, int)
            self.gating = Gating(dim, dim_feedforward, gating)
        self.layer_scale_1: nn.Module = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)
        self.layer_scale_2: nn.Module = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)

    def _ff(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        if self.gating is None:
            return self.linear2(F.gelu(self.linear1(x)))
        if isinstance(self.gating, nn.ModuleList):
            outs = []
            for t in range(x.shape[1]):
                i = offset + t
                outs.append(self.gating[self.schedule[i] if self.schedule else i](x[:, t : t + 1]))
            return torch.cat(outs, dim=1)
        return self.gating(x)

    def forward(self, x: torch.Tensor, cache: KVCache | None, offset: int) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cache, offset))
        return x + self.layer_scale_2(self._ff(self.norm2(x), offset))


class Transformer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int | list[int],
        norm: str,
        gating: str,
        layer_scale: float | None,
        context: int | None,
        positional_embedding: str,
        max_period: float,
        kv_repeat: int = 1,
        weights_per_step: int = 0,
        schedule: list[int] | None = None,
    ) -> None:
        super().__init__()
        if positional_embedding not in {"sin", "rope", "sin_rope", "none", "rope_concat"}:
            raise ValueError(f"unknown positional embedding {positional_embedding!r}")
        self.positional_embedding = positional_embedding
        self.max_period = max_period
        rope = None
        if positional_embedding in {"rope", "sin_rope", "rope_concat"}:
            rope = (max_period, positional_embedding != "rope_concat")
        self.context = context
        self.layers = nn.ModuleList(
            [
                TransformerLayer(
                    dim,
                    num_heads,
                    dim_feedforward,
                    norm,
                    gating,
                    layer_scale,
                    context,
                    rope,
                    kv_repeat,
                    weights_per_step,
                    schedule,
                )
                for _ in range(num_layers)
            ]
        )

    def new_caches(self, capacity: int) -> list[KVCache]:
        return [KVCache(capacity) for _ in self.layers]

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, offset: int = 0) -> torch.Tensor:
        dtype = x.dtype
        if self.positional_embedding in {"sin", "sin_rope"}:
            pos = torch.arange(offset, offset + x.shape[1], device=x.device)
            x = x + sin_embedding(pos, x.shape[-1], self.max_period, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, caches[i] if caches is not None else None, offset)
        return x.to(dtype)


class ScaledEmbedding(nn.Embedding):
    """Embedding where id -1 gives a zero vector (moshi's 'zero token'); optional low rank and norm."""

    def __init__(self, num: int, dim: int, low_rank: int | None = None, norm: bool = False) -> None:
        super().__init__(num, low_rank or dim)
        self.norm = nn.LayerNorm(low_rank or dim, eps=1e-5) if norm else None
        self.low_rank = nn.Linear(low_rank, dim, bias=False) if low_rank else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        is_zero = (ids == -1).unsqueeze(-1)
        y = super().forward(ids.clamp(min=0))
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where(is_zero, torch.zeros((), dtype=y.dtype, device=y.device), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y


# ---------------------------------------------------------------------------------------------------------
# Conditioning (moshi's LUTConditioner + ConditionProvider, 'sum' fuser only)


class LUTConditioner(nn.Module):
    def __init__(
        self,
        output_dim: int,
        n_bins: int,
        dim: int,
        tokenizer: str = "noop",
        possible_values: list[str] | None = None,
        force_linear: bool = True,
        output_bias: bool = False,
        learn_padding: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        if tokenizer != "noop":
            raise ValueError(f"unsupported conditioner tokenizer {tokenizer!r}")
        if output_bias:
            raise ValueError("conditioner output_bias is not supported")
        self.n_bins = n_bins
        self.possible_values = {v: i for i, v in enumerate(possible_values)} if possible_values else None
        self.embed = nn.Embedding(n_bins + 1, dim)
        self.output_proj: nn.Module = (
            nn.Linear(dim, output_dim, bias=False) if force_linear or dim != output_dim else nn.Identity()
        )
        self.learnt_padding = nn.Parameter(torch.zeros(1, 1, output_dim)) if learn_padding else None

    def index(self, value: str | None) -> int:
        if value is None:
            return self.n_bins
        if self.possible_values is None:
            return int(hashlib.sha256(value.encode("utf-8")).hexdigest(), 16) % self.n_bins
        if value not in self.possible_values:
            raise ValueError(f"condition value {value!r} not in {sorted(self.possible_values)}")
        return self.possible_values[value]

    def forward(self, values: list[str | None]) -> torch.Tensor:
        dev = self.embed.weight.device
        ids = torch.tensor([[self.index(v)] for v in values], device=dev)
        present = torch.tensor([[v is not None] for v in values], device=dev, dtype=torch.float32)[..., None]
        cond = self.output_proj(self.embed(ids))
        pad = self.learnt_padding if self.learnt_padding is not None else torch.zeros_like(cond)
        return cond * present + pad * (1 - present)  # [B, 1, output_dim]


class ConditionProvider(nn.Module):
    def __init__(self, output_dim: int, conditioners: dict[str, Any]) -> None:
        super().__init__()
        mods = {}
        for name, spec in conditioners.items():
            kind = spec["type"]
            if kind != "lut":
                raise ValueError(f"unsupported conditioner type {kind!r}")
            mods[name] = LUTConditioner(output_dim, **spec[kind])
        self.conditioners = nn.ModuleDict(mods)


# ---------------------------------------------------------------------------------------------------------
# The LM


class MoshiLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.emb = nn.ModuleList([ScaledEmbedding(c.card + 1, c.dim, norm=c.norm_emb) for _ in range(c.n_q)])
        self.text_emb = ScaledEmbedding(c.text_card + 1, c.dim, norm=c.norm_emb)
        self.text_linear = nn.Linear(c.dim, c.text_card_out or c.text_card, bias=c.bias_proj)
        self.transformer = Transformer(
            c.dim,
            c.num_heads,
            c.num_layers,
            int(c.hidden_scale * c.dim),
            c.norm,
            c.gating,
            c.layer_scale,
            c.context,
            c.positional_embedding,
            c.max_period,
            c.kv_repeat,
        )
        self.out_norm = make_norm(c.norm, c.dim)
        schedule = c.depformer_weights_per_step_schedule
        n_in = (max(schedule) + 1 if schedule else c.dep_q) if c.depformer_multi_linear else 1
        self.depformer_in = nn.ModuleList(
            [nn.Linear(c.dim, c.depformer_dim, bias=False) for _ in range(n_in)]
        )
        low = c.depformer_low_rank_embeddings
        self.depformer_emb = nn.ModuleList(
            [
                ScaledEmbedding(c.card + 1, c.depformer_dim, low_rank=low, norm=c.norm_emb)
                for _ in range(c.dep_q - 1)
            ]
        )
        self.depformer_text_emb = ScaledEmbedding(
            c.text_card + 1, c.depformer_dim, low_rank=low, norm=c.norm_emb
        )
        self.depformer_norms = nn.ModuleList(
            [
                make_norm(c.depformer_norm, c.depformer_dim) if c.depformer_norm else nn.Identity()
                for _ in range(c.dep_q)
            ]
        )
        dep_ff = c.depformer_dim_feedforward
        if dep_ff is None:
            dep_ff = int(c.hidden_scale * c.depformer_dim)
        self.depformer = Transformer(
            c.depformer_dim,
            c.depformer_num_heads or c.num_heads,
            c.depformer_num_layers or c.num_layers,
            dep_ff,
            c.norm,
            c.depformer_gating or c.gating,
            c.depformer_layer_scale if c.depformer_layer_scale is not None else c.layer_scale,
            None,  # the depth transformer sees at most dep_q positions
            c.depformer_pos_emb,
            c.depformer_max_period or c.max_period,
            c.depformer_kv_repeat or c.kv_repeat,
            weights_per_step=c.dep_q if c.depformer_weights_per_step else 0,
            schedule=schedule,
        )
        self.linears = nn.ModuleList(
            [nn.Linear(c.depformer_dim, c.card, bias=c.bias_proj) for _ in range(c.dep_q)]
        )
        self.condition_provider = ConditionProvider(c.dim, c.conditioners) if c.conditioners else None
        self.fuse_sum: list[str] = list((c.fuser or {}).get("sum", [])) if self.condition_provider else []

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    # -- conditioning ------------------------------------------------------------------------------------
    def condition_sum(self, values: dict[str, list[str | None]]) -> torch.Tensor | None:
        """Sum of the conditioners named by the 'sum' fuser: [B, 1, dim] in the model dtype, or None."""
        if self.condition_provider is None or not self.fuse_sum:
            return None
        total = None
        for name in self.fuse_sum:
            cond = self.condition_provider.conditioners[name](values[name])
            total = cond if total is None else total + cond
        assert total is not None
        return total.to(self.dtype)

    # -- temporal transformer ----------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + n_q, T] token ids -> [B, T, dim]: text and audio embeddings summed."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.emb):
            x = x + emb(tokens[:, 1 + k])
        return x

    def forward_text(
        self,
        tokens: torch.Tensor,
        condition: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normalised hidden [B, T, dim], text logits [B, T, text_card_out])."""
        x = self.embed(tokens)
        if condition is not None:
            x = x + condition.to(x)
        h = self.out_norm(self.transformer(x, caches, offset))
        return h, self.text_linear(h)

    # -- depth transformer -------------------------------------------------------------------------------
    def _depformer_input(self, k: int, token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        schedule = self.cfg.depformer_weights_per_step_schedule
        i = (schedule[k] if schedule else k) if self.cfg.depformer_multi_linear else 0
        emb = self.depformer_text_emb(token) if k == 0 else self.depformer_emb[k - 1](token)
        return self.depformer_in[i](hidden) + emb

    def depformer_step(
        self, k: int, token: torch.Tensor, hidden: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        """Logits [B, card] of codebook ``k`` given the previous token [B] (text token for k=0)."""
        x = self._depformer_input(k, token[:, None], hidden)
        y = self.depformer(x, caches, offset=k)
        return self.linears[k](self.depformer_norms[k](y))[:, 0]

    def depformer_logits(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: tokens [B, dep_q] (text, audio 0..dep_q-2), hidden [B, dim] -> [B, dep_q, card]."""
        xs = [self._depformer_input(k, tokens[:, k : k + 1], hidden[:, None]) for k in range(self.cfg.dep_q)]
        y = self.depformer(torch.cat(xs, dim=1))
        return torch.stack(
            [self.linears[k](self.depformer_norms[k](y[:, k])) for k in range(self.cfg.dep_q)], dim=1
        )


# ---------------------------------------------------------------------------------------------------------
# Loading moshi-format weights

_LEGACY_PROJ = {"in_proj_weight": "in_projs", "in_proj.weight": "in_projs", "out_proj.weight": "out_projs"}


def _split_legacy(state: dict[str, torch.Tensor], model: MoshiLM) -> dict[str, torch.Tensor]:
    """Older checkpoints fuse each attention's projections: split them over in_projs.{i} / out_projs.{i}."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for key, value in state.items():
        for legacy, target in _LEGACY_PROJ.items():
            if key.endswith("self_attn." + legacy):
                prefix = key[: -len(legacy)]
                attn = modules[prefix.rstrip(".")]
                assert isinstance(attn, Attention)
                mult = len(getattr(attn, target))
                for i, part in enumerate(value.view(mult, -1, *value.shape[1:])):
                    out[f"{prefix}{target}.{i}.weight"] = part
                break
        else:
            out[key] = value
    return out


def load_state(model: MoshiLM, state: dict[str, torch.Tensor], assign: bool = False) -> None:
    state = {k: v for k, v in state.items() if not k.startswith("extra_heads.")}
    state = _split_legacy(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if missing or unexpected:
        raise ValueError(
            f"LM weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def load_lm(
    config: LMConfig | dict[str, Any],
    weights: str | Path | dict[str, torch.Tensor] | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MoshiLM:
    cfg = config if isinstance(config, LMConfig) else LMConfig.from_dict(config)
    with torch.device("meta"):
        model = MoshiLM(cfg)
    if weights is None:
        model = model.to_empty(device=device)
        _init_random(model)
    elif isinstance(weights, dict):  # the caller keeps its tensors: copy them
        model = model.to_empty(device=device)
        load_state(model, weights)
    else:
        from safetensors.torch import load_file

        # the meta model takes the loaded tensors as they are: no second copy of a multi-GB checkpoint
        load_state(model, load_file(str(weights), device=str(device)), assign=True)
    model = model.to(dtype=dtype)
    if model.condition_provider is not None:
        model.condition_provider.float()  # moshi keeps conditioners in fp32
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _init_random(model: MoshiLM, generator: torch.Generator | None = None) -> None:
    """Random init with std 1/sqrt(fan_in) (moshi's scheme), norms at 1: for tests and benchmarks."""
    for name, p in model.named_parameters():
        if name.endswith(("alpha", ".weight")) and (
            "norm" in name and p.dim() <= 3 and p.shape[-1] == p.numel()
        ):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif name.endswith("scale"):
            p.fill_(0.1)
        elif name.endswith("learnt_padding"):
            p.normal_(0, 0.2, generator=generator)
        else:
            std = 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=generator).clamp_(-3, 3) * std)


def random_lm(cfg: LMConfig, seed: int = 0) -> MoshiLM:
    torch.manual_seed(seed)
    model = MoshiLM(cfg)
    _init_random(model, torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())

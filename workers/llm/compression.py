"""Group-wise low-bit compression of weights and KV cache (FlexLLMGen-style).

A tensor is cut into groups of ``group_size`` consecutive values along ``group_dim``; each group is
quantized with its own affine map and the codes are packed ``8 // num_bits`` per byte:

* asymmetric (default): ``scale = (2**bits - 1) / (max - min)``, ``code = round((x - min) * scale)``,
  ``x_hat = code / scale + min``;
* symmetric: ``scale = (2**(bits-1) - 1) / max|x|``, ``code = round(x * scale) + 2**(bits-1)``,
  ``x_hat = (code - 2**(bits-1)) / scale`` (zero is exact, no ``min`` stored).

Per-group ``scale``/``min`` are stored in ``param_dtype`` (default: the tensor's own dtype; with fp16
parameters a 4-bit/64-group tensor takes 36 bytes per 64 values = 28.1% of fp16). They are rounded to
that dtype *before* the codes are computed, with ``min`` rounded down and ``scale`` rounded down, so
every value stays inside the representable range and the reconstruction error is at most half a step
(``0.5 / scale``) of the *stored* scale - no clamping error from parameter rounding.

Everything is plain torch, so it runs on whichever device the input lives on.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KV_CONFIG",
    "WEIGHT_CONFIG",
    "CompressedEmbedding",
    "CompressedKVCache",
    "CompressedLinear",
    "CompressedTensor",
    "CompressionConfig",
    "affine_unpack",
    "compress",
    "decompress",
    "fake_compress",
    "pack_codes",
    "pad_last",
    "round_toward",
    "unpack_codes",
]


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """Group-wise quantization settings.

    ``group_dim`` may be negative. For an ``nn.Linear`` weight ``[out, in]`` the input dim is 1 (or -1);
    for a KV tensor ``[B, H, S, D]`` the head dim is -1.
    """

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = -1
    symmetric: bool = False
    # dtype of the per-group scale/min; None keeps the compressed tensor's dtype.
    param_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.num_bits not in (1, 2, 4, 8):
            raise ValueError(f"num_bits must be 1, 2, 4 or 8, got {self.num_bits}")
        if self.symmetric and self.num_bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")
        if self.group_size <= 0 or self.group_size % (8 // self.num_bits):
            raise ValueError(
                f"group_size {self.group_size} must be a positive multiple of {8 // self.num_bits}"
            )


# FlexLLMGen defaults: weights grouped along the input dim, cache along the head dim.
WEIGHT_CONFIG = CompressionConfig(num_bits=4, group_size=64, group_dim=1)
KV_CONFIG = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)


@dataclasses.dataclass
class CompressedTensor:
    """Packed codes plus per-group parameters.

    Layout: ``group_dim`` is moved last, padded to ``num_groups * group_size`` and split, so
    ``data`` is ``[*other_dims, num_groups, group_size * num_bits // 8]`` (uint8) and ``scale``/``min``
    are ``[*other_dims, num_groups, 1]``. Leading dims keep the original order, so slicing ``data``,
    ``scale`` and ``min`` along a leading dim slices the tensor (used by the KV cache).
    """

    data: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()
        if self.min is not None:
            n += self.min.numel() * self.min.element_size()
        return n

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> CompressedTensor:
        return dataclasses.replace(
            self,
            data=self.data.to(device),
            scale=self.scale.to(device),
            min=None if self.min is None else self.min.to(device),
        )


def round_toward(v: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """Cast fp32 ``v`` to ``dtype``, rounding down (or up) instead of to nearest."""
    r = v.to(dtype)
    if dtype == v.dtype:
        return r
    limit = torch.full_like(r, -math.inf if down else math.inf)
    wrong = r.float() > v if down else r.float() < v
    return torch.where(wrong, torch.nextafter(r, limit), r)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` -> ``[..., n * bits // 8]``; the first value goes to the high bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    c = codes.unflatten(-1, (-1, per_byte))
    packed = c[..., 0] << (bits * (per_byte - 1))
    for j in range(1, per_byte):
        packed |= c[..., j] << (bits * (per_byte - 1 - j))
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``[..., m]`` -> uint8 codes ``[..., m * 8 // bits]``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(bits * (per_byte - 1), -1, -bits, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last dim up to a multiple of ``multiple``."""
    pad = -x.shape[-1] % multiple
    if pad == 0:
        return x
    # Repeat the last real value so padding never widens the last group's min/max range.
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)


@torch.no_grad()
def compress(t: torch.Tensor, cfg: CompressionConfig = WEIGHT_CONFIG) -> CompressedTensor:
    """Quantize ``t`` group-wise along ``cfg.group_dim`` and pack the codes into uint8."""
    if not t.is_floating_point():
        raise TypeError(f"compress needs a floating tensor, got {t.dtype}")
    if t.ndim == 0:
        raise ValueError("compress needs at least one dimension")
    bits = cfg.num_bits
    pdtype = cfg.param_dtype or t.dtype
    gd = cfg.group_dim % t.ndim
    x = t.movedim(gd, -1)
    x = pad_last(x.float(), cfg.group_size).unflatten(-1, (-1, cfg.group_size))
    tiny = torch.finfo(torch.float32).tiny
    big = torch.finfo(pdtype).max

    if cfg.symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = x.abs().amax(dim=-1, keepdim=True)
        scale = round_toward((qmax / absmax.clamp_min(tiny)).clamp_max(big), pdtype, down=True)
        codes = (x * scale.float()).round_().clamp_(-qmax, qmax).add_(2 ** (bits - 1))
        mn = None
    else:
        qmax = 2**bits - 1
        mn = round_toward(x.amin(dim=-1, keepdim=True), pdtype, down=True)
        rng = x.amax(dim=-1, keepdim=True) - mn.float()
        # max == min -> the scale saturates and every code is 0, which decodes to min exactly.
        scale = round_toward((qmax / rng.clamp_min(tiny)).clamp_max(big), pdtype, down=True)
        codes = (x - mn.float()).mul_(scale.float()).round_().clamp_(0, qmax)
    data = pack_codes(codes.to(torch.uint8), bits)
    return CompressedTensor(data=data, scale=scale, min=mn, shape=t.shape, dtype=t.dtype, config=cfg)


def affine_unpack(packed: torch.Tensor, bits: int, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``codes * step + offset`` in fp32 straight from packed bytes ``[..., m]`` -> ``[..., m * 8 // bits]``.

    ``step``/``offset`` broadcast against ``[..., 1]``. 4-bit takes a two-pass path (high and low
    nibbles written into interleaved output views), about twice as fast on CPU as unpack-then-scale.
    """
    if bits == 4:
        out = torch.empty(*packed.shape, 2, dtype=torch.float32, device=packed.device)
        torch.addcmul(offset, (packed >> 4).float(), step, out=out[..., 0])
        torch.addcmul(offset, (packed & 15).float(), step, out=out[..., 1])
        return out.flatten(-2)
    return torch.addcmul(offset, unpack_codes(packed, bits).float(), step)


def decompress(ct: CompressedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild a tensor of the original shape (and ``ct.dtype`` unless ``dtype`` is given)."""
    cfg = ct.config
    step = ct.scale.float().reciprocal()
    # symmetric codes carry an offset of 2**(bits-1): fold it into the additive term
    offset = -(2 ** (cfg.num_bits - 1)) * step if cfg.symmetric else ct.min.float()
    x = affine_unpack(ct.data, cfg.num_bits, step, offset)
    gd = cfg.group_dim % len(ct.shape)
    x = x.flatten(-2)[..., : ct.shape[gd]].movedim(-1, gd)
    return x.to(dtype or ct.dtype)


def fake_compress(t: torch.Tensor, cfg: CompressionConfig = WEIGHT_CONFIG) -> torch.Tensor:
    """``decompress(compress(t))``: the values a compressed store would hand back."""
    return decompress(compress(t, cfg))


class CompressedLinear(nn.Module):
    """``nn.Linear`` whose weight is kept 4-bit and decompressed on every forward.

    Nothing decompressed is cached: saving weight memory is the point, the price is one dequantize
    pass per call. The packed tensors are buffers, so ``.to(device)`` and ``state_dict`` work.
    """

    def __init__(self, weight: CompressedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError("CompressedLinear needs a 2-D weight")
        self.out_features, self.in_features = weight.shape
        self.config = weight.config
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_data", weight.data)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_min", weight.min)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: CompressionConfig = WEIGHT_CONFIG, dtype: torch.dtype | None = None
    ) -> CompressedLinear:
        """Compress ``linear.weight`` (optionally cast to ``dtype`` first, e.g. fp16 storage)."""
        w = linear.weight.detach()
        if dtype is not None:
            w = w.to(dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(w.dtype)
        return cls(compress(w, config), bias)

    @property
    def compressed_weight(self) -> CompressedTensor:
        return CompressedTensor(
            data=self.weight_data,
            scale=self.weight_scale,
            min=self.weight_min,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            config=self.config,
        )

    @property
    def weight_nbytes(self) -> int:
        return self.compressed_weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = decompress(self.compressed_weight, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        c = self.config
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={c.num_bits}, group={c.group_size}"


class CompressedEmbedding(nn.Module):
    """Token embedding stored compressed (groups along the hidden dim); a lookup only decompresses the
    rows it gathers. ``as_linear()`` shares the same storage for a tied output head."""

    def __init__(self, weight: CompressedTensor) -> None:
        super().__init__()
        if len(weight.shape) != 2 or weight.config.group_dim % 2 != 1:
            raise ValueError("CompressedEmbedding needs a 2-D weight grouped along dim 1")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.config = weight.config
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_data", weight.data)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_min", weight.min)

    @property
    def compressed_weight(self) -> CompressedTensor:
        return CompressedTensor(
            data=self.weight_data,
            scale=self.weight_scale,
            min=self.weight_min,
            shape=torch.Size((self.num_embeddings, self.embedding_dim)),
            dtype=self.weight_dtype,
            config=self.config,
        )

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, config: CompressionConfig = WEIGHT_CONFIG, dtype: torch.dtype | None = None
    ) -> CompressedEmbedding:
        w = emb.weight.detach()
        return cls(compress(w if dtype is None else w.to(dtype), config))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ct = self.compressed_weight
        flat = ids.reshape(-1)
        rows = CompressedTensor(
            data=ct.data[flat],
            scale=ct.scale[flat],
            min=None if ct.min is None else ct.min[flat],
            shape=torch.Size((flat.numel(), self.embedding_dim)),
            dtype=ct.dtype,
            config=ct.config,
        )
        return decompress(rows).view(*ids.shape, self.embedding_dim)

    def as_linear(self) -> CompressedLinear:
        return CompressedLinear(self.compressed_weight)


class CompressedKVCache:
    """One attention layer's K/V cache kept compressed, gpt-fast static-cache layout ``[B, H, S, D]``.

    Each ``(b, h, s)`` head vector is quantized on its own (groups along D), so writing new positions
    never touches old ones. Positions are shared by the whole batch (left-padded batches, as in the
    static caches of gpt-fast).

    * ``write(positions, k, v)``: ``positions`` is an int start or a LongTensor ``[S_new]``;
      ``k``/``v`` are ``[B, H, S_new, D]``.
    * ``get(upto=None, dtype=None)``: decompressed ``(k, v)`` for positions ``[0, upto)``
      (default: up to the highest position written).
    * ``update(positions, k, v)``: ``write`` then ``get`` - a drop-in for gpt-fast's ``KVCache.update``
      except the returned tensors stop at the filled length rather than ``max_seq_len``.
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        config: CompressionConfig = KV_CONFIG,
    ) -> None:
        if config.group_dim % 4 != 3:
            raise ValueError("CompressedKVCache groups along the head dim (group_dim=-1)")
        self.config = config
        self.dtype = dtype
        self.shape = (batch_size, n_heads, max_seq_len, head_dim)
        groups = -(-head_dim // config.group_size)
        packed = config.group_size * config.num_bits // 8
        pdtype = config.param_dtype or dtype
        lead = (batch_size, n_heads, max_seq_len, groups)

        def alloc(last: int, dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(*lead, last, dtype=dt, device=device)

        self.k_data, self.v_data = alloc(packed, torch.uint8), alloc(packed, torch.uint8)
        # unit scales: never-written slots decode to exact zeros (a zero scale would give NaN, which
        # survives a masked softmax @ V)
        self.k_scale, self.v_scale = alloc(1, pdtype).fill_(1), alloc(1, pdtype).fill_(1)
        self.k_min = None if config.symmetric else alloc(1, pdtype)
        self.v_min = None if config.symmetric else alloc(1, pdtype)
        self.length = 0

    @property
    def nbytes(self) -> int:
        bufs = [self.k_data, self.v_data, self.k_scale, self.v_scale, self.k_min, self.v_min]
        return sum(b.numel() * b.element_size() for b in bufs if b is not None)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes an uncompressed cache of the same shape would take."""
        return 2 * math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()

    def reset(self) -> None:
        """Forget the contents (slots past ``length`` are overwritten before they are read)."""
        self.length = 0

    def _positions(self, positions: int | torch.Tensor, n: int) -> torch.Tensor:
        if isinstance(positions, int):
            return torch.arange(positions, positions + n, device=self.k_data.device)
        return positions.to(device=self.k_data.device, dtype=torch.long).reshape(-1)

    @torch.no_grad()
    def write(self, positions: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = self._positions(positions, k.shape[2])
        if pos.numel() != k.shape[2] or k.shape != v.shape:
            raise ValueError("positions, k and v disagree on the number of new positions")
        for src, data, scale, mn in (
            (k, self.k_data, self.k_scale, self.k_min),
            (v, self.v_data, self.v_scale, self.v_min),
        ):
            ct = compress(src.to(self.dtype), self.config)
            data.index_copy_(2, pos, ct.data)
            scale.index_copy_(2, pos, ct.scale)
            if mn is not None:
                mn.index_copy_(2, pos, ct.min)
        self.length = max(self.length, int(pos.max()) + 1)

    def get(
        self, upto: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length if upto is None else upto
        b, h, _, d = self.shape
        out = []
        for data, scale, mn in (
            (self.k_data, self.k_scale, self.k_min),
            (self.v_data, self.v_scale, self.v_min),
        ):
            ct = CompressedTensor(
                data=data[:, :, :n],
                scale=scale[:, :, :n],
                min=None if mn is None else mn[:, :, :n],
                shape=torch.Size((b, h, n, d)),
                dtype=self.dtype,
                config=self.config,
            )
            out.append(decompress(ct, dtype))
        return out[0], out[1]

    def update(
        self, positions: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(positions, k, v)
        return self.get(dtype=k.dtype)

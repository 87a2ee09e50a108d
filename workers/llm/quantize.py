"""Weight-only int8 / int4 quantization (gpt-fast style) and safetensors checkpoints for it.

* ``int8``: symmetric per output channel, ``w ~= q * scales[:, None]`` with ``q`` in [-127, 127]
  (the -128 code is unused so the grid is symmetric and max |w| is exact).
* ``int4``: asymmetric per group of ``group_size`` values along the input dim,
  ``w ~= q * scales + zeros`` with ``q`` in [0, 15], two codes per byte (high nibble first);
  ``zeros`` is the float value of code 0 (the group's minimum).

Scales are rounded to their storage dtype *before* quantizing (int8 scales up; int4 zeros down and
scales up), so every weight lands inside the grid and the error is at most half a stored step.
Default storage: fp32 scales for int8 (one per row, negligible) and bf16 scales/zeros for int4 (fp32
would take 37.5% of the fp16 weight bytes; bf16 keeps 28.1% with group 64 and has fp32's range).

Checkpoints are safetensors only (never pickle): ``model.safetensors`` plus a sidecar
``genmill_quant.json``. Tensor names follow the module names: ``<mod>.weight`` (int8 or packed uint8),
``<mod>.scales``, ``<mod>.zeros`` (int4), ``<mod>.bias``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from workers.llm.compression import affine_unpack, pack_codes, pad_last, round_toward, unpack_codes

__all__ = [
    "CHECKPOINT_SKIP",
    "DEFAULT_SKIP",
    "QUANT_SIDECAR",
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "dequantize_int8",
    "enable_fast_kernels",
    "load_quantized",
    "quantize_checkpoint",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "read_quantized",
    "save_quantized",
]

log = logging.getLogger(__name__)

Mode = Literal["int8", "int4"]
QUANT_SIDECAR = "genmill_quant.json"
QUANT_FORMAT = "genmill-weight-only"
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Module-name fragments left in full precision by quantize_model.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)
# Tensor-name fragments left in full precision when quantizing a checkpoint without building the
# model: embeddings, output heads and norms (their 2-D weights are not nn.Linear inputs).
CHECKPOINT_SKIP: tuple[str, ...] = ("embed", "lm_head", "norm", "wte", "wpe", "ln_", "shared", "pos_emb")
# HF families whose projections are Conv1D ([in, out] weights): the input dim is 0, not 1.
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_NON_TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def _default_scale_dtype(mode: Mode) -> torch.dtype:
    return torch.float32 if mode == "int8" else torch.bfloat16


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# Tensor-level quantizers (shared by the module path and the checkpoint path, so both give identical
# bytes for identical weights).


@torch.no_grad()
def quantize_int8(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (int8 ``[out, in]``, scales ``[out]``)."""
    wf = w.float()
    absmax = wf.abs().amax(dim=1)
    scales = round_toward((absmax / 127).clamp_min(torch.finfo(torch.float32).tiny), scale_dtype, down=False)
    q = (wf / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


@torch.no_grad()
def quantize_int4(
    w: torch.Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (uint8 ``[out, in_padded // 2]``, scales ``[out, G]``, zeros ``[out, G]``).

    ``in`` is padded to a multiple of ``group_size`` by repeating the last column, which never widens
    the last group's range.
    """
    if group_size % 2:
        raise ValueError("int4 group_size must be even")
    groups = pad_last(w.float(), group_size).unflatten(-1, (-1, group_size))
    zeros = round_toward(groups.amin(dim=-1), scale_dtype, down=True)
    rng = groups.amax(dim=-1) - zeros.float()
    scales = round_toward((rng / 15).clamp_min(torch.finfo(torch.float32).tiny), scale_dtype, down=False)
    codes = (groups - zeros.float()[..., None]).div_(scales.float()[..., None]).round_().clamp_(0, 15)
    return pack_codes(codes.to(torch.uint8).flatten(-2), 4), scales, zeros


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    groups = packed.unflatten(-1, (scales.shape[-1], -1))
    w = affine_unpack(groups, 4, scales.float()[..., None], zeros.float()[..., None]).flatten(-2)
    return w[:, :in_features].to(dtype)


# ---------------------------------------------------------------------------------------------------
# Modules


class Int8Linear(nn.Module):
    """Linear layer with int8 weights and one scale per output channel.

    ``forward`` = ``F.linear(x, q.to(x.dtype)) * scales + bias``. After ``prepare_fast_kernel()`` (or
    ``enable_fast_kernels(model)``), bf16/fp16 inputs use ``aten._weight_int8pack_mm`` instead, which skips
    the dequantized copy of the weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        scale_dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        )
        self.fast_kernel = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> Int8Linear:
        q, scales = quantize_int8(linear.weight.detach(), scale_dtype or _default_scale_dtype("int8"))
        mod = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        mod.weight, mod.scales = q, scales
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    @torch.no_grad()
    def prepare_fast_kernel(self) -> bool:
        """Use ``aten._weight_int8pack_mm`` for bf16/fp16 inputs if it exists here and matches the
        reference path on a probe (it is a CPU/MPS kernel)."""
        self.fast_kernel = False
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return False
        try:
            probe = torch.randn(4, self.in_features, device=self.weight.device, dtype=torch.bfloat16)
            got = torch.ops.aten._weight_int8pack_mm(
                probe, self.weight, self.scales.to(torch.bfloat16)
            ).float()
        except (RuntimeError, NotImplementedError) as exc:
            log.info("int8 kernel unavailable (%s); keeping the reference path", exc)
            return False
        ref = F.linear(probe.float(), self.dequantized_weight())
        self.fast_kernel = bool(torch.isfinite(got).all()) and bool(
            (got - ref).norm() <= 2e-2 * ref.norm() + 1e-6
        )
        return self.fast_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_kernel and x.dtype in (torch.bfloat16, torch.float16):
            out = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype)
            ).view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """Linear layer with 4-bit group-wise weights (two per byte), dequantized on every call.

    The portable layout (``weight`` uint8 ``[out, in_padded // 2]``, ``scales``/``zeros``
    ``[out, groups]``) is what gets saved. ``prepare_fast_kernel()`` additionally builds the layout of
    ``aten._weight_int4pack_mm[_for_cpu]`` (non-persistent; same size again) and uses it for bf16
    inputs when the kernel gives the same answer as the reference path.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 64,
        scale_dtype: torch.dtype = torch.bfloat16,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = -(-in_features // group_size)
        self.register_buffer(
            "weight", torch.zeros(out_features, groups * group_size // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        )
        self.fast_kernel = False
        self._fast: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 64, scale_dtype: torch.dtype | None = None
    ) -> Int4Linear:
        packed, scales, zeros = quantize_int4(
            linear.weight.detach(), group_size, scale_dtype or _default_scale_dtype("int4")
        )
        mod = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size, device="meta")
        mod.weight, mod.scales, mod.zeros = packed, scales, zeros
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.zeros, self.in_features, dtype)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype))

    @torch.no_grad()
    def prepare_fast_kernel(self) -> bool:
        """Build the packed-kernel layout; keep it only if it matches the reference path on a probe."""
        self._fast, self.fast_kernel = None, False
        on_cpu = self.weight.device.type == "cpu"
        convert = "_convert_weight_to_int4pack_for_cpu" if on_cpu else "_convert_weight_to_int4pack"
        mm = "_weight_int4pack_mm_for_cpu" if on_cpu else "_weight_int4pack_mm"
        if self.group_size not in INT4_GROUP_SIZES or not hasattr(torch.ops.aten, mm):
            return False
        try:
            codes = unpack_codes(self.weight, 4).to(torch.int32)
            if not on_cpu:  # the CUDA kernel wants uint8 pairs (even, odd) = (high, low) nibble
                codes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            wpack = getattr(torch.ops.aten, convert)(codes, 2 if on_cpu else 8)
            # The kernels dequantize as (q - 8) * scale + zero: shift our zero from code 0 to code 8.
            mid = self.zeros.float() + 8 * self.scales.float()
            sz = (
                torch.stack([self.scales.float(), mid], dim=-1)
                .transpose(0, 1)
                .contiguous()
                .to(torch.bfloat16)
            )
            probe = torch.randn(4, self.weight.shape[1] * 2, device=self.weight.device, dtype=torch.bfloat16)
            got = getattr(torch.ops.aten, mm)(probe, wpack, self.group_size, sz).float()
            ref = F.linear(
                probe.float(), dequantize_int4(self.weight, self.scales, self.zeros, probe.shape[1])
            )
            if not torch.isfinite(got).all() or (got - ref).norm() > 2e-2 * ref.norm() + 1e-6:
                log.warning("int4 kernel disagrees with the reference path; keeping dequantize+matmul")
                return False
        except (RuntimeError, NotImplementedError) as exc:
            log.info("int4 kernel unavailable (%s); keeping dequantize+matmul", exc)
            return False
        self._fast, self.fast_kernel = (wpack, sz), True
        self._mm = getattr(torch.ops.aten, mm)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_kernel and self._fast is not None and x.dtype == torch.bfloat16:
            wpack, sz = self._fast
            x2 = x.reshape(-1, self.in_features)
            pad = self.weight.shape[1] * 2 - self.in_features
            if pad:
                x2 = F.pad(x2, (0, pad))
            out = self._mm(x2, wpack, self.group_size, sz).view(*x.shape[:-1], self.out_features)
        else:
            out = self._reference(x)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4, group={self.group_size}"
        )


def _skipped(name: str, skip: Iterable[str]) -> bool:
    low = name.lower()
    return any(s.lower() in low for s in skip)


def _quantized_modules(model: nn.Module) -> dict[str, Int8Linear | Int4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: Mode = "int8",
    group_size: int = 64,
    skip: Iterable[str] = DEFAULT_SKIP,
    scale_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every plain ``nn.Linear`` (not subclasses such as MHA's ``out_proj``, which is read
    directly by its parent) whose qualified name contains none of ``skip`` - in place. Returns
    ``model`` (or the quantized layer when ``model`` itself is an ``nn.Linear``)."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"mode must be 'int8' or 'int4', got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}")
    skip = tuple(skip)

    def convert(lin: nn.Linear) -> nn.Module:
        if mode == "int8":
            return Int8Linear.from_linear(lin, scale_dtype)
        return Int4Linear.from_linear(lin, group_size, scale_dtype)

    if type(model) is nn.Linear:  # a bare layer cannot be replaced in place: return its replacement
        return convert(model)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not _skipped(name, skip)
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, convert(lin))
    return model


def enable_fast_kernels(model: nn.Module) -> int:
    """Turn on the packed aten kernels where they work; returns how many layers use them."""
    n = 0
    for mod in _quantized_modules(model).values():
        n += mod.prepare_fast_kernel()
    return n


# ---------------------------------------------------------------------------------------------------
# safetensors I/O


def _quant_config_of(model: nn.Module) -> dict[str, Any]:
    mods = _quantized_modules(model)
    if not mods:
        raise ValueError("model has no Int8Linear/Int4Linear layers; run quantize_model first")
    modes = {"int8" if isinstance(m, Int8Linear) else "int4" for m in mods.values()}
    if len(modes) != 1:
        raise ValueError("mixed int8/int4 models are not supported by the checkpoint format")
    mode = modes.pop()
    first = next(iter(mods.values()))
    return {
        "format": QUANT_FORMAT,
        "version": 1,
        "mode": mode,
        "group_size": first.group_size if mode == "int4" else None,
        "scale_dtype": _dtype_name(first.scales.dtype),
        "modules": sorted(mods),
    }


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses aliased storage (tied embeddings): keep one copy, remember the aliases."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t is None:
            continue
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out, aliases


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(folder / "model.safetensors"),
        metadata={"format": "pt", "genmill_quant": json.dumps(config)},
    )
    (folder / QUANT_SIDECAR).write_text(json.dumps(config, indent=2) + "\n")


def save_quantized(
    model: nn.Module | Mapping[str, torch.Tensor],
    folder: str | Path,
    quant_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``genmill_quant.json``.

    ``model`` is a quantized module (config derived from its layers) or a state dict, in which case
    ``quant_config`` must give at least ``mode`` and ``modules``. Returns the safetensors path.
    """
    folder = Path(folder)
    if isinstance(model, nn.Module):
        config = _quant_config_of(model) | dict(quant_config or {})
        state: Mapping[str, torch.Tensor] = model.state_dict()
    else:
        if not quant_config or "mode" not in quant_config or "modules" not in quant_config:
            raise ValueError("saving a bare state dict needs quant_config with 'mode' and 'modules'")
        config = {"format": QUANT_FORMAT, "version": 1} | dict(quant_config)
        state = model
    tensors, aliases = _dedupe(state)
    config["aliases"] = aliases
    _write(folder, tensors, config)
    return folder / "model.safetensors"


def read_quantized(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with aliases restored, sidecar config) of a quantized folder."""
    folder = Path(folder)
    sidecar = folder / QUANT_SIDECAR
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: not a genmill quantized checkpoint")
    config = json.loads(sidecar.read_text())
    if config.get("format") != QUANT_FORMAT:
        raise ValueError(f"unsupported quantization format {config.get('format')!r}")
    # only our own file: a stale shard left in the folder must not leak into the state dict
    # fresh copies: safetensors may return tensors at unaligned offsets, which aten's packed
    # int8/int4 kernels read out of bounds (a segfault, not an error)
    state: dict[str, torch.Tensor] = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
    for alias, src in config.get("aliases", {}).items():
        state[alias] = state[src]
    return state, config


def _shell(
    lin: nn.Module, name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Empty (meta) quantized layer in place of ``lin``; ``load_state_dict(assign=True)`` fills it."""
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is {type(lin).__name__}, expected nn.Linear")
    has_bias = f"{name}.bias" in state
    if config["mode"] == "int8":
        return Int8Linear(lin.in_features, lin.out_features, has_bias, device="meta")
    return Int4Linear(
        lin.in_features, lin.out_features, has_bias, group_size=int(config["group_size"]), device="meta"
    )


def load_quantized(model: nn.Module, folder: str | Path, strict: bool = True) -> nn.Module:
    """Swap the listed ``nn.Linear`` layers of ``model`` (an fp model built from the same config; its
    own weights are discarded) for quantized shells and load the tensors by assignment, so dtypes are
    the file's. Parameters tied in ``model`` (e.g. ``lm_head`` to the embedding) and absent from the
    file are re-tied to the loaded tensor. Returns ``model``."""
    state, config = read_quantized(folder)
    for name in config["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _shell(getattr(parent, child), name, config, state))
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing_set = set(missing)
    for names in tied.values():
        loaded = [n for n in names if n not in missing_set]
        if not loaded:
            continue
        src = model.get_parameter(loaded[0])
        for n in names:
            if n in missing_set:
                mod_name, _, attr = n.rpartition(".")
                setattr(model.get_submodule(mod_name), attr, src)
                missing_set.discard(n)
    if strict and (missing_set or unexpected):
        raise RuntimeError(f"load_quantized: missing={sorted(missing_set)} unexpected={unexpected}")
    return model


# ---------------------------------------------------------------------------------------------------
# Checkpoint folder -> quantized folder (what `genmill quantize` calls)


def _source_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [src / f for f in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {src}; pickle checkpoints (.bin/.pt) are not read - convert them first"
        )
    return files


@torch.no_grad()
def quantize_checkpoint(
    src_folder: str | Path,
    dst_folder: str | Path,
    mode: Mode = "int8",
    group_size: int = 64,
    skip: Iterable[str] = CHECKPOINT_SKIP,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Quantize an HF checkpoint folder's safetensors state dict without building the model.

    Every floating 2-D ``*.weight`` whose name contains none of ``skip`` (embeddings, heads, norms) is
    treated as an ``nn.Linear`` weight ``[out, in]`` and quantized; everything else is copied as is.
    ``config.json``, tokenizer and other small files are copied; pickles are never opened. Writes
    ``model.safetensors`` and ``genmill_quant.json``; returns the sidecar config. The result loads with
    ``load_quantized(AutoModelForCausalLM.from_config(config), dst_folder)``.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"mode must be 'int8' or 'int4', got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}")
    src, dst = Path(src_folder), Path(dst_folder)
    if src.resolve() == dst.resolve():
        raise ValueError("dst_folder must differ from src_folder")
    model_type = None
    if (src / "config.json").is_file():
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type in _CONV1D_MODEL_TYPES:
        raise ValueError(f"{model_type} stores projections as Conv1D [in, out]; not supported")
    skip = tuple(skip)
    sdt = scale_dtype or _default_scale_dtype(mode)

    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    src_bytes = 0
    for path in _source_files(src):
        with safe_open(str(path), framework="pt") as f:
            for name in list(f.keys()):  # safe_open is not iterable
                t = f.get_tensor(name)
                src_bytes += t.numel() * t.element_size()
                is_linear = (
                    name.endswith(".weight")
                    and t.ndim == 2
                    and t.is_floating_point()
                    and not _skipped(name, skip)
                )
                if not is_linear:
                    out[name] = t
                    continue
                mod = name.removesuffix(".weight")
                modules.append(mod)
                if mode == "int8":
                    out[name], out[f"{mod}.scales"] = quantize_int8(t, sdt)
                else:
                    out[name], out[f"{mod}.scales"], out[f"{mod}.zeros"] = quantize_int4(t, group_size, sdt)
    if not modules:
        raise ValueError(f"no linear weights found to quantize in {src}")

    config: dict[str, Any] = {
        "format": QUANT_FORMAT,
        "version": 1,
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "scale_dtype": _dtype_name(sdt),
        "modules": sorted(modules),
        "aliases": {},
        "source": src.name,
        "source_bytes": src_bytes,
        "quantized_bytes": sum(t.numel() * t.element_size() for t in out.values()),
    }
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if (
            p.is_file()
            and not p.name.endswith(_NON_TENSOR_SUFFIXES)
            and p.name != "model.safetensors.index.json"
        ):
            shutil.copy2(p, dst / p.name)
    _write(dst, out, config)
    return config

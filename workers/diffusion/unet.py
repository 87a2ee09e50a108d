"""Load a diffusers ``UNet2DModel`` from a local folder: ``config.json`` + safetensors weights, nothing else.

Pickled checkpoints (``.bin``, ``.pt``, ``.ckpt``) are refused rather than unpickled: loading one
runs arbitrary code. A diffusers pipeline folder (``model_index.json`` with ``unet/``) works too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsafeCheckpointError(ValueError):
    """The folder holds only pickled weights."""


def unet_dir(path: str | Path) -> Path:
    """The folder holding the UNet's config.json: ``path`` itself, or ``path/unet`` for a pipeline folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    if (root / "unet" / "config.json").is_file() and not (root / "config.json").is_file():
        return root / "unet"
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json (nor unet/config.json): not a diffusers UNet folder")
    return root


def read_unet_config(path: str | Path) -> dict[str, Any]:
    config = json.loads((unet_dir(path) / "config.json").read_text())
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{path}: config.json describes a {name}, expected UNet2DModel")
    return config


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        return load_file(folder / WEIGHTS)
    if (folder / WEIGHTS_INDEX).is_file():  # sharded: weight_map names the shard of each tensor
        shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickles)}); GenMill loads safetensors only. "
            f"Convert once in a trusted environment, e.g. UNet2DModel.from_pretrained(...)"
            f".save_pretrained(folder, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} (nor {WEIGHTS_INDEX})")


def _prepare(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # cast the tensors, not the module (diffusers warns on Module.to(dtype)); and give SIMD kernels
    # 64-byte aligned weights, which safetensors' buffers need not be
    if tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def load_unet(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
    """The UNet in eval mode on ``device``; strict loading, so a config/weights mismatch fails here."""
    from diffusers import UNet2DModel  # imported here: diffusers is slow to import and only engines need it

    folder = unet_dir(path)
    config = read_unet_config(folder)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    state = {k: _prepare(v, torch_dtype) for k, v in _state_dict(folder).items()}
    # Build on the meta device and adopt the loaded tensors: skips a random init of every weight.
    with torch.device("meta"):
        model = UNet2DModel.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = UNet2DModel.from_config(config).to(torch_dtype)  # a buffer outside the state dict
        model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


class UNetNetwork:
    """Adapts a UNet2DModel to the denoiser's network call ``F(x_in, t, labels)``.

    Inputs arrive in float32 and are cast to the model's dtype; the output is returned in float32 so
    the sampler's arithmetic stays in float32 whatever the model runs in.
    """

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.dtype = unet.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.unet(x.to(self.dtype), t, class_labels=labels, return_dict=False)[0]
        return out.float()

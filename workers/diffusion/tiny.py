"""Random diffusers UNets saved the way real checkpoints are, for tests, the demo and the benchmark."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workers.diffusion.denoiser import SIDECAR


def build_tiny_unet(
    folder: str | Path,
    class_conditional: bool,
    image_size: int = 8,
    seed: int = 0,
    *,
    num_classes: int = 10,
    block_out_channels: Sequence[int] = (16, 32),
    layers_per_block: int = 1,
    distillation: bool = True,
    pipeline_layout: bool = False,
) -> Path:
    """Write a random UNet2DModel (config.json + diffusion_pytorch_model.safetensors) and a genmill.json.

    ``pipeline_layout`` writes a ConsistencyModelPipeline folder instead (model_index.json, unet/,
    scheduler/), the layout of the released consistency-model checkpoints, which diffusers' own
    pipeline can load too. Every level but the first has attention, as in the real models.
    Returns ``folder``.
    """
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    root = Path(folder)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        unet = _unet(UNet2DModel, image_size, block_out_channels, layers_per_block,
                     num_classes if class_conditional else None)
    unet_folder = root / "unet" if pipeline_layout else root
    unet.save_pretrained(unet_folder, safe_serialization=True)
    sidecar: dict[str, Any] = {"distillation": distillation, "time_convention": "250log",
                               "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    (root / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    if pipeline_layout:
        CMStochasticIterativeScheduler().save_pretrained(root / "scheduler")
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "ConsistencyModelPipeline",
            "scheduler": ["diffusers", "CMStochasticIterativeScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }, indent=2) + "\n")
    return root


def _unet(cls: Any, image_size: int, channels: Sequence[int], layers: int, num_classes: int | None) -> Any:
    levels = len(channels)
    return cls(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1),
        up_block_types=("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=8,
        norm_num_groups=min(8, channels[0]),
        num_class_embeds=num_classes,
    )

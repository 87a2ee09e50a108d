"""Wrap a network F into the EDM denoiser D(x, sigma, labels) = c_skip x + c_out F(c_in x, t(sigma), labels).

What the checkpoint needs (sigma_data, the boundary-condition flag of distilled consistency models,
the time convention, the number of classes) comes from, in increasing priority: the UNet config,
a diffusers pipeline's scheduler config, a ``genmill.json`` sidecar, and explicit overrides.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from workers.diffusion.schedule import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    TIME_CONVENTIONS,
    boundary_scalings,
    edm_scalings,
    time_input,
)
from workers.diffusion.unet import read_unet_config, unet_dir

SIDECAR = "genmill.json"

# F(x_in, t, labels) -> raw network output, all float32
Network = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    image_size: int
    in_channels: int = 3
    num_classes: int | None = None
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN  # the model's boundary sigma (distilled models), not the sampler's
    sigma_max: float = SIGMA_MAX
    distillation: bool = False
    time_convention: str = "250log"

    def __post_init__(self) -> None:
        if self.time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention: unknown {self.time_convention!r} "
                             f"(expected one of {', '.join(TIME_CONVENTIONS)})")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1 or null (got {self.num_classes})")
        if self.sigma_data <= 0 or self.sigma_min <= 0:
            raise ValueError("sigma_data, sigma_min: must be > 0")


SPEC_FIELDS = {f.name for f in fields(ModelSpec)}


def _from_scheduler(config: dict[str, Any]) -> dict[str, Any]:
    """What a diffusers scheduler config says about the denoiser it was saved with."""
    name = config.get("_class_name", "")
    keep = {k: config[k] for k in ("sigma_data", "sigma_min", "sigma_max") if k in config}
    if name == "CMStochasticIterativeScheduler":
        return {**keep, "distillation": True, "time_convention": "250log"}
    if name.startswith("EDM"):
        return {**keep, "distillation": False, "time_convention": "edm"}
    return {}


def read_model_spec(path: str | Path, **overrides: Any) -> ModelSpec:
    """The spec of the model folder at ``path`` (flat UNet folder or diffusers pipeline folder)."""
    root, folder = Path(path), unet_dir(path)
    config = read_unet_config(folder)
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{path}: non-square sample_size {size} is not supported")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"{path}: config.json has no integer sample_size")  # noqa: TRY004 (bad file content)
    # num_class_embeds is an embedding of class indices only without a class_embed_type
    classes = config.get("num_class_embeds") if config.get("class_embed_type") is None else None
    values: dict[str, Any] = {"image_size": size, "in_channels": config.get("in_channels", 3),
                              "num_classes": classes}

    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        values.update(_from_scheduler(json.loads(scheduler.read_text())))
    for sidecar in dict.fromkeys((root / SIDECAR, folder / SIDECAR)):
        if sidecar.is_file():
            data = json.loads(sidecar.read_text())
            unknown = sorted(set(data) - SPEC_FIELDS)
            if unknown:
                raise ValueError(f"{sidecar}: unknown keys {unknown} (known: {sorted(SPEC_FIELDS)})")
            values.update(data)
            break
    unknown = sorted(set(overrides) - SPEC_FIELDS)
    if unknown:
        raise TypeError(f"unknown model options {unknown} (known: {sorted(SPEC_FIELDS)})")
    return replace(ModelSpec(**values), **overrides)


class Denoiser:
    """D(x, sigma, labels) for one network and spec.

    ``eval_batch``: when set, every network call has exactly that many rows (a tail is padded and the
    padding dropped). CPU GEMM and convolution kernels round differently for different row counts,
    while with a fixed row count each row's result depends on that row alone; fixing it makes the
    samples bit-identical whatever the job's batch size or chunking.
    """

    def __init__(self, net: Network, spec: ModelSpec, eval_batch: int | None = None) -> None:
        if eval_batch is not None and eval_batch < 1:
            raise ValueError(f"eval_batch: must be >= 1 (got {eval_batch})")
        self.net, self.spec, self.eval_batch = net, spec, eval_batch

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.spec.distillation:
            return boundary_scalings(sigma, self.spec.sigma_data, self.spec.sigma_min)
        return edm_scalings(sigma, self.spec.sigma_data)

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if (labels is None) != (self.spec.num_classes is None):
            raise ValueError("labels: required by a class-conditional model and refused by an unconditional one")
        n = x.shape[0]
        # scalings in float64, then cast: the same values on every device
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(n)
        c_skip, c_out, c_in = (c.to(x.device, x.dtype).view(n, *([1] * (x.ndim - 1))) for c in self.scalings(s))
        t = time_input(s, self.spec.time_convention).to(x.device, torch.float32)
        out = self._forward(c_in * x, t, labels)
        return c_skip * x + c_out * out

    def _forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        m, n = self.eval_batch, x.shape[0]
        if m is None or n == m:
            return self.net(x, t, labels)
        outs = []
        for start in range(0, n, m):
            xs, ts = x[start:start + m], t[start:start + m]
            ls = None if labels is None else labels[start:start + m]
            k = xs.shape[0]
            if k < m:
                pad = m - k
                xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                ts = torch.cat([ts, ts[:1].expand(pad)])
                ls = None if ls is None else torch.cat([ls, ls.new_zeros(pad)])
            outs.append(self.net(xs, ts, ls)[:k])
        return torch.cat(outs)

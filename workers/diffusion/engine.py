"""Image-sampling engine: N samples from a Karras/EDM or consistency-model UNet with one sampler.

``DiffusionEngine.sample(indices, labels, params, seed, batch_size)`` returns an ``EngineRun`` with

- ``outcomes``: one ``ImageSample(index, image, label)`` per requested index, in request order;
  ``image`` is uint8 ``[H, W, 3]`` (``((x + 1) * 127.5)`` clamped and truncated, as the reference
  writes it), views into one ``[n, H, W, 3]`` array (``stack_images`` stacks them back);
- ``metrics``: samples_per_s, model_evals_per_sample, peak_memory_bytes (CUDA: peak allocated;
  CPU: the process's peak RSS), wall_s.

Sample i depends only on (seed, i), its label, the sampler parameters and the engine's
``eval_batch``: not on batch_size, on which other indices share the call, nor on the worker
(noise: ``noise.PerSampleNoise``; network rounding: ``Denoiser.eval_batch``).
"""
from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.diffusion.denoiser import Denoiser, ModelSpec, Network, read_model_spec
from workers.diffusion.noise import PerSampleNoise, sample_labels
from workers.diffusion.samplers import SamplerParams
from workers.diffusion.unet import DTYPES, UNetNetwork, load_unet
from workers.engine import EngineRun, Metric, ProgressFn


@dataclass
class SampleRequest:
    """One engine call's worth of sample indices (and their labels for class-conditional models)."""

    indices: list[int]
    labels: list[int] | None = None


@dataclass(frozen=True)
class ImageSample:
    index: int
    image: np.ndarray  # uint8 [H, W, 3]
    label: int | None


def stack_images(outcomes: Sequence[ImageSample]) -> np.ndarray:
    """The ``[n, H, W, 3]`` uint8 array of a run's samples, in outcome order."""
    return np.stack([o.image for o in outcomes])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats to NHWC uint8, as consistency_models' image_sample.py does."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class DiffusionEngine:
    kind = "diffusion"

    def __init__(self, net: Network, spec: ModelSpec, device: str | torch.device = "cpu",
                 eval_batch: int | None = 16) -> None:
        if spec.in_channels != 3:
            raise ValueError(f"in_channels: image sampling needs 3 channels (model has {spec.in_channels})")
        self.spec = spec
        self.device = torch.device(device)
        self.denoiser = Denoiser(net, spec, eval_batch)
        self.image_size: int = spec.image_size
        self.num_classes: int | None = spec.num_classes
        self.in_channels: int = spec.in_channels
        self.eval_batch = eval_batch

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str = "float32",
             eval_batch: int | None = 16, **options: Any) -> DiffusionEngine:
        """Load a UNet folder; ``options`` override ModelSpec fields (e.g. ``distillation=True``).

        ``eval_batch`` fixes the network's batch (see ``Denoiser``): keep it constant across the
        workers of a deployment; on a GPU set it to the batch that saturates the device.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype: unknown {dtype!r} (expected one of {', '.join(DTYPES)})")
        spec = read_model_spec(path, **options)
        return cls(UNetNetwork(load_unet(path, device, dtype)), spec, device, eval_batch)

    def check_labels(self, indices: Sequence[int], labels: Sequence[int] | None) -> None:
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels: the model is unconditional and takes no class labels")
            return
        if labels is None:
            return
        if len(labels) != len(indices):
            raise ValueError(f"labels: {len(labels)} labels for {len(indices)} samples")
        bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.num_classes]
        if bad:
            raise ValueError(f"labels: {bad[:5]} outside the model's classes [0, {self.num_classes - 1}]")

    def sample(self, indices: Sequence[int], labels: Sequence[int] | None, params: SamplerParams,
               seed: int, batch_size: int | None = None, progress: ProgressFn | None = None) -> EngineRun:
        """Samples for ``indices``; a class-conditional model without ``labels`` gets random ones
        drawn from (seed, index), the same draw ``sample_labels`` gives the job kind."""
        indices = [int(i) for i in indices]
        self.check_labels(indices, labels)
        if self.num_classes is not None and labels is None:
            labels = sample_labels(seed, indices, self.num_classes)
        batch_size = batch_size or self.eval_batch or 16
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        images, evals = [], 0
        for lo in range(0, len(indices), batch_size):
            batch = indices[lo:lo + batch_size]
            batch_labels = None if labels is None else list(labels[lo:lo + batch_size])
            x, n_evals = self._sample_batch(batch, batch_labels, params, seed)
            images.append(x)
            evals += n_evals * len(batch)
            if progress is not None:
                progress(len(batch))
        wall = time.perf_counter() - start
        array = np.concatenate(images) if images else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        outcomes = [ImageSample(i, array[r], None if labels is None else int(labels[r]))
                    for r, i in enumerate(indices)]
        n = max(len(indices), 1)
        return EngineRun(outcomes=outcomes, metrics=[
            Metric("samples_per_s", len(indices) / wall if wall > 0 else 0.0, "samples/s"),
            Metric("model_evals_per_sample", evals / n, "evals"),
            Metric("peak_memory_bytes", float(self._peak_memory()), "bytes"),
            Metric("wall_s", wall, "s"),
        ])

    def run(self, request: SampleRequest, params: SamplerParams, seed: int,
            batch_size: int | None = None, progress: ProgressFn | None = None) -> EngineRun:
        return self.sample(request.indices, request.labels, params, seed, batch_size, progress)

    @torch.inference_mode()
    def _sample_batch(self, indices: list[int], labels: list[int] | None, params: SamplerParams,
                      seed: int) -> tuple[np.ndarray, int]:
        noise = PerSampleNoise(seed, indices, self.device)
        size = self.image_size
        x = noise.randn((self.in_channels, size, size)) * params.sigma_max
        y = None if labels is None else torch.tensor(labels, dtype=torch.long, device=self.device)
        calls = 0

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            nonlocal calls
            calls += 1
            out = self.denoiser(x, sigma, y)
            return out.clamp(-1, 1) if params.clip_denoised else out

        x = params.run(denoise, x, noise)
        return to_uint8(x), calls

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def close(self) -> None:
        self.denoiser.net = None  # type: ignore[assignment]  # drop the weights
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

"""Reproducible noise: each sample draws from its own stream, seeded from (job seed, sample index).

A batch's noise is the stack of its samples' next draws, so a sample's noise does not depend on
which other samples share its batch, chunk or worker. That is the property of consistency_models'
``determ`` generators, without their dependence on ``num_samples`` (the job can grow or be cut
into any chunks and sample i keeps its noise).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

_NOISE, _LABEL = 0, 1  # stream purposes: same (seed, index) never reuses the noise stream for labels


def sample_seed(seed: int, index: int, purpose: int = _NOISE) -> int:
    """A 63-bit seed for one sample's stream; SeedSequence mixes the inputs so near seeds don't collide."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    state = np.random.SeedSequence([seed, index, purpose]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sample_labels(seed: int, indices: Sequence[int], num_classes: int) -> list[int]:
    """Random class labels, one per sample index, from their own streams (not the noise streams)."""
    return [
        int(np.random.default_rng(sample_seed(seed, i, _LABEL)).integers(num_classes)) for i in indices
    ]


class NoiseSource(Protocol):
    """What a sampler draws its noise from."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor: ...


class PerSampleNoise:
    """One CPU generator per sample; draws are made on the CPU in float32 and then moved.

    Drawing on the CPU makes the noise the same on every device type, which also matches diffusers'
    ``randn_tensor`` when given one CPU generator per batch row.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise of shape ``[len(indices), *shape]``; row r is sample ``indices[r]``'s next draw."""
        rows = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device, dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but noise for {len(self.generators)} samples")
        return self.randn(x.shape[1:], x.dtype)


class GlobalNoise:
    """One generator for the whole batch: fast, for tests and benchmarks that need no per-sample streams."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device, dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.dtype)

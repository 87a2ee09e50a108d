"""Noise schedule and EDM preconditioning shared by every sampler and denoiser.

Conventions follow Karras et al. 2022 (EDM) and the consistency-models code: data in [-1, 1],
``x_sigma = x_0 + sigma * eps``, sigmas decreasing from ``sigma_max`` to ``sigma_min``.
"""
from __future__ import annotations

import math
from typing import TypeVar

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5

# what the network receives as its time input, as a function of sigma
TIME_CONVENTIONS = ("250log", "edm", "sigma")

T = TypeVar("T", float, torch.Tensor)


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
    append_zero: bool = True,
) -> torch.Tensor:
    """``n`` sigmas evenly spaced in ``sigma**(1/rho)`` from sigma_max to sigma_min, then a trailing 0.

    Computed in float64 on the CPU: samplers read them as Python floats, so no device sync per step.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1 (got {n})")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def edm_scalings(sigma: T, sigma_data: float = SIGMA_DATA) -> tuple[T, T, T]:
    """(c_skip, c_out, c_in) of EDM: D(x, sigma) = c_skip * x + c_out * F(c_in * x)."""
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var**0.5, 1 / var**0.5


def boundary_scalings(
    sigma: T, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
) -> tuple[T, T, T]:
    """Consistency-model scalings: c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x.

    As in the released distilled models, only c_skip's and c_out's numerators use sigma - sigma_min;
    c_out's denominator and c_in keep sigma itself.
    """
    shifted = sigma - sigma_min
    var = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    return c_skip, shifted * sigma_data / var**0.5, 1 / var**0.5


def time_input(sigma: torch.Tensor, convention: str) -> torch.Tensor:
    """The network's time input for ``sigma``.

    "250log": 1000 * 0.25 * log(sigma), the consistency-model / diffusers CM checkpoints;
    "edm": c_noise = 0.25 * log(sigma) (EDM's own networks); "sigma": sigma unchanged.
    """
    if convention == "250log":
        return 250.0 * torch.log(sigma + 1e-44)  # 1e-44 as the reference: finite at sigma = 0
    if convention == "edm":
        return 0.25 * torch.log(sigma)
    if convention == "sigma":
        return sigma
    raise ValueError(f"time_convention: unknown {convention!r} (expected one of {', '.join(TIME_CONVENTIONS)})")


def churn_gamma(sigma: float, n_sigmas: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM Algorithm 2's gamma_i: extra noise is added only inside [s_tmin, s_tmax], capped at sqrt2 - 1."""
    if s_churn <= 0 or not (s_tmin <= sigma <= s_tmax):
        return 0.0
    return min(s_churn / (n_sigmas - 1), math.sqrt(2) - 1)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): deterministic step to sigma_down, then fresh noise of std sigma_up."""
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up

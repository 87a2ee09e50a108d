"""Karras-ODE/SDE samplers and consistency-model samplers, k-diffusion style.

Every sampler is ``(denoise, x, sigmas, noise, **opts) -> x``: ``denoise(x, sigma)`` returns the
denoised estimate at noise level ``sigma`` (a Python float), ``x`` starts at ``sigmas[0]`` noise,
``sigmas`` is the decreasing schedule with a trailing 0, ``noise`` supplies any fresh noise.
Samplers only draw noise they use, one ``randn_like`` per step that needs it, so every sample of a
batch consumes its stream identically.

Behaviour matches consistency_models' ``karras_sample`` samplers (names included) and, where the
two agree, k-diffusion's; ``dpm_2`` is k-diffusion's variant of ``dpm``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from workers.diffusion.noise import NoiseSource
from workers.diffusion.schedule import RHO, SIGMA_MAX, SIGMA_MIN, ancestral_step, churn_gamma, karras_sigmas

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def _floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    return sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]


def _churn(x: torch.Tensor, sigma: float, gamma: float, noise: NoiseSource, s_churn: float,
           s_noise: float) -> tuple[torch.Tensor, float]:
    """EDM's stochastic step: raise the noise level to sigma_hat = sigma * (1 + gamma).

    With churn enabled a draw is made every step, even where gamma is 0, as both references do,
    so the noise streams line up with theirs.
    """
    if s_churn <= 0:
        return x, sigma
    eps = noise.randn_like(x) * s_noise
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                 noise: NoiseSource, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """First-order steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        gamma = churn_gamma(s[i], len(s), s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, s[i], gamma, noise, s_churn, s_noise)
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                noise: NoiseSource, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """EDM Algorithm 2: Heun's second-order steps; the last step to sigma = 0 is Euler (D is undefined at 0)."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        gamma = churn_gamma(s[i], len(s), s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, s[i], gamma, noise, s_churn, s_noise)
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def _sample_midpoint(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                     noise: NoiseSource, midpoint: Callable[[float, float], float], euler_last: bool,
                     s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> torch.Tensor:
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        gamma = churn_gamma(s[i], len(s), s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, s[i], gamma, noise, s_churn, s_noise)
        d = (x - denoise(x, sigma_hat)) / sigma_hat
        if euler_last and s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
            continue
        sigma_mid = midpoint(sigma_hat, s[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
        x = x + d_2 * (s[i + 1] - sigma_hat)
    return x


def sample_dpm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
               noise: NoiseSource, *, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """consistency_models' ``dpm``: DPM-Solver-2-like midpoint steps, the midpoint on a rho = 3 Karras
    grid; the step to 0 is a midpoint step too (its midpoint is sigma_hat / 8)."""
    def rho3(a: float, b: float) -> float:
        return ((a ** (1 / 3) + b ** (1 / 3)) / 2) ** 3
    return _sample_midpoint(denoise, x, sigmas, noise, rho3, False, s_churn, s_tmin, s_tmax, s_noise)


def sample_dpm_2(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                 noise: NoiseSource, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """k-diffusion's ``sample_dpm_2``: geometric midpoint, Euler for the last step to 0."""
    def geometric(a: float, b: float) -> float:
        return math.exp((math.log(a) + math.log(b)) / 2)
    return _sample_midpoint(denoise, x, sigmas, noise, geometric, True, s_churn, s_tmin, s_tmax, s_noise)


def sample_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                     noise: NoiseSource, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler ancestral: Euler step down to sigma_down, then fresh noise of std sigma_up (none into 0)."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + noise.randn_like(x) * (s_noise * sigma_up)
    return x


def sample_onestep(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                   noise: NoiseSource) -> torch.Tensor:
    """Consistency model, one evaluation: f(x_T, sigma_max)."""
    return denoise(x, _floats(sigmas)[0])


def sample_multistep(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                     noise: NoiseSource, *, ts: Sequence[int], s_noise: float = 1.0) -> torch.Tensor:
    """Consistency models' Algorithm 1 (``stochastic_iterative_sampler``).

    ``sigmas`` is the ``steps``-long Karras grid (trailing 0 ignored); ``ts`` are increasing indices
    into it. Each of the len(ts) - 1 evaluations maps x to x_0 at grid[ts[i]], then re-noises it to
    grid[ts[i + 1]] (noise std sqrt(t^2 - sigma_min^2)). Ending ts at steps - 1 (sigma_min) returns a
    clean x_0, as in the reference's "0,22,39" with 40 steps.
    """
    grid = [v for v in _floats(sigmas) if v > 0]
    t_min, t_max = grid[-1], grid[0]
    for i in range(len(ts) - 1):
        x0 = denoise(x, grid[ts[i]])
        t_next = min(max(grid[ts[i + 1]], t_min), t_max)
        std = (t_next**2 - t_min**2) ** 0.5
        x = x0 + noise.randn_like(x0) * (s_noise * std) if std > 0 else x0
    return x


def sample_progdist(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                    noise: NoiseSource) -> torch.Tensor:
    """Progressive-distillation students: Euler steps along the grid, stopping at sigma_min (no step to 0)."""
    return sample_euler(denoise, x, [v for v in _floats(sigmas) if v > 0], noise)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm": sample_dpm,
    "dpm_2": sample_dpm_2,
    "ancestral": sample_ancestral,
    "onestep": sample_onestep,
    "multistep": sample_multistep,
    "progdist": sample_progdist,
}
ALIASES = {"euler_ancestral": "ancestral"}
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "euler": _CHURN, "heun": _CHURN, "dpm": _CHURN, "dpm_2": _CHURN,
    "ancestral": ("eta", "s_noise"), "onestep": (), "multistep": ("ts", "s_noise"), "progdist": (),
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}: must be a number (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class SamplerParams:
    """One sampling configuration; invalid values raise ValueError naming the parameter.

    Defaults are ``karras_sample``'s. ``ts`` is required for (and only used by) ``multistep``.
    ``clip_denoised`` clamps every denoiser output to [-1, 1], as the reference does.
    """

    sampler: str = "heun"
    steps: int = 40
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta: float = 1.0
    ts: tuple[int, ...] | None = None
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        sampler = ALIASES.get(self.sampler, self.sampler)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {self.sampler!r} (expected one of {', '.join(SAMPLERS)})")
        object.__setattr__(self, "sampler", sampler)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: must be an integer >= 1 (got {self.steps!r})")
        for name in ("sigma_min", "sigma_max", "rho", "s_churn", "s_tmin", "s_tmax", "s_noise", "eta"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if not 0 < self.sigma_min < self.sigma_max or math.isinf(self.sigma_max):
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max < inf "
                             f"(got {self.sigma_min}, {self.sigma_max})")
        if self.rho <= 0:
            raise ValueError(f"rho: must be > 0 (got {self.rho})")
        for name in ("s_churn", "s_noise", "eta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (got {getattr(self, name)})")
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"s_tmin: must be <= s_tmax (got {self.s_tmin} > {self.s_tmax})")
        if not isinstance(self.clip_denoised, bool):
            # ValueError like every other parameter check: callers catch one type
            raise ValueError(f"clip_denoised: must be true or false (got {self.clip_denoised!r})")  # noqa: TRY004
        object.__setattr__(self, "ts", self._check_ts(sampler))

    def _check_ts(self, sampler: str) -> tuple[int, ...] | None:
        ts: Any = self.ts
        if isinstance(ts, str):  # the reference's command-line form "0,22,39"
            try:
                ts = [int(v) for v in ts.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"ts: expected comma-separated integers (got {self.ts!r})") from None
        if ts is None or len(ts) == 0:
            if sampler == "multistep":
                raise ValueError("ts: required by the multistep sampler, e.g. [0, 22, 39] with steps=40")
            return None
        if sampler != "multistep":
            raise ValueError(f"ts: only used by the multistep sampler (sampler is {sampler!r})")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ts):
            raise ValueError(f"ts: must be integers (got {list(ts)!r})")
        if len(ts) < 2:
            raise ValueError("ts: needs at least 2 indices (each pair is one evaluation)")
        if any(not 0 <= v < self.steps for v in ts):
            raise ValueError(f"ts: indices must be in [0, steps - 1] = [0, {self.steps - 1}] (got {list(ts)})")
        if any(b <= a for a, b in itertools.pairwise(ts)):
            raise ValueError(f"ts: must be strictly increasing (got {list(ts)})")
        return tuple(ts)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SamplerParams:
        """From job parameters: keys not naming a field are ignored; s_tmax None means infinity."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in params.items() if k in names and v is not None}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (infinite s_tmax becomes None); only what the sampler uses is kept."""
        used = set(_OPTIONS[self.sampler]) | {"sampler", "steps", "sigma_min", "sigma_max", "rho", "clip_denoised"}
        out = {k: v for k, v in asdict(self).items() if k in used}
        if "s_tmax" in out and math.isinf(out["s_tmax"]):
            out["s_tmax"] = None
        if "ts" in out:
            out["ts"] = list(out["ts"])
        return out

    def sigmas(self) -> torch.Tensor:
        """The schedule the sampler walks: progdist uses steps + 1 Karras sigmas, the others steps."""
        n = self.steps + 1 if self.sampler == "progdist" else self.steps
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def model_evals(self) -> int:
        """Network evaluations per sample, known before sampling (for estimates and metrics)."""
        n = self.steps
        return {
            "euler": n, "progdist": n, "ancestral": n, "onestep": 1,
            "heun": 2 * n - 1, "dpm_2": 2 * n - 1, "dpm": 2 * n,
            "multistep": len(self.ts or ()) - 1,
        }[self.sampler]

    def options(self) -> dict[str, Any]:
        """The keyword options this configuration passes to its sampler function."""
        return {k: getattr(self, k) for k in _OPTIONS[self.sampler]}

    def run(self, denoise: Denoise, x: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """Sample from ``x`` (already scaled to sigma_max) with this configuration."""
        return SAMPLERS[self.sampler](denoise, x, self.sigmas(), noise, **self.options())

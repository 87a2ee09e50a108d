"""Parity with reference implementations on the same denoiser and the same noise.

- k-diffusion's ``sample_euler``, ``sample_heun``, ``sample_euler_ancestral``, ``sample_dpm_2``
  (its ``sampling.py`` is loaded on its own: the package's ``__init__`` imports torchvision, which
  has no CPU wheel here);
- diffusers' ``ConsistencyModelPipeline`` + ``CMStochasticIterativeScheduler`` for onestep and
  multistep consistency sampling, given one CPU generator per sample seeded like ours.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from workers.diffusion.denoiser import Denoiser, read_model_spec
from workers.diffusion.noise import PerSampleNoise, sample_seed
from workers.diffusion.samplers import SAMPLERS, SamplerParams
from workers.diffusion.schedule import karras_sigmas
from workers.diffusion.tiny import build_tiny_unet
from workers.diffusion.unet import UNetNetwork, load_unet

SEED, INDICES, LABELS = 5, [0, 1, 2, 3], [1, 7, 3, 3]


def _load_kdiffusion_sampling() -> types.ModuleType:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        pytest.skip("k-diffusion is not installed")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        pytest.importorskip(dep)
    package = types.ModuleType("_kd_ref")
    package.__path__ = []
    utils = types.ModuleType("_kd_ref.utils")

    def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("_kd_ref", package)
    sys.modules.setdefault("_kd_ref.utils", utils)
    path = Path(spec.origin).parent / "sampling.py"
    module_spec = importlib.util.spec_from_file_location("_kd_ref.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class _TorchWithNoise(types.ModuleType):
    """``torch`` for k-diffusion's module, with ``randn_like`` drawing from our noise source."""

    def __init__(self, noise: PerSampleNoise) -> None:
        super().__init__("torch")
        self._noise = noise

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def randn_like(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._noise.randn_like(x)


@pytest.fixture(scope="module")
def kd() -> types.ModuleType:
    return _load_kdiffusion_sampling()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_unet(tmp_path_factory.mktemp("cm") / "model", class_conditional=True,
                           pipeline_layout=True)


@pytest.fixture(scope="module")
def denoiser(model_dir) -> Denoiser:
    return Denoiser(UNetNetwork(load_unet(model_dir)), read_model_spec(model_dir))


def _ours(denoiser, params: SamplerParams, sigmas: torch.Tensor) -> torch.Tensor:
    noise = PerSampleNoise(SEED, INDICES)
    labels = torch.tensor(LABELS)
    x = noise.randn((3, 8, 8)) * params.sigma_max
    with torch.inference_mode():
        return SAMPLERS[params.sampler](lambda x, s: denoiser(x, s, labels), x, sigmas, noise, **params.options())


@pytest.mark.parametrize("ours,theirs,options", [
    ("euler", "sample_euler", {}),
    ("euler", "sample_euler", {"s_churn": 10.0}),
    ("heun", "sample_heun", {}),
    ("heun", "sample_heun", {"s_churn": 10.0, "s_noise": 1.003}),
    ("dpm_2", "sample_dpm_2", {}),
    ("dpm_2", "sample_dpm_2", {"s_churn": 10.0}),
    ("ancestral", "sample_euler_ancestral", {}),
    ("ancestral", "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
])
def test_matches_k_diffusion(kd, denoiser, monkeypatch, ours, theirs, options):
    params = SamplerParams(sampler=ours, steps=6, **options)
    sigmas = karras_sigmas(6).float()  # the same float32 schedule for both
    expected_noise = PerSampleNoise(SEED, INDICES)
    x = expected_noise.randn((3, 8, 8)) * params.sigma_max
    labels = torch.tensor(LABELS)
    monkeypatch.setattr(kd, "torch", _TorchWithNoise(expected_noise))
    kwargs = {k: options[k] for k in options}
    if theirs == "sample_euler_ancestral":
        kwargs["noise_sampler"] = lambda sigma, sigma_next: expected_noise.randn_like(x)
    with torch.inference_mode():
        reference = getattr(kd, theirs)(lambda x, s: denoiser(x, s, labels), x, sigmas, disable=True, **kwargs)
    result = _ours(denoiser, params, sigmas)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params,timesteps", [
    (SamplerParams(sampler="onestep"), None),
    (SamplerParams(sampler="multistep", steps=40, ts=(0, 22, 39)), [22, 0]),
    (SamplerParams(sampler="multistep", steps=40, ts=(0, 10, 20, 30, 39)), [30, 20, 10, 0]),
])
def test_matches_diffusers_consistency_pipeline(model_dir, denoiser, params, timesteps):
    from diffusers import ConsistencyModelPipeline

    pipe = ConsistencyModelPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(sample_seed(SEED, i)) for i in INDICES]
    with torch.inference_mode():
        theirs = pipe(batch_size=len(INDICES), class_labels=LABELS, generator=generators, output_type="pt",
                      num_inference_steps=None if timesteps else 1, timesteps=timesteps).images
        clipped = lambda x, s: denoiser(x, s, torch.tensor(LABELS)).clamp(-1, 1)
        noise = PerSampleNoise(SEED, INDICES)
        ours = params.run(clipped, noise.randn((3, 8, 8)) * params.sigma_max, noise)
    # the pipeline returns (x / 2 + 0.5) clamped to [0, 1]
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=1e-4, atol=1e-4)

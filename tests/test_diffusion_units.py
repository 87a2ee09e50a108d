"""Schedule values, preconditioning, noise streams, sampler parameters, UNet folder loading."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workers.diffusion.denoiser import Denoiser, ModelSpec, read_model_spec
from workers.diffusion.noise import PerSampleNoise, sample_labels, sample_seed
from workers.diffusion.samplers import SAMPLERS, SamplerParams
from workers.diffusion.schedule import (
    ancestral_step,
    boundary_scalings,
    churn_gamma,
    edm_scalings,
    karras_sigmas,
    time_input,
)
from workers.diffusion.tiny import build_tiny_unet
from workers.diffusion.unet import UnsafeCheckpointError, load_unet


# --- schedule -------------------------------------------------------------------------------------

def test_karras_sigmas_values():
    s = karras_sigmas(40)
    assert len(s) == 41 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert torch.all(s[:-1][1:] < s[:-1][:-1])
    # evenly spaced in sigma^(1/rho)
    assert torch.allclose(torch.diff(s[:-1] ** (1 / 7)), torch.full((39,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 39,
                                                                     dtype=torch.float64))
    i = 22  # the middle index of the reference's "0,22,39"
    assert s[i].item() == pytest.approx((80 ** (1 / 7) + i / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    assert len(karras_sigmas(5, append_zero=False)) == 5


def test_karras_sigmas_match_diffusers_scheduler():
    from diffusers import CMStochasticIterativeScheduler

    np.testing.assert_allclose(karras_sigmas(40, append_zero=False).numpy(),
                               CMStochasticIterativeScheduler().sigmas.numpy(), rtol=1e-12)


def test_edm_scalings():
    c_skip, c_out, c_in = edm_scalings(0.5)  # at sigma = sigma_data
    assert c_skip == pytest.approx(0.5) and c_out == pytest.approx(0.5 / math.sqrt(2))
    assert c_in == pytest.approx(1 / math.sqrt(0.5))
    c_skip, c_out, _ = edm_scalings(80.0)
    assert c_skip == pytest.approx(0.25 / 6400.25) and c_out == pytest.approx(40 / math.sqrt(6400.25))


def test_boundary_scalings_make_f_identity_at_sigma_min():
    c_skip, c_out, c_in = boundary_scalings(0.002)
    assert c_skip == 1.0 and c_out == 0.0 and c_in == pytest.approx(1 / math.sqrt(0.002**2 + 0.25))
    c_skip, c_out, _ = boundary_scalings(80.0)
    assert c_skip == pytest.approx(0.25 / (79.998**2 + 0.25))
    assert c_out == pytest.approx(79.998 * 0.5 / math.sqrt(6400.25))


def test_time_conventions():
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    assert torch.allclose(time_input(sigma, "250log"), 250 * torch.log(sigma))
    assert torch.allclose(time_input(sigma, "edm"), 0.25 * torch.log(sigma))
    assert torch.equal(time_input(sigma, "sigma"), sigma)
    with pytest.raises(ValueError, match="time_convention"):
        time_input(sigma, "1000t")


def test_churn_and_ancestral_steps():
    assert churn_gamma(10.0, 41, 0.0, 0.0, math.inf) == 0.0
    assert churn_gamma(10.0, 41, 4.0, 0.0, math.inf) == pytest.approx(0.1)
    assert churn_gamma(10.0, 41, 400.0, 0.0, math.inf) == pytest.approx(math.sqrt(2) - 1)
    assert churn_gamma(10.0, 41, 4.0, 0.05, 5.0) == 0.0
    down, up = ancestral_step(2.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0) and up == pytest.approx(math.sqrt(0.75))
    assert ancestral_step(2.0, 0.0) == (0.0, 0.0)


# --- noise ----------------------------------------------------------------------------------------

def test_per_sample_noise_is_independent_of_batch_composition():
    whole = PerSampleNoise(7, range(6))
    a, b = whole.randn((3, 4, 4)), whole.randn((3, 4, 4))
    part = PerSampleNoise(7, [4, 2])
    torch.testing.assert_close(part.randn((3, 4, 4)), a[[4, 2]], rtol=0, atol=0)
    torch.testing.assert_close(part.randn((3, 4, 4)), b[[4, 2]], rtol=0, atol=0)
    assert not torch.equal(PerSampleNoise(8, [2]).randn((3, 4, 4))[0], a[2])


def test_sample_seeds_and_labels():
    seeds = {sample_seed(s, i) for s in range(20) for i in range(200)}
    assert len(seeds) == 4000 and all(0 <= v < 2**63 for v in seeds)
    labels = sample_labels(3, range(1000), 10)
    assert labels[500:] == sample_labels(3, range(500, 1000), 10)
    assert set(labels) == set(range(10))
    with pytest.raises(ValueError):
        sample_seed(-1, 0)


# --- sampler parameters ---------------------------------------------------------------------------

def test_sampler_params_defaults_and_round_trip():
    p = SamplerParams()
    assert (p.sampler, p.steps, p.sigma_min, p.sigma_max, p.rho) == ("heun", 40, 0.002, 80.0, 7.0)
    q = SamplerParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p and p.to_dict()["s_tmax"] is None
    m = SamplerParams(sampler="multistep", ts="0,22,39")
    assert m.ts == (0, 22, 39) and m.model_evals() == 2
    assert SamplerParams(sampler="euler_ancestral").sampler == "ancestral"


@pytest.mark.parametrize("kwargs,name", [
    ({"sampler": "ddim"}, "sampler"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"sampler": "multistep"}, "ts"),
    ({"sampler": "multistep", "steps": 40, "ts": [0, 40]}, "ts"),
    ({"sampler": "multistep", "steps": 40, "ts": [0, 22, 22]}, "ts"),
    ({"sampler": "multistep", "steps": 40, "ts": [22, 0]}, "ts"),
    ({"sampler": "multistep", "ts": "0,a"}, "ts"),
    ({"sampler": "heun", "ts": [0, 1]}, "ts"),
    ({"sigma_min": 80.0, "sigma_max": 80.0}, "sigma_min"),
    ({"sigma_min": 0.0}, "sigma_min"),
    ({"rho": 0}, "rho"),
    ({"s_churn": -1}, "s_churn"),
    ({"s_noise": "1"}, "s_noise"),
    ({"s_tmin": 5.0, "s_tmax": 1.0}, "s_tmin"),
    ({"clip_denoised": "yes"}, "clip_denoised"),
])
def test_sampler_params_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplerParams(**kwargs)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_model_evals_match_counted_calls(sampler):
    params = SamplerParams(sampler=sampler, steps=7, ts=(0, 3, 6) if sampler == "multistep" else None)
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return x * 0.5

    params.run(denoise, torch.ones(2, 3), PerSampleNoise(0, [0, 1]))
    assert len(calls) == params.model_evals()
    assert all(s > 0 for s in calls)  # the network is never asked about sigma = 0


# --- model folders --------------------------------------------------------------------------------

def test_load_tiny_unet_folder(tmp_path):
    folder = build_tiny_unet(tmp_path / "m", class_conditional=True, image_size=16)
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors",
                                                   "genmill.json"}
    unet = load_unet(folder)
    spec = read_model_spec(folder)
    assert spec == ModelSpec(image_size=16, num_classes=10, distillation=True, time_convention="250log")
    out = unet(torch.zeros(2, 3, 16, 16), torch.tensor([1.0, 2.0]), class_labels=torch.tensor([0, 9])).sample
    assert out.shape == (2, 3, 16, 16)
    again = build_tiny_unet(tmp_path / "m2", class_conditional=True, image_size=16)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), load_unet(again).state_dict().values()))


def test_pipeline_folder_spec_comes_from_the_scheduler(tmp_path):
    folder = build_tiny_unet(tmp_path / "p", class_conditional=False, pipeline_layout=True)
    (folder / "genmill.json").unlink()  # the released checkpoints have no sidecar
    spec = read_model_spec(folder)
    assert spec.distillation and spec.time_convention == "250log" and spec.num_classes is None
    assert read_model_spec(folder, distillation=False).distillation is False
    assert load_unet(folder, dtype="bfloat16").dtype == torch.bfloat16


def test_pickle_only_folder_is_refused(tmp_path):
    folder = build_tiny_unet(tmp_path / "b", class_conditional=False)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_unet(folder)
    (folder / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError):
        load_unet(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(tmp_path)


def test_sidecar_typos_are_errors(tmp_path):
    folder = build_tiny_unet(tmp_path / "s", class_conditional=False)
    (folder / "genmill.json").write_text(json.dumps({"distilation": True}))
    with pytest.raises(ValueError, match="distilation"):
        read_model_spec(folder)


def test_denoiser_eval_batch_pads_without_changing_rows():
    seen = []

    def net(x, t, labels):
        seen.append(x.shape[0])
        return x * t[:, None, None, None]

    spec = ModelSpec(image_size=2, time_convention="sigma")
    x = torch.randn(5, 3, 2, 2)
    padded = Denoiser(net, spec, eval_batch=4)(x, 3.0)
    assert seen == [4, 4]
    torch.testing.assert_close(padded, Denoiser(net, spec)(x, 3.0), rtol=0, atol=0)

"""--model takes a registry name or a checkpoint folder; nothing needs a config edit."""
import json

import pytest

from workers.registry import UnknownModel, detect_engine, resolve_model, spec_for_folder


def folder_with(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_registry_name_maps_to_folder_engine_and_options(tmp_path):
    folder_with(tmp_path, "llama", {"model_type": "llama"})
    reg = tmp_path / "models.toml"
    reg.write_text('[models.small]\npath = "llama"\ndtype = "bfloat16"\nmax_batch_size = 8\n')
    spec = resolve_model("small", reg)
    assert spec.path == (tmp_path / "llama").resolve()
    assert spec.engine == "llm"
    assert spec.options == {"dtype": "bfloat16", "max_batch_size": 8}
    assert spec.queue == "genmill.llm.small"


def test_folder_path_works_without_registry_and_queue_is_stable(tmp_path):
    d = folder_with(tmp_path, "unet", {"_class_name": "UNet2DModel"})
    a, b = resolve_model(str(d), None), spec_for_folder(d)
    assert a.engine == "diffusion" and a.queue == b.queue


def test_engine_detection(tmp_path):
    assert detect_engine(folder_with(tmp_path, "opt", {"model_type": "opt"})) == "llm"
    assert detect_engine(folder_with(tmp_path, "whisper", {"model_type": "whisper"})) == "audio"
    with pytest.raises(UnknownModel, match="bert"):
        detect_engine(folder_with(tmp_path, "bert", {"model_type": "bert"}))


def test_unknown_model_names_what_is_known(tmp_path):
    reg = tmp_path / "models.toml"
    folder_with(tmp_path, "llama", {"model_type": "llama"})
    reg.write_text('[models.small]\npath = "llama"\n')
    with pytest.raises(UnknownModel, match=r"unknown model 'nope'.*small"):
        resolve_model("nope", reg)


def test_registry_entry_with_missing_folder_is_reported(tmp_path):
    reg = tmp_path / "models.toml"
    reg.write_text('[models.gone]\npath = "/does/not/exist"\n')
    with pytest.raises(UnknownModel, match="does not exist"):
        resolve_model("gone", reg)


def test_diffusers_pipeline_folder_is_a_diffusion_model(tmp_path):
    d = tmp_path / "cd-imagenet64"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text('{"_class_name": "ConsistencyModelPipeline"}')
    assert detect_engine(d) == "diffusion"

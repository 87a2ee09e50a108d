"""The model registry: a name maps to a local checkpoint folder, its engine and engine options.

``models.toml``::

    [models.tiny-llama]
    path = "models/tiny-llama"      # relative to this file, or absolute
    engine = "llm"                  # optional: detected from the folder
    dtype = "bfloat16"              # everything else is an engine option
    max_batch_size = 32

``--model`` takes a registry name or a checkpoint folder path, so nothing needs a config edit.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("llm", "diffusion", "audio")
LLM_MODEL_TYPES = {"llama", "mistral", "qwen2", "opt"}
AUDIO_MODEL_TYPES = {"whisper", "seamless_m4t_v2", "seamless_m4t"}


class UnknownModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    engine: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def queue(self) -> str:
        """The Celery queue of this model; a worker serving the model consumes it."""
        return f"genmill.{self.engine}.{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "engine": self.engine, "options": self.options}


def detect_engine(folder: Path) -> str:
    """Tell the engine family from what a checkpoint folder holds."""
    cfg_path = folder / "config.json"
    if (folder / "model_index.json").exists() and (folder / "unet").is_dir():
        return "diffusion"  # a diffusers pipeline folder, as the consistency-model checkpoints ship
    if (folder / "genmill_hibiki.json").exists() or (folder / "lm_config.json").exists():
        return "audio"
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UnknownModel(f"{cfg_path}: unreadable config.json ({e})") from e
        model_type = str(cfg.get("model_type", ""))
        if "dep_q" in cfg and "n_q" in cfg:  # a moshi-format LM config, as Hibiki ships it
            return "audio"
        if model_type in LLM_MODEL_TYPES:
            return "llm"
        if model_type in AUDIO_MODEL_TYPES or model_type == "hibiki":
            return "audio"
        if cfg.get("_class_name") == "UNet2DModel" or (folder / "diffusion_pytorch_model.safetensors").exists():
            return "diffusion"
        raise UnknownModel(f"{folder}: model_type {model_type!r} is not served by any GenMill engine")
    raise UnknownModel(f"{folder}: no config.json, so this is not a checkpoint folder GenMill can load")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def spec_for_folder(folder: Path, options: dict[str, Any] | None = None) -> ModelSpec:
    folder = folder.expanduser().resolve()
    # a folder's queue name must be the same for the producer and the worker: name + path hash
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return ModelSpec(name=f"{_slug(folder.name)}-{digest}", path=folder, engine=detect_engine(folder),
                     options=dict(options or {}))


def load_registry(path: Path | None) -> dict[str, ModelSpec]:
    if path is None or not Path(path).exists():
        return {}
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UnknownModel(f"model registry {path} is not valid TOML: {e}") from e
    specs: dict[str, ModelSpec] = {}
    for name, entry in (doc.get("models") or {}).items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise UnknownModel(f"model registry {path}: [models.{name}] needs a path")
        entry = dict(entry)
        folder = Path(str(entry.pop("path"))).expanduser()
        if not folder.is_absolute():
            folder = (path.parent / folder).resolve()
        engine = entry.pop("engine", None)
        if engine is not None and engine not in ENGINES:
            raise UnknownModel(f"model registry {path}: [models.{name}] engine {engine!r} is not one of {ENGINES}")
        options = entry.pop("options", {}) | entry
        specs[name] = ModelSpec(name=name, path=folder, engine=engine or "", options=options)
    return specs


def resolve_model(ref: str, registry_path: Path | None) -> ModelSpec:
    """A registry name, or a path to a checkpoint folder."""
    registry = load_registry(registry_path)
    if ref in registry:
        spec = registry[ref]
        if not spec.path.is_dir():
            raise UnknownModel(f"model {ref!r}: its folder {spec.path} does not exist")
        if not spec.engine:
            spec = ModelSpec(spec.name, spec.path, detect_engine(spec.path), spec.options)
        return spec
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return spec_for_folder(folder)
    known = ", ".join(sorted(registry)) or "none registered"
    raise UnknownModel(f"unknown model {ref!r}: not a registry name ({known}) and not a checkpoint folder")

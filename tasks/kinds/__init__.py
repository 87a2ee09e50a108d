"""Job kinds by name. A kind module is imported only when a job of that kind is seen."""
from __future__ import annotations

import importlib
from typing import Any

from tasks.kinds.base import JobInvalid

_KINDS = {"prompts": ("tasks.kinds.prompts", "PromptsKind"),
          "images": ("tasks.kinds.images", "ImagesKind"),
          "audio": ("tasks.kinds.audio", "AudioKind")}
# the kind a model's engine serves when a job does not name one
DEFAULT_KIND = {"llm": "prompts", "diffusion": "images", "audio": "audio"}


def get_kind(name: str) -> Any:
    if name not in _KINDS:
        raise JobInvalid(f"unknown job kind {name!r}; expected one of {', '.join(_KINDS)}")
    module, cls = _KINDS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except ModuleNotFoundError as e:
        raise JobInvalid(f"job kind {name!r} is not available in this installation ({e})") from e

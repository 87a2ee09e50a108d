"""The "images" job kind: N samples from a diffusion / consistency model with one sampler.

No input file: the parameters describe the job. Each sample index is one request; a chunk samples
its indices on a ``DiffusionEngine`` and writes them as an npz part; finalize joins the parts into
``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 images, ``arr_1`` int64 labels for class-conditional
models, as consistency_models' image_sample.py writes it) and a PNG grid of the first 64 samples.

Parameters (``validate_params``): num_samples (required), batch_size (16), seed (42), class_labels
(null: random labels drawn from (seed, index); an int: every sample; a list: repeated to
num_samples), and the sampler's: sampler (heun), steps (40), sigma_min, sigma_max, rho, s_churn,
s_tmin, s_tmax, s_noise, eta, ts, clip_denoised (see ``workers.diffusion.samplers.SamplerParams``).
The model's class count comes from ``model_config["num_classes"]`` or, failing that, from the
model folder at ``model_config["_path"]`` (what the flow passes). The num_samples limit is
``model_config["max_samples"]`` (the service's configured limit), else the kind's ``max_samples``.
"""
from __future__ import annotations

import io
import math
import zipfile
from typing import Any

import numpy as np

from tasks.kinds.base import ChunkContext, ChunkResult, FinalizeContext, JobInvalid, ParsedInput
from workers.diffusion.noise import sample_labels
from workers.diffusion.samplers import SamplerParams

GRID_SAMPLES = 64
# "num_classes" is written by validate_params itself (from the model), so normalised params revalidate
_JOB_KEYS = {"num_samples", "batch_size", "seed", "class_labels", "model", "num_classes"}
_SAMPLER_KEYS = set(SamplerParams.__dataclass_fields__)


def _int(params: dict[str, Any], name: str, default: int | None, low: int, high: int | None = None) -> int:
    value = params.get(name, default)
    if value is None:
        raise JobInvalid(f"{name}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobInvalid(f"{name}: must be an integer (got {value!r})")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise JobInvalid(f"{name}: must be {bound} (got {value})")
    return value


def _num_classes(model_config: dict[str, Any]) -> int | None:
    """The model's class count: explicit, else from its folder (the flow passes ``_path`` and the
    registry's ``_options``, which may override the folder's spec), else from a UNet config dict."""
    if "num_classes" in model_config:
        return model_config["num_classes"]
    path = model_config.get("_path") or model_config.get("path")
    if path:
        from workers.diffusion.denoiser import SPEC_FIELDS, read_model_spec

        overrides = {k: v for k, v in (model_config.get("_options") or {}).items() if k in SPEC_FIELDS}
        try:
            return read_model_spec(path, **overrides).num_classes
        except (OSError, ValueError) as exc:
            raise JobInvalid(f"model: cannot read its folder: {exc}") from exc
    if "sample_size" in model_config:  # a UNet2DModel config.json
        return model_config.get("num_class_embeds") if model_config.get("class_embed_type") is None else None
    raise JobInvalid("model: its configuration gives neither num_classes nor a folder")


def _labels(value: Any, num_classes: int | None, num_samples: int) -> int | list[int] | None:
    if value is None:
        return None
    if num_classes is None:
        raise JobInvalid("class_labels: the model is unconditional and takes no class labels")
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > num_samples:
        raise JobInvalid(f"class_labels: give 1 to num_samples={num_samples} labels (got {len(values)})")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_classes:
            raise JobInvalid(f"class_labels: {v!r} is outside the model's classes [0, {num_classes - 1}]")
    return value


class ImagesKind:
    name = "images"
    engine = "diffusion"
    needs_input_file = False

    def __init__(self, max_samples: int = 50_000, max_batch_size: int = 4096) -> None:
        self.max_samples = max_samples
        self.max_batch_size = max_batch_size

    def validate_params(self, params: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - _JOB_KEYS - _SAMPLER_KEYS)
        if unknown:
            raise JobInvalid(f"{', '.join(unknown)}: unknown parameter(s) for an images job")
        # the service passes its configured limit as model_config["max_samples"]
        num_samples = _int(params, "num_samples", None, 1, model_config.get("max_samples", self.max_samples))
        batch_size = _int(params, "batch_size", 16, 1, self.max_batch_size)
        seed = _int(params, "seed", 42, 0, 2**63 - 1)
        try:
            sampler = SamplerParams.from_dict(params)
        except (TypeError, ValueError) as exc:
            raise JobInvalid(str(exc)) from exc
        num_classes = _num_classes(model_config)
        labels = _labels(params.get("class_labels"), num_classes, num_samples)
        out = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed, "class_labels": labels,
               "num_classes": num_classes, **sampler.to_dict()}
        if "model" in params:
            out["model"] = params["model"]
        return out

    def parse(self, data: bytes | None, params: dict[str, Any]) -> ParsedInput:
        n, given, num_classes = params["num_samples"], params.get("class_labels"), params.get("num_classes")
        if num_classes is None:
            labels: list[int | None] = [None] * n
        elif given is None:
            labels = list(sample_labels(params["seed"], range(n), num_classes))
        else:
            pattern = given if isinstance(given, list) else [given]
            labels = [pattern[i % len(pattern)] for i in range(n)]
        return ParsedInput(requests=[{"index": i, "line": i + 1, "label": labels[i]} for i in range(n)])

    def run_chunk(self, engine: Any, requests: list[dict[str, Any]], ctx: ChunkContext,
                  progress: Any = None) -> ChunkResult:
        indices = [r["index"] for r in requests]
        labels = [r["label"] for r in requests] if requests and requests[0]["label"] is not None else None
        run = engine.sample(indices, labels, SamplerParams.from_dict(ctx.params), ctx.params["seed"],
                            ctx.params["batch_size"], progress)
        images = np.stack([o.image for o in run.outcomes])
        part = {"indices": np.asarray(indices, np.int64), "images": images}
        if labels is not None:
            part["labels"] = np.asarray(labels, np.int64)
        buf = io.BytesIO()
        np.savez(buf, **part)
        # one write per (job, chunk): a redelivered chunk overwrites its own part
        ctx.bucket.put_bytes(ctx.part_key("npz"), buf.getvalue())
        results = [{"index": o.index, "label": o.label} for o in run.outcomes]
        return ChunkResult(results=results, errors=[], metrics=run.metrics)

    def finalize(self, ctx: FinalizeContext) -> dict[str, str]:
        parts = []
        for c in range(ctx.num_chunks):
            key = ctx.part_key(c, "npz")
            if ctx.bucket.exists(key):  # a failed chunk leaves no part; the others are still delivered
                with np.load(io.BytesIO(ctx.bucket.get_bytes(key))) as z:
                    parts.append({k: z[k] for k in z.files})
        parts = [p for p in parts if len(p["indices"])]
        if not parts:
            return {}
        parts.sort(key=lambda p: int(p["indices"][0]))
        indices = np.concatenate([p["indices"] for p in parts])
        if np.any(np.diff(indices) <= 0):  # parts overlap or interleave: order every sample by index
            order = np.argsort(indices, kind="stable")
            parts = [{k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}]
        images = [p["images"] for p in parts]
        n, (h, w, c) = len(indices), images[0].shape[1:]
        members = {"arr_0": images}
        if "labels" in parts[0]:
            members["arr_1"] = [p["labels"] for p in parts]
        samples_key = ctx.output_key(f"samples_{n}x{h}x{w}x{c}.npz")
        ctx.bucket.put_bytes(samples_key, npz_bytes(members))
        grid_key = ctx.output_key("samples_grid.png")
        ctx.bucket.put_bytes(grid_key, png_grid(_first(images, GRID_SAMPLES)))
        return {"samples": samples_key, "grid": grid_key}


def _first(parts: list[np.ndarray], n: int) -> np.ndarray:
    out, have = [], 0
    for p in parts:
        if have >= n:
            break
        out.append(p[: n - have])
        have += len(out[-1])
    return np.concatenate(out)


def npz_bytes(members: dict[str, list[np.ndarray]]) -> bytes:
    """An uncompressed .npz (what np.savez writes) whose arrays are the concatenation of their parts.

    Parts are streamed into the archive, so the joined array never exists as a second copy.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, parts in members.items():
            header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False,
                      "shape": (sum(len(p) for p in parts), *parts[0].shape[1:])}
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for p in parts:
                    f.write(np.ascontiguousarray(p, parts[0].dtype).data)
    return buf.getvalue()


def png_grid(images: np.ndarray, pad: int = 2) -> bytes:
    """A near-square grid of uint8 HWC images, ``pad`` black pixels apart, as PNG bytes."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    out = io.BytesIO()
    Image.fromarray(grid).save(out, format="PNG")
    return out.getvalue()


kind = ImagesKind()

"""The images job kind: parameter validation, requests, npz parts, the final npz and PNG grid."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.kinds.base import ChunkContext, FinalizeContext, JobInvalid
from tasks.kinds.images import ImagesKind, npz_bytes, png_grid
from workers.diffusion.engine import DiffusionEngine
from workers.diffusion.noise import sample_labels
from workers.diffusion.tiny import build_tiny_unet

CONDITIONAL = {"num_classes": 10}
UNCONDITIONAL = {"num_classes": None}


class DictBucket(dict):
    def put_bytes(self, key: str, data: bytes) -> None:
        self[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes:
        return self[key]

    def exists(self, key: str) -> bool:
        return key in self


@pytest.mark.parametrize("params,config,name", [
    ({}, CONDITIONAL, "num_samples"),
    ({"num_samples": 0}, CONDITIONAL, "num_samples"),
    ({"num_samples": 101}, CONDITIONAL, "num_samples"),  # above the configured limit (100 here)
    ({"num_samples": 4, "batch_size": 0}, CONDITIONAL, "batch_size"),
    ({"num_samples": 4, "seed": -1}, CONDITIONAL, "seed"),
    ({"num_samples": 4, "sampler": "plms"}, CONDITIONAL, "sampler"),
    ({"num_samples": 4, "steps": 0}, CONDITIONAL, "steps"),
    ({"num_samples": 4, "sampler": "multistep", "steps": 40, "ts": [0, 22, 40]}, CONDITIONAL, "ts"),
    ({"num_samples": 4, "sampler": "multistep", "steps": 40, "ts": [0, 30, 22]}, CONDITIONAL, "ts"),
    ({"num_samples": 4, "sigma_min": 1.0, "sigma_max": 0.5}, CONDITIONAL, "sigma_min"),
    ({"num_samples": 4, "class_labels": 10}, CONDITIONAL, "class_labels"),
    ({"num_samples": 4, "class_labels": [1, -1]}, CONDITIONAL, "class_labels"),
    ({"num_samples": 2, "class_labels": [1, 2, 3]}, CONDITIONAL, "class_labels"),
    ({"num_samples": 4, "class_labels": 1}, UNCONDITIONAL, "class_labels"),
    ({"num_samples": 4, "guidance": 3}, CONDITIONAL, "guidance"),
])
def test_validation_errors_name_the_parameter(params, config, name):
    with pytest.raises(JobInvalid, match=f"^{name}"):
        ImagesKind(max_samples=100).validate_params(params, config)


def test_validation_normalises_and_is_idempotent():
    kind = ImagesKind()
    params = kind.validate_params({"num_samples": 5, "sampler": "multistep", "ts": "0,22,39",
                                   "s_churn": 3.0}, CONDITIONAL)
    assert params["ts"] == [0, 22, 39] and params["batch_size"] == 16 and params["seed"] == 42
    assert "s_churn" not in params  # not a multistep option
    assert kind.validate_params(params, CONDITIONAL) == params


def test_labels_requested_single_or_random():
    kind = ImagesKind()

    def labels(extra: dict) -> list:
        params = kind.validate_params({"num_samples": 5, "seed": 3, **extra}, CONDITIONAL)
        requests = kind.parse(None, params).requests
        assert [(r["index"], r["line"]) for r in requests] == [(i, i + 1) for i in range(5)]
        return [r["label"] for r in requests]

    assert labels({"class_labels": 7}) == [7] * 5
    assert labels({"class_labels": [1, 2]}) == [1, 2, 1, 2, 1]
    assert labels({}) == sample_labels(3, range(5), 10)
    params = kind.validate_params({"num_samples": 3}, UNCONDITIONAL)
    assert [r["label"] for r in kind.parse(None, params).requests] == [None] * 3


@pytest.mark.parametrize("class_conditional", [True, False])
def test_outputs_have_the_reference_names_and_shapes(tmp_path, class_conditional):
    folder = build_tiny_unet(tmp_path / "m", class_conditional=class_conditional)
    engine = DiffusionEngine.load(folder)
    kind = ImagesKind()
    params = kind.validate_params({"num_samples": 10, "batch_size": 4, "sampler": "onestep"},
                                  {"path": str(folder)})
    requests = kind.parse(None, params).requests
    bucket = DictBucket()
    for c, (lo, hi) in enumerate([(0, 6), (6, 10)]):
        result = kind.run_chunk(engine, requests[lo:hi], ChunkContext("j", c, params, bucket))
        assert [r["index"] for r in result.results] == list(range(lo, hi)) and result.errors == []
        assert {m.name for m in result.metrics} >= {"samples_per_s", "model_evals_per_sample"}
    outputs = kind.finalize(FinalizeContext("j", params, bucket, num_chunks=2, total=10))
    assert outputs == {"samples": "jobs/j/outputs/samples_10x8x8x3.npz", "grid": "jobs/j/outputs/samples_grid.png"}
    with np.load(io.BytesIO(bucket[outputs["samples"]])) as z:
        assert z.files == (["arr_0", "arr_1"] if class_conditional else ["arr_0"])
        assert z["arr_0"].shape == (10, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        if class_conditional:
            assert z["arr_1"].tolist() == [r["label"] for r in requests]
    grid = Image.open(io.BytesIO(bucket[outputs["grid"]]))
    assert grid.format == "PNG" and grid.mode == "RGB" and grid.size == (4 * 10 + 2, 3 * 10 + 2)


def test_finalize_skips_a_missing_part_and_orders_by_index():
    kind = ImagesKind()
    bucket = DictBucket()
    params = {"num_samples": 6}
    for c, idx in [(0, [0, 1]), (2, [4, 5])]:  # chunk 1 failed: no part
        buf = io.BytesIO()
        np.savez(buf, indices=np.array(idx), images=np.full((2, 4, 4, 3), idx[0], np.uint8))
        bucket.put_bytes(f"jobs/j/parts/{c:05d}.npz", buf.getvalue())
    outputs = kind.finalize(FinalizeContext("j", params, bucket, num_chunks=3, total=6))
    assert outputs["samples"].endswith("samples_4x4x4x3.npz")
    with np.load(io.BytesIO(bucket[outputs["samples"]])) as z:
        assert z["arr_0"][:, 0, 0, 0].tolist() == [0, 0, 4, 4]
    assert kind.finalize(FinalizeContext("k", params, DictBucket(), num_chunks=2, total=6)) == {}


def test_npz_writer_matches_numpy_and_grid_of_64():
    parts = [np.random.default_rng(i).integers(0, 255, (n, 3, 3, 3), dtype=np.uint8) for i, n in enumerate((5, 1, 9))]
    with np.load(io.BytesIO(npz_bytes({"arr_0": parts, "arr_1": [np.arange(5), np.arange(1), np.arange(9)]}))) as z:
        np.testing.assert_array_equal(z["arr_0"], np.concatenate(parts))
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    grid = Image.open(io.BytesIO(png_grid(np.zeros((64, 8, 8, 3), np.uint8))))
    assert grid.size == (8 * 10 + 2, 8 * 10 + 2)

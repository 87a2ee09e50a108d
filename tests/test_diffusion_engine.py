"""The engine and the images kind together: reproducibility across batch sizes, chunkings and workers."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.kinds.base import ChunkContext, FinalizeContext
from tasks.kinds.images import ImagesKind
from workers.diffusion.engine import DiffusionEngine, stack_images
from workers.diffusion.samplers import SamplerParams
from workers.diffusion.tiny import build_tiny_unet

ROOT = Path(__file__).resolve().parents[1]


class DictBucket(dict):
    def put_bytes(self, key: str, data: bytes) -> None:
        self[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes:
        return self[key]

    def exists(self, key: str) -> bool:
        return key in self


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_unet(tmp_path_factory.mktemp("engine") / "model", class_conditional=True)


@pytest.fixture(scope="module")
def engine(model_dir) -> DiffusionEngine:
    return DiffusionEngine.load(model_dir, eval_batch=4)


def run_job(params: dict, chunks: list[tuple[int, int]], workers: list[DiffusionEngine],
            model_dir: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The flow in miniature: validate, parse, chunks on workers round-robin (last chunk first), finalize."""
    kind = ImagesKind()
    params = kind.validate_params(params, {"path": str(model_dir)})
    requests = kind.parse(None, params).requests
    bucket = DictBucket()
    for c in reversed(range(len(chunks))):
        lo, hi = chunks[c]
        kind.run_chunk(workers[c % len(workers)], requests[lo:hi], ChunkContext("job", c, params, bucket))
    outputs = kind.finalize(FinalizeContext("job", params, bucket, len(chunks), len(requests)))
    with np.load(io.BytesIO(bucket[outputs["samples"]])) as z:
        return z["arr_0"], z["arr_1"] if "arr_1" in z.files else None, outputs


@pytest.mark.parametrize("sampler", [
    {"sampler": "heun", "steps": 3, "s_churn": 5.0},  # fresh noise every step
    {"sampler": "ancestral", "steps": 3},
    {"sampler": "multistep", "steps": 40, "ts": [0, 20, 39]},
])
def test_same_job_same_arrays_whatever_the_batching_chunking_and_workers(model_dir, engine, sampler):
    job = {"num_samples": 11, "seed": 123, **sampler}
    second_worker = DiffusionEngine.load(model_dir, eval_batch=4)
    images, labels, _ = run_job({**job, "batch_size": 11}, [(0, 11)], [engine], model_dir)
    assert images.shape == (11, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
    for batch_size, chunks, workers in [
        (3, [(0, 4), (4, 5), (5, 11)], [engine, second_worker]),
        (1, [(0, 6), (6, 11)], [second_worker]),
        (16, [(i, i + 1) for i in range(11)], [engine, second_worker]),
    ]:
        again, again_labels, _ = run_job({**job, "batch_size": batch_size}, chunks, workers, model_dir)
        np.testing.assert_array_equal(again, images)
        np.testing.assert_array_equal(again_labels, labels)
    other_seed, _, _ = run_job({**job, "seed": 124, "batch_size": 11}, [(0, 11)], [engine], model_dir)
    assert not np.array_equal(other_seed, images)


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: 5-10 s
def test_a_worker_in_another_process_gives_the_same_samples(model_dir, engine):
    params = SamplerParams(sampler="heun", steps=2, s_churn=5.0)
    here = stack_images(engine.sample([5, 6, 7], [1, 2, 3], params, seed=9, batch_size=3).outcomes)
    code = (
        "import json, sys, numpy as np, torch\n"
        "from workers.diffusion.engine import DiffusionEngine, stack_images\n"
        "from workers.diffusion.samplers import SamplerParams\n"
        "torch.set_num_threads(1)\n"
        "e = DiffusionEngine.load(sys.argv[1], eval_batch=4)\n"
        "p = SamplerParams.from_dict(json.loads(sys.argv[2]))\n"
        "sys.stdout.write(json.dumps(stack_images(e.sample([6, 7], [2, 3], p, 9, 1).outcomes).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(model_dir), json.dumps(params.to_dict())],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    np.testing.assert_array_equal(np.array(json.loads(out.stdout), np.uint8), here[1:])


def test_engine_outcomes_metrics_and_progress(engine):
    params = SamplerParams(sampler="heun", steps=3)
    done = []
    run = engine.sample([3, 1, 2], [0, 9, 5], params, seed=0, batch_size=2, progress=done.append)
    assert [o.index for o in run.outcomes] == [3, 1, 2] and [o.label for o in run.outcomes] == [0, 9, 5]
    assert run.outcomes[0].image.shape == (8, 8, 3) and done == [2, 1]
    metrics = {m.name: m.value for m in run.metrics}
    assert set(metrics) == {"samples_per_s", "model_evals_per_sample", "peak_memory_bytes", "wall_s"}
    assert metrics["model_evals_per_sample"] == params.model_evals() == 5
    assert metrics["samples_per_s"] > 0 and metrics["peak_memory_bytes"] > 0
    # without labels a class-conditional model gets the job's seeded random labels
    auto = engine.sample([0, 1], None, params, seed=0)
    assert all(0 <= o.label < 10 for o in auto.outcomes)


def test_engine_rejects_bad_labels(engine, model_dir, tmp_path):
    params = SamplerParams(sampler="onestep")
    with pytest.raises(ValueError, match="labels"):
        engine.sample([0], [10], params, seed=0)
    with pytest.raises(ValueError, match="labels"):
        engine.sample([0, 1], [1], params, seed=0)
    unconditional = DiffusionEngine.load(build_tiny_unet(tmp_path / "u", class_conditional=False))
    assert unconditional.num_classes is None
    with pytest.raises(ValueError, match="labels"):
        unconditional.sample([0], [1], params, seed=0)
    assert unconditional.sample([0], None, params, seed=0).outcomes[0].label is None


def test_bfloat16_engine_runs(model_dir):
    bf16 = DiffusionEngine.load(model_dir, dtype="bfloat16")
    run = bf16.sample([0, 1], [1, 2], SamplerParams(sampler="multistep", ts=(0, 22, 39)), seed=0)
    assert stack_images(run.outcomes).shape == (2, 8, 8, 3)
    bf16.close()
    with pytest.raises(ValueError, match="dtype"):
        DiffusionEngine.load(model_dir, dtype="int8")

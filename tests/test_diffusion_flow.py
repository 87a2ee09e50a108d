"""An images job through the service's own flow, in-process (what ``genmill run`` does)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from storage import repo
from tasks.embedded import run_job
from tasks.flow import open_services
from tasks.settings import Settings
from workers.diffusion.tiny import build_tiny_unet


@pytest.fixture
def svc(tmp_path):
    return open_services(Settings(home=tmp_path / "home", max_requests_per_job=40), migrate=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(build_tiny_unet(tmp_path_factory.mktemp("flow") / "cm8", class_conditional=True))


def test_images_job_end_to_end_and_independent_of_chunk_size(svc, model):
    params = {"num_samples": 10, "batch_size": 4, "sampler": "multistep", "steps": 40, "ts": [0, 22, 39],
              "seed": 7}
    arrays = []
    for chunk_size in (3, 7):
        job = run_job(svc, model=model, params=params, chunk_size=chunk_size, show_progress=False)
        assert job.state == "completed", job.error_message
        assert (job.kind, job.total, job.completed, job.failed) == ("images", 10, 10, 0)
        prefix = f"jobs/{job.id}/outputs/"
        with np.load(io.BytesIO(svc.bucket.get_bytes(prefix + "samples_10x8x8x3.npz"))) as z:
            arrays.append((z["arr_0"], z["arr_1"]))
        assert svc.bucket.get_bytes(prefix + "samples_grid.png")[:8] == b"\x89PNG\r\n\x1a\n"
        lines = [json.loads(x) for x in svc.bucket.get_bytes(job.output_key).splitlines()]
        assert [line["index"] for line in lines] == list(range(10))
        assert [line["label"] for line in lines] == arrays[-1][1].tolist()
        names = {(m.chunk_index, m.name) for m in repo.job_metrics(svc.db, job.id)}
        assert {(0, "samples_per_s"), (0, "model_evals_per_sample"), (0, "peak_memory_bytes")} <= names
    np.testing.assert_array_equal(arrays[0][0], arrays[1][0])
    np.testing.assert_array_equal(arrays[0][1], arrays[1][1])


@pytest.mark.parametrize("params,name", [
    ({"num_samples": 41}, "num_samples"),  # the service's max_requests_per_job is 40 here
    ({"num_samples": 4, "sampler": "multistep", "ts": [0, 40]}, "ts"),
    ({"num_samples": 4, "class_labels": 12}, "class_labels"),
])
def test_bad_parameters_fail_the_job_at_validation(svc, model, params, name):
    job = run_job(svc, model=model, params=params, show_progress=False)
    assert job.state == "failed" and job.error_message.startswith(name), job.error_message

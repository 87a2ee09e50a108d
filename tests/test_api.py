"""The HTTP API: auth, ownership, uploads confined to the bucket, status and downloads."""
import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tasks.flow import execute_chunk
from tasks.settings import Settings


class RunNow:
    """Runs each chunk as it is dispatched: the API's own behaviour without a broker."""

    def __init__(self):
        self.svc = None

    def dispatch(self, job_id, chunk_index, queue):
        execute_chunk(self.svc, job_id, chunk_index)


@pytest.fixture
def client(tmp_path, tiny_llama):
    settings = Settings(home=tmp_path / "home", api_keys="alice-key:alice,bob-key:bob", chunk_size=4)
    dispatcher = RunNow()
    app = create_app(settings, dispatcher=dispatcher)
    dispatcher.svc = app.state.services
    with TestClient(app) as c:
        c.model = str(tiny_llama)
        yield c


def auth(who):
    return {"Authorization": f"Bearer {who}-key"}


def submit(client, who, data=b"one\ntwo\nthree\n", **params):
    r = client.post("/v1/jobs/upload", headers=auth(who), files={"file": ("p.txt", data)},
                    data={"model": client.model, "params": json.dumps({"max_tokens": 3, **params})})
    return r


def test_openapi_and_health_are_served(client):
    assert client.get("/health").json() == {"status": "ok"}
    doc = client.get("/openapi.json").json()
    assert "/v1/jobs" in doc["paths"] and "/v1/jobs/{job_id}/cancel" in doc["paths"]


def test_missing_or_wrong_key_is_refused(client):
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_submit_run_status_and_download(client):
    r = submit(client, "alice")
    assert r.status_code == 201, r.text
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=auth("alice")).json()
    assert job["state"] == "completed"
    assert job["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert job["metrics"]["generated_tokens"]["value"] > 0
    out = client.get(f"/v1/jobs/{job['id']}/output", headers=auth("alice"))
    rows = [json.loads(x) for x in out.text.splitlines()]
    assert [x["custom_id"] for x in rows] == ["line-1", "line-2", "line-3"]
    assert client.get(f"/v1/jobs/{job['id']}/errors", headers=auth("alice")).text == ""


def test_a_key_sees_and_cancels_only_its_own_jobs(client):
    job_id = submit(client, "alice").json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth("bob")).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth("bob")).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/output", headers=auth("bob")).status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth("bob")).json()["data"]] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth("alice")).json()["data"]] == [job_id]


def test_input_keys_are_confined_to_the_bucket_and_the_owner(client):
    key = client.post("/v1/files", headers=auth("alice"), files={"file": ("p.txt", b"hi\n")}).json()["key"]
    assert key.startswith("uploads/alice/")
    body = {"model": client.model, "input_key": key}
    assert client.post("/v1/jobs", headers=auth("bob"), json=body).status_code == 403
    for bad in ("../../etc/passwd", "/etc/passwd", "uploads/alice/../../x"):
        r = client.post("/v1/jobs", headers=auth("alice"), json={**body, "input_key": bad})
        assert r.status_code == 400, bad
    assert client.post("/v1/jobs", headers=auth("alice"), json=body).status_code == 201


def test_bad_job_is_rejected_naming_the_problem(client):
    r = client.post("/v1/jobs/upload", headers=auth("alice"), files={"file": ("p.txt", b"x\n")},
                    data={"model": "missing-model"})
    assert r.status_code == 400 and "unknown model 'missing-model'" in r.json()["detail"]
    r = submit(client, "alice", temperature=9)
    assert r.status_code == 400 and "temperature" in r.json()["detail"]


def test_listing_is_paginated_and_filtered(client):
    ids = [submit(client, "alice").json()["id"] for _ in range(3)]
    first = client.get("/v1/jobs?limit=2", headers=auth("alice")).json()
    assert first["has_more"] and [j["id"] for j in first["data"]] == ids[::-1][:2]
    rest = client.get(f"/v1/jobs?limit=2&after={first['last_id']}", headers=auth("alice")).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert client.get("/v1/jobs?state=failed", headers=auth("alice")).json()["data"] == []


def test_cancelling_a_finished_job_is_a_conflict(client):
    job_id = submit(client, "alice").json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice"))
    assert r.status_code == 409 and "completed" in r.json()["detail"]


def test_api_refuses_to_start_without_keys(tmp_path):
    with pytest.raises(RuntimeError, match="GENMILL_API_KEYS"):
        create_app(Settings(home=tmp_path), dispatcher=RunNow())

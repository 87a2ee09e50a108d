"""The job flow in-process (the embedded mode): what a user of ``genmill run`` relies on."""
import json

import pytest

from storage import repo
from tasks.embedded import InlineDispatcher, run_job
from tasks.flow import ChunkFailed, cancel_job, execute_chunk, open_services, submit_job
from tasks.settings import Settings
from workers import model_cache


@pytest.fixture
def svc(tmp_path):
    return open_services(Settings(home=tmp_path / "home", chunk_size=8, max_attempts=3), migrate=True)


def jsonl_line(cid, prompt, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, **body}})


def read_jsonl(svc, key):
    return [json.loads(x) for x in svc.bucket.get_bytes(key).decode().splitlines() if x.strip()]


def test_prompt_job_keeps_input_order_and_fails_only_bad_lines(svc, tiny_llama):
    lines = [jsonl_line(f"r{i}", f"story number {i} begins") for i in range(30)]
    lines[4] = '{"custom_id": "broken", '  # invalid JSON
    lines[11] = jsonl_line("r3", "duplicate id")  # duplicate custom_id
    lines[20] = jsonl_line("r20", "word " * 400)  # longer than the model's context
    job = run_job(svc, model=str(tiny_llama), input_bytes="\n".join(lines).encode(), show_progress=False)
    assert job.state == "completed", job.error_message
    assert (job.total, job.completed, job.failed) == (30, 27, 3)
    out = read_jsonl(svc, job.output_key)
    expected = [f"r{i}" for i in range(30) if i not in (4, 11, 20)]
    assert [o["custom_id"] for o in out] == expected
    first = out[0]["response"]
    assert first["status_code"] == 200
    assert first["body"]["object"] == "text_completion"
    usage = first["body"]["usage"]
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    errors = read_jsonl(svc, job.error_key)
    assert [(e["line"], e["error"]["code"]) for e in errors] == [
        (5, "invalid_json"), (12, "duplicate_custom_id"), (21, "prompt_too_long")]
    names = {(m.chunk_index, m.name) for m in repo.job_metrics(svc.db, job.id)}
    for chunk in range(job.num_chunks):
        assert (chunk, "generated_tokens") in names and (chunk, "decode_tokens_per_s") in names
    assert (None, "generated_tokens") in names and (None, "job_tokens_per_s") in names


def test_same_seed_gives_same_samples_whatever_the_chunk_size(svc, tiny_llama):
    data = "\n".join(f"prompt {i} about rivers" for i in range(10)).encode()
    params = {"temperature": 1.0, "max_tokens": 8, "seed": 99}
    texts = []
    for size in (3, 7):
        job = run_job(svc, model=str(tiny_llama), input_bytes=data, params=params, chunk_size=size,
                      show_progress=False)
        texts.append([o["response"]["body"]["choices"][0]["text"] for o in read_jsonl(svc, job.output_key)])
    assert texts[0] == texts[1]
    other = run_job(svc, model=str(tiny_llama), input_bytes=data, params={**params, "seed": 100}, show_progress=False)
    assert [o["response"]["body"]["choices"][0]["text"] for o in read_jsonl(svc, other.output_key)] != texts[0]


def test_redelivered_chunk_overwrites_its_part_and_metrics(svc, tiny_llama):
    data = "\n".join(f"prompt {i}" for i in range(12)).encode()
    d = InlineDispatcher()
    job = submit_job(svc, d, model=str(tiny_llama), input_bytes=data, params={"max_tokens": 4}, chunk_size=6)
    # a worker claims chunk 0, writes a part, then dies before finishing
    assert repo.claim_chunk(svc.db, job.id, 0, "dead-worker", 3).action == "run"
    svc.bucket.put_bytes(f"jobs/{job.id}/parts/00000.results.jsonl", b'{"stale": true}\n')
    repo.record_metrics(svc.db, job.id, 0, [("generated_tokens", 999.0, "tokens")])
    for job_id, index in d.pending:  # the broker redelivers chunk 0, then chunk 1 runs
        assert execute_chunk(svc, job_id, index) == "done"
    final = repo.get_job(svc.db, job.id)
    assert final.state == "completed" and final.completed == 12
    out = read_jsonl(svc, final.output_key)
    assert [o["custom_id"] for o in out] == [f"line-{i}" for i in range(1, 13)]
    chunk0 = [m for m in repo.job_metrics(svc.db, job.id) if m.chunk_index == 0 and m.name == "generated_tokens"]
    assert len(chunk0) == 1 and chunk0[0].value != 999.0
    assert repo.get_chunk(svc.db, job.id, 0).attempts == 2


def test_failing_chunk_is_retried_then_fails_its_items_only(svc, tiny_llama, monkeypatch):
    data = "\n".join(f"prompt {i}" for i in range(16)).encode()
    d = InlineDispatcher()
    job = submit_job(svc, d, model=str(tiny_llama), input_bytes=data, params={"max_tokens": 3}, chunk_size=8)
    real_get = model_cache.get_engine

    class Exploding:
        def generate(self, requests, progress=None):
            raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(model_cache, "get_engine", lambda *a, **k: Exploding())
    for _ in range(2):  # attempts 1 and 2 ask for a retry
        with pytest.raises(ChunkFailed):
            execute_chunk(svc, job.id, 0)
    assert execute_chunk(svc, job.id, 0) == "failed"  # attempt 3 is the last
    monkeypatch.setattr(model_cache, "get_engine", real_get)
    assert execute_chunk(svc, job.id, 1) == "done"
    final = repo.get_job(svc.db, job.id)
    assert final.state == "completed" and (final.completed, final.failed) == (8, 8)
    errors = read_jsonl(svc, final.error_key)
    assert [e["line"] for e in errors] == list(range(1, 9))
    assert all("device-side assert" in e["error"]["message"] for e in errors)


def test_job_whose_every_chunk_fails_is_failed_with_the_reason(svc, tiny_llama, monkeypatch):
    svc.settings.max_attempts = 1

    class Exploding:
        def generate(self, requests, progress=None):
            raise MemoryError("out of memory")

    monkeypatch.setattr(model_cache, "get_engine", lambda *a, **k: Exploding())
    job = run_job(svc, model=str(tiny_llama), input_bytes=b"a\nb\n", show_progress=False)
    assert job.state == "failed" and "out of memory" in job.error_message


def test_cancel_stops_queued_chunks_and_keeps_finished_results(svc, tiny_llama):
    data = "\n".join(f"prompt {i}" for i in range(24)).encode()
    d = InlineDispatcher()
    job = submit_job(svc, d, model=str(tiny_llama), input_bytes=data, params={"max_tokens": 3}, chunk_size=8)
    assert execute_chunk(svc, job.id, 0) == "done"
    assert cancel_job(svc, job.id)
    assert execute_chunk(svc, job.id, 1) == "skipped"
    final = repo.get_job(svc.db, job.id)
    assert final.state == "cancelled"
    assert [o["custom_id"] for o in read_jsonl(svc, final.output_key)] == [f"line-{i}" for i in range(1, 9)]
    assert not cancel_job(svc, job.id)  # a finished job cannot be cancelled again


@pytest.mark.parametrize("model, data, message", [
    ("no-such-model", b"hello\n", "unknown model 'no-such-model'"),
    (None, b"\n\n", "empty"),
    (None, b"\xff\xfe", "UTF-8"),
])
def test_bad_job_fails_at_validation_with_a_clear_message(svc, tiny_llama, model, data, message):
    job = run_job(svc, model=model or str(tiny_llama), input_bytes=data, show_progress=False)
    assert job.state == "failed" and message in job.error_message
    assert repo.get_job(svc.db, job.id).num_chunks == 0


def test_all_lines_bad_completes_with_only_errors(svc, tiny_llama):
    job = run_job(svc, model=str(tiny_llama), input_bytes=b'{"custom_id": 1}\n{bad\n', show_progress=False)
    assert job.state == "completed" and (job.completed, job.failed) == (0, 2)
    assert len(read_jsonl(svc, job.error_key)) == 2


def test_flow_on_an_s3_bucket(tmp_path, s3_endpoint, tiny_llama):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="genmill-flow")
    svc = open_services(Settings(home=tmp_path / "home", chunk_size=3, bucket_url="s3://genmill-flow/prod",
                                 s3_endpoint_url=s3_endpoint), migrate=True)
    data = "\n".join(["p1", "p2", '{"bad', "p4", "p5", "p6", "p7"]).encode()
    job = run_job(svc, model=str(tiny_llama), input_bytes=data, params={"max_tokens": 3, "format": "text"},
                  show_progress=False)
    assert job.state == "completed" and (job.completed, job.failed) == (7, 0)
    assert [o["custom_id"] for o in read_jsonl(svc, job.output_key)] == [f"line-{i}" for i in range(1, 8)]
    assert job.output_key.startswith("jobs/") and svc.bucket.exists(job.output_key)


def test_job_past_its_completion_window_expires_keeping_finished_work(svc, tiny_llama):
    from datetime import datetime, timedelta, timezone

    data = "\n".join(f"prompt {i}" for i in range(16)).encode()
    d = InlineDispatcher()
    job = submit_job(svc, d, model=str(tiny_llama), input_bytes=data, params={"max_tokens": 3}, chunk_size=8)
    assert execute_chunk(svc, job.id, 0) == "done"
    repo.update_job(svc.db, job.id, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert execute_chunk(svc, job.id, 1) == "skipped"  # the window passed before chunk 1 ran
    final = repo.get_job(svc.db, job.id)
    assert final.state == "expired"
    assert (final.completed, final.failed) == (8, 0)
    assert len(read_jsonl(svc, final.output_key)) == 8


def test_registry_engine_options_reach_the_engine_speculative_draft_by_name(tmp_path, tiny_llama):
    """A registry entry can name its draft model by registry name; greedy output is the target's."""
    registry = tmp_path / "models.toml"
    registry.write_text(f'[models.plain]\npath = "{tiny_llama}"\n\n'
                        f'[models.fast]\npath = "{tiny_llama}"\ndraft_model = "plain"\nspeculate_k = 3\n')
    svc = open_services(Settings(home=tmp_path / "home", registry=registry, chunk_size=4), migrate=True)
    data = "\n".join(f"the mill by river number {i}" for i in range(6)).encode()
    texts = {}
    for name in ("plain", "fast"):
        job = run_job(svc, model=name, input_bytes=data, params={"max_tokens": 8, "temperature": 0},
                      show_progress=False)
        assert job.state == "completed", job.error_message
        texts[name] = [o["response"]["body"]["choices"][0]["text"] for o in read_jsonl(svc, job.output_key)]
        metrics = {m.name for m in repo.job_metrics(svc.db, job.id) if m.chunk_index is None}
    assert texts["fast"] == texts["plain"]
    assert "acceptance_rate" in metrics  # the speculative engine served the second job

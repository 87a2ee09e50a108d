"""End to end through the real parts: the API process, two `genmill worker` processes, Redis and
PostgreSQL (started by the tests on free ports), and a local bucket folder shared by all."""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from api.client import Client
from tests.servers import free_port

pytestmark = pytest.mark.slow


def jsonl(cid, prompt, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, **body}})


def prompt_file(path):
    lines = [jsonl(f"req-{i:03d}", f"request {i} tells a story about the sea") for i in range(300)]
    bad = {17: '{"custom_id": "req-017", "body": ',  # invalid JSON
           60: jsonl("req-060", "wrong type", max_tokens="many"),
           123: jsonl("req-001", "duplicate custom_id"),
           200: jsonl("req-200", "long " * 400),  # longer than the model's context
           288: json.dumps({"custom_id": "req-288", "method": "POST", "url": "/v1/embeddings", "body": {}})}
    for i, line in bad.items():
        lines[i] = line
    path.write_text("\n".join(lines) + "\n")
    return sorted(bad)


def wait_for(predicate, timeout, what, every=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def service(tmp_path, redis_url, postgres_server, tiny_llama, request):
    postgres_url = postgres_server.create_database(f"e2e_{os.getpid()}_{time.monotonic_ns()}")
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(f'[models.tiny]\npath = "{tiny_llama}"\nmax_batch_size = 16\n')
    env = {**os.environ, "GENMILL_HOME": str(home), "GENMILL_DATABASE_URL": postgres_url,
           "GENMILL_BROKER_URL": redis_url, "GENMILL_BUCKET_URL": (tmp_path / "bucket").as_uri(),
           "GENMILL_API_KEYS": "test-key:tester", "OMP_NUM_THREADS": "1",
           **getattr(request, "param", {})}
    genmill = [sys.executable, "-m", "api.cli"]
    subprocess.run([*genmill, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    procs, logs = [], []

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([*genmill, *args], env=env, stdout=log, stderr=subprocess.STDOUT))
        return log

    start(["api", "--port", str(port)], "api")
    worker_logs = [start(["worker", "--device", "cpu", "--threads", "1", "--name", f"w{i}@test",
                                  "--models", "tiny"], f"w{i}")
                   for i in (1, 2)]
    try:
        client = Client(f"http://127.0.0.1:{port}", "test-key")

        def api_up():
            try:
                return client.http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(api_up, 60, "the API")
        for log in worker_logs:
            wait_for(lambda path=log.name: "ready" in open(path).read(), 90, "a worker")
        yield client, postgres_url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


def test_prompt_file_through_api_two_workers_redis_and_postgres(service, tmp_path):
    client, db_url = service
    path = tmp_path / "prompts.jsonl"
    bad = prompt_file(path)
    job = client.submit("tiny", path, chunk_size=25, metadata={"team": "e2e"})
    assert job["state"] in ("queued", "in_progress")
    done = client.wait(job["id"], poll_s=0.5, timeout=300)
    assert done["state"] == "completed", done
    assert done["request_counts"] == {"total": 300, "completed": 295, "failed": 5}

    out = [json.loads(x) for x in b"".join(client.download(job["id"], "output")).decode().splitlines()]
    expected = [f"req-{i:03d}" for i in range(300) if i not in bad]
    assert [o["custom_id"] for o in out] == expected  # input order
    assert all(o["response"]["status_code"] == 200 for o in out)
    errors = [json.loads(x) for x in b"".join(client.download(job["id"], "errors")).decode().splitlines()]
    assert [e["line"] for e in errors] == [i + 1 for i in bad]

    engine = create_engine(db_url.replace("postgresql+psycopg", "postgresql+psycopg"))
    with engine.connect() as c:
        row = c.execute(text("select state, total, completed, failed, num_chunks from jobs where id = :id"),
                        {"id": job["id"]}).one()
        assert tuple(row) == ("completed", 300, 295, 5, 12)
        workers = {w for (w,) in c.execute(text("select distinct worker from chunks where job_id = :id"),
                                           {"id": job["id"]})}
        assert workers == {"w1@test", "w2@test"}  # both workers took chunks
        metric_chunks = c.execute(text("select count(distinct chunk_index) from metrics where job_id = :id "
                                       "and name = 'generated_tokens' and chunk_index is not null"),
                                  {"id": job["id"]}).scalar()
        assert metric_chunks == 12
        job_tokens = c.execute(text("select value from metrics where job_id = :id and chunk_index is null "
                                    "and name = 'generated_tokens'"), {"id": job["id"]}).scalar()
        assert job_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    engine.dispose()


@pytest.fixture
def lone_worker(tmp_path, redis_url, postgres_server, tiny_llama):
    """API-less set-up for the crash test: env, and a way to start workers."""
    home = tmp_path / "home"
    home.mkdir()
    # one row at a time, so that a chunk of the tiny model lasts long enough (~0.5 s) to be killed
    # in the middle
    (home / "models.toml").write_text(f'[models.tiny]\npath = "{tiny_llama}"\nmax_batch_size = 1\n')
    db_url = postgres_server.create_database(f"crash_{os.getpid()}_{time.monotonic_ns()}")
    env = {**os.environ, "GENMILL_HOME": str(home), "GENMILL_DATABASE_URL": db_url,
           "GENMILL_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/3", "GENMILL_BUCKET_URL": (tmp_path / "bucket").as_uri(),
           "GENMILL_VISIBILITY_TIMEOUT": "4", "OMP_NUM_THREADS": "1"}
    procs = []

    def start(name):
        log = tmp_path / f"{name}.log"
        p = subprocess.Popen([sys.executable, "-m", "api.cli", "worker", "--device", "cpu", "--threads", "1",
                              "--name", f"{name}@test", "--models", "tiny"], env=env,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(p)
        wait_for(lambda: "ready" in log.read_text(), 90, f"worker {name}")
        return p

    subprocess.run([sys.executable, "-m", "api.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    yield env, start, db_url
    for p in procs:
        p.kill()
        p.wait()


def test_a_killed_worker_loses_no_work(lone_worker, tmp_path):
    """SIGKILL a worker in the middle of a chunk: the unacknowledged chunk comes back after the
    visibility timeout, another worker runs it, and the output has every request exactly once."""
    env, start, db_url = lone_worker
    victim = start("victim")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} about the old mill\n" for i in range(24)))
    out = subprocess.run([sys.executable, "-m", "api.cli", "submit", str(prompts), "--model", "tiny",
                          "--max-tokens", "200", "--temperature", "0", "--chunk-size", "8", "--json"],
                         env=env, capture_output=True, text=True, check=True)
    job_id = json.loads(out.stdout)["id"]
    engine = create_engine(db_url)

    def running():
        with engine.connect() as c:
            return c.execute(text("select count(*) from chunks where job_id = :id and state = 'running'"),
                             {"id": job_id}).scalar() > 0

    wait_for(running, 60, "a running chunk", every=0.05)
    victim.kill()  # no warm shutdown: the message stays unacknowledged in Redis
    victim.wait()
    start("rescuer")
    done = subprocess.run([sys.executable, "-m", "api.cli", "wait", job_id, "--json", "-q", "--timeout", "180"],
                          env=env, capture_output=True, text=True)
    view = json.loads(done.stdout)
    assert view["state"] == "completed", done.stderr
    assert view["request_counts"] == {"total": 24, "completed": 24, "failed": 0}
    with engine.connect() as c:
        attempts = dict(c.execute(text("select index, attempts from chunks where job_id = :id"), {"id": job_id}).all())
    assert max(attempts.values()) == 2  # the killed chunk ran again, once
    results = subprocess.run([sys.executable, "-m", "api.cli", "results", job_id, "--output", str(tmp_path / "r")],
                             env=env, capture_output=True, text=True, check=True)
    assert results.returncode == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "output.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"line-{i}" for i in range(1, 25)]
    engine.dispose()

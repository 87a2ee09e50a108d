"""Queue overhead: the same prompt job in-process (the embedded mode of ``genmill run``) and through
Redis + PostgreSQL with one ``genmill worker`` process, on the tiny model. Prints the ratio
service / in-process of the wall time from submit to the job's end.

    python -m bench.queue_overhead [--prompts 2000] [--chunk-size 64] [--repeats 2]

Both sides time only the job, from submit to the end the SQL store records for it: the model is
loaded and warmed (one small job) beforehand in each, so the ratio is the cost of the queue, the SQL
store and the bucket round trips. Runs alternate and
the best of each is kept, because this 2-core machine is shared. Starts its own Redis and
PostgreSQL on free ports. Target: ratio <= 1.15. Writes the "Queue overhead" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section
from tests.servers import PostgresServer, RedisServer

POLL_S = 0.5


def prompts(n: int) -> bytes:
    return "".join(f"request {i}: tell me about the river and the old mill\n" for i in range(n)).encode()


def time_job(svc, submit, data: bytes, max_tokens: int) -> tuple[float, str]:
    """Seconds from submit to the job's end as the store records it (``finished_at``, written by
    whichever process finalized the job). The service side is watched by polling, but slowly and
    off the clock: on 2 cores a fast poll loop takes CPU from the worker it is timing."""
    from storage import repo

    params = {"max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.time()
    job = submit(data, params)
    while job.state not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(POLL_S)
        job = repo.get_job(svc.db, job.id)
    if job.state != "completed" or job.completed != data.count(b"\n"):
        raise RuntimeError(f"job {job.id} ended {job.state}: {job.error_message}")
    finished = job.finished_at if job.finished_at.tzinfo else job.finished_at.replace(tzinfo=UTC)
    return finished.timestamp() - t0, job.id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[64, 8],
                    help="one run per value: 64 is a prompt job's default, 8 stresses the queue")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from tasks.embedded import run_job
    from tasks.flow import open_services, submit_job
    from tasks.settings import Settings, reset_settings
    from workers import model_cache
    from workers.llm.tiny import build_tiny_checkpoint
    from workers.registry import resolve_model

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis, PostgresServer() as pg:
        tmp_path = Path(tmp)
        model = str(build_tiny_checkpoint(tmp_path / "tiny", arch="llama"))
        data, warm = prompts(args.prompts), prompts(64)

        local = open_services(Settings(home=tmp_path / "embedded", chunk_size=args.chunk_size), migrate=True)
        model_cache.get_engine(resolve_model(model, None), "cpu")

        def submit_local(d: bytes, params: dict) -> object:
            return run_job(local, model=model, input_bytes=d, params=params, show_progress=False)

        env = {**os.environ, "GENMILL_HOME": str(tmp_path / "service"), "GENMILL_BROKER_URL": redis.url,
               "GENMILL_DATABASE_URL": pg.url(), "GENMILL_BUCKET_URL": (tmp_path / "bucket").as_uri(),
               "GENMILL_CHUNK_SIZE": str(args.chunk_size)}
        os.environ.update({k: v for k, v in env.items() if k.startswith("GENMILL_")})
        reset_settings()
        from tasks.worker_tasks import CeleryDispatcher

        remote = open_services(Settings(), migrate=True)
        (tmp_path / "service").mkdir(exist_ok=True)
        log_path = tmp_path / "worker.log"
        with open(log_path, "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "api.cli", "worker", "--device", "cpu", "--models", model],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 120
                while "ready" not in log_path.read_text():
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise RuntimeError(log_path.read_text()[-3000:])
                    time.sleep(0.2)

                def submit_remote(d: bytes, params: dict) -> object:
                    return submit_job(remote, CeleryDispatcher(), model=model, input_bytes=d, params=params)

                runs: dict[int, tuple[list[float], list[float]]] = {}
                for max_tokens in args.max_tokens:
                    time_job(local, submit_local, warm, max_tokens)  # warm both sides the same way
                    time_job(remote, submit_remote, warm, max_tokens)
                    embedded, service = [], []
                    for _ in range(args.repeats):
                        embedded.append(time_job(local, submit_local, data, max_tokens)[0])
                        service.append(time_job(remote, submit_remote, data, max_tokens)[0])
                    runs[max_tokens] = (embedded, service)
            finally:
                worker.terminate()
                worker.wait(timeout=30)

    chunks = -(-args.prompts // args.chunk_size)
    lines = [(f"- job: {args.prompts} prompts, chunk size {args.chunk_size} ({chunks} chunks), greedy, tiny random "
              "Llama, CPU; both sides had the model loaded and warmed by a 64-prompt job first; runs alternate "
              "on a shared 2-core machine, best of each kept; each time runs from submit to the job's "
              "finished_at in SQL (the service side is polled twice a second, off the clock)"), "",
             "| new tokens a request | in-process (s) | Redis + PostgreSQL + 1 worker (s) | ratio | overhead per chunk |",
             "| --- | --- | --- | --- | --- |"]
    for max_tokens, (embedded, service) in runs.items():
        best_e, best_s = min(embedded), min(service)
        lines.append(f"| {max_tokens} | {best_e:.2f} ({', '.join(f'{t:.2f}' for t in embedded)}) | "
                     f"{best_s:.2f} ({', '.join(f'{t:.2f}' for t in service)}) | **{best_s / best_e:.2f}** | "
                     f"{(best_s - best_e) / chunks * 1000:.1f} ms |")
    lines += ["", ("Target: ratio <= 1.15. The overhead is a fixed cost per chunk (a Celery delivery and its result "
                   "records in Redis, the chunk's claim and finish transactions in PostgreSQL instead of SQLite), so "
                   "its share falls as chunks do more work.")]
    print("\n".join(lines))
    write_section("Queue overhead", "\n".join(lines))


if __name__ == "__main__":
    main()

"""Queue overhead: the same prompt job run in-process (``genmill run``) and through Redis with one
worker process, on the tiny model. Prints the ratio (service wall time / in-process wall time).

    python -m bench.queue_overhead [--prompts 2000] [--chunk-size 64]

Starts its own Redis and PostgreSQL on free ports (tests/servers.py), so it needs their binaries.
Target: ratio <= 1.15. Figures go to bench/RESULTS.md (section "Queue overhead").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section
from tests.servers import PostgresServer, RedisServer


def prompts(n: int) -> bytes:
    return "".join(f"request {i}: tell me about the river and the old mill\n" for i in range(n)).encode()


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "GENMILL_HOME": str(home), **extra}


def run_embedded(model: Path, data: Path, home: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "api.cli", "run", str(data), "--model", str(model), "--output", str(home / "out"),
           "--max-tokens", str(args.max_tokens), "--temperature", "0", "--chunk-size", str(args.chunk_size),
           "--json", "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env_for(home), check=True, capture_output=True)
    return time.perf_counter() - t0


def run_service(model: Path, data: Path, home: Path, args: argparse.Namespace) -> float:
    with RedisServer() as redis, PostgresServer() as pg:
        env = env_for(home, GENMILL_BROKER_URL=redis.url, GENMILL_DATABASE_URL=pg.url(),
                      GENMILL_BUCKET_URL=(home / "bucket").as_uri())
        cli = [sys.executable, "-m", "api.cli"]
        subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
        log = open(home / "worker.log", "w")
        worker = subprocess.Popen([*cli, "worker", "--device", "cpu", "--models", str(model)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "ready" not in (home / "worker.log").read_text():
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError((home / "worker.log").read_text()[-3000:])
                time.sleep(0.2)
            # timed like the embedded run: from submit (a new process) until the job has ended
            t0 = time.perf_counter()
            out = subprocess.run([*cli, "submit", str(data), "--model", str(model), "--max-tokens",
                                  str(args.max_tokens), "--temperature", "0", "--chunk-size", str(args.chunk_size),
                                  "--json"], env=env, check=True, capture_output=True, text=True)
            import json

            job_id = json.loads(out.stdout)["id"]
            subprocess.run([*cli, "wait", job_id, "--json", "-q"], env=env, check=True, capture_output=True)
            return time.perf_counter() - t0
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    from workers.llm.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = build_tiny_checkpoint(tmp_path / "tiny", arch="llama")
        data = tmp_path / "prompts.txt"
        data.write_bytes(prompts(args.prompts))
        embedded = run_embedded(model, data, tmp_path / "embedded", args)
        service = run_service(model, data, tmp_path / "service", args)
    ratio = service / embedded
    lines = [(f"- job: {args.prompts} prompts, chunk size {args.chunk_size}, {args.max_tokens} new tokens, "
              "greedy, tiny random Llama, CPU"),
             f"- in-process (`genmill run`): {embedded:.1f} s",
             f"- through Redis + PostgreSQL, one worker (`genmill submit` + `genmill wait`): {service:.1f} s",
             f"- ratio service / in-process: **{ratio:.2f}** (target <= 1.15)",
             "- both timings include starting the CLI process; the worker's model load happens before submit"]
    print("\n".join(lines))
    write_section("Queue overhead", "\n".join(lines))


if __name__ == "__main__":
    main()

"""The SQL store on SQLite and PostgreSQL: migrations, engines, and the repository functions."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage import repo
from storage.db import (
    current_revision,
    downgrade,
    get_engine,
    head_revision,
    make_engine,
    normalize_url,
    upgrade,
)
from storage.models import Base, ChunkState, JobState
from workers.engine import Metric

DB = sessionmaker[Session]
TABLES = {"jobs", "chunks", "metrics"}


def new_job(db: DB, job_id: str = "job_1", **kw: Any) -> Any:
    args: dict[str, Any] = {
        "id": job_id,
        "kind": "prompts",
        "model": "tiny",
        "params": {"max_tokens": 8},
        "owner": "alice",
        "input_key": f"jobs/{job_id}/input",
        "metadata": {"tag": "x"},
        "expires_at": None,
        **kw,
    }
    return repo.create_job(db, **args)


def run_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released together; return the results (re-raising errors)."""
    barrier = threading.Barrier(n)

    def body(i: int) -> Any:
        barrier.wait(10)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(body, range(n)))


# --- migrations and engines ------------------------------------------------------------------


def test_migrated_schema_matches_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
            assert ctx.get_current_revision() == head_revision()
            conn.rollback()  # end the comparison's implicit transaction
            # the comparison does see differences: drop an index and look again
            with conn.begin():
                conn.execute(text("DROP INDEX ix_jobs_owner_created"))
                diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
                assert [d[0] for d in diffs] == ["add_index"]
                conn.rollback()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_reversible(empty_db_url: str) -> None:
    url = empty_db_url
    assert current_revision(url) is None
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision()
    engine = make_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        downgrade(url, "base")
        assert TABLES.isdisjoint(inspect(engine).get_table_names())
        assert current_revision(url) is None
        upgrade(url)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_concurrent_first_run_migrates_once(empty_db_url: str) -> None:
    # embedded mode: the API and a worker may both call ensure_schema on a fresh database
    run_threads(4, lambda _: upgrade(empty_db_url))
    assert current_revision(empty_db_url) == head_revision()


def test_url_normalisation_and_engine_cache(tmp_path: Path) -> None:
    for url in ("postgres://u:p@h:5432/d", "postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"):
        assert normalize_url(url).drivername == "postgresql+psycopg"
        assert normalize_url(url).database == "d"
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}"
    engine = get_engine(url)
    assert get_engine(url) is engine
    assert (tmp_path / "a" / "b").is_dir()  # the parent folder is created
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    engine.dispose()


# --- jobs ------------------------------------------------------------------------------------


def test_job_lifecycle(db: DB) -> None:
    cest = timezone(timedelta(hours=2))
    expires = datetime(2030, 1, 2, 12, 0, tzinfo=cest)
    job = new_job(db, expires_at=expires)
    assert job.state == JobState.validating
    assert job.params == {"max_tokens": 8} and job.metadata_ == {"tag": "x"}
    assert job.created_at.tzinfo is not None and job.started_at is None

    got = repo.get_job(db, "job_1")
    assert got is not None and got.owner == "alice" and got.input_key == "jobs/job_1/input"
    # the same instant, in UTC, on both stores (SQLite has no timezone type)
    assert got.expires_at == expires and got.expires_at.utcoffset() == timedelta(0)
    assert got.expires_at < datetime(2031, 1, 1, tzinfo=UTC)
    assert repo.get_job(db, "nope") is None

    repo.update_job(db, "job_1", total=10, num_chunks=2, metadata={"tag": "y"}, output_key="o")
    got = repo.get_job(db, "job_1")
    assert (got.total, got.num_chunks, got.metadata_, got.output_key) == (10, 2, {"tag": "y"}, "o")
    with pytest.raises(ValueError, match="bogus"):
        repo.update_job(db, "job_1", bogus=1)
    with pytest.raises(repo.JobNotFound):
        repo.update_job(db, "nope", total=1)
    with pytest.raises(IntegrityError):
        new_job(db)  # duplicate id

    assert repo.set_job_state(db, "job_1", JobState.queued, only_from=[JobState.validating])
    assert repo.set_job_state(db, "job_1", "in_progress", only_from=["queued"])
    started = repo.get_job(db, "job_1").started_at
    assert started is not None and repo.get_job(db, "job_1").finished_at is None
    assert repo.set_job_state(db, "job_1", "finalizing")
    assert repo.set_job_state(db, "job_1", "completed", only_from=["finalizing"])
    done = repo.get_job(db, "job_1")
    assert done.state == "completed" and done.finished_at is not None and done.finished_at >= started


def test_conditional_transitions(db: DB) -> None:
    new_job(db)
    # not from the listed states: no change
    assert not repo.set_job_state(db, "job_1", "completed", only_from=["finalizing"])
    assert repo.get_job(db, "job_1").state == "validating"
    assert not repo.set_job_state(db, "job_1", "completed", only_from=[])
    assert not repo.set_job_state(db, "nope", "queued")
    with pytest.raises(ValueError):
        repo.set_job_state(db, "job_1", "done")  # not a job state
    assert repo.set_job_state(db, "job_1", "failed", error_message="bad input", only_from=["validating"])
    job = repo.get_job(db, "job_1")
    assert job.state == "failed" and job.error_message == "bad input" and job.finished_at is not None
    # finished_at keeps the first terminal time
    first = job.finished_at
    assert repo.set_job_state(db, "job_1", "expired")
    assert repo.get_job(db, "job_1").finished_at == first


def test_conditional_transition_race(db: DB) -> None:
    # a cancel and a finalize race for the same in_progress job: exactly one wins
    new_job(db)
    repo.set_job_state(db, "job_1", "in_progress")
    targets = ["cancelling", "finalizing"] * 4
    won = run_threads(
        len(targets), lambda i: repo.set_job_state(db, "job_1", targets[i], only_from=["in_progress"])
    )
    assert won.count(True) == 1
    assert repo.get_job(db, "job_1").state == targets[won.index(True)]


def test_list_jobs_pagination(db: DB) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(7):
        new_job(db, f"job_{i}", owner="alice" if i % 2 == 0 else "bob")
        repo.update_job(db, f"job_{i}", created_at=base + timedelta(minutes=i))
    # three jobs created in the same microsecond: the id breaks the tie, pages still partition
    for s in ("tie_a", "tie_b", "tie_c"):
        new_job(db, s, owner="carol")
        repo.update_job(db, s, created_at=base + timedelta(hours=1))
    repo.set_job_state(db, "job_4", "queued")

    everything = [j.id for j in repo.list_jobs(db, limit=100)]
    assert everything == ["tie_c", "tie_b", "tie_a", *(f"job_{i}" for i in range(6, -1, -1))]

    pages, after = [], None
    while True:
        page = repo.list_jobs(db, owner=None, state=None, limit=3, after=after)
        if not page:
            break
        pages.append([j.id for j in page])
        after = page[-1].id
    assert [j for p in pages for j in p] == everything
    assert all(len(p) == 3 for p in pages[:-1])

    alice = [j.id for j in repo.list_jobs(db, owner="alice", limit=2)]
    assert alice == ["job_6", "job_4"]
    assert [j.id for j in repo.list_jobs(db, owner="alice", limit=10, after="job_4")] == ["job_2", "job_0"]
    assert [j.id for j in repo.list_jobs(db, state="queued", limit=10)] == ["job_4"]
    assert [j.id for j in repo.list_jobs(db, owner="bob", state="validating", limit=1)] == ["job_5"]
    assert repo.list_jobs(db, limit=10, after="unknown") == []
    assert repo.list_jobs(db, state="bogus", limit=10) == []
    assert repo.list_jobs(db, limit=0) == []


# --- chunks ----------------------------------------------------------------------------------


def make_chunked_job(db: DB, n: int = 3, job_id: str = "job_1") -> None:
    new_job(db, job_id)
    repo.create_chunks(db, job_id, [(i * 10, i * 10 + 10) for i in range(n)])
    repo.set_job_state(db, job_id, "in_progress")


def test_chunk_run_and_summary(db: DB) -> None:
    make_chunked_job(db, 3)
    assert repo.get_job(db, "job_1").num_chunks == 3
    s = repo.chunk_summary(db, "job_1")
    assert s["chunks"] == {"queued": 3, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert (s["num_chunks"], s["completed"], s["failed"], s["finished"]) == (3, 0, 0, False)

    claim = repo.claim_chunk(db, "job_1", 1, "cpu-0", max_attempts=3)
    assert claim.action == "run" and claim.run and claim.attempts == 1
    c = claim.chunk
    assert (c.index, c.start, c.stop, c.state, c.worker) == (1, 10, 20, "running", "cpu-0")
    assert c.started_at is not None

    repo.finish_chunk(db, "job_1", 1, state=ChunkState.done, completed=9, failed=1)
    again = repo.claim_chunk(db, "job_1", 1, "cpu-1", max_attempts=3)
    assert again.action == "skip" and again.chunk.state == "done" and again.attempts == 1

    for i in (0, 2):
        assert repo.claim_chunk(db, "job_1", i, "cpu-0", max_attempts=3).run
    repo.finish_chunk(db, "job_1", 0, state="done", completed=10, failed=0)
    s = repo.chunk_summary(db, "job_1")
    assert s["chunks"]["done"] == 2 and s["chunks"]["running"] == 1 and not s["finished"]
    repo.finish_chunk(db, "job_1", 2, state="failed", completed=0, failed=10, error_message="oom")
    s = repo.chunk_summary(db, "job_1")
    assert s["chunks"] == {"queued": 0, "running": 0, "done": 2, "failed": 1, "cancelled": 0}
    assert (s["completed"], s["failed"], s["finished"]) == (19, 11, True)
    assert repo.chunk_summary(db, "nope")["finished"] is False

    assert repo.claim_chunk(db, "job_1", 99, "cpu-0", max_attempts=3).action == "skip"
    with pytest.raises(repo.ChunkNotFound):
        repo.finish_chunk(db, "job_1", 99, state="done", completed=0, failed=0)
    with pytest.raises(IntegrityError):
        repo.create_chunks(db, "job_1", [(0, 1)])  # chunk 0 exists already
    with pytest.raises(repo.JobNotFound):
        repo.create_chunks(db, "nope", [(0, 1)])


def test_claim_starts_the_job_and_finish_reports_the_last_chunk(db: DB) -> None:
    # a chunk's whole bookkeeping is two transactions: the claim starts a queued job and hands
    # back its row; the finish stores outcome and metrics and says whether the job's chunks are done
    new_job(db, "job_1")
    repo.create_chunks(db, "job_1", [(0, 10), (10, 20)])
    repo.set_job_state(db, "job_1", "queued")
    claim = repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3)
    assert claim.run and claim.job.id == "job_1" and claim.job.state == "in_progress"
    job = repo.get_job(db, "job_1")
    assert job.state == "in_progress" and job.started_at is not None
    started = job.started_at
    assert repo.claim_chunk(db, "job_1", 1, "w", max_attempts=3).job.started_at == started

    first = repo.finish_chunk(db, "job_1", 0, state="done", completed=9, failed=1,
                              metrics=[("tokens_per_s", 10.0, "tokens/s"), ("wall_s", 2.0, "s")])
    assert not first["finished"] and first["chunks"]["running"] == 1
    last = repo.finish_chunk(db, "job_1", 1, state="done", completed=10, failed=0,
                             metrics=[("tokens_per_s", 20.0, "tokens/s")])
    assert last["finished"] and (last["completed"], last["failed"]) == (19, 1)
    got = {(m.chunk_index, m.name): m.value for m in repo.job_metrics(db, "job_1")}
    assert got == {(0, "tokens_per_s"): 10.0, (0, "wall_s"): 2.0, (1, "tokens_per_s"): 20.0}
    # a redelivered chunk's finish replaces its metrics instead of adding a second set
    repo.finish_chunk(db, "job_1", 1, state="done", completed=10, failed=0,
                      metrics=[("tokens_per_s", 30.0, "tokens/s")])
    assert [m.value for m in repo.job_metrics(db, "job_1") if m.chunk_index == 1] == [30.0]


def test_claim_of_a_job_past_its_window_changes_nothing(db: DB) -> None:
    make_chunked_job(db, 1)
    repo.update_job(db, "job_1", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    claim = repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3)
    assert claim.action == "expired" and not claim.run
    chunk = repo.get_chunk(db, "job_1", 0)
    assert (chunk.state, chunk.attempts) == ("queued", 0)


def test_finish_chunk_does_not_undo_done(db: DB) -> None:
    make_chunked_job(db, 1)
    repo.claim_chunk(db, "job_1", 0, "a", max_attempts=3)
    repo.claim_chunk(db, "job_1", 0, "b", max_attempts=3)  # a redelivery runs in parallel
    repo.finish_chunk(db, "job_1", 0, state="done", completed=10, failed=0)
    repo.finish_chunk(db, "job_1", 0, state="failed", completed=0, failed=10, error_message="late")
    s = repo.chunk_summary(db, "job_1")
    assert s["chunks"]["done"] == 1 and s["completed"] == 10


def test_claim_attempts_cap(db: DB) -> None:
    make_chunked_job(db, 1)
    # a chunk still "running" when delivered again: its worker was lost, it runs again
    for attempt in (1, 2, 3):
        claim = repo.claim_chunk(db, "job_1", 0, f"w{attempt}", max_attempts=3)
        assert claim.action == "run" and claim.attempts == attempt
        assert claim.reason == ("redelivered" if attempt > 1 else "")
    claim = repo.claim_chunk(db, "job_1", 0, "w4", max_attempts=3)
    assert claim.action == "exhausted"
    assert claim.chunk.state == "failed" and claim.chunk.error_message == "gave up after 3 attempts"
    assert repo.claim_chunk(db, "job_1", 0, "w5", max_attempts=3).action == "skip"
    assert repo.chunk_summary(db, "job_1")["chunks"]["failed"] == 1


@pytest.mark.parametrize("job_state", ["cancelling", "cancelled", "expired", "failed"])
def test_claim_skips_chunks_of_stopped_jobs(db: DB, job_state: str) -> None:
    make_chunked_job(db, 2)
    assert repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3).run
    repo.finish_chunk(db, "job_1", 0, state="done", completed=10, failed=0)
    repo.set_job_state(db, "job_1", job_state)
    claim = repo.claim_chunk(db, "job_1", 1, "w", max_attempts=3)
    assert claim.action == "skip" and claim.chunk.state == "cancelled" and job_state in claim.reason
    assert repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3).chunk.state == "done"  # done stays done


@pytest.mark.parametrize(("threads", "max_attempts"), [(2, 1), (8, 3)])
def test_claim_chunk_concurrency(db: DB, threads: int, max_attempts: int) -> None:
    # simultaneous deliveries of one chunk: each sees the others' attempts, so exactly
    # max_attempts of them run (with max_attempts=1: exactly one)
    make_chunked_job(db, 1)
    claims = run_threads(threads, lambda i: repo.claim_chunk(db, "job_1", 0, f"w{i}", max_attempts))
    actions = Counter(c.action for c in claims)
    assert actions["run"] == max_attempts
    assert actions["exhausted"] == 1
    assert sorted(c.attempts for c in claims if c.run) == list(range(1, max_attempts + 1))


def test_cancel_queued_chunks(db: DB) -> None:
    make_chunked_job(db, 4)
    repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3)
    repo.claim_chunk(db, "job_1", 1, "w", max_attempts=3)
    repo.finish_chunk(db, "job_1", 1, state="done", completed=10, failed=0)
    assert repo.cancel_queued_chunks(db, "job_1") == 2
    assert repo.cancel_queued_chunks(db, "job_1") == 0
    s = repo.chunk_summary(db, "job_1")
    assert s["chunks"] == {"queued": 0, "running": 1, "done": 1, "failed": 0, "cancelled": 2}


def test_chunk_progress_and_errors(db: DB) -> None:
    make_chunked_job(db, 3)
    assert repo.get_chunk(db, "job_1", 2).state == "queued" and repo.get_chunk(db, "job_1", 9) is None
    repo.set_chunk_progress(db, "job_1", 0, 4)  # not running yet: ignored
    assert repo.get_chunk(db, "job_1", 0).completed == 0

    repo.claim_chunk(db, "job_1", 0, "w", max_attempts=3)
    repo.set_chunk_progress(db, "job_1", 0, 4)
    assert repo.chunk_summary(db, "job_1")["completed"] == 4  # live progress of a running chunk
    # the worker is lost; the redelivery starts the chunk's counts again
    assert repo.claim_chunk(db, "job_1", 0, "w2", max_attempts=3).chunk.completed == 0
    assert repo.chunk_summary(db, "job_1")["completed"] == 0

    assert repo.chunk_errors(db, "job_1") == [] and repo.first_chunk_error(db, "job_1") is None
    # an engine error re-queues the chunk with its message; a later one fails chunk 2
    repo.finish_chunk(db, "job_1", 0, state="queued", completed=0, failed=0, error_message="attempt 2: oom")
    repo.claim_chunk(db, "job_1", 2, "w", max_attempts=3)
    repo.finish_chunk(db, "job_1", 2, state="failed", completed=0, failed=10, error_message="bad weights")
    assert repo.chunk_errors(db, "job_1") == [
        {"index": 0, "state": "queued", "attempts": 2, "error": "attempt 2: oom"},
        {"index": 2, "state": "failed", "attempts": 1, "error": "bad weights"},
    ]
    assert repo.chunk_errors(db, "job_1", limit=1)[0]["index"] == 0
    assert repo.first_chunk_error(db, "job_1") == "bad weights"  # only failed chunks count
    assert repo.claim_chunk(db, "job_1", 0, "w3", max_attempts=3).chunk.error_message == "attempt 2: oom"


def test_jobs_past_expiry_and_ping(db: DB) -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    new_job(db, "a", expires_at=now - timedelta(hours=2))
    new_job(db, "b", expires_at=now - timedelta(minutes=1))
    new_job(db, "c", expires_at=now + timedelta(minutes=1))
    new_job(db, "d", expires_at=None)
    new_job(db, "e", expires_at=now - timedelta(hours=3))
    repo.set_job_state(db, "e", "completed")
    active = ["validating", "queued", "in_progress"]
    assert repo.jobs_past_expiry(db, now, active) == ["a", "b"]
    # an aware datetime in another zone is the same instant
    assert repo.jobs_past_expiry(db, now.astimezone(timezone(timedelta(hours=-5))), active) == ["a", "b"]
    assert repo.jobs_past_expiry(db, now, ["completed"]) == ["e"]
    assert repo.jobs_past_expiry(db, now, []) == []
    repo.ping(db)


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_replace_not_duplicate(db: DB) -> None:
    make_chunked_job(db, 2)
    repo.record_metrics(db, "job_1", 0, [("tokens_per_s", 10.0, "tok/s"), ("latency", 1.5, "s")])
    repo.record_metrics(db, "job_1", 1, [("tokens_per_s", 20.0, "tok/s")])
    repo.record_metrics(db, "job_1", None, [("wall", 3.0, "s")])
    # redelivered chunk 0 and a second finalize: replaced, not added
    repo.record_metrics(db, "job_1", 0, [Metric("tokens_per_s", 11.0, "tok/s")])
    repo.record_metrics(db, "job_1", None, [("wall", 4.0, "s"), ("wall", 5.0, "s"), ("items", 20)])
    repo.record_metrics(db, "job_1", 1, [])

    rows = [(m.chunk_index, m.name, m.value, m.unit) for m in repo.job_metrics(db, "job_1")]
    assert rows == [
        (None, "items", 20.0, ""),
        (None, "wall", 5.0, "s"),
        (0, "latency", 1.5, "s"),
        (0, "tokens_per_s", 11.0, "tok/s"),
        (1, "tokens_per_s", 20.0, "tok/s"),
    ]
    assert repo.job_metrics(db, "nope") == []


@pytest.mark.parametrize("chunk_index", [None, 0])
def test_metrics_concurrent_writers(db: DB, chunk_index: int | None) -> None:
    # NULL chunk_index is not covered by PostgreSQL's unique constraint: the job row lock is
    make_chunked_job(db, 1)
    run_threads(6, lambda i: repo.record_metrics(db, "job_1", chunk_index, [("wall", float(i), "s")]))
    rows = repo.job_metrics(db, "job_1")
    assert len(rows) == 1 and rows[0].chunk_index == chunk_index


# --- servers other suites use ---------------------------------------------------------------


def test_redis_fixture(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        client.close()


def test_postgres_url_fixture(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert postgres_url.endswith("/genmill_test")
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == "genmill_test"
    finally:
        engine.dispose()

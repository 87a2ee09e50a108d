"""One flow for every job kind: submit → chunks → run_chunk on workers → finalize.

The embedded mode (``genmill run``) and the Celery workers call these same functions; only the
dispatcher differs. Exactly-once output comes from idempotent writes keyed by (job, chunk): a
redelivered chunk rewrites its own part files, and its metrics replace the earlier ones.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from storage import repo
from storage.bucket import Bucket, ObjectNotFound, open_bucket, safe_key
from storage.db import get_engine, session_factory, upgrade
from storage.models import ChunkState, Job, JobState
from tasks.kinds import DEFAULT_KIND, get_kind
from tasks.kinds.base import ChunkContext, ChunkResult, FinalizeContext, JobInvalid
from tasks.metrics import aggregate_job_metrics
from tasks.settings import Settings, get_settings
from workers import model_cache
from workers.registry import ModelSpec, UnknownModel, resolve_model

log = logging.getLogger("genmill.flow")
COPY_BLOCK = 1 << 20
ACTIVE_STATES = (JobState.validating.value, JobState.queued.value, JobState.in_progress.value)


@dataclass
class Services:
    settings: Settings
    db: Any  # sessionmaker
    bucket: Bucket


def open_services(settings: Settings | None = None, *, migrate: bool = False) -> Services:
    settings = settings or get_settings()
    if migrate:
        upgrade(settings.database_url)
    return Services(settings=settings, db=session_factory(get_engine(settings.database_url)),
                    bucket=open_bucket(settings.bucket_url, endpoint_url=settings.s3_endpoint_url))


_services: dict[tuple, Services] = {}


def cached_services(settings: Settings) -> Services:
    """One Services per store/bucket in a long-lived process (a worker), reused across tasks."""
    key = (settings.database_url, settings.bucket_url, settings.s3_endpoint_url)
    if key not in _services:
        _services[key] = open_services(settings)
    return _services[key]


class Dispatcher(Protocol):
    def dispatch(self, job_id: str, chunk_index: int, queue: str) -> None: ...


class ChunkFailed(RuntimeError):
    """A chunk raised; ``retry`` says whether another attempt is allowed."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


def _read_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _model_config(spec: ModelSpec) -> dict[str, Any]:
    cfg_path = spec.path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cfg = {}
    return {**cfg, "_path": str(spec.path), "_options": spec.options}


# ---------------------------------------------------------------- submit


def submit_job(svc: Services, dispatcher: Dispatcher, *, model: str, kind: str | None = None,
               input_bytes: bytes | None = None, input_key: str | None = None,
               params: dict[str, Any] | None = None, owner: str = "local",
               metadata: dict[str, str] | None = None, chunk_size: int | None = None) -> Job:
    """Validate, split into chunks and enqueue. A bad job ends ``failed`` with a message naming
    what was wrong (the returned row says so); bad lines become error entries and the job runs."""
    settings = svc.settings
    job_id = f"job_{uuid.uuid4().hex[:24]}"
    expires = datetime.now(UTC) + timedelta(hours=settings.completion_window_hours)
    metadata = dict(metadata or {})
    if len(metadata) > 16:
        raise JobInvalid("metadata takes at most 16 key-value pairs")
    job = repo.create_job(svc.db, id=job_id, kind=kind or "", model=model, params=dict(params or {}),
                          owner=owner, input_key=None, metadata=metadata, expires_at=expires)
    try:
        spec = resolve_model(model, settings.registry)
        kind_name = kind or DEFAULT_KIND[spec.engine]
        job_kind = get_kind(kind_name)
        if job_kind.engine != spec.engine:
            raise JobInvalid(f"model {model!r} is served by the {spec.engine} engine; a {kind_name} job "
                             f"needs a {job_kind.engine} model")
        model_config = _model_config(spec) | {"max_samples": settings.max_requests_per_job}
        checked = job_kind.validate_params(dict(params or {}), model_config)
        data = _load_input(svc, job_id, job_kind, input_bytes, input_key)
        checked["_owner"] = owner  # inputs that name bucket objects may name only the owner's uploads
        parsed = job_kind.parse(data, checked)
        if len(parsed.requests) > settings.max_requests_per_job:
            raise JobInvalid(f"the job has {len(parsed.requests)} requests; the limit is "
                             f"{settings.max_requests_per_job}")
    except (JobInvalid, UnknownModel, ValueError) as e:
        repo.update_job(svc.db, job_id, kind=kind or "")
        repo.set_job_state(svc.db, job_id, JobState.failed.value, error_message=str(e))
        return repo.get_job(svc.db, job_id)

    checked["_model_name"] = model
    for err in parsed.errors:
        err["id"] = f"{job_id}-{err.get('line')}"
    prefix = job_prefix(job_id)
    size = chunk_size or settings.chunk_size
    ranges = [(s, min(s + size, len(parsed.requests))) for s in range(0, len(parsed.requests), size)]
    for index, (start, stop) in enumerate(ranges):
        svc.bucket.put_bytes(f"{prefix}/requests/{index:05d}.jsonl", _jsonl(parsed.requests[start:stop]))
    svc.bucket.put_bytes(f"{prefix}/parse_errors.jsonl", _jsonl(parsed.errors))
    repo.create_chunks(svc.db, job_id, ranges)
    repo.update_job(svc.db, job_id, kind=kind_name, params=checked,
                    total=len(parsed.requests) + len(parsed.errors), failed=len(parsed.errors),
                    num_chunks=len(ranges))
    if not ranges:  # every line was bad: nothing to run, the error file is the result
        repo.set_job_state(svc.db, job_id, JobState.finalizing.value, only_from=[JobState.validating.value])
        finalize_job(svc, job_id, was_cancelling=False)
        return repo.get_job(svc.db, job_id)
    repo.set_job_state(svc.db, job_id, JobState.queued.value, only_from=[JobState.validating.value])
    for index in range(len(ranges)):
        dispatcher.dispatch(job_id, index, spec.queue)
    return repo.get_job(svc.db, job_id) or job


def _load_input(svc: Services, job_id: str, job_kind: Any, input_bytes: bytes | None,
                input_key: str | None) -> bytes | None:
    if not job_kind.needs_input_file:
        return None
    limit = svc.settings.max_input_bytes
    if input_key is not None:
        key = safe_key(input_key)
        try:
            if svc.bucket.size(key) > limit:
                raise JobInvalid(f"input {key!r} is larger than the {limit}-byte limit")
            input_bytes = svc.bucket.get_bytes(key)
        except ObjectNotFound as e:
            raise JobInvalid(f"input {key!r} is not in the bucket") from e
        repo.update_job(svc.db, job_id, input_key=key)
        return input_bytes
    if input_bytes is None:
        raise JobInvalid("a job of this kind needs an input file")
    if len(input_bytes) > limit:
        raise JobInvalid(f"the input file is larger than the {limit}-byte limit")
    key = f"{job_prefix(job_id)}/input"
    svc.bucket.put_bytes(key, input_bytes)
    repo.update_job(svc.db, job_id, input_key=key)
    return input_bytes


# ---------------------------------------------------------------- run a chunk


class _Progress:
    """Throttled in-chunk progress, so ``status`` moves during long chunks without a write per item."""

    def __init__(self, svc: Services, job_id: str, index: int, every_s: float = 1.0):
        self.svc, self.job_id, self.index, self.every_s = svc, job_id, index, every_s
        self.done = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                repo.set_chunk_progress(self.svc.db, self.job_id, self.index, self.done)


def execute_chunk(svc: Services, job_id: str, index: int, *, device: str = "cpu", worker: str = "local",
                  engine_overrides: dict[str, Any] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> str:
    """Run one chunk; returns "done", "skipped", "failed" or "missing". Raises ChunkFailed when the
    engine raised and another attempt is allowed (the caller re-queues it).

    Two SQL transactions on the way of a chunk that runs: the claim (which also starts the job)
    and the finish (outcome, metrics and the job's chunk summary), so the per-chunk cost stays small
    next to the engine's work."""
    claim = repo.claim_chunk(svc.db, job_id, index, worker, svc.settings.max_attempts)
    job = claim.job
    if job is None:
        return "missing"
    if claim.action == "expired":
        expire_job(svc, job_id)
        return "skipped"
    if claim.action == "skip":
        maybe_finalize(svc, job_id)
        return "skipped"
    chunk = claim.chunk
    requests = _read_jsonl(svc.bucket.get_bytes(f"{job_prefix(job_id)}/requests/{index:05d}.jsonl"))
    if claim.action == "exhausted":
        _fail_chunk_items(svc, job, index, requests, claim.reason or "gave up after repeated attempts")
        return "failed"
    progress = _Progress(svc, job_id, index)

    def report(n: int) -> None:
        progress(n)
        if on_progress:
            on_progress(n)

    try:
        spec = resolve_model(job.model, svc.settings.registry)
        engine = model_cache.get_engine(spec, device, engine_overrides, svc.settings.registry)
        ctx = ChunkContext(job_id=job_id, chunk_index=index, params=job.params, bucket=svc.bucket)
        result: ChunkResult = get_kind(job.kind).run_chunk(engine, requests, ctx, progress=report)
    except Exception as e:  # the engine or model load failed for the whole chunk
        message = f"chunk {index} attempt {chunk.attempts}: {type(e).__name__}: {e}"
        log.exception("job %s %s", job_id, message)
        if chunk.attempts < svc.settings.max_attempts:
            repo.finish_chunk(svc.db, job_id, index, state=ChunkState.queued.value, completed=0, failed=0,
                              error_message=message)
            raise ChunkFailed(message, retry=True) from e
        _fail_chunk_items(svc, job, index, requests, message)
        return "failed"
    prefix = job_prefix(job_id)
    svc.bucket.put_bytes(f"{prefix}/parts/{index:05d}.results.jsonl", _jsonl(result.results))
    svc.bucket.put_bytes(f"{prefix}/parts/{index:05d}.errors.jsonl", _jsonl(result.errors))
    summary = repo.finish_chunk(svc.db, job_id, index, state=ChunkState.done.value,
                                completed=len(result.results), failed=len(result.errors),
                                metrics=[(m.name, m.value, m.unit) for m in result.metrics])
    maybe_finalize(svc, job_id, summary)
    return "done"


def _fail_chunk_items(svc: Services, job: Job, index: int, requests: list[dict[str, Any]], message: str) -> None:
    """A chunk that cannot run fails its items (each an error entry), not the other chunks; the job
    finalizes when this was its last chunk."""
    errors = [{"id": f"{job.id}-{r.get('line')}", "custom_id": r.get("custom_id"), "line": r.get("line"),
               "response": {"status_code": 500, "body": {"error": {"code": "chunk_failed", "message": message}}},
               "error": {"code": "chunk_failed", "message": f"line {r.get('line')}: {message}"}}
              for r in requests]
    prefix = job_prefix(job.id)
    svc.bucket.put_bytes(f"{prefix}/parts/{index:05d}.results.jsonl", b"")
    svc.bucket.put_bytes(f"{prefix}/parts/{index:05d}.errors.jsonl", _jsonl(errors))
    summary = repo.finish_chunk(svc.db, job.id, index, state=ChunkState.failed.value, completed=0,
                                failed=len(errors), error_message=message)
    maybe_finalize(svc, job.id, summary)


# ---------------------------------------------------------------- finalize, cancel, expire


def maybe_finalize(svc: Services, job_id: str, summary: dict[str, Any] | None = None) -> bool:
    """Finalize when every chunk is terminal (``summary``: the job's chunk summary when the caller
    has it already); the conditional state change makes exactly one caller do it, even when two
    workers finish the last two chunks at once."""
    summary = summary or repo.chunk_summary(svc.db, job_id)
    if any(summary["chunks"].get(s.value, 0) for s in ChunkState if not s.terminal):
        return False
    job = repo.get_job(svc.db, job_id)
    if job is None:
        return False
    was_cancelling = job.state == JobState.cancelling.value
    if not repo.set_job_state(svc.db, job_id, JobState.finalizing.value,
                              only_from=[*ACTIVE_STATES, JobState.cancelling.value]):
        return False
    finalize_job(svc, job_id, was_cancelling=was_cancelling)
    return True


def finalize_job(svc: Services, job_id: str, *, was_cancelling: bool) -> None:
    job = repo.get_job(svc.db, job_id)
    assert job is not None
    try:
        _finalize(svc, job, was_cancelling)
    except Exception as e:  # an unfinishable job must not sit in finalizing forever
        log.exception("finalize %s", job_id)
        repo.set_job_state(svc.db, job_id, JobState.failed.value, error_message=f"finalize failed: {e}")


def _finalize(svc: Services, job: Job, was_cancelling: bool) -> None:
    prefix = job_prefix(job.id)
    bucket = svc.bucket
    completed = 0
    errors = _read_jsonl(bucket.get_bytes(f"{prefix}/parse_errors.jsonl"))
    # merge results in chunk order (= input order) through a local temp file: outputs can be large
    with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".jsonl") as out:
        for index in range(job.num_chunks):
            key = f"{prefix}/parts/{index:05d}.results.jsonl"
            if bucket.exists(key):
                # parts are written by _jsonl: one object a line, each ending in a newline; copy in
                # blocks (an S3 body iterates in fixed-size chunks, not lines) and count lines
                with bucket.open_read(key) as src:
                    while block := src.read(COPY_BLOCK):
                        out.write(block)
                        completed += block.count(b"\n")
            ekey = f"{prefix}/parts/{index:05d}.errors.jsonl"
            if bucket.exists(ekey):
                errors.extend(_read_jsonl(bucket.get_bytes(ekey)))
        tmp_path = out.name
    try:
        bucket.put_file(f"{prefix}/output.jsonl", tmp_path)
    finally:
        os.unlink(tmp_path)
    errors.sort(key=lambda e: (e.get("line") or 0))
    bucket.put_bytes(f"{prefix}/errors.jsonl", _jsonl(errors))

    ctx = FinalizeContext(job_id=job.id, params=job.params, bucket=bucket, num_chunks=job.num_chunks,
                          total=job.total)
    if job.kind:
        get_kind(job.kind).finalize(ctx)
    repo.record_metrics(svc.db, job.id, None, aggregate_job_metrics(
        repo.job_metrics(svc.db, job.id), _aware(job.started_at) if job.started_at else None))

    summary = repo.chunk_summary(svc.db, job.id)
    failed_chunks = summary["chunks"].get(ChunkState.failed.value, 0)
    expired = job.expires_at is not None and _aware(job.expires_at) < datetime.now(UTC)
    error_message = None
    if was_cancelling:
        state = JobState.expired if expired else JobState.cancelled
    elif job.num_chunks and failed_chunks == job.num_chunks:
        state = JobState.failed
        error_message = repo.first_chunk_error(svc.db, job.id) or "every chunk failed"
    else:
        state = JobState.completed
    repo.update_job(svc.db, job.id, output_key=f"{prefix}/output.jsonl", error_key=f"{prefix}/errors.jsonl",
                    completed=completed, failed=len(errors))
    repo.set_job_state(svc.db, job.id, state.value, error_message=error_message)


def cancel_job(svc: Services, job_id: str) -> bool:
    """Stop chunks not yet started; running chunks finish and their results are kept."""
    if not repo.set_job_state(svc.db, job_id, JobState.cancelling.value, only_from=ACTIVE_STATES):
        return False
    repo.cancel_queued_chunks(svc.db, job_id)
    maybe_finalize(svc, job_id)
    return True


def expire_job(svc: Services, job_id: str) -> bool:
    """The completion window passed: unfinished work is cancelled, finished work returned."""
    return cancel_job(svc, job_id)


def expire_due_jobs(svc: Services) -> int:
    now = datetime.now(UTC)
    n = 0
    for job_id in repo.jobs_past_expiry(svc.db, now, ACTIVE_STATES):
        n += expire_job(svc, job_id)
    return n


def _aware(ts: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone=True columns; they are stored in UTC
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)

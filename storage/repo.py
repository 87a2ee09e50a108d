"""Repository functions over jobs, chunks and metrics.

Every function takes the ``sessionmaker`` (``db``) first and runs its own short transaction, so
callers never manage sessions. ORM objects come back detached and fully loaded (their columns; not
their ``chunks``/``metrics`` relationships).

Concurrency: on PostgreSQL, state changes are conditional UPDATEs or happen under a row lock
(SELECT ... FOR UPDATE). On SQLite, writing transactions start with BEGIN IMMEDIATE, which
serialises writers for the whole transaction (see ``storage.db.write_session``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import and_, case, delete, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import read_session, write_session
from storage.models import Chunk, ChunkState, Job, JobState, MetricRow, utcnow

__all__ = [
    "ChunkClaim",
    "ChunkNotFound",
    "JobNotFound",
    "cancel_queued_chunks",
    "chunk_errors",
    "chunk_summary",
    "claim_chunk",
    "create_chunks",
    "create_job",
    "finish_chunk",
    "first_chunk_error",
    "get_chunk",
    "get_job",
    "job_metrics",
    "jobs_past_expiry",
    "list_jobs",
    "ping",
    "record_metrics",
    "set_chunk_progress",
    "set_job_state",
    "update_job",
]

DB = sessionmaker[Session]

# a chunk of a job in one of these states must not start
_JOB_STOPPED = frozenset({JobState.cancelling, JobState.cancelled, JobState.expired, JobState.failed})
_JOB_COLUMNS = {attr.key for attr in Job.__mapper__.column_attrs}


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class ChunkNotFound(KeyError):
    def __str__(self) -> str:
        job_id, index = self.args
        return f"no chunk {index} in job {job_id!r}"


def _job_state(state: JobState | str) -> str:
    return JobState(state).value  # ValueError on a typo rather than a silently stuck job


def _chunk_state(state: ChunkState | str) -> str:
    return ChunkState(state).value


# --- jobs ------------------------------------------------------------------------------------


def create_job(
    db: DB,
    *,
    id: str,
    kind: str,
    model: str,
    params: dict[str, Any],
    owner: str,
    input_key: str | None,
    metadata: dict[str, Any] | None,
    expires_at: datetime | None,
) -> Job:
    """Insert a job in state ``validating``. A duplicate id raises ``IntegrityError``."""
    job = Job(
        id=id,
        kind=kind,
        model=model,
        state=JobState.validating.value,
        params=dict(params or {}),
        metadata_=dict(metadata or {}),
        owner=owner,
        input_key=input_key,
        expires_at=expires_at,
        created_at=utcnow(),
    )
    with write_session(db) as s:
        s.add(job)
        s.flush()
        s.refresh(job)  # load the defaults as stored (and the datetimes as the store returns them)
    return job


def get_job(db: DB, job_id: str) -> Job | None:
    with read_session(db) as s:
        return s.get(Job, job_id)


def list_jobs(
    db: DB,
    *,
    owner: str | None = None,
    state: str | None = None,
    limit: int = 20,
    after: str | None = None,
) -> list[Job]:
    """Jobs newest first. ``after`` is the id of the last job of the previous page; an unknown
    cursor, like an unknown state, gives an empty page (a filter, not an error)."""
    if limit <= 0:
        return []
    q = select(Job)
    if owner is not None:
        q = q.where(Job.owner == owner)
    if state is not None:
        q = q.where(Job.state == (state.value if isinstance(state, JobState) else state))
    with read_session(db) as s:
        if after is not None:
            cursor = s.execute(select(Job.created_at, Job.id).where(Job.id == after)).first()
            if cursor is None:
                return []
            # keyset pagination on (created_at, id): stable while new jobs arrive
            q = q.where(
                or_(
                    Job.created_at < cursor.created_at,
                    and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
                )
            )
        q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        return list(s.scalars(q))


def set_job_state(
    db: DB,
    job_id: str,
    state: JobState | str,
    *,
    error_message: str | None = None,
    only_from: Iterable[JobState | str] | None = None,
) -> bool:
    """Move a job to ``state``; with ``only_from``, only if its current state is one of those.

    One conditional UPDATE, so two processes racing (a cancel against a finalize) cannot both win.
    ``started_at`` is set on the first move to in_progress and ``finished_at`` on the first move to
    a terminal state. Returns whether the row was updated.
    """
    new = JobState(state)
    values: dict[str, Any] = {"state": new.value}
    now = utcnow()
    # typed like the column, so the UTC normalisation of UTCDateTime applies to the literal too
    now_lit = literal(now, Job.__table__.c.started_at.type)
    if new is JobState.in_progress:
        values["started_at"] = func.coalesce(Job.started_at, now_lit)
    if new.terminal:
        values["finished_at"] = func.coalesce(Job.finished_at, now_lit)
    if error_message is not None:
        values["error_message"] = error_message
    q = update(Job).where(Job.id == job_id).values(**values)
    if only_from is not None:
        allowed = [_job_state(s) for s in only_from]
        if not allowed:
            return False
        q = q.where(Job.state.in_(allowed))
    with write_session(db) as s:
        result = s.execute(q.execution_options(synchronize_session=False))
        return result.rowcount == 1


def update_job(db: DB, job_id: str, **fields: Any) -> None:
    """Set columns of a job by attribute name (``metadata`` is accepted for ``metadata_``)."""
    if "metadata" in fields:
        fields["metadata_"] = fields.pop("metadata")
    unknown = set(fields) - _JOB_COLUMNS
    if unknown or "id" in fields:
        raise ValueError(f"update_job: not updatable: {sorted(unknown | ({'id'} & set(fields)))}")
    if "state" in fields:
        fields["state"] = _job_state(fields["state"])
    if not fields:
        return
    values = {getattr(Job, k): v for k, v in fields.items()}
    with write_session(db) as s:
        result = s.execute(
            update(Job).where(Job.id == job_id).values(values).execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise JobNotFound(job_id)


# --- chunks ----------------------------------------------------------------------------------


def create_chunks(db: DB, job_id: str, ranges: list[tuple[int, int]]) -> None:
    """One chunk row per ``(start, stop)`` range; the chunk index is the position in ``ranges``.

    Also sets the job's ``num_chunks``. Chunks that already exist are a programming error
    (``IntegrityError``), so a resubmitted job cannot silently get two chunk sets.
    """
    now = utcnow()
    rows = [
        Chunk(job_id=job_id, index=i, start=int(a), stop=int(b), state=ChunkState.queued.value, queued_at=now)
        for i, (a, b) in enumerate(ranges)
    ]
    for c in rows:
        if c.start > c.stop:
            raise ValueError(f"chunk {c.index}: start {c.start} > stop {c.stop}")
    with write_session(db) as s:
        n = s.execute(update(Job).where(Job.id == job_id).values(num_chunks=len(rows))).rowcount
        if n != 1:
            raise JobNotFound(job_id)
        s.add_all(rows)


def get_chunk(db: DB, job_id: str, index: int) -> Chunk | None:
    with read_session(db) as s:
        return s.scalars(select(Chunk).where(Chunk.job_id == job_id, Chunk.index == index)).one_or_none()


def set_chunk_progress(db: DB, job_id: str, index: int, completed: int) -> None:
    """Items finished so far inside a running chunk (live progress; ``finish_chunk`` sets the final
    counts). Ignored unless the chunk is running."""
    with write_session(db) as s:
        s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.index == index, Chunk.state == ChunkState.running.value)
            .values(completed=completed)
            .execution_options(synchronize_session=False)
        )


@dataclass(frozen=True)
class ChunkClaim:
    """What a worker should do with a delivered chunk task.

    - ``run``: the chunk is now ``running`` for this worker (``attempts`` counts this one).
    - ``skip``: nothing to do (already finished, or its job stopped; ``reason`` says which).
    - ``exhausted``: it already ran ``max_attempts`` times; it is now ``failed``.
    - ``expired``: its job is still active but past ``expires_at``; nothing changed (the caller
      expires the job, which cancels this chunk with the other queued ones).
    """

    action: Literal["run", "skip", "exhausted", "expired"]
    chunk: Chunk | None  # detached, as it is after the claim; None if the chunk does not exist
    reason: str = ""
    job: Job | None = None  # the chunk's job, detached, as it is after the claim

    @property
    def run(self) -> bool:
        return self.action == "run"

    @property
    def attempts(self) -> int:
        return self.chunk.attempts if self.chunk is not None else 0


def claim_chunk(
    db: DB, job_id: str, index: int, worker: str, max_attempts: int, now: datetime | None = None
) -> ChunkClaim:
    """Decide whether this delivery of a chunk runs, under a lock on the chunk row.

    A chunk still ``running`` is a redelivery (its worker was lost, or the broker's visibility
    timeout passed): it runs again, counted against ``max_attempts``. Two deliveries claiming at
    once are serialised by the row lock (PostgreSQL) or the write lock (SQLite): each sees the
    other's attempt count. A claim that runs also moves a queued job to ``in_progress``, and the
    job row comes back with the claim: starting a chunk is one transaction, not three.
    """
    now = now or utcnow()
    with write_session(db) as s:
        chunk = s.scalars(
            select(Chunk).where(Chunk.job_id == job_id, Chunk.index == index).with_for_update()
        ).one_or_none()
        job = s.get(Job, job_id)
        if chunk is None:
            return ChunkClaim("skip", None, "no such chunk", job)
        state = ChunkState(chunk.state)
        if state.terminal:
            return ChunkClaim("skip", chunk, f"chunk already {state.value}", job)
        job_state = JobState(job.state) if job is not None else None
        if job_state in _JOB_STOPPED:
            chunk.state = ChunkState.cancelled.value
            chunk.finished_at = now
            return ChunkClaim("skip", chunk, f"job is {job_state.value}", job)
        expiring = job_state in (JobState.validating, JobState.queued, JobState.in_progress)
        if expiring and job.expires_at is not None and _as_utc(job.expires_at) < _as_utc(now):
            return ChunkClaim("expired", chunk, "the job's completion window has passed", job)
        if chunk.attempts >= max_attempts:
            chunk.state = ChunkState.failed.value
            chunk.error_message = f"gave up after {chunk.attempts} attempts"
            chunk.finished_at = now
            return ChunkClaim("exhausted", chunk, chunk.error_message, job)
        chunk.state = ChunkState.running.value
        chunk.attempts += 1
        chunk.worker = worker
        chunk.started_at = now
        chunk.finished_at = None
        chunk.completed = chunk.failed = 0  # in-chunk progress of a lost attempt would count twice
        if job_state is JobState.queued:
            job.state = JobState.in_progress.value
            job.started_at = job.started_at or now
        return ChunkClaim("run", chunk, "redelivered" if state is ChunkState.running else "", job)


def _as_utc(ts: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they are stored in UTC
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def finish_chunk(
    db: DB,
    job_id: str,
    index: int,
    *,
    state: ChunkState | str,
    completed: int,
    failed: int,
    error_message: str | None = None,
    metrics: Iterable[Any] = (),
) -> dict[str, Any]:
    """Record a chunk's outcome (and its ``metrics``, as ``record_metrics`` would) in one
    transaction; returns the job's ``chunk_summary`` as of that commit, so the caller knows at
    once whether this was the last chunk.

    A ``done`` chunk stays done: a late duplicate delivery that failed (or was cancelled) after
    another delivery succeeded does not overwrite the success."""
    new = _chunk_state(state)
    q = (
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.index == index)
        .values(
            state=new,
            completed=completed,
            failed=failed,
            error_message=error_message,
            finished_at=utcnow() if ChunkState(new).terminal else None,
        )
        .execution_options(synchronize_session=False)
    )
    latest = _latest_metrics(metrics)
    with write_session(db) as s:
        if new != ChunkState.done.value:
            q = q.where(Chunk.state != ChunkState.done.value)
        if s.execute(q).rowcount == 0:
            exists = s.scalar(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.index == index))
            if exists is None:
                raise ChunkNotFound(job_id, index)
        if latest:
            # the UPDATE above holds the chunk row's lock: writers of this chunk's set are serialised
            _replace_metrics(s, job_id, index, latest)
        return _summary(s, job_id)


def chunk_summary(db: DB, job_id: str) -> dict[str, Any]:
    """Progress of a job's chunks::

        {"chunks": {"queued": 1, "running": 2, "done": 5, "failed": 0, "cancelled": 0},
         "num_chunks": 8, "completed": 310, "failed": 4, "finished": False}

    ``completed``/``failed`` are item counts summed over the chunks; ``finished`` is true when every
    chunk is in a terminal state (and there is at least one).
    """
    with read_session(db) as s:
        return _summary(s, job_id)


def _summary(s: Session, job_id: str) -> dict[str, Any]:
    q = (
        select(
            Chunk.state,
            func.count(),
            func.coalesce(func.sum(Chunk.completed), 0),
            func.coalesce(func.sum(Chunk.failed), 0),
        )
        .where(Chunk.job_id == job_id)
        .group_by(Chunk.state)
    )
    counts = {st.value: 0 for st in ChunkState}
    completed = failed = 0
    for state, n, c, f in s.execute(q):
        counts[state] = counts.get(state, 0) + int(n)
        completed += int(c)
        failed += int(f)
    total = sum(counts.values())
    pending = counts[ChunkState.queued.value] + counts[ChunkState.running.value]
    return {
        "chunks": counts,
        "num_chunks": total,
        "completed": completed,
        "failed": failed,
        "finished": total > 0 and pending == 0,
    }


def cancel_queued_chunks(db: DB, job_id: str) -> int:
    """Queued chunks of a job become cancelled (running ones finish or see the job state when
    claimed). Returns how many changed."""
    with write_session(db) as s:
        result = s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == ChunkState.queued.value)
            .values(state=ChunkState.cancelled.value, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return result.rowcount


def chunk_errors(db: DB, job_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """Chunks that recorded an error, by index (at most ``limit``), for status views::

    [{"index": 3, "state": "failed", "attempts": 3, "error": "gave up after 3 attempts"}]
    """
    q = (
        select(Chunk.index, Chunk.state, Chunk.attempts, Chunk.error_message)
        .where(Chunk.job_id == job_id, Chunk.error_message.is_not(None))
        .order_by(Chunk.index)
        .limit(limit)
    )
    with read_session(db) as s:
        return [{"index": i, "state": st, "attempts": a, "error": e} for i, st, a, e in s.execute(q)]


def first_chunk_error(db: DB, job_id: str) -> str | None:
    """The error of the lowest-numbered failed chunk (a job whose chunks all failed reports it)."""
    q = (
        select(Chunk.error_message)
        .where(
            Chunk.job_id == job_id,
            Chunk.state == ChunkState.failed.value,
            Chunk.error_message.is_not(None),
        )
        .order_by(Chunk.index)
        .limit(1)
    )
    with read_session(db) as s:
        return s.scalar(q)


# --- expiry and health -----------------------------------------------------------------------


def jobs_past_expiry(db: DB, now: datetime, states: Iterable[JobState | str]) -> list[str]:
    """Ids of jobs in one of ``states`` whose ``expires_at`` is before ``now``, oldest deadline first."""
    wanted = [_job_state(st) for st in states]
    if not wanted:
        return []
    q = (
        select(Job.id)
        .where(Job.expires_at.is_not(None), Job.expires_at < now, Job.state.in_(wanted))
        .order_by(Job.expires_at, Job.id)
    )
    with read_session(db) as s:
        return list(s.scalars(q))


def ping(db: DB) -> None:
    """Round trip to the database; raises if it cannot be reached (health checks)."""
    with read_session(db) as s:
        s.execute(select(1)).scalar_one()


# --- metrics ---------------------------------------------------------------------------------


def _metric_tuple(m: Any) -> tuple[str, float, str]:
    if isinstance(m, tuple):
        name, value, unit = m if len(m) == 3 else (*m, "")
    else:  # workers.engine.Metric or anything with name / value / unit
        name, value, unit = m.name, m.value, getattr(m, "unit", "")
    return str(name), float(value), str(unit or "")


def _latest_metrics(metrics: Iterable[Any]) -> dict[str, tuple[float, str]]:
    latest: dict[str, tuple[float, str]] = {}
    for m in metrics:
        name, value, unit = _metric_tuple(m)
        latest[name] = (value, unit)  # the last value of a name in one call wins
    return latest


def _replace_metrics(
    s: Session, job_id: str, chunk_index: int | None, latest: dict[str, tuple[float, str]]
) -> None:
    idx_match = (
        MetricRow.chunk_index.is_(None) if chunk_index is None else MetricRow.chunk_index == chunk_index
    )
    s.execute(
        delete(MetricRow)
        .where(MetricRow.job_id == job_id, idx_match, MetricRow.name.in_(list(latest)))
        .execution_options(synchronize_session=False)
    )
    now = utcnow()
    s.add_all(
        MetricRow(job_id=job_id, chunk_index=chunk_index, name=n, value=v, unit=u, created_at=now)
        for n, (v, u) in latest.items()
    )


def record_metrics(
    db: DB, job_id: str, chunk_index: int | None, metrics: Iterable[tuple[str, float, str]]
) -> None:
    """Store metrics of a chunk (or of the job, ``chunk_index=None``), replacing any earlier value
    with the same (job, chunk_index, name): a redelivered chunk does not add a second set.

    Delete-then-insert rather than an upsert: PostgreSQL's unique constraint does not treat two
    NULL chunk_index values as equal, so it would not catch duplicated job-level metrics. Items
    may be ``(name, value, unit)`` tuples or objects with those attributes (``Metric``).
    """
    latest = _latest_metrics(metrics)
    if not latest:
        return
    for attempt in range(3):
        try:
            with write_session(db) as s:
                # serialise writers of the same set on PostgreSQL: on the chunk row, or the job
                # row for job-level metrics (whose NULL chunk_index the unique index ignores)
                locked = None
                if chunk_index is not None:
                    locked = s.scalar(
                        select(Chunk.id)
                        .where(Chunk.job_id == job_id, Chunk.index == chunk_index)
                        .with_for_update()
                    )
                if locked is None:
                    s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
                _replace_metrics(s, job_id, chunk_index, latest)
            return
        except IntegrityError:
            # metrics of a chunk without a chunk row, written concurrently: the other writer's
            # rows are committed now, so a retry replaces them
            if attempt == 2:
                raise


def job_metrics(db: DB, job_id: str) -> list[MetricRow]:
    """A job's metrics: job-level ones first, then by chunk index, then by name."""
    q = (
        select(MetricRow)
        .where(MetricRow.job_id == job_id)
        .order_by(
            case((MetricRow.chunk_index.is_(None), 0), else_=1),
            MetricRow.chunk_index,
            MetricRow.name,
        )
    )
    with read_session(db) as s:
        return list(s.scalars(q))

"""SQL records: jobs, their chunks, and metrics. SQLAlchemy 2.x declarative models.

The job and chunk rows are the source of truth for status; Celery's result backend is not.
Schema changes go through Alembic (``storage/migrations``), never ``create_all`` in the service.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobState(str, enum.Enum):
    validating = "validating"
    queued = "queued"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        return self in (JobState.completed, JobState.failed, JobState.cancelled, JobState.expired)


class ChunkState(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (ChunkState.done, ChunkState.failed, ChunkState.cancelled)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every store.

    SQLite has no timezone type: plain ``DateTime(timezone=True)`` drops the offset on write (an
    aware +02:00 value is stored as its wall time) and returns naive values, which then fail to
    compare with ``utcnow()``. Normalise to UTC on the way in and re-attach UTC on the way out.
    Naive inputs are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# explicit constraint names, so later migrations (SQLite batch mode included) can refer to them
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # prompts | images | audio
    model: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default=JobState.validating.value, index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    metadata_: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    owner: Mapped[str] = mapped_column(String(200), default="local", index=True)

    input_key: Mapped[str | None] = mapped_column(String(500))
    output_key: Mapped[str | None] = mapped_column(String(500))
    error_key: Mapped[str | None] = mapped_column(String(500))

    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    num_chunks: Mapped[int] = mapped_column(Integer, default=0)
    error_message: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()

    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Chunk.index"
    )
    metrics: Mapped[list[MetricRow]] = relationship(back_populates="job", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_jobs_owner_created", "owner", "created_at"),)


class Chunk(Base):
    __tablename__ = "chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)  # request range [start, stop) within the job
    stop: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default=ChunkState.queued.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error_message: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="chunks")

    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_chunks_job_index"),)


class MetricRow(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    chunk_index: Mapped[int | None] = mapped_column(Integer)  # None: a job-level metric
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics")

    # a redelivered chunk replaces its metrics rather than adding a second set
    __table_args__ = (UniqueConstraint("job_id", "chunk_index", "name", name="uq_metrics_job_chunk_name"),)

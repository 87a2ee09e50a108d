"""The job as producers see it: one JSON object, the same from the API, the client and the CLI."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from storage import repo
from storage.models import Job


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def job_view(svc: Any, job: Job, *, with_metrics: bool = True) -> dict[str, Any]:
    summary = repo.chunk_summary(svc.db, job.id)
    if job.state in ("completed", "failed", "cancelled", "expired"):
        completed, failed = job.completed, job.failed
    else:  # live counts: finished chunks plus progress inside running ones, plus parse errors
        completed = summary["completed"]
        failed = job.failed + summary["failed"]
    done = completed + failed
    view: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "kind": job.kind,
        "model": job.model,
        "state": job.state,
        "owner": job.owner,
        "params": {k: v for k, v in (job.params or {}).items() if not k.startswith("_")},
        "metadata": job.metadata_ or {},
        "request_counts": {"total": job.total, "completed": completed, "failed": failed},
        "progress": round(done / job.total, 4) if job.total else (1.0 if job.state == "completed" else 0.0),
        "chunks": {"total": job.num_chunks, **summary["chunks"]},
        "error": job.error_message,
        "input_key": job.input_key,
        "output_key": job.output_key,
        "error_key": job.error_key,
        "outputs": svc.bucket.list(f"jobs/{job.id}/outputs/") if job.state == "completed" or job.output_key else [],
        "created_at": _ts(job.created_at),
        "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at),
        "expires_at": _ts(job.expires_at),
    }
    if with_metrics:
        view["metrics"] = {
            m.name: {"value": m.value, "unit": m.unit}
            for m in repo.job_metrics(svc.db, job.id) if m.chunk_index is None
        }
        view["chunk_errors"] = repo.chunk_errors(svc.db, job.id)
    return view

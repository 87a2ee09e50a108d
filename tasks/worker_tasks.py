"""Celery task definitions. Thin: the work is ``tasks.flow.execute_chunk``; this adds retries and
the worker's device, which ``genmill worker`` fixed at start-up and passes down through here."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tasks.celery_app import app
from tasks.flow import ChunkFailed, cached_services, execute_chunk
from tasks.settings import get_settings

log = logging.getLogger("genmill.worker")


@dataclass
class WorkerRuntime:
    device: str = "cpu"
    name: str = "worker"
    engine_overrides: dict[str, Any] = field(default_factory=dict)


runtime = WorkerRuntime()


@app.task(name="genmill.run_chunk", bind=True, acks_late=True, max_retries=None)
def run_chunk(self: Any, job_id: str, index: int) -> str:
    svc = cached_services(get_settings())
    try:
        return execute_chunk(svc, job_id, index, device=runtime.device, worker=runtime.name,
                             engine_overrides=runtime.engine_overrides)
    except ChunkFailed as e:
        # the attempt cap lives in the chunk row (claim_chunk), not in Celery's retry counter, so
        # it also counts deliveries after a lost worker
        log.warning("job %s chunk %d will be retried: %s", job_id, index, e)
        queue = (self.request.delivery_info or {}).get("routing_key")
        raise self.retry(exc=e, countdown=min(2 ** (self.request.retries or 0), 30), queue=queue)


class CeleryDispatcher:
    def dispatch(self, job_id: str, chunk_index: int, queue: str) -> None:
        run_chunk.apply_async(args=[job_id, chunk_index], queue=queue)

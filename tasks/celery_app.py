"""The Celery app: Redis broker, JSON only, settings for long GPU tasks (Celery's own guidance).

- acks_late + prefetch 1: a chunk is acknowledged after it ran, and a worker holds one at a time.
- reject_on_worker_lost: a chunk whose worker died (OOM, kill) is redelivered; ``storage.repo.
  claim_chunk`` caps the attempts so a poison chunk cannot loop forever.
- visibility_timeout longer than the longest chunk, or Redis hands a running chunk to a second worker;
  the unacked-message sweep runs often enough to redeliver soon after it.
"""
from __future__ import annotations

from celery import Celery

from tasks.settings import Settings, get_settings

CONTROL_QUEUE = "genmill.control"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("genmill", broker=settings.broker_url, backend=settings.result_backend, include=["tasks.worker_tasks"])
    # Kombu sweeps for unacknowledged messages past the visibility timeout every interval x
    # throttle seconds (100 s by default in kombu 5.7): sweep at least every 10 s, so a chunk whose
    # worker died comes back soon after its timeout (a sweep is one small Redis ZRANGE)
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "unacked_restore_interval": min(10, max(1, settings.visibility_timeout // 4)),
                 "unacked_restore_throttle": 1}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_default_queue=CONTROL_QUEUE,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=24 * 3600,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


app = make_celery()

"""``genmill worker``: one Celery worker process pinned to one device, serving some models.

Solo pool, one process per GPU: CUDA cannot re-initialise in a forked child, and a GPU runs one
chunk at a time anyway. The device is fixed before torch is imported.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from workers.device import pin_device, set_threads
from workers.registry import resolve_model


def start_worker(device: str, models: list[str], *, engine_overrides: dict[str, Any] | None = None,
                 loglevel: str = "info", warm: bool = True, name: str | None = None,
                 threads: int | None = None) -> None:
    torch_device = pin_device(device)  # before anything imports torch
    set_threads(threads)
    from tasks.settings import get_settings
    from tasks.worker_tasks import app, runtime
    from workers import model_cache

    settings = get_settings()
    specs = [resolve_model(m, settings.registry) for m in models]
    runtime.device = torch_device
    runtime.engine_overrides = dict(engine_overrides or {})
    worker_name = name or f"genmill-{device.replace(':', '')}@{socket.gethostname()}"
    runtime.name = worker_name
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if warm:  # load each model once, now: the first chunk should not pay for it, and a bad model fails fast
        for spec in specs:
            model_cache.get_engine(spec, torch_device, runtime.engine_overrides, settings.registry)
    queues = sorted({spec.queue for spec in specs})
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--hostname={worker_name}",
                     f"--queues={','.join(queues)}", f"--loglevel={loglevel}",
                     "--without-gossip", "--without-mingle"])

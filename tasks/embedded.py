"""The embedded mode: the same flow with the same functions, called in-process (SQLite + a local
bucket folder by default), so ``genmill run FILE --model M`` needs no servers."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from storage import repo
from storage.models import Job
from tasks.flow import ChunkFailed, Services, execute_chunk, submit_job


@dataclass
class InlineDispatcher:
    pending: list[tuple[str, int]] = field(default_factory=list)

    def dispatch(self, job_id: str, chunk_index: int, queue: str) -> None:
        self.pending.append((job_id, chunk_index))


def run_job(svc: Services, *, model: str, device: str = "cpu", engine_overrides: dict[str, Any] | None = None,
            show_progress: bool = True, **submit_args: Any) -> Job:
    dispatcher = InlineDispatcher()
    job = submit_job(svc, dispatcher, model=model, **submit_args)
    if not dispatcher.pending:
        return job
    bar = tqdm(total=job.total, initial=job.failed, unit="req", desc=job.id, file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)
    try:
        queue = list(dispatcher.pending)
        while queue:
            job_id, index = queue.pop(0)
            before = bar.n
            try:
                execute_chunk(svc, job_id, index, device=device, worker="embedded",
                              engine_overrides=engine_overrides, on_progress=bar.update)
            except ChunkFailed:
                queue.append((job_id, index))  # same retry policy as a worker: attempts are capped in SQL
                bar.n = before
                continue
            chunk = repo.get_chunk(svc.db, job_id, index)
            if chunk is not None:  # items the engine did not report through progress (errors)
                bar.n = before + (chunk.completed + chunk.failed)
                bar.refresh()
    finally:
        bar.close()
    return repo.get_job(svc.db, job.id) or job

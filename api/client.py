"""A small Python client for the GenMill HTTP API (httpx)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled", "expired")


class GenMillError(RuntimeError):
    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise GenMillError(response.status_code, detail)
        return response.json()

    def upload(self, path: str | Path) -> str:
        path = Path(path)
        with path.open("rb") as f:
            return self._json(self.http.post("/v1/files", files={"file": (path.name, f)}))["key"]

    def submit(self, model: str, path: str | Path | None = None, *, kind: str | None = None,
               params: dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
               chunk_size: int | None = None, input_key: str | None = None) -> dict[str, Any]:
        if path is not None:
            input_key = self.upload(path)
        body = {"model": model, "kind": kind, "input_key": input_key, "params": params or {},
                "metadata": metadata or {}, "chunk_size": chunk_size}
        return self._json(self.http.post("/v1/jobs", json=body))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def list(self, state: str | None = None, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"state": state, "limit": limit, "after": after}.items() if v is not None}
        return self._json(self.http.get("/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, poll_s: float = 1.0, timeout: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(poll_s)

    def download(self, job_id: str, which: str = "output") -> Iterator[bytes]:
        """Stream ``output``, ``errors``, or ``outputs/NAME`` of a job."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/{which}") as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            yield from r.iter_bytes()

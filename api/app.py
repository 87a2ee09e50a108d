"""The HTTP API (FastAPI): submit jobs, read their status, cancel them, download their files.

Bearer API keys come from settings (``GENMILL_API_KEYS="key:owner,..."``); a key sees and cancels
only its own jobs, and reads only its own uploads. Status is read from SQL, never from the broker.
"""

import json
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from api.views import job_view
from storage import repo
from storage.bucket import BucketKeyError, ObjectNotFound, safe_key
from tasks.flow import Dispatcher, Services, cancel_job, expire_due_jobs, open_services, submit_job
from tasks.kinds.base import JobInvalid
from tasks.settings import Settings, get_settings

UPLOAD_CHUNK = 1 << 20


class JobRequest(BaseModel):
    model: str = Field(description="registry name or checkpoint folder path")
    kind: str | None = Field(default=None, description="prompts | images | audio; default: the model's")
    input_key: str | None = Field(default=None, description="bucket object holding the input (from /v1/files)")
    params: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    chunk_size: int | None = Field(default=None, ge=1)


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None,
               require_auth: bool = True) -> FastAPI:
    settings = settings or get_settings()
    svc: Services = open_services(settings, migrate=True)
    if dispatcher is None:
        from tasks.worker_tasks import CeleryDispatcher

        dispatcher = CeleryDispatcher()
    owners = settings.api_key_owners()
    if require_auth and not owners:
        raise RuntimeError("no API keys configured: set GENMILL_API_KEYS=key:owner[,key:owner] "
                           "(or start the API with --no-auth for a local, single-user setup)")
    bearer = HTTPBearer(auto_error=False)

    def owner_of(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if not require_auth:
            return "local"
        if creds is None or creds.credentials not in owners:
            raise HTTPException(status_code=401, detail="missing or unknown API key",
                                headers={"WWW-Authenticate": "Bearer"})
        return owners[creds.credentials]

    Owner = Annotated[str, Depends(owner_of)]
    app = FastAPI(title="GenMill", version="0.1.0",
                  description="Batch generation jobs: prompt files, image samples, audio translation.")
    app.state.services = svc

    def own_job(job_id: str, owner: str):
        job = repo.get_job(svc.db, job_id)
        if job is None or (require_auth and job.owner != owner):
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job

    @app.exception_handler(JobInvalid)
    async def _invalid(_, exc: JobInvalid) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        repo.ping(svc.db)
        return {"status": "ok"}

    @app.post("/v1/files", status_code=201)
    def upload(owner: Owner, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        name = (file.filename or "input").rsplit("/", 1)[-1].rsplit("\\", 1)[-1] or "input"
        key = safe_key(f"uploads/{owner}/{uuid.uuid4().hex}/{name}")
        data = bytearray()
        while chunk := file.file.read(UPLOAD_CHUNK):
            data += chunk
            if len(data) > settings.max_input_bytes:
                raise HTTPException(status_code=413, detail=f"file larger than {settings.max_input_bytes} bytes")
        svc.bucket.put_bytes(key, bytes(data))
        return {"key": key, "bytes": len(data), "filename": name}

    @app.post("/v1/jobs", status_code=201)
    def create_job(body: JobRequest, owner: Owner) -> dict[str, Any]:
        if body.input_key is not None:
            try:
                key = safe_key(body.input_key)
            except BucketKeyError as e:
                raise HTTPException(status_code=400, detail=str(e)) from e
            if require_auth and not key.startswith(f"uploads/{owner}/"):
                raise HTTPException(status_code=403, detail=f"input_key {key!r} is not one of your uploads")
        job = submit_job(svc, dispatcher, model=body.model, kind=body.kind, input_key=body.input_key,
                         params=body.params, owner=owner, metadata=body.metadata, chunk_size=body.chunk_size)
        if job.state == "failed":
            return JSONResponse(status_code=400, content={"detail": job.error_message, "job": job_view(svc, job)})
        return job_view(svc, job)

    @app.post("/v1/jobs/upload", status_code=201)
    def create_job_with_file(owner: Owner, file: Annotated[UploadFile, File()], model: Annotated[str, Form()],
                             kind: str | None = Form(None), params: str = Form("{}"),
                             metadata: str = Form("{}"), chunk_size: int | None = Form(None)) -> Any:
        try:
            body = JobRequest(model=model, kind=kind, params=json.loads(params), metadata=json.loads(metadata),
                              chunk_size=chunk_size)
        except (json.JSONDecodeError, ValueError) as e:
            raise HTTPException(status_code=400, detail=f"params/metadata must be JSON objects: {e}") from e
        body.input_key = upload(owner, file)["key"]
        return create_job(body, owner)

    @app.get("/v1/jobs")
    def list_jobs(owner: Owner, state: str | None = None, limit: int = Query(20, ge=1, le=100),
                  after: str | None = None) -> dict[str, Any]:
        expire_due_jobs(svc)
        jobs = repo.list_jobs(svc.db, owner=owner if require_auth else None, state=state, limit=limit + 1, after=after)
        page = jobs[:limit]
        return {"object": "list", "data": [job_view(svc, j, with_metrics=False) for j in page],
                "has_more": len(jobs) > limit, "last_id": page[-1].id if page else None}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, owner: Owner) -> dict[str, Any]:
        own_job(job_id, owner)
        expire_due_jobs(svc)
        return job_view(svc, repo.get_job(svc.db, job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, owner: Owner) -> dict[str, Any]:
        job = own_job(job_id, owner)
        if not cancel_job(svc, job_id) and job.state not in ("cancelling", "cancelled"):
            raise HTTPException(status_code=409, detail=f"job {job_id} is {job.state}; it cannot be cancelled")
        return job_view(svc, repo.get_job(svc.db, job_id))

    def stream(key: str) -> Iterator[bytes]:
        with svc.bucket.open_read(key) as f:
            while chunk := f.read(UPLOAD_CHUNK):
                yield chunk

    def file_response(key: str | None, media_type: str) -> StreamingResponse:
        if not key or not svc.bucket.exists(key):
            raise HTTPException(status_code=404, detail="that file is not ready")
        return StreamingResponse(stream(key), media_type=media_type)

    @app.get("/v1/jobs/{job_id}/output")
    def output(job_id: str, owner: Owner) -> StreamingResponse:
        return file_response(own_job(job_id, owner).output_key, "application/jsonl")

    @app.get("/v1/jobs/{job_id}/errors")
    def errors(job_id: str, owner: Owner) -> StreamingResponse:
        return file_response(own_job(job_id, owner).error_key, "application/jsonl")

    @app.get("/v1/jobs/{job_id}/outputs/{name}")
    def output_file(job_id: str, name: str, owner: Owner) -> StreamingResponse:
        own_job(job_id, owner)
        try:
            key = safe_key(f"jobs/{job_id}/outputs/{name}")
        except BucketKeyError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        try:
            return file_response(key, "application/octet-stream")
        except ObjectNotFound as e:
            raise HTTPException(status_code=404, detail=str(e)) from e

    return app

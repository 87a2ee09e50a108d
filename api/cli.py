"""``genmill``: run jobs in-process, or submit to and query the service.

Machine-readable output (``--json``) goes to stdout as one JSON object; progress bars go to stderr.
Without ``--api`` (or GENMILL_API_URL), status/wait/results/cancel read the SQL store directly.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

TERMINAL = ("completed", "failed", "cancelled", "expired")


# ---------------------------------------------------------------- shared helpers


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _collect_params(pairs: tuple[str, ...], **named: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--param")
        params[key.strip()] = _parse_value(value)
    for key, value in named.items():
        if value is not None and value != ():
            params[key] = list(value) if isinstance(value, tuple) else value
    return params


def _summary(view: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": view["id"], "state": view["state"], "kind": view.get("kind"), "model": view.get("model"),
            "request_counts": view["request_counts"], "progress": view.get("progress"),
            "error": view.get("error"), "metrics": view.get("metrics", {}), **extra}


def _print_human(view: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    counts = view["request_counts"]
    click.echo(f"job {view['id']}: {view['state']} — {counts['completed']} completed, {counts['failed']} failed "
               f"of {counts['total']}")
    if view.get("error"):
        click.echo(f"error: {view['error']}")
    for name, m in sorted((view.get("metrics") or {}).items()):
        click.echo(f"  {name}: {m['value']:.6g} {m['unit']}".rstrip())
    for k, v in (extra or {}).items():
        click.echo(f"{k}: {v}")


def _emit(view: dict[str, Any], as_json: bool, **extra: Any) -> None:
    if as_json:
        click.echo(json.dumps(_summary(view, **extra)))
    else:
        _print_human(view, extra)


def _exit_code(view: dict[str, Any]) -> int:
    return 0 if view["state"] == "completed" else 1


class Backend:
    """Where status queries go: the HTTP API when given, else the SQL store and bucket directly."""

    def __init__(self, api_url: str | None, api_key: str | None):
        self.client = None
        self.svc = None
        if api_url:
            from api.client import Client

            self.client = Client(api_url, api_key)
        else:
            from tasks.flow import open_services

            self.svc = open_services(migrate=True)

    @classmethod
    def local(cls, svc: Any) -> Backend:
        backend = cls.__new__(cls)
        backend.client, backend.svc = None, svc
        return backend

    def get(self, job_id: str) -> dict[str, Any]:
        if self.client:
            return self.client.get(job_id)
        from api.views import job_view
        from storage import repo

        job = repo.get_job(self.svc.db, job_id)
        if job is None:
            raise click.ClickException(f"no job {job_id!r}")
        return job_view(self.svc, job)

    def cancel(self, job_id: str) -> dict[str, Any]:
        if self.client:
            return self.client.cancel(job_id)
        from tasks.flow import cancel_job

        self.get(job_id)
        cancel_job(self.svc, job_id)
        return self.get(job_id)

    def download(self, job_id: str, view: dict[str, Any], dest: Path) -> dict[str, str]:
        dest.mkdir(parents=True, exist_ok=True)
        written: dict[str, str] = {}
        names = {"output": "output.jsonl", "errors": "errors.jsonl"}
        for which, name in names.items():
            target = dest / name
            if self.client:
                with target.open("wb") as f:
                    for part in self.client.download(job_id, which):
                        f.write(part)
            else:
                key = view["output_key"] if which == "output" else view["error_key"]
                if not key:
                    continue
                with self.svc.bucket.open_read(key) as src, target.open("wb") as f:
                    shutil.copyfileobj(src, f)
            written[which] = str(target)
        for key in view.get("outputs") or []:
            name = key.rsplit("/", 1)[-1]
            target = dest / name
            if self.client:
                with target.open("wb") as f:
                    for part in self.client.download(job_id, f"outputs/{name}"):
                        f.write(part)
            else:
                with self.svc.bucket.open_read(key) as src, target.open("wb") as f:
                    shutil.copyfileobj(src, f)
            written[name] = str(target)
        return written


def _wait(backend: Backend, job_id: str, quiet: bool, timeout: float | None, poll: float = 0.5) -> dict[str, Any]:
    from tqdm import tqdm

    view = backend.get(job_id)
    bar = tqdm(total=view["request_counts"]["total"], unit="req", desc=job_id, file=sys.stderr, disable=quiet)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            counts = view["request_counts"]
            bar.total = counts["total"]
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix_str(view["state"])
            if view["state"] in TERMINAL:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise click.ClickException(f"job {job_id} still {view['state']} after {timeout}s")
            time.sleep(poll)
            view = backend.get(job_id)
    finally:
        bar.close()


api_options = [
    click.option("--api", "api_url", envvar="GENMILL_API_URL", default=None,
                 help="GenMill API base URL; default: read the SQL store directly"),
    click.option("--api-key", envvar="GENMILL_API_KEY", default=None, help="API key (Bearer)"),
]


def with_api(f: Any) -> Any:
    for option in reversed(api_options):
        f = option(f)
    return f


sampling_options = [
    click.option("--max-tokens", type=int, default=None, help="LLM: tokens to generate (default 64)"),
    click.option("--temperature", type=float, default=None, help="LLM: 0 is greedy (default 1.0)"),
    click.option("--top-p", type=float, default=None),
    click.option("--top-k", type=int, default=None),
    click.option("--seed", type=int, default=None, help="job seed; per-request seeds derive from it"),
    click.option("--stop", multiple=True, help="LLM stop string (repeatable)"),
    click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
                 help="any job parameter, VALUE parsed as JSON when it can be (e.g. -p num_samples=64)"),
    click.option("--kind", type=click.Choice(["prompts", "images", "audio"]), default=None,
                 help="job kind; default: the kind the model's engine serves"),
    click.option("--chunk-size", type=int, default=None, help="requests per chunk (task)"),
]


def with_sampling(f: Any) -> Any:
    for option in reversed(sampling_options):
        f = option(f)
    return f


def _job_params(params: tuple[str, ...], max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
                stop: tuple[str, ...]) -> dict[str, Any]:
    return _collect_params(params, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed, stop=stop)


def _input_for(files: tuple[Path, ...], kind: str | None, bucket: Any, owner: str) -> tuple[bytes | None, str | None]:
    """Prompt files are read as they are; audio files are put in the bucket and listed."""
    if not files:
        return None, None
    if kind == "audio" or (len(files) > 1 or files[0].suffix.lower() in (".wav", ".flac", ".ogg", ".opus", ".mp3")):
        keys = []
        for path in files:
            key = f"uploads/{owner}/{uuid.uuid4().hex}/{path.name}"
            bucket.put_file(key, str(path))
            keys.append(key)
        return ("\n".join(keys) + "\n").encode(), "audio"
    return files[0].read_bytes(), kind


# ---------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GenMill: batch generation jobs on device-pinned workers."""


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="registry name or local checkpoint folder")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where output.jsonl and errors.jsonl go (default ./genmill-results/JOB)")
@with_sampling
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="compute dtype (engine option)")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def run(files: tuple[Path, ...], model: str, output_dir: Path | None, kind: str | None, chunk_size: int | None,
        params: tuple[str, ...], max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
        stop: tuple[str, ...], device: str, dtype: str | None, threads: int | None, as_json: bool,
        quiet: bool) -> None:
    """Run a job in this process: no servers, SQLite and a local bucket folder (GENMILL_HOME)."""
    from api.views import job_view
    from tasks.embedded import run_job
    from tasks.flow import open_services
    from workers.device import pin_device, set_threads

    torch_device = pin_device(device)
    set_threads(threads)
    svc = open_services(migrate=True)
    data, kind = _input_for(files, kind, svc.bucket, "local")
    overrides = {"dtype": dtype} if dtype else {}
    job = run_job(svc, model=model, kind=kind, input_bytes=data, device=torch_device, engine_overrides=overrides,
                  show_progress=not (quiet or as_json and not sys.stderr.isatty()),
                  params=_job_params(params, max_tokens, temperature, top_p, top_k, seed, stop),
                  chunk_size=chunk_size)
    view = job_view(svc, job)
    extra: dict[str, Any] = {}
    if view["output_key"]:
        dest = output_dir or Path("genmill-results") / job.id
        extra["files"] = Backend.local(svc).download(job.id, view, dest)
        extra["output_dir"] = str(dest)
    _emit(view, as_json, **extra)
    sys.exit(_exit_code(view))


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="registry name or local checkpoint folder")
@with_sampling
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE")
@with_api
@click.option("--json", "as_json", is_flag=True)
def submit(files: tuple[Path, ...], model: str, kind: str | None, chunk_size: int | None, params: tuple[str, ...],
           max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any, stop: tuple[str, ...],
           metadata: tuple[str, ...], api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """Submit a job to the service (through the API, or straight to SQL + Redis)."""
    job_params = _job_params(params, max_tokens, temperature, top_p, top_k, seed, stop)
    meta = {k: str(v) for k, v in _collect_params(metadata).items()}
    if api_url:
        from api.client import Client, GenMillError

        client = Client(api_url, api_key)
        try:
            if kind == "audio" or len(files) > 1:
                keys = [client.upload(p) for p in files]
                import tempfile

                with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                    f.write("\n".join(keys) + "\n")
                view = client.submit(model, f.name, kind=kind or "audio", params=job_params, metadata=meta,
                                     chunk_size=chunk_size)
            else:
                view = client.submit(model, files[0] if files else None, kind=kind, params=job_params,
                                     metadata=meta, chunk_size=chunk_size)
        except GenMillError as e:
            raise click.ClickException(str(e.detail)) from e
    else:
        from api.views import job_view
        from tasks.flow import open_services, submit_job
        from tasks.worker_tasks import CeleryDispatcher

        svc = open_services(migrate=True)
        data, kind = _input_for(files, kind, svc.bucket, "local")
        job = submit_job(svc, CeleryDispatcher(), model=model, kind=kind, input_bytes=data, params=job_params,
                         metadata=meta, chunk_size=chunk_size)
        view = job_view(svc, job)
    _emit(view, as_json)
    if view["state"] == "failed":
        sys.exit(1)


@main.command()
@click.argument("job_id")
@with_api
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """Show a job's state, counts, progress, metrics and errors."""
    view = Backend(api_url, api_key).get(job_id)
    _emit(view, as_json, progress=f"{view['progress']:.1%}", chunks=view["chunks"])


@main.command()
@click.argument("job_id")
@with_api
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def wait(job_id: str, api_url: str | None, api_key: str | None, timeout: float | None, as_json: bool,
         quiet: bool) -> None:
    """Wait for a job to end, with a progress bar on stderr."""
    view = _wait(Backend(api_url, api_key), job_id, quiet, timeout)
    _emit(view, as_json)
    sys.exit(_exit_code(view))


@main.command()
@click.argument("job_id")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@with_api
@click.option("--json", "as_json", is_flag=True)
def results(job_id: str, output_dir: Path | None, api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """Download a job's output.jsonl, errors.jsonl and other outputs."""
    backend = Backend(api_url, api_key)
    view = backend.get(job_id)
    if not view["output_key"]:
        raise click.ClickException(f"job {job_id} is {view['state']}: no output yet")
    written = backend.download(job_id, view, output_dir or Path("genmill-results") / job_id)
    _emit(view, as_json, files=written)


@main.command()
@click.argument("job_id")
@with_api
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """Cancel a job: queued chunks stop, finished results are kept."""
    _emit(Backend(api_url, api_key).cancel(job_id), as_json)


@main.command("list")
@click.option("--state", default=None)
@click.option("--limit", type=int, default=20)
@with_api
@click.option("--json", "as_json", is_flag=True)
def list_jobs(state: str | None, limit: int, api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """List recent jobs."""
    backend = Backend(api_url, api_key)
    if backend.client:
        rows = backend.client.list(state=state, limit=limit)["data"]
    else:
        from api.views import job_view
        from storage import repo

        rows = [job_view(backend.svc, j, with_metrics=False)
                for j in repo.list_jobs(backend.svc.db, owner=None, state=state, limit=limit, after=None)]
    if as_json:
        click.echo(json.dumps({"data": [_summary(r) for r in rows]}))
        return
    for r in rows:
        c = r["request_counts"]
        click.echo(f"{r['id']}  {r['state']:<11} {r['kind']:<8} {c['completed']}/{c['total']} ok, {c['failed']} failed  {r['model']}")


@main.command()
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: one worker per device")
@click.option("--models", "models_flag", is_flag=True, hidden=True)
@click.argument("models", nargs=-1, required=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--no-warm", is_flag=True, help="load models on first use instead of at start-up")
@click.option("--name", default=None, help="worker node name (default genmill-DEVICE@HOST)")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (split the cores between CPU workers)")
def worker(device: str, models_flag: bool, models: tuple[str, ...], dtype: str | None, loglevel: str,
           no_warm: bool, name: str | None, threads: int | None) -> None:
    """Start a worker pinned to DEVICE serving MODELS: genmill worker --device cuda:1 --models a b"""
    from tasks.worker_main import start_worker

    names = [m for arg in models for m in arg.split(",") if m]
    start_worker(device, names, engine_overrides={"dtype": dtype} if dtype else {}, loglevel=loglevel,
                 warm=not no_warm, name=name, threads=threads)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--no-auth", is_flag=True, help="no API keys: only for a single user on localhost")
def api(host: str, port: int, no_auth: bool) -> None:
    """Serve the HTTP API (OpenAPI document at /docs and /openapi.json)."""
    import uvicorn

    from api.app import create_app

    if no_auth and host not in ("127.0.0.1", "localhost", "::1"):
        raise click.ClickException("--no-auth is only allowed on a loopback host")
    try:
        app = create_app(require_auth=not no_auth)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from e
    uvicorn.run(app, host=host, port=port, log_level="info")


@main.group()
def db() -> None:
    """The SQL store."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (Alembic) to GENMILL_DATABASE_URL."""
    from storage.db import upgrade
    from tasks.settings import get_settings

    url = get_settings().database_url
    upgrade(url)
    click.echo(f"database at head: {url.split('@')[-1]}")


@main.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the tiny model goes (default GENMILL_HOME/models/tiny-llama)")
@click.option("--output", "-o", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("genmill-demo"), show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def demo(ctx: click.Context, folder: Path | None, output_dir: Path, as_json: bool) -> None:
    """Build a tiny random-weight model and run the bundled example prompt file on it."""
    from tasks.settings import get_settings
    from workers.llm.tiny import build_tiny_checkpoint

    folder = folder or get_settings().home / "models" / "tiny-llama"
    if not (folder / "config.json").exists():
        click.echo(f"building a tiny random-weight Llama at {folder} (its text is gibberish)", err=True)
        build_tiny_checkpoint(folder, arch="llama")
    example = Path(__file__).parent / "data" / "example_prompts.jsonl"
    ctx.invoke(run, files=(example,), model=str(folder), output_dir=output_dir, kind=None, chunk_size=None,
               params=(), max_tokens=24, temperature=None, top_p=None, top_k=None, seed=1234, stop=(),
               device="cpu", dtype=None, threads=None, as_json=as_json, quiet=False)


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="int8: per output channel; int4: group-wise along the input dim")
@click.option("--group-size", type=int, default=64, show_default=True, help="int4 group size (32, 64 or 128)")
def quantize(source: Path, dest: Path, mode: str, group_size: int) -> None:
    """Write a weight-only int8/int4 copy of an HF checkpoint folder (safetensors in and out)."""
    from workers.llm.quantize import quantize_checkpoint

    if dest.exists() and any(dest.iterdir()):
        raise click.ClickException(f"{dest} exists and is not empty")
    try:
        sidecar = quantize_checkpoint(source, dest, mode, group_size=group_size)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{mode} checkpoint written to {dest} ({len(sidecar.get('modules', []))} layers quantized)")


@main.command("convert-mimi")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--moshi-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the checkpoint's moshi-format JSON config (default: Kyutai's released Mimi)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a MimiConfig field")
def convert_mimi_cmd(source: Path, dest: Path, moshi_config: Path | None, overrides: tuple[str, ...]) -> None:
    """Convert moshi-format Mimi weights (as Hibiki ships them) into a transformers MimiModel folder."""
    from safetensors import SafetensorError

    from workers.audio.mimi_convert import convert_mimi

    config = _collect_params(overrides)
    if moshi_config is not None:
        config["moshi_config"] = str(moshi_config)
    try:
        out = convert_mimi(source, dest, config_overrides=config)
    except (ValueError, KeyError, OSError, SafetensorError) as e:
        raise click.ClickException(f"{source}: not a moshi-format Mimi safetensors file ({e})") from e
    click.echo(f"Mimi codec written to {out}")


if __name__ == "__main__":
    main()

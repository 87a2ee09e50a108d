"""Throw-away Redis, PostgreSQL and S3 (moto) servers on free ports, for tests.

Each server runs from a fresh temporary folder and is stopped by ``stop()`` (or by leaving its
``with`` block), so tests need neither the system services nor a particular port. Missing binaries
are an error, not a skip: CI installs them, and a silently skipped database suite hides breakage.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

START_TIMEOUT = 30.0
# free_port() cannot reserve the port: another process may take it before the server binds it
PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _port_taken(log_text: str) -> bool:
    return any(
        m in log_text for m in ("in use", "Address already", "could not bind", "could not create listen")
    )


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[Any]) -> bool:
    """Poll ``ready`` until it is true (True) or the process exits or time runs out (False)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _bulk_len(reply: bytes) -> int:
    """Total length of a complete RESP bulk-string reply whose header is in ``reply``."""
    header, _, _ = reply.partition(b"\r\n")
    try:
        return len(header) + 2 + int(header[1:]) + 2 if header.startswith(b"$") else len(reply)
    except ValueError:
        return len(reply)


class _Server:
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Redis -----------------------------------------------------------------------------------


class RedisServer(_Server):
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        if not self.binary:
            raise ServerError("redis-server not found on PATH: install redis (apt-get install redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="genmill-redis-"))
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            log = self.dir / f"redis-{attempt}.log"
            cmd = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(log),
            ]  # fmt: skip
            with open(self.dir / f"stderr-{attempt}.log", "wb") as err:
                self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=err)
            if _wait_until(self._ping, self.proc):
                return self
            text = _tail(log) + _tail(self.dir / f"stderr-{attempt}.log")
            code = self.proc.poll()
            self._stop_process()
            if code is None or not _port_taken(text):
                self.stop()
                why = f"exited with {code}" if code is not None else f"did not answer within {START_TIMEOUT}s"
                raise ServerError(f"redis-server {why}:\n{text}")
        self.stop()
        raise ServerError(f"redis-server: no free port after {PORT_ATTEMPTS} attempts")

    def _ping(self) -> bool:
        """Our server answers (checked by its pid: the port could belong to someone else's)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"\r\n" not in data or len(data) < _bulk_len(data):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return False
        return self.proc is not None and f"process_id:{self.proc.pid}\r\n".encode() in data

    def _stop_process(self) -> None:
        _stop_process(self.proc)
        self.proc = None

    def stop(self) -> None:
        self._stop_process()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# --- PostgreSQL ------------------------------------------------------------------------------


def find_postgres_bindir() -> Path:
    """The folder with initdb and postgres: ``pg_config --bindir``, PATH, /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    if env := os.environ.get("GENMILL_PG_BINDIR"):
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], check=False, capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0:
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)

    def version(p: str) -> tuple[int, ...]:
        v = Path(p).parent.name
        return tuple(int(x) for x in v.split(".") if x.isdigit())

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no pg_config, no initdb on PATH)"
    raise ServerError(
        "PostgreSQL server binaries (initdb, postgres) not found; looked in: "
        f"{looked}. Install the server package (apt-get install postgresql) or set GENMILL_PG_BINDIR."
    )


class PostgresServer(_Server):
    """A private PostgreSQL cluster, tuned for tests (no fsync), trust auth on 127.0.0.1.

    PostgreSQL refuses to run as root; as root, initdb and postgres run as the ``postgres`` user.
    """

    user = "postgres"

    def __init__(self, bindir: str | os.PathLike[str] | None = None) -> None:
        self.bindir = Path(bindir) if bindir else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise ServerError(
                "running as root, and there is no 'postgres' system user to run PostgreSQL as "
                "(postgres refuses to run as root): create it, or run the tests as another user"
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> Self:
        bindir = self.bindir or find_postgres_bindir()
        owner = self._as_owner()
        # not under pytest's tmp_path: its parents are private to root, and postgres must reach it
        self.dir = Path(tempfile.mkdtemp(prefix="genmill-pg-"))
        data, sock, log = self.dir / "data", self.dir / "sock", self.dir / "postgres.log"
        sock.mkdir()
        if owner:
            os.chown(self.dir, owner["user"], owner["group"])
            os.chown(sock, owner["user"], owner["group"])
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8",
             "--no-locale", "--no-sync"],
            check=False, capture_output=True, text=True, env=env, cwd=self.dir, **owner,
        )  # fmt: skip
        if initdb.returncode != 0:
            self.stop()
            raise ServerError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}\n{initdb.stderr}")
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            log = self.dir / f"postgres-{attempt}.log"
            cmd = [
                str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sock),
                "-h", "127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB",
            ]  # fmt: skip
            with open(log, "wb") as logf:
                self.proc = subprocess.Popen(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=self.dir, **owner
                )
            if _wait_until(self._ready, self.proc):
                return self
            code = self.proc.poll()
            _stop_process(self.proc, signal.SIGINT)
            if code is None or not _port_taken(_tail(log)):
                text = _tail(log)
                self.stop()
                why = (
                    f"exited with {code}"
                    if code is not None
                    else f"did not accept connections in {START_TIMEOUT}s"
                )
                raise ServerError(f"postgres {why}:\n{text}")
        self.stop()
        raise ServerError(f"postgres: no free port after {PORT_ATTEMPTS} attempts")

    def _ready(self) -> bool:
        """Our server accepts connections (checked by its data directory: the port could belong to
        someone else's)."""
        import psycopg

        assert self.dir is not None
        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", connect_timeout=2
            ) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
        except psycopg.Error:
            return False
        return row is not None and Path(row[0]).resolve() == (self.dir / "data").resolve()

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE / DROP DATABASE)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname=database, autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create ``name`` (optionally copying ``template``, which must have no open connections);
        return its URL."""
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        self.execute(sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        _stop_process(self.proc, signal.SIGINT)  # SIGINT: fast shutdown, no waiting for clients
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# --- S3 (moto) -------------------------------------------------------------------------------

# dummy credentials: boto3 must find some, and they must never be real ones
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class MotoServer(_Server):
    """moto's S3 (and other AWS APIs) in a thread of this process, reachable over HTTP."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:
            raise ServerError(f'moto server support missing ({e}): pip install "moto[server]"') from e
        # port 0: the OS picks a free port when the server binds, so there is no race to lose
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


if __name__ == "__main__":  # manual check: python -m tests.servers
    with RedisServer() as r, PostgresServer() as p, MotoServer() as m:
        print(r.url, p.url(), m.endpoint_url, file=sys.stderr)

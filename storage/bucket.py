"""The result bucket: a local folder (embedded mode) or S3 / an S3-compatible service.

Keys are ``/``-separated relative paths (``jobs/{job}/parts/00003.jsonl``). Every method checks
its key with ``safe_key`` first, so a key built from user input cannot leave the bucket.
Writes are all-or-nothing: a reader sees the old object, the new one, or none, never a partial one
(temp file + ``os.replace`` in a folder; a single PUT on S3).
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

# in-flight writes of a LocalBucket; such names are reserved so that no key can collide with one
TMP_PREFIX = ".genmill-tmp-"

# objects up to this size are one PUT; larger ones a multipart upload (still atomic on S3)
S3_MULTIPART_THRESHOLD = 512 * 1024 * 1024

_UMASK = os.umask(0)
os.umask(_UMASK)


class BucketKeyError(ValueError):
    """A key that could escape the bucket or is malformed."""


class ObjectNotFound(KeyError):
    """No object under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError would show the repr of the args
        return f"no object {self.key!r} in the bucket"


def safe_key(key: str) -> str:
    """Return ``key`` if it is a clean relative key, else raise ``BucketKeyError``."""
    if not isinstance(key, str) or not key:
        raise BucketKeyError(f"invalid bucket key {key!r}: empty")
    problem = None
    segments = key.split("/")
    if "\x00" in key:
        problem = "contains NUL"
    elif "\\" in key:
        problem = "contains a backslash"
    elif key.startswith("/"):
        problem = "is absolute"
    elif "" in segments:
        problem = "has an empty segment"
    elif any(s in (".", "..") for s in segments):
        problem = "has a '.' or '..' segment"
    elif any(s.startswith(TMP_PREFIX) for s in segments):
        problem = f"uses the reserved prefix {TMP_PREFIX!r}"
    if problem:
        raise BucketKeyError(f"invalid bucket key {key!r}: {problem}")
    return key


def safe_prefix(prefix: str) -> str:
    """A listing prefix: ``""`` (everything), a key, or a key followed by ``/``."""
    if prefix == "":
        return prefix
    safe_key(prefix.removesuffix("/"))
    return prefix


class Bucket(abc.ABC):
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A stream of the object's bytes; the caller closes it (use ``with``)."""

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix`` (a plain string prefix, as on S3)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix`` (which must not be empty)."""

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    def local_path(self, key: str) -> Path | None:
        """The object's file, for buckets that are folders; None otherwise."""
        safe_key(key)
        return None


def _nonempty_prefix(prefix: str) -> str:
    if not prefix:
        raise BucketKeyError("refusing to delete the whole bucket (empty prefix)")
    return safe_prefix(prefix)


class LocalBucket(Bucket):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBucket({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*safe_key(key).split("/"))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    @contextmanager
    def _atomic(self, key: str) -> Iterator[IO[bytes]]:
        # the temp file lives next to the target: os.replace is only atomic within a filesystem
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as f:
            f.write(data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as src, self._atomic(key) as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        safe_prefix(prefix)
        # walk only the deepest folder the prefix names; the rest of it filters names
        folder, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        _nonempty_prefix(prefix)
        if prefix.endswith("/"):
            # a whole folder: also takes leftover temp files of writers that crashed
            folder = self.root.joinpath(*prefix[:-1].split("/"))
            if folder.is_dir():
                shutil.rmtree(folder)
            parents = [folder]
        else:
            parents = []
            for key in self.list(prefix):
                path = self._path(key)
                with _suppress_oserror():
                    path.unlink()
                parents.append(path)
        for p in parents:
            self._prune_empty_dirs(p.parent)

    def _prune_empty_dirs(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop here
                if folder.exists():
                    return
            folder = folder.parent


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


class S3Bucket(Bucket):
    """Objects under ``s3://{bucket}/{prefix}``; ``endpoint_url`` for MinIO, moto, R2 and the like."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        client: Any = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        prefix = prefix.strip("/")
        if prefix:
            safe_key(prefix)
        self.prefix = f"{prefix}/" if prefix else ""
        if client is None:
            options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
            if endpoint_url:
                # S3-compatible services: path-style addressing, and checksums only where S3
                # requires them (several do not accept boto3's default CRC32 trailers)
                options.update(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            client = boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))
        self._s3 = client
        self._transfer = TransferConfig(multipart_threshold=S3_MULTIPART_THRESHOLD, use_threads=False)

    def __repr__(self) -> str:
        return f"S3Bucket({self.bucket!r}, {self.prefix!r})"

    def _key(self, key: str) -> str:
        return self.prefix + safe_key(key)

    @staticmethod
    def _missing(err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("NoSuchKey", "404", "NotFound")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        k = self._key(key)
        with open(path, "rb") as f:
            self._s3.upload_fileobj(f, self.bucket, k, Config=self._transfer)

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as e:
            if self._missing(e):
                raise ObjectNotFound(key) from None
            raise

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if self._missing(e):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(key)
        return int(head["ContentLength"])

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            for obj in page.get("Contents", ()):
                yield obj["Key"]

    def list(self, prefix: str = "") -> list[str]:
        safe_prefix(prefix)
        n = len(self.prefix)
        return sorted(k[n:] for k in self._iter_keys(prefix))

    def delete_prefix(self, prefix: str) -> None:
        _nonempty_prefix(prefix)
        keys = list(self._iter_keys(prefix))
        for i in range(0, len(keys), 1000):  # the DeleteObjects limit
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise OSError(f"S3 delete failed for {len(resp['Errors'])} keys, e.g. {first}")


def open_bucket(url: str, endpoint_url: str | None = None) -> Bucket:
    """``file:///abs/path``, ``s3://bucket[/prefix]``, or a plain folder path."""
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"bucket URL {url!r} has no bucket name")
        return S3Bucket(parts.netloc, unquote(parts.path), endpoint_url)
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"bucket URL {url!r}: remote file hosts are not supported")
        return LocalBucket(url2pathname(parts.path))
    if "://" in url:
        raise ValueError(f"unsupported bucket URL {url!r} (use file:// or s3://)")
    return LocalBucket(url)

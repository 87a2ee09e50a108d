"""The bucket on a local folder and on S3 (a moto server): the same behaviour from both."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from storage.bucket import (
    TMP_PREFIX,
    Bucket,
    BucketKeyError,
    LocalBucket,
    ObjectNotFound,
    S3Bucket,
    open_bucket,
    safe_key,
)


@pytest.fixture
def s3_bucket_name(s3_endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bucket]:
    if request.param == "local":
        yield LocalBucket(tmp_path / "bucket")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield S3Bucket(request.getfixturevalue("s3_bucket_name"), "genmill/data", endpoint)


def test_round_trip(bucket: Bucket) -> None:
    assert not bucket.exists("jobs/a/input")
    bucket.put_bytes("jobs/a/input", b"hello\n")
    assert bucket.exists("jobs/a/input")
    assert bucket.get_bytes("jobs/a/input") == b"hello\n"
    assert bucket.size("jobs/a/input") == 6
    bucket.put_bytes("jobs/a/input", b"")  # overwrite, with an empty object
    assert bucket.get_bytes("jobs/a/input") == b"" and bucket.size("jobs/a/input") == 0
    assert not bucket.exists("jobs/a")  # a "folder" is not an object


def test_put_file_and_streaming_read(bucket: Bucket, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    bucket.put_file("jobs/b/outputs/samples.npz", src)
    assert bucket.size("jobs/b/outputs/samples.npz") == len(data)
    digest, n = hashlib.sha256(), 0
    with bucket.open_read("jobs/b/outputs/samples.npz") as f:
        while block := f.read(256 * 1024):  # never the whole object at once
            assert len(block) <= 256 * 1024
            digest.update(block)
            n += len(block)
    assert n == len(data) and digest.digest() == hashlib.sha256(data).digest()


def test_list_and_delete_prefix(bucket: Bucket) -> None:
    keys = [
        "jobs/j1/parts/00001.jsonl",
        "jobs/j1/parts/00000.jsonl",
        "jobs/j1/input",
        "jobs/j10/input",
        "top",
    ]
    for k in keys:
        bucket.put_bytes(k, k.encode())
    assert bucket.list() == sorted(keys)
    assert bucket.list("jobs/j1/parts/") == ["jobs/j1/parts/00000.jsonl", "jobs/j1/parts/00001.jsonl"]
    # a plain string prefix, as on S3: "jobs/j1" also matches "jobs/j10/..."
    assert bucket.list("jobs/j1") == sorted(k for k in keys if k.startswith("jobs/j1"))
    assert bucket.list("jobs/j1/") == sorted(k for k in keys if k.startswith("jobs/j1/"))
    assert bucket.list("nothing/here/") == [] and bucket.list("jobs/j2") == []

    bucket.delete_prefix("jobs/j1/")
    assert bucket.list() == ["jobs/j10/input", "top"]
    bucket.delete_prefix("jobs/j1")  # string prefix: takes jobs/j10 too
    assert bucket.list() == ["top"]
    bucket.delete_prefix("missing/")
    with pytest.raises(BucketKeyError):
        bucket.delete_prefix("")  # never the whole bucket by accident
    assert bucket.list() == ["top"]


def test_missing_objects(bucket: Bucket) -> None:
    for call in (bucket.get_bytes, bucket.open_read, bucket.size):
        with pytest.raises(ObjectNotFound, match="jobs/none/output.jsonl") as info:
            call("jobs/none/output.jsonl")
        assert isinstance(info.value, KeyError) and info.value.key == "jobs/none/output.jsonl"


BAD_KEYS = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("../outside", "'..'"),
    ("jobs/../../outside", "'..'"),
    ("jobs/./x", "'.'"),
    ("jobs\\x", "backslash"),
    ("jobs//x", "empty segment"),
    ("jobs/x/", "empty segment"),
    ("jobs/x\x00y", "NUL"),
    (f"jobs/{TMP_PREFIX}abc", "reserved"),
]


@pytest.mark.parametrize(("key", "why"), BAD_KEYS)
def test_key_confinement(bucket: Bucket, key: str, why: str) -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("put_bytes", (key, b"x")),
        ("put_file", (key, __file__)),
        ("open_read", (key,)),
        ("get_bytes", (key,)),
        ("exists", (key,)),
        ("size", (key,)),
        ("local_path", (key,)),
    ]
    if key and not key.endswith("/"):  # "" and "jobs/x/" are valid listing prefixes
        calls += [("list", (key,)), ("delete_prefix", (key,))]
    for name, args in calls:
        with pytest.raises(BucketKeyError, match=why) as info:
            getattr(bucket, name)(*args)
        assert repr(key) in str(info.value), name  # the message names the key
    assert bucket.list() == []


def test_safe_key_accepts_ordinary_keys() -> None:
    for key in ("a", "jobs/batch_1/parts/00000.jsonl", "x/.hidden", "a/b..c", "with space/ü.txt"):
        assert safe_key(key) == key


# --- local folder specifics ------------------------------------------------------------------


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    b = LocalBucket(tmp_path / "bucket")
    b.put_bytes("jobs/a/output.jsonl", b"old")

    class Broken:
        def __init__(self) -> None:
            self.n = 0

        def read(self, size: int = -1) -> bytes:
            self.n += 1
            if self.n > 2:
                raise OSError("disk went away")
            return b"partial" * 1000

    # a write that fails half-way leaves the previous object and no temp file behind
    src = tmp_path / "src"
    src.write_bytes(b"new")
    real = shutil.copyfileobj
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil, "copyfileobj", lambda s, d, n=0: real(Broken(), d, n))
        with pytest.raises(OSError, match="disk went away"):
            b.put_file("jobs/a/output.jsonl", src)
    assert b.get_bytes("jobs/a/output.jsonl") == b"old"
    assert os.listdir(tmp_path / "bucket" / "jobs" / "a") == ["output.jsonl"]

    # a crashed writer's temp file is neither listed nor an object
    (tmp_path / "bucket" / "jobs" / "a" / f"{TMP_PREFIX}dead").write_bytes(b"half")
    assert b.list() == ["jobs/a/output.jsonl"] and b.list("jobs/a/") == ["jobs/a/output.jsonl"]

    # readers racing a writer see a whole old or whole new object, never a mix
    versions = [bytes([i]) * 2_000_000 for i in range(2)]
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            data = b.get_bytes("jobs/a/output.jsonl")
            seen.add(data[:1] if data in versions else b"TORN")

    b.put_bytes("jobs/a/output.jsonl", versions[0])
    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        b.put_bytes("jobs/a/output.jsonl", versions[i % 2])
    stop.set()
    t.join()
    assert b"TORN" not in seen
    # files are created with ordinary permissions, not mkstemp's 0600
    mode = (tmp_path / "bucket" / "jobs" / "a" / "output.jsonl").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()

    # deleting a folder prefix takes stray temp files with it and prunes empty folders
    b.delete_prefix("jobs/a/")
    assert not (tmp_path / "bucket" / "jobs").exists() and (tmp_path / "bucket").is_dir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_local_path(tmp_path: Path, s3_endpoint: str, s3_bucket_name: str) -> None:
    b = LocalBucket(tmp_path / "bucket")
    b.put_bytes("jobs/a/x.wav", b"RIFF")
    path = b.local_path("jobs/a/x.wav")
    assert path == tmp_path / "bucket" / "jobs" / "a" / "x.wav" and path.read_bytes() == b"RIFF"
    assert S3Bucket(s3_bucket_name, "", s3_endpoint).local_path("jobs/a/x.wav") is None


def test_open_bucket(tmp_path: Path, s3_endpoint: str, s3_bucket_name: str) -> None:
    folder = tmp_path / "my bucket"
    b = open_bucket(folder.as_uri())  # file:// with a percent-encoded space
    assert isinstance(b, LocalBucket) and b.root == folder.resolve()
    b.put_bytes("k", b"v")
    assert open_bucket(str(folder)).get_bytes("k") == b"v"  # a plain path

    s3 = open_bucket(f"s3://{s3_bucket_name}/some/prefix/", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3Bucket) and s3.prefix == "some/prefix/"
    s3.put_bytes("k", b"v")
    raw = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket_name)
    assert [o["Key"] for o in raw["Contents"]] == ["some/prefix/k"]
    assert open_bucket(f"s3://{s3_bucket_name}", endpoint_url=s3_endpoint).list() == ["some/prefix/k"]

    for bad in ("ftp://host/x", "s3:///nobucket", "file://otherhost/x"):
        with pytest.raises(ValueError):
            open_bucket(bad)
    with pytest.raises(BucketKeyError):
        S3Bucket(s3_bucket_name, "../escape", s3_endpoint)

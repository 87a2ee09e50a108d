"""What a job kind is: parse its input into requests, run a chunk of them on an engine, finalize.

The generic flow (``tasks.flow``) owns states, chunking, part files and merging the JSONL parts into
``output.jsonl`` / ``errors.jsonl``. A kind adds only what is its own: how input becomes requests,
how requests become engine calls, and any extra outputs (an npz, WAVs) written at finalize.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.engine import Metric


class JobInvalid(ValueError):
    """The whole job is unusable (unknown model, empty file, bad parameter): fail at validation."""


@dataclass
class ParsedInput:
    # JSON-able request dicts in input order; each carries "index" (0-based position among the
    # job's requests) and "line" (1-based line or item number in the input, for error messages)
    requests: list[dict[str, Any]]
    # error-file entries for items rejected while parsing; the rest of the job still runs
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChunkResult:
    results: list[dict[str, Any]]  # output-file lines, in request order
    errors: list[dict[str, Any]]  # error-file lines (each has "line" for ordering)
    metrics: list[Metric] = field(default_factory=list)


class Storage(Protocol):
    """The bucket as a kind sees it (``storage.bucket.Bucket`` satisfies this)."""

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...


@dataclass
class ChunkContext:
    job_id: str
    chunk_index: int
    params: dict[str, Any]
    bucket: Storage

    def part_key(self, suffix: str) -> str:
        """Keyed by (job, chunk): a redelivered chunk overwrites its part instead of adding one."""
        return f"jobs/{self.job_id}/parts/{self.chunk_index:05d}.{suffix}"

    def output_key(self, name: str) -> str:
        return f"jobs/{self.job_id}/outputs/{name}"


@dataclass
class FinalizeContext:
    job_id: str
    params: dict[str, Any]
    bucket: Storage
    num_chunks: int
    total: int  # number of requests, parse errors included

    def part_key(self, chunk_index: int, suffix: str) -> str:
        return f"jobs/{self.job_id}/parts/{chunk_index:05d}.{suffix}"

    def output_key(self, name: str) -> str:
        return f"jobs/{self.job_id}/outputs/{name}"


class JobKind(Protocol):
    name: str  # "prompts" | "images" | "audio"
    engine: str  # engine family that serves it: "llm" | "diffusion" | "audio"
    needs_input_file: bool

    def validate_params(self, params: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
        """Check and normalise job parameters; raise JobInvalid naming the parameter."""
        ...

    def parse(self, data: bytes | None, params: dict[str, Any]) -> ParsedInput:
        """Turn the input file (or, for inputless kinds, the parameters) into requests."""
        ...

    def run_chunk(self, engine: Any, requests: list[dict[str, Any]], ctx: ChunkContext, progress: Any = None) -> ChunkResult:
        ...

    def finalize(self, ctx: FinalizeContext) -> dict[str, str]:
        """Write kind-specific outputs from the parts; return {label: bucket key}. May be empty."""
        ...

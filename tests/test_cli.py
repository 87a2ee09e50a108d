"""The CLI conventions users script against: --json on stdout, progress on stderr, files in --output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def genmill(*args, home, check=True):
    env = {**os.environ, "GENMILL_HOME": str(home)}
    env.pop("GENMILL_API_URL", None)
    return subprocess.run([sys.executable, "-m", "api.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, check=False, cwd=home.parent)


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def test_run_json_writes_output_and_errors_and_status_agrees(home, tiny_llama, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text((ROOT / "api/data/example_prompts.jsonl").read_text())
    out_dir = tmp_path / "out"
    r = genmill("run", prompts, "--model", tiny_llama, "--output", out_dir, "--json", home=home)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert summary["state"] == "completed"
    assert summary["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert summary["metrics"]["generated_tokens"]["value"] > 0
    output = [json.loads(x) for x in (out_dir / "output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (out_dir / "errors.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in output] == ["story-1", "story-2", "chat-1", "list-1", "story-3"]
    assert output[2]["response"]["body"]["object"] == "chat.completion"
    assert errors[0]["custom_id"] == "bad-1" and "temperature" in errors[0]["error"]["message"]

    s = genmill("status", summary["id"], "--json", home=home)
    assert s.returncode == 0, s.stderr
    status = json.loads(s.stdout)
    assert status["id"] == summary["id"] and status["request_counts"] == summary["request_counts"]
    w = genmill("wait", summary["id"], "--json", home=home)
    assert json.loads(w.stdout)["state"] == "completed" and w.returncode == 0


def test_run_text_file_with_sampling_flags(home, tiny_llama, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the river\r\n\r\nthe mill\r\n")
    r = genmill("run", prompts, "--model", tiny_llama, "--output", tmp_path / "o", "--max-tokens", "3",
                "--temperature", "0", "--json", home=home)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o" / "output.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in rows] == ["line-1", "line-3"]
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 3 for x in rows)


def test_bad_job_exits_nonzero_with_the_reason(home, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    r = genmill("run", prompts, "--model", "nonexistent-model", "--json", home=home)
    assert r.returncode == 1
    summary = json.loads(r.stdout)
    assert summary["state"] == "failed" and "unknown model 'nonexistent-model'" in summary["error"]


def test_unknown_job_is_reported(home):
    r = genmill("status", "job_missing", home=home)
    assert r.returncode != 0 and "no job 'job_missing'" in r.stderr


def test_demo_runs_on_a_fresh_home(home, tmp_path):
    r = genmill("demo", "--output", tmp_path / "demo", "--json", home=home)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert (home / "models" / "tiny-llama" / "config.json").exists()
    assert len((tmp_path / "demo" / "output.jsonl").read_text().splitlines()) == 5

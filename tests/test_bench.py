"""`batchd bench` against echo daemons on a real redis-server: it runs and counts what it sent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def bench(url: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchd.cli", "bench", "--redis", url, "--no-progress", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture
def fleet(daemons):
    daemons.scheduler()
    daemons.echo_worker()
    daemons.wait_for_workers()
    return daemons


def test_closed_loop_counts_every_request_and_token(fleet, tmp_path):
    report_path = tmp_path / "bench.json"
    run = bench(fleet.url, "--requests", "60", "--concurrency", "8", "--producers", "2",
                "--prompt-len", "8", "--output-len", "4", "--json", str(report_path))
    assert run.returncode == 0, run.stderr + fleet.logs()
    assert "60 completed of 60" in run.stdout
    report = json.loads(report_path.read_text())
    assert report["requests"] == report["completed"] == 60
    assert report["errors"] == {}
    # The echo engine returns the prompt's bytes up to max_new_tokens: 4 tokens each.
    assert report["output_tokens"] == 240
    assert report["prompt_tokens"] == 480
    assert report["settings"]["mode"] == "closed" and report["settings"]["producers"] == 2
    for name in ("ttft", "itl", "queue", "e2e"):
        stats = report["latency_s"][name]
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], (name, stats)
    assert report["latency_s"]["ttft"]["p99"] <= report["latency_s"]["e2e"]["p99"]
    assert report["requests_per_s"] > 0


def test_open_loop_with_prompts_from_a_file_prints_json(fleet, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hello there"\n{"prompt": "abc", "max_new_tokens": 2}\n'
                       '{"messages": [{"role": "user", "content": "xyz"}]}\n')
    run = bench(fleet.url, "--requests", "30", "--rate", "300", "--prompts-file", str(prompts),
                "--output-len", "64", "--json", "-")
    assert run.returncode == 0, run.stderr + fleet.logs()
    report = json.loads(run.stdout)
    assert report["completed"] == 30 and report["settings"]["mode"] == "open"
    # Ten of each prompt: "hello there" (11 bytes), "abc" capped at 2 tokens, "xyz" (3).
    assert report["output_tokens"] == 10 * 11 + 10 * 2 + 10 * 3


def test_bad_arguments_fail_before_sending(redis_server):
    run = bench(redis_server.url, "--prompt-len", "9:3")
    assert run.returncode != 0
    assert "LO <= HI" in run.stderr

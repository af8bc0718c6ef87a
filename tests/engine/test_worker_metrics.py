"""A real worker process with the paged engine, as Prometheus sees it: /metrics and /health
answer from process start with a loading state, and the engine's preemptions, prefill and
decode times reach the worker's counters (what BatchdKVCachePressure reads)."""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request

from engine_helpers import VOCAB
from prometheus_client.parser import text_string_to_metric_families

from batchd import Client
from batchd.embedded import free_port

# One KV block of the tiny llama: 16 tokens x 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes.
BLOCK_BYTES = 16 * 512


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = get(f"http://127.0.0.1:{port}/metrics")[1]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (sample, sample_labels), v in samples.items()
               if sample == name and all(dict(sample_labels).get(k) == x for k, x in labels.items()))


def test_a_loading_worker_answers_scrapes_and_its_preemptions_are_counted(tiny_models, daemons):
    port = free_port()
    # 12 blocks of 16 tokens for 6 requests that each grow to 3-5 blocks: the paged engine
    # must preempt the youngest (tests/engine/test_paged.py checks the tokens stay exact).
    worker = daemons.start("worker", "--engine", "hf", "--model", str(tiny_models["llama"]), "--device", "cpu",
                           "--slots", "6", "--max-context", "128", "--max-prefill-tokens", "24",
                           "--kv-memory", str(13 * BLOCK_BYTES), "--worker-id", "paged-w1",
                           "--metrics-port", str(port))
    seen, loading_scrape = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            status, body = get(f"http://127.0.0.1:{port}/health")
        except OSError:  # not listening yet: the interpreter is still starting
            time.sleep(0.02)
            continue
        seen.append((status, body.strip()))
        if body.strip() == "loading" and loading_scrape is None:
            loading_scrape = scrape(port)
        if body.strip() == "serving":
            break
        time.sleep(0.05)
    assert seen and seen[0] == (503, "loading"), daemons.logs()
    assert seen[-1] == (200, "serving"), daemons.logs()
    # While it loaded, /metrics said so: a slow start is not a down target.
    assert value(loading_scrape, "batchd:worker_state", worker="paged-w1", state="loading") == 1
    assert value(scrape(port), "batchd:worker_state", worker="paged-w1", state="serving") == 1

    daemons.scheduler()
    daemons.wait_for_workers(1)
    rng = random.Random(21)
    asked = [([rng.randint(3, VOCAB - 1) for _ in range(rng.randint(20, 40))], rng.randint(18, 30)) for _ in range(6)]
    with Client(daemons.url) as client:
        handles = [client.submit(prompt_token_ids=ids, max_new_tokens=n, ignore_eos=True, timeout=120)
                   for ids, n in asked]
        results = [handle.result() for handle in handles]
    assert [r.usage.completion_tokens for r in results] == [n for _ids, n in asked]

    labels = {"worker": "paged-w1", "model_name": tiny_models["llama"].name}
    samples = scrape(port)
    assert value(samples, "batchd:num_preemptions_total", **labels) > 0
    assert value(samples, "batchd:request_success_total", finished_reason="length", **labels) == 6
    assert value(samples, "batchd:request_prefill_time_seconds_count", **labels) == 6
    assert value(samples, "batchd:request_decode_time_seconds_count", **labels) == 6
    assert value(samples, "batchd:request_decode_time_seconds_sum", **labels) > 0

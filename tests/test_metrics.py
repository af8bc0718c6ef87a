"""Both daemons' /metrics, scraped during a real run, count what was sent."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from batchd import Client
from batchd.embedded import free_port


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


def test_scraped_counts_match_the_requests_sent(daemons):
    scheduler_port, worker_port = free_port(), free_port()
    daemons.scheduler("--metrics-port", str(scheduler_port), "--max-wait-ms", "30")
    daemons.echo_worker("--metrics-port", str(worker_port), "--worker-id", "metrics-w1")
    daemons.wait_for_workers(1)
    prompts = [f"prompt number {i}" for i in range(20)]
    with Client(daemons.url) as client:
        handles = [client.submit(p, max_new_tokens=8) for p in prompts]
        results = [h.result() for h in handles]
        cancelled = client.submit("x" * 50, max_new_tokens=50, priority=3)
        cancelled.cancel()
        try:
            cancelled.result()
        except Exception:
            pass
    generated = sum(r.usage.completion_tokens for r in results)

    sched, work = scrape(scheduler_port), scrape(worker_port)
    assert total(sched, "batchd:requests_received_total") == 21
    assert total(sched, "batchd:requests_received_total", priority="3") == 1
    assert total(sched, "batchd:job_size_requests_sum") == 21 - total(sched, "batchd:requests_rejected_total")
    assert total(sched, "batchd:jobs_dispatched_total") == total(sched, "batchd:job_size_requests_count")
    assert total(sched, "batchd:live_workers") == 1

    labels = {"worker": "metrics-w1", "model_name": "echo"}
    assert total(work, "batchd:request_success_total", finished_reason="length", **labels) == 20
    assert total(work, "batchd:generation_tokens_total", **labels) >= generated
    assert total(work, "batchd:time_to_first_token_seconds_count", **labels) >= 20
    assert total(work, "batchd:e2e_request_latency_seconds_count", **labels) >= 20
    assert total(work, "batchd:worker_heartbeats_total", **labels) >= 1
    # Every step is timed; the echo engine has no accelerator to wait on.
    assert total(work, "batchd:engine_step_duration_seconds_count", **labels) >= 8
    assert ("batchd:engine_device_wait_seconds_total", tuple(sorted(labels.items()))) in work
    assert total(work, "batchd:engine_device_wait_seconds_total", **labels) == 0

"""10,000 requests from 8 producer processes at once, and fair share for a quiet producer.

Prints the measured throughput and latencies (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time

import pytest

from batchd import Client
from batchd.bench import percentiles

from .conftest import assert_serves_new_requests

pytestmark = pytest.mark.slow

PRODUCERS = 8
PER_PRODUCER = 1250

BURST = """
import asyncio, json, sys, time
from batchd import AsyncClient

async def main(url, name, count):
    async with AsyncClient(url, producer=name) as client:
        started = time.monotonic()
        async def one(i):
            sent = time.monotonic()
            result = await client.generate(f"{name} request {i}", request_id=f"{name}-{i}", timeout=120)
            assert result.text == f"{name} request {i}", result
            return time.monotonic() - sent
        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        print(json.dumps({"latencies": latencies, "elapsed": time.monotonic() - started}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_ten_thousand_requests_from_eight_producers(redis_server, daemons, observer):
    daemons.scheduler("--max-batch", "256")
    daemons.echo_worker()
    daemons.wait_for_workers(1)
    quiet: list[float] = []
    quiet_errors: list[BaseException] = []
    done = threading.Event()

    def quiet_producer() -> None:
        """Another team's occasional request while the burst runs."""
        with Client(redis_server.url, producer="quiet") as client:
            n = 0
            while not done.is_set():
                sent = time.monotonic()
                try:
                    assert client.generate(f"quiet {n}", request_id=f"quiet-{n}", timeout=60).text == f"quiet {n}"
                except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
                    quiet_errors.append(exc)
                    return
                quiet.append(time.monotonic() - sent)
                n += 1
                time.sleep(0.1)

    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", BURST, redis_server.url, f"p{k}", str(PER_PRODUCER)],
                              stdout=subprocess.PIPE, text=True) for k in range(PRODUCERS)]
    side = threading.Thread(target=quiet_producer)
    side.start()
    try:
        reports = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    finally:
        done.set()
        side.join(timeout=90)
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - started
    assert not side.is_alive() and not quiet_errors, f"the quiet producer's request {len(quiet)} failed: {quiet_errors}"
    assert all(p.returncode == 0 for p in procs)
    ids = [f"p{k}-{i}" for k in range(PRODUCERS) for i in range(PER_PRODUCER)]
    observer.wait_for_finals(ids, timeout=30)
    observer.assert_exactly_once(ids + [f"quiet-{n}" for n in range(len(quiet))])
    burst = percentiles([latency for report in reports for latency in report["latencies"]])
    print(f"\n{len(ids)} requests from {PRODUCERS} processes in {elapsed:.1f}s "
          f"({len(ids) / elapsed:.0f} req/s); burst latency p50 {burst['p50']:.2f}s "
          f"p99 {burst['p99']:.2f}s; quiet producer ({len(quiet)} requests) "
          f"p50 {statistics.median(quiet):.3f}s max {max(quiet):.3f}s")
    assert quiet, "the quiet producer never got an answer during the burst"
    # Fair share: the quiet producer's requests overtake the burst queued before them.
    assert statistics.median(quiet) < burst['p50'] / 4
    assert_serves_new_requests(redis_server.url)

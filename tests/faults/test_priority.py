"""Priority under a backlog: urgent requests overtake thousands of queued ordinary ones.

Prints the measured latencies (docs/reliability.md quotes them).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from batchd import AsyncClient

pytestmark = pytest.mark.slow

BACKLOG = 1000
URGENT = 20


def test_high_priority_requests_overtake_a_backlog(redis_server, daemons):
    daemons.scheduler("--max-batch", "64")
    daemons.echo_worker("--slots", "64", "--token-delay-ms", "5")
    daemons.wait_for_workers(1)

    async def run() -> tuple[list[float], list[float]]:
        async with AsyncClient(redis_server.url, producer="batch-job") as bulk, \
                AsyncClient(redis_server.url, producer="interactive") as urgent:

            async def timed(client, prompt: str, priority: int) -> float:
                sent = time.monotonic()
                result = await client.generate(prompt, priority=priority, timeout=120)
                assert result.text == prompt
                return time.monotonic() - sent

            backlog = [asyncio.create_task(timed(bulk, f"ordinary request number {i:05d} " + "." * 20, 0))
                       for i in range(BACKLOG)]
            await asyncio.sleep(0.5)  # the backlog is queued and running
            urgent_latencies = await asyncio.gather(*(timed(urgent, f"urgent {i:03d} " + "!" * 30, 10)
                                                      for i in range(URGENT)))
            return await asyncio.gather(*backlog), urgent_latencies

    backlog, urgent = asyncio.run(run())
    backlog_p50, urgent_p50 = statistics.median(backlog), statistics.median(urgent)
    print(f"\nbacklog of {BACKLOG}: p50 {backlog_p50:.2f}s max {max(backlog):.2f}s; "
          f"{URGENT} priority-10 requests sent 0.5s later: p50 {urgent_p50:.2f}s max {max(urgent):.2f}s")
    assert urgent_p50 < backlog_p50 / 4
    assert max(urgent) < statistics.quantiles(backlog, n=4)[2]

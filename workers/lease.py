"""Keeps a worker's lease alive through long engine steps, on its own thread and connection.

A step may take longer than the lease (a long prefill, a loaded CPU). The
heartbeat's content is the loop's; this thread only extends its expiry, every
heartbeat interval, while the loop keeps making progress, and lets it lapse once
the loop has been stuck for stall_timeout_s, so schedulers reclaim its requests.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from batchd.daemon import toolkit

log = logging.getLogger("batchd.worker")


class LeaseKeeper:
    def __init__(self, client: redis.Redis, heartbeat_key: str, lease_ms: int, interval_s: float,
                 stall_timeout_s: float):
        self.redis = client
        self._key = heartbeat_key
        self._lease_ms = lease_ms
        self._interval_s = interval_s
        self._stall_timeout_s = stall_timeout_s
        self._last_progress = time.monotonic()
        self._done = threading.Event()

    def start(self) -> None:
        toolkit.supervise("batchd-lease", self._keep, self._done)

    def progress(self) -> None:
        """The loop is alive: it just began an iteration or a step."""
        self._last_progress = time.monotonic()

    def stop(self) -> None:
        """Drained: the lease may lapse."""
        self._done.set()

    def _keep(self) -> None:
        while not self._done.wait(self._interval_s):
            if time.monotonic() - self._last_progress > self._stall_timeout_s:
                log.error("worker loop stuck for over %.0fs; letting the lease lapse so schedulers reclaim "
                          "its requests", self._stall_timeout_s)
                continue
            try:
                self.redis.pexpire(self._key, self._lease_ms)
            except redis.RedisError as exc:
                # Lost connection, or BUSY while someone's script runs: the loop reports and
                # reconnects; this thread tries again at the next interval.
                log.debug("could not extend the lease: %s", exc)

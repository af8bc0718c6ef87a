"""How every batchd process finds its Redis server, and how it waits when the server is gone.

The URL comes from the caller, else $BATCHD_REDIS_URL, else the local default;
`rediss://` gives TLS and `redis://user:password@host` an ACL user. Logs only
ever show the redacted form.
"""

from __future__ import annotations

import os

import redis
from redis.client import PubSub

DEFAULT_URL = "redis://127.0.0.1:6379/0"

# What a lost or unreachable server raises, sync and asyncio alike.
CONNECTION_LOST = (redis.ConnectionError, redis.TimeoutError)


def redis_url(url: str | None = None) -> str:
    return url or os.environ.get("BATCHD_REDIS_URL") or DEFAULT_URL


def redact(url: str) -> str:
    """The URL with its password replaced, safe to log."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def connect(url: str | None = None, **options) -> redis.Redis:
    """A daemon's command connection: bounded timeouts so a dead server is noticed."""
    options.setdefault("socket_timeout", 10)
    options.setdefault("socket_connect_timeout", 5)
    options.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(redis_url(url), **options)


class Backoff:
    """Delays between tries at a lost connection: 0.1 s, doubling up to cap_s."""

    FIRST_S = 0.1

    def __init__(self, cap_s: float):
        self.cap_s = cap_s
        self._next = self.FIRST_S

    def next_delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap_s)
        return delay

    def reset(self) -> None:
        self._next = self.FIRST_S


class Subscription(PubSub):
    """A PubSub that notes every (re)connect. redis-py reconnects and resubscribes silently,
    and whatever was published while the connection was down is lost: a reader that sees
    `reconnected` looks up what it may have missed, then clears it."""

    reconnected = False

    def on_connect(self, connection) -> None:
        self.reconnected = True
        super().on_connect(connection)

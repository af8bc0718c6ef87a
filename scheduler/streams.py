"""The request streams a scheduler consumes: the shared one and every tenant's.

A tenant (a producer identity, by default its Redis ACL user) submits to a stream of its own,
`<prefix>requests:<tenant>`, on which docs/security.md lets it XADD and nothing else; so what it
does there (a MAXLEN trim, a flood of raw XADDs, an entry id at the end of time) reaches its own
requests only. Tenants are found without trusting producers: in the registry set an
administrator writes beside each tenant's ACL user (`<prefix>tenants`, read every second), and
by a SCAN for request streams (a producer can create only its own) at a slower pace, since it
walks the whole keyspace (docs/security.md, "Limits", gives its cost). The schedulers create
their group on each stream found and read all of them in one XREADGROUP that asks every stream
for the same share, so one tenant's backlog cannot crowd out another's requests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable

import redis

from batchd.client.keys import Keys
from batchd.daemon.toolkit import ensure_group

log = logging.getLogger("batchd.scheduler")

# A registered tenant's stream is read within this long of its registration.
REGISTRY_INTERVAL_S = 1.0
# An unregistered tenant's first request waits at most this long for a SCAN to find its stream.
SCAN_INTERVAL_S = 30.0
SCAN_COUNT = 1000


class RequestStreams:
    """Every request stream this scheduler reads, each with its tenant ("": the shared one)."""

    def __init__(self, client: redis.Redis, keys: Keys, group: str, shards: Iterable[int] | None = None):
        self.redis = client
        self.keys = keys
        self.group = group
        # The shards read (SchedulerConfig.read_shards): every one unless a subset is named.
        self.shards = tuple(range(keys.shards)) if shards is None else tuple(shards)
        self.tenants: dict[str, str] = dict.fromkeys(self._shared(), "")
        self._next_registry = 0.0
        self._next_scan = 0.0

    def __iter__(self):
        return iter(list(self.tenants))

    def __len__(self) -> int:
        return len(self.tenants)

    def tenant(self, stream: str) -> str:
        return self.tenants[stream]

    def forget(self) -> None:
        """Back to the shared stream only (after an error reply: a stream may have been deleted);
        discover() finds the tenants' streams again at once."""
        self.tenants = dict.fromkeys(self._shared(), "")
        self._next_registry = self._next_scan = 0.0

    def discover(self, now: float) -> list[str]:
        """Tenant streams that appeared since the last look, each given the schedulers' group
        (reading from its first entry; a registered tenant's stream is created with it)."""
        found = []
        if now >= self._next_scan:
            self._next_scan = now + SCAN_INTERVAL_S
            for key in self.redis.scan_iter(match=self.keys.tenant_streams, count=SCAN_COUNT, _type="stream"):
                found += self._add(_text(key))
        if now >= self._next_registry:
            self._next_registry = now + REGISTRY_INTERVAL_S
            for name in self.redis.smembers(self.keys.tenants):
                for shard in self.shards:
                    found += self._add(self.keys.requests_of(_text(name), shard))
        if found:
            log.info("reading %d new tenant request streams: %s", len(found), ", ".join(found[:10]))
        return found

    def _shared(self) -> list[str]:
        return [self.keys.requests_of("", shard) for shard in self.shards]

    def _add(self, stream: str) -> list[str]:
        tenant = self.keys.tenant_of_stream(stream)
        if not tenant or stream in self.tenants or self.keys.shard_of_key(stream) not in self.shards:
            return []
        ensure_group(self.redis, stream, self.group)
        self.tenants[stream] = tenant
        return [stream]

    def read_positions(self, position: str) -> dict[str, str]:
        """XREADGROUP's streams argument: every stream at one position (">" or "0")."""
        return {stream: position for stream in self.tenants}

    def share(self, room: int) -> int:
        """Entries to ask each stream for in one read: an equal share of the room (at least one)."""
        return max(1, room // len(self.tenants))


def by_stream(entries: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(stream, entry id) pairs grouped by stream."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for stream, entry_id in entries:
        grouped[stream].append(entry_id)
    return grouped


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

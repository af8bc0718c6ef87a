"""The request streams a scheduler consumes: the shared one and every tenant's.

A tenant (a producer identity, by default its Redis ACL user) submits to a stream of its own,
`<prefix>requests:<tenant>`, on which docs/security.md lets it XADD and nothing else; so what it
does there (a MAXLEN trim, a flood of raw XADDs, an entry id at the end of time) reaches its own
requests only. Tenants are not registered anywhere a producer could write: the schedulers find
their streams by SCAN (a producer can create only its own stream), create their group on each,
and read all of them in one XREADGROUP that asks every stream for the same share, so one
tenant's backlog cannot crowd out another's requests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable

import redis

from batchd.client.keys import Keys
from batchd.daemon.toolkit import ensure_group

log = logging.getLogger("batchd.scheduler")

# SCAN walks the whole keyspace; a new tenant's first request waits at most this long
# for a scheduler to find its stream.
DISCOVERY_INTERVAL_S = 1.0
SCAN_COUNT = 1000


class RequestStreams:
    """Every request stream this scheduler reads, each with its tenant ("": the shared one)."""

    def __init__(self, client: redis.Redis, keys: Keys, group: str):
        self.redis = client
        self.keys = keys
        self.group = group
        self.tenants: dict[str, str] = {keys.requests: ""}
        self._next_discovery = 0.0

    def __iter__(self):
        return iter(list(self.tenants))

    def __len__(self) -> int:
        return len(self.tenants)

    def tenant(self, stream: str) -> str:
        return self.tenants[stream]

    def forget(self) -> None:
        """Back to the shared stream only (after an error reply: a stream may have been deleted);
        discover() finds the tenants' streams again at once."""
        self.tenants = {self.keys.requests: ""}
        self._next_discovery = 0.0

    def discover(self, now: float) -> list[str]:
        """Tenant streams that appeared since the last look, each given the schedulers' group
        (reading from its first entry); at most once a DISCOVERY_INTERVAL_S."""
        if now < self._next_discovery:
            return []
        self._next_discovery = now + DISCOVERY_INTERVAL_S
        found = []
        for key in self.redis.scan_iter(match=self.keys.tenant_streams, count=SCAN_COUNT, _type="stream"):
            stream = key.decode() if isinstance(key, bytes) else key
            tenant = self.keys.tenant_of_stream(stream)
            if tenant and stream not in self.tenants:
                ensure_group(self.redis, stream, self.group)
                self.tenants[stream] = tenant
                found.append(stream)
        if found:
            log.info("reading %d new tenant request streams: %s", len(found), ", ".join(found[:10]))
        return found

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

"""Every Redis key, stream, group and channel name batchd uses, in one place.

Producers, schedulers and workers all build names through `Keys`, so a
deployment that sets another prefix (several batchd installations sharing one
Redis, or an ACL that grants `~myapp:*`) changes them everywhere at once.
docs/protocol.md documents each name for producers written in other languages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "batchd:"

# A tenant is a producer identity with a request stream of its own (docs/protocol.md,
# "Tenants"): by default its Redis ACL user name. The name goes into keys and, before a "/",
# into every id of its requests, so it may hold neither ":" nor "/" nor a glob character.
TENANT_PATTERN = r"[A-Za-z0-9._-]{1,64}"
# The ACL user of an unauthenticated connection: it keeps the shared stream.
SHARED_TENANT_USERS = ("default",)

# Consumer groups.
SCHEDULER_GROUP = "schedulers"
WORKER_GROUP = "worker"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    # -- streams ----------------------------------------------------------
    @property
    def requests(self) -> str:
        """The shared request stream (fields: id, data): submitted, not yet dispatched requests
        of producers without a tenant (the unauthenticated user, raw XADD producers)."""
        return f"{self.prefix}requests"

    def requests_of(self, tenant: str) -> str:
        """A tenant's own request stream; only its producer may XADD there ("": the shared one)."""
        return f"{self.prefix}requests:{tenant}" if tenant else self.requests

    @property
    def tenant_streams(self) -> str:
        """SCAN pattern matching every tenant's request stream (the schedulers discover them so)."""
        return f"{self.prefix}requests:*"

    @property
    def tenants(self) -> str:
        """Set of registered tenant names, written by an administrator beside each tenant's ACL
        user (docs/security.md): schedulers read their streams within a second."""
        return f"{self.prefix}tenants"

    def tenant_of_stream(self, stream: str) -> str | None:
        """The tenant whose request stream this is ("" the shared one; None: not a request stream)."""
        if stream == self.requests:
            return ""
        tenant = stream[len(self.prefix) + len("requests:"):]
        return tenant if stream.startswith(f"{self.prefix}requests:") and is_tenant(tenant) else None

    def stream_of_request(self, request_id: str) -> str:
        """Where a request id is submitted and handed back: its tenant's stream."""
        return self.requests_of(tenant_of(request_id))

    def jobs(self, worker_id: str) -> str:
        """One worker's job stream: batches the schedulers dispatched to it."""
        return f"{self.prefix}jobs:{worker_id}"

    @property
    def dead_letters(self) -> str:
        """Requests that could not be served: malformed or failed too often."""
        return f"{self.prefix}dead"

    # -- per request ------------------------------------------------------
    def channel(self, request_id: str) -> str:
        """Pub/sub channel carrying one request's token and final events."""
        return f"{self.prefix}res:{request_id}"

    def channel_pattern(self, id_prefix: str) -> str:
        """Pattern matching the channels of every request id starting with id_prefix."""
        return f"{self.prefix}res:{id_prefix}*"

    def result(self, request_id: str) -> str:
        """The stored final event (with TTL), for callers that missed the publish."""
        return f"{self.prefix}result:{request_id}"

    def accepted(self, request_id: str) -> str:
        """The request's claim: the one stream entry allowed to run it (written by schedulers
        when they read it, moved by a hand-back), so a second submission never runs."""
        return f"{self.prefix}accepted:{request_id}"

    def owner(self, request_id: str) -> str:
        """Lease: which worker attempt may publish for this request right now."""
        return f"{self.prefix}owner:{request_id}"

    def cancelled(self, request_id: str) -> str:
        """Set when a caller cancels; checked before dispatch and at admission."""
        return f"{self.prefix}cancel:{request_id}"

    # -- fleet --------------------------------------------------------------
    @property
    def cancel_channel(self) -> str:
        """Broadcast of cancelled request ids, so a running slot is freed at once."""
        return f"{self.prefix}cancels"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (unix seconds)."""
        return f"{self.prefix}workers"

    def heartbeat(self, worker_id: str) -> str:
        """A worker's last heartbeat; expires when the worker stops beating."""
        return f"{self.prefix}worker:{worker_id}"

    def reaping(self, worker_id: str) -> str:
        """Short lock so only one scheduler re-dispatches a dead worker's jobs."""
        return f"{self.prefix}reaping:{worker_id}"

    def tokenizer(self, model: str) -> str:
        """Hash of a served model's tokenizer: `info` (TokenizerInfo) and `files` (a msgpack map
        of the files save_pretrained writes, by name). Written by the workers serving the model
        when they connect, kept alive by their heartbeats (client/tokenizers.py)."""
        return f"{self.prefix}tokenizer:{model}"

    def pin(self, handle: str) -> str:
        """A pinned prefix (protocol.PinnedPrefix), expiring with the pin: written by the worker
        that pinned it, read by every worker that meets the handle (workers/pins.py)."""
        return f"{self.prefix}pin:{handle}"

    @property
    def config(self) -> str:
        """Hash of settings the schedulers publish for everyone (max_queue, ...)."""
        return f"{self.prefix}config"

    @property
    def overloaded(self) -> str:
        """Count of shared-stream submits refused as Overloaded since a scheduler last took it
        for Prometheus."""
        return f"{self.prefix}overloaded"

    def overloaded_of(self, tenant: str) -> str:
        """The same count for one tenant's submits ("": the shared one). Only that tenant (and
        its SUBMIT) may write it, so a forged INCR moves only the forger's own series."""
        return f"{self.prefix}overloaded:{tenant}" if tenant else self.overloaded

    @property
    def stats(self) -> str:
        """Hash of fleet-wide counters (dead letters, reclaimed requests, ...)."""
        return f"{self.prefix}stats"


def parse_stream_id(stream_id: str | bytes) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as a tuple that orders like the stream."""
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def is_tenant(name: str) -> bool:
    return re.fullmatch(TENANT_PATTERN, name) is not None


def tenant_of(request_id: str) -> str:
    """The tenant a request id belongs to: the part before its "/" ("": a shared-stream id)."""
    tenant, slash, _local = request_id.partition("/")
    return tenant if slash else ""


def tenant_id(tenant: str, request_id: str) -> str:
    """An id as a tenant's client means it: `<tenant>/<id>` for an id without a namespace;
    an id that names one (or a shared-stream client's id) as it is."""
    if not tenant or "/" in request_id:
        return request_id
    return f"{tenant}/{request_id}"

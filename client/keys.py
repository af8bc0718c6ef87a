"""Every Redis key, stream, group and channel name batchd uses, in one place.

Producers, schedulers and workers all build names through `Keys`, so a
deployment that sets another prefix (several batchd installations sharing one
Redis, or an ACL that grants `~myapp:*`) changes them everywhere at once.
docs/protocol.md documents each name for producers written in other languages.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "batchd:"

# Consumer groups.
SCHEDULER_GROUP = "schedulers"
WORKER_GROUP = "worker"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    # -- streams ----------------------------------------------------------
    @property
    def requests(self) -> str:
        """Stream of submitted, not yet dispatched requests (fields: id, data)."""
        return f"{self.prefix}requests"

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
        """Count of submits refused as Overloaded since a scheduler last took it for Prometheus."""
        return f"{self.prefix}overloaded"

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

"""Every Redis key, stream, group and channel name batchd uses, in one place.

Producers, schedulers and workers all build names through `Keys`, so a
deployment that sets another prefix (several batchd installations sharing one
Redis, or an ACL that grants `~myapp:*`) changes them everywhere at once.
docs/protocol.md documents each name for producers written in other languages.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

DEFAULT_PREFIX = "batchd:"
# Request shards (docs/deploy.md, "Redis Cluster"): 1 keeps the one-server layout, key for key.
MAX_SHARDS = 256

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
    """shards: how many request shards the fleet runs (`--shards`). With more than one, each
    shard's keys carry a hash tag of their own, so on Redis Cluster a shard lives on one master
    and every script touches one slot: a request's keys (its claim, lease, result, cancel flag)
    sit in the shard its id hashes to, with that shard's request streams, the job streams its
    requests are dispatched on, its dead letters, counters and config. Fleet keys (heartbeats,
    tokenizers, pins) share one tag, so a scheduler reads every heartbeat in one MGET.

    shard_channels: a request's events go out on a shard channel (SPUBLISH, heard through
    SSUBSCRIBE) tagged like its other keys, so on a cluster they stay on its shard's master
    instead of crossing the cluster bus to every node (PUBLISH). A fleet on Redis Cluster with
    more than one shard uses them (uses_shard_channels, below); elsewhere events keep the
    untagged channels one pattern subscription hears."""

    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    shard_channels: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {self.shards}")

    # -- shards -----------------------------------------------------------
    def shard_of(self, request_id: str) -> int:
        """The shard a request id belongs to: producers submit to it, schedulers dispatch from it."""
        if self.shards == 1:
            return 0
        return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) % self.shards

    def in_shard(self, shard: int) -> str:
        """The start of every key of one shard."""
        return self.prefix if self.shards == 1 else f"{self.prefix}{{{shard_tags(self.shards)[shard]}}}:"

    @property
    def _fleet(self) -> str:
        return self.prefix if self.shards == 1 else f"{self.prefix}{{fleet}}:"

    def _of(self, request_id: str) -> str:
        return self.in_shard(self.shard_of(request_id))

    def shard_of_key(self, key: str) -> int | None:
        """The shard a shard key (a request or job stream, ...) belongs to; None: no shard key."""
        if self.shards == 1:
            return 0 if key.startswith(self.prefix) else None
        for shard, tag in enumerate(shard_tags(self.shards)):
            if key.startswith(f"{self.prefix}{{{tag}}}:"):
                return shard
        return None

    # -- streams ----------------------------------------------------------
    @property
    def requests(self) -> str:
        """The shared request stream (fields: id, data) of shard 0 (the only one, unsharded):
        submitted, not yet dispatched requests of producers without a tenant (the
        unauthenticated user, raw XADD producers)."""
        return self.requests_of("")

    def requests_of(self, tenant: str, shard: int = 0) -> str:
        """A tenant's own request stream in one shard; only its producer may XADD there
        ("": the shared one)."""
        base = f"{self.in_shard(shard)}requests"
        return f"{base}:{tenant}" if tenant else base

    def shared_streams(self) -> list[str]:
        """The shared request stream of every shard."""
        return [self.requests_of("", shard) for shard in range(self.shards)]

    @property
    def tenant_streams(self) -> str:
        """SCAN pattern matching every tenant's request stream (the schedulers discover them so)."""
        return f"{self.prefix}requests:*" if self.shards == 1 else f"{self.prefix}{{*}}:requests:*"

    @property
    def tenants(self) -> str:
        """Set of registered tenant names, written by an administrator beside each tenant's ACL
        user (docs/security.md): schedulers read their streams within a second."""
        return f"{self._fleet}tenants"

    def tenant_of_stream(self, stream: str) -> str | None:
        """The tenant whose request stream this is ("" the shared one; None: not a request stream)."""
        shard = self.shard_of_key(stream)
        if shard is None:
            return None
        base = f"{self.in_shard(shard)}requests"
        if stream == base:
            return ""
        tenant = stream[len(base) + 1:]
        return tenant if stream.startswith(base + ":") and is_tenant(tenant) else None

    def stream_of_request(self, request_id: str) -> str:
        """Where a request id is submitted and handed back: its tenant's stream in its shard."""
        return self.requests_of(tenant_of(request_id), self.shard_of(request_id))

    def jobs(self, worker_id: str, shard: int = 0) -> str:
        """One worker's job stream in one shard: batches of that shard's requests the
        schedulers dispatched to it (a worker reads one per shard)."""
        return f"{self.in_shard(shard)}jobs:{worker_id}"

    def job_streams(self, worker_id: str) -> list[str]:
        return [self.jobs(worker_id, shard) for shard in range(self.shards)]

    def dead_letters_in(self, shard: int) -> str:
        """Requests of one shard that could not be served: malformed or failed too often."""
        return f"{self.in_shard(shard)}dead"

    @property
    def dead_letters(self) -> str:
        return self.dead_letters_in(0)

    # -- per request ------------------------------------------------------
    def channel(self, request_id: str) -> str:
        """Pub/sub channel carrying one request's token and final events (with shard_channels,
        a shard channel in the request's shard)."""
        return f"{self._of(request_id) if self.shard_channels else self.prefix}res:{request_id}"

    def request_of_channel(self, channel: str) -> str | None:
        """The request id whose events a channel carries; None: not an event channel."""
        if not channel.startswith(self.prefix):
            return None
        rest = channel[len(self.prefix):]
        if self.shard_channels and self.shards > 1:  # "{tag}:res:<id>"; tags hold no "}"
            rest = rest.partition("}:")[2]
        return rest[4:] if rest.startswith("res:") else None

    def channel_pattern(self, id_prefix: str) -> str:
        """Pattern matching the channels of every request id starting with id_prefix (no
        shard_channels: there is no pattern form of SSUBSCRIBE)."""
        return f"{self.prefix}res:{id_prefix}*"

    def result(self, request_id: str, shard: int | None = None) -> str:
        """The stored final event (with TTL), for callers that missed the publish. shard: where
        to keep it when it is not the id's own (an entry in another shard's stream)."""
        return f"{self._at(request_id, shard)}result:{request_id}"

    def accepted(self, request_id: str, shard: int | None = None) -> str:
        """The request's claim: the one stream entry allowed to run it (written by schedulers
        when they read it, moved by a hand-back), so a second submission never runs."""
        return f"{self._at(request_id, shard)}accepted:{request_id}"

    def owner(self, request_id: str) -> str:
        """Lease: which worker attempt may publish for this request right now."""
        return f"{self._of(request_id)}owner:{request_id}"

    def cancelled(self, request_id: str) -> str:
        """Set when a caller cancels; checked before dispatch and at admission."""
        return f"{self._of(request_id)}cancel:{request_id}"

    def _at(self, request_id: str, shard: int | None) -> str:
        return self._of(request_id) if shard is None else self.in_shard(shard)

    # -- fleet --------------------------------------------------------------
    @property
    def cancel_channel(self) -> str:
        """Broadcast of cancelled request ids, so a running slot is freed at once."""
        return f"{self.prefix}cancels"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (unix seconds)."""
        return f"{self._fleet}workers"

    def heartbeat(self, worker_id: str) -> str:
        """A worker's last heartbeat; expires when the worker stops beating."""
        return f"{self._fleet}worker:{worker_id}"

    def reaping(self, worker_id: str) -> str:
        """Short lock so only one scheduler re-dispatches a dead worker's jobs."""
        return f"{self._fleet}reaping:{worker_id}"

    def tokenizer(self, model: str) -> str:
        """Hash of a served model's tokenizer: `info` (TokenizerInfo) and `files` (a msgpack map
        of the files save_pretrained writes, by name). Written by the workers serving the model
        when they connect, kept alive by their heartbeats (client/tokenizers.py)."""
        return f"{self._fleet}tokenizer:{model}"

    def pin(self, handle: str) -> str:
        """A pinned prefix (protocol.PinnedPrefix), expiring with the pin: written by the worker
        that pinned it, read by every worker that meets the handle (workers/pins.py)."""
        return f"{self._fleet}pin:{handle}"

    def config_in(self, shard: int) -> str:
        """Hash of settings the schedulers publish for everyone (max_queue, ...), one per shard
        (SUBMIT reads it beside the shard's stream)."""
        return f"{self.in_shard(shard)}config"

    @property
    def config(self) -> str:
        return self.config_in(0)

    @property
    def fleet_config(self) -> str:
        """The untagged config hash, where schedulers also write their shard count: a producer
        or worker of any --shards finds it there (with one shard it is `config` itself)."""
        return f"{self.prefix}config"

    @property
    def overloaded(self) -> str:
        """Count of shared-stream submits refused as Overloaded since a scheduler last took it
        for Prometheus."""
        return self.overloaded_of("")

    def overloaded_of(self, tenant: str, shard: int = 0) -> str:
        """The same count for one tenant's submits in one shard ("": the shared one). Only that
        tenant (and its SUBMIT) may write it, so a forged INCR moves only the forger's own series."""
        base = f"{self.in_shard(shard)}overloaded"
        return f"{base}:{tenant}" if tenant else base

    def stats_in(self, shard: int) -> str:
        """Hash of fleet-wide counters (dead letters, reclaimed requests, ...) kept in one shard;
        the fleet's are the sum over shards."""
        return f"{self.in_shard(shard)}stats"

    @property
    def stats(self) -> str:
        return self.stats_in(0)


def uses_shard_channels(cluster: bool, shards: int) -> bool:
    """Whether a fleet publishes events on shard channels (Keys.shard_channels): on Redis Cluster
    with more than one shard. One shard keeps untagged keys, so its events stay plain PUBLISH."""
    return cluster and shards > 1


@lru_cache(maxsize=16)
def shard_tags(shards: int) -> tuple[str, ...]:
    """Each shard's hash tag, chosen so the shards' slots lie evenly over the slot space: a
    cluster whose masters hold equal slot ranges (what `redis-cli --cluster create` makes) then
    holds equal numbers of shards when shards is a multiple of the masters. Every process
    computes the same tags."""
    tags = []
    for shard in range(shards):
        low = shard * REDIS_CLUSTER_HASH_SLOTS // shards
        width = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards - low
        # The middle half of the shard's range, so ranges a few slots off still hold it.
        start, end = low + width // 4, low + max(1, 3 * width // 4)
        attempt = 0
        while not start <= key_slot(f"{{s{shard}.{attempt}}}".encode()) < end:
            attempt += 1
        tags.append(f"s{shard}.{attempt}")
    return tuple(tags)


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


# -- job references ---------------------------------------------------------------
# A worker reads one job stream per shard; it names a job by its shard and entry id,
# "<shard>/<entry id>", or by the entry id alone in an unsharded fleet (shard 0).

def job_ref(shard: int, entry_id: str) -> str:
    return f"{shard}/{entry_id}" if shard else entry_id


def parse_job_ref(ref: str) -> tuple[int, str]:
    """(shard, entry id) of a job reference."""
    shard, slash, entry_id = ref.partition("/")
    return (int(shard), entry_id) if slash else (0, ref)


def format_last_reads(last: dict[int, str]) -> str:
    """A heartbeat's last_job_read: the newest job entry read on each shard's stream, as
    "<id>" (shard 0 alone: what unsharded workers send) or "<shard>/<id>,..." ."""
    if set(last) <= {0}:
        return last.get(0, "0-0")
    return ",".join(job_ref(shard, entry_id) if shard else f"0/{entry_id}" for shard, entry_id in sorted(last.items()))


def parse_last_reads(text: str) -> dict[int, tuple[int, int]]:
    """format_last_reads read back, each entry id as parse_stream_id gives it."""
    last = {}
    for part in text.split(","):
        shard, entry_id = parse_job_ref(part)
        last[shard] = parse_stream_id(entry_id)
    return last

"""The worker's subscription to cancel broadcasts, and what it can vouch for.

A caller cancels by setting the request's cancel flag and broadcasting its id.
The scheduler's DISPATCH script refuses requests whose flag is already set, so
a worker only has to hear cancels sent after a job was dispatched, and this
subscription hears every one of them while it is live. So a job needs no
round trip to read its flags, except where the subscription may have missed
something: before it is confirmed after a (re)connect, for jobs dispatched
before that moment. `needs_flags` tells those apart by job stream id (on each shard's job stream).

Cancels for requests the worker does not hold yet are remembered (the job may
still be on its way), so one heard a moment before its job is read still
counts.
"""

from __future__ import annotations

from collections import OrderedDict

import redis

from batchd.client.connection import Subscription, pubsub_pool
from batchd.client.keys import parse_job_ref, parse_stream_id
from batchd.client.protocol import Request
from batchd.daemon.toolkit import cancel_matches

# Cancel ids remembered for requests not (yet) held here; the oldest go first.
REMEMBERED_CANCELS = 10_000


class CancelFeed:
    def __init__(self, client: redis.Redis, channel: str, job_streams: list[str]):
        """job_streams: the worker's, by shard."""
        self._client = client
        self._channel = channel
        self._job_streams = job_streams
        self._subscription: Subscription | None = None
        # Per shard: jobs after this stream id were dispatched while the subscription was live.
        self._live_after: list[tuple[int, int]] | None = None
        self._heard: OrderedDict[str, list[str]] = OrderedDict()

    def connect(self) -> None:
        # On a cluster, another node than the last one's (it may be the node that failed).
        last = self._subscription.connection_pool if self._subscription is not None else None
        self.close()
        self._live_after = None
        self._subscription = Subscription(pubsub_pool(self._client, avoid=last))
        self._subscription.subscribe(self._channel)

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def poll(self) -> tuple[list[tuple[str, str]], bool]:
        """Cancels heard since the last poll, as (request id, the secret the broadcast carried:
        '' for none), and whether the subscription just became live again (then cancels of
        requests already held may have been missed). The worker checks each secret against the
        request (toolkit.cancel_matches): anyone may broadcast."""
        cancelled, resynced = [], False
        while True:
            message = self._subscription.get_message(timeout=0)
            if self._subscription.reconnected:
                self._subscription.reconnected = False
                self._live_after = None
            if message is None:
                return cancelled, resynced
            if message["type"] == "subscribe":
                self._live_after = self._last_dispatched()
                resynced = True
            elif message["type"] == "message":
                request_id, _, secret = message["data"].decode("utf-8", "replace").partition(" ")
                cancelled.append((request_id, secret))
                self._remember(request_id, secret)

    def needs_flags(self, job: str) -> bool:
        """True when this job's (keys.job_ref) requests may have been cancelled unheard: read their flags."""
        if self._live_after is None:
            return True
        shard, entry_id = parse_job_ref(job)
        return parse_stream_id(entry_id) <= self._live_after[shard]

    def heard(self, request: Request) -> bool:
        """A cancel for this request, with its secret, was heard before the request arrived."""
        return any(cancel_matches(request, secret) for secret in self._heard.get(request.id, ()))

    def _remember(self, request_id: str, secret: str) -> None:
        # Every secret heard for the id: a forged cancel must not hide the real one.
        self._heard.setdefault(request_id, []).append(secret)
        self._heard.move_to_end(request_id)
        del self._heard[request_id][:-8]
        while len(self._heard) > REMEMBERED_CANCELS:
            self._heard.popitem(last=False)

    def _last_dispatched(self) -> list[tuple[int, int]]:
        # Every job not yet read is still on its stream (the worker deletes only what
        # it acked), so each stream's newest entry bounds what was dispatched before now.
        with self._client.pipeline(transaction=False) as pipe:
            for stream in self._job_streams:
                pipe.xrevrange(stream, count=1)
            newest = pipe.execute()
        return [parse_stream_id(entries[0][0]) if entries else (0, 0) for entries in newest]

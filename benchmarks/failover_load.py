"""kill -9 of a Sentinel-managed master under load: what accepted requests a failover loses.

For each setting, a fresh SentinelSet (1 master, 2 replicas, 3 sentinels; cli/embedded.py),
one scheduler and one echo worker (`batchd` processes on the redis+sentinel:// URL), and
--producers producer processes submitting --requests requests in all through AsyncClient.
Once a third of them were accepted, the master is killed (SIGKILL). Every producer then
waits for every request it saw accepted.

  durable: appendonly yes + appendfsync always on every server, producers with
           durable_replicas=1, the worker with --durable-replicas 1;
  default: Redis's defaults (no AOF, asynchronous replication), no WAIT.

Two more settings run the same load on a Redis Cluster (cli/embedded.py ClusterSet: 3 masters,
1 replica each, Redis's default asynchronous replication) with a fleet of --cluster-shards
shards (BATCHD_SHARDS for every process):

  cluster-failover: kill -9 of the master holding shard 0 once a third are accepted;
  cluster-reshard:  the slots from that master's first through shard 0's (and 100 more) move
                    to another master (redis-cli --cluster reshard) once a third are accepted;
  cluster-durable:  cluster-failover with the durable setting: 2 replicas per master,
                    appendfsync always on every node, producers with durable_replicas=1, the
                    worker with --durable-replicas 1;
  cluster-both:     cluster-durable, then at once shard 0's slots move off the master the
                    failover promoted (failover_s: the kill to the end of the reshard).

Per setting: accepted (the submit returned), refused (the submit raised a typed error: the
caller knows it was not accepted), lost (accepted, then no result: ResultTimeout), wrong
(text not the echoed prompt), answer_differs_from_stored (the caller's answer is not the
result stored on the new master: a second run replaced it), final_events_seen_twice (ids
whose final event an observer saw twice on the wire; a handle returns the first), and
failover_s (kill to a majority of sentinels naming a new master that answers ROLE master).

  python benchmarks/failover_load.py --requests 10000 --producers 8
Prints a table and writes benchmarks/results/failover_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "durable": {"server_args": ["--appendfsync", "always"], "appendonly": True, "replicas_acked": 1},
    "default": {"server_args": [], "appendonly": False, "replicas_acked": 0},
}
# Seconds a producer waits for an accepted request's result before counting it lost.
RESULT_TIMEOUT_S = 20.0
# Requests a producer keeps in flight.
WINDOW = 100


def produce(url: str, index: int, count: int, durable_replicas: int, go_file: str, out_path: str) -> None:
    """One producer process: submit `count` requests, WINDOW at a time, record each outcome, and
    print a line per 50 accepted (the parent kills the master on that count)."""
    asyncio.run(_produce(url, index, count, durable_replicas, go_file, out_path))


async def _produce(url, index, count, durable_replicas, go_file, out_path) -> None:
    from batchd.client import AsyncClient, BatchdError

    records: list[dict] = []
    accepted = 0
    async with AsyncClient(url, durable_replicas=durable_replicas) as client:
        print("ready", flush=True)
        while not os.path.exists(go_file):
            await asyncio.sleep(0.005)

        async def one(n: int) -> None:
            nonlocal accepted
            prompt = f"p{index}-{n}"
            record = {"prompt": prompt}
            records.append(record)
            try:
                handle = await client.submit(prompt, max_new_tokens=len(prompt), timeout=RESULT_TIMEOUT_S)
            except BatchdError as exc:
                record["refused"] = exc.code
                return
            record["id"] = handle.request_id
            accepted += 1
            if accepted % 50 == 0:
                print("accepted 50", flush=True)
            try:
                result = await handle.result()
                record["text"] = result.text
            except BatchdError as exc:
                record["error"] = exc.code

        pending: set[asyncio.Task] = set()
        for n in range(count):
            if len(pending) >= WINDOW:
                _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(one(n)))
        await asyncio.gather(*pending)
    Path(out_path).write_text(json.dumps(records))


class Producers:
    """The producer processes of one run, and the count of submits they saw accepted."""

    def __init__(self, url: str, requests: int, producers: int, durable_replicas: int, logs: Path, name: str):
        self.go_file = logs / f"{name}-go"
        self.outs = [logs / f"{name}-producer-{i}.json" for i in range(producers)]
        shares = [requests // producers + (i < requests % producers) for i in range(producers)]
        self.processes = [subprocess.Popen([sys.executable, __file__, "--produce", url, str(i), str(shares[i]),
                                            str(durable_replicas), str(self.go_file), str(self.outs[i])],
                                           stdout=subprocess.PIPE, text=True) for i in range(producers)]
        self.accepted = 0
        self._ready = threading.Semaphore(0)
        self._lock = threading.Lock()
        for process in self.processes:
            threading.Thread(target=self._count, args=(process,), daemon=True).start()

    def _count(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            if line.startswith("ready"):
                self._ready.release()
            elif line.startswith("accepted"):
                with self._lock:
                    self.accepted += int(line.split()[1])

    def go(self, timeout: float = 120.0) -> None:
        for _ in self.processes:
            if not self._ready.acquire(timeout=timeout):
                raise RuntimeError("a producer did not start")
        self.go_file.touch()

    def wait_for_accepted(self, count: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted < count:
            exited = [p.args for p in self.processes if p.poll() not in (None, 0)]
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"{self.accepted} of {count} submits accepted; producers exited: {exited}")
            time.sleep(0.005)

    def records(self) -> list[dict]:
        for process in self.processes:
            if process.wait() != 0:
                raise RuntimeError(f"producer {process.args} exited with {process.returncode}")
        return [r for out in self.outs for r in json.loads(out.read_text())]


class FinalEvents(threading.Thread):
    """Counts final events per request on the wire (a pattern subscription to every result
    channel, following the failover like any batchd client). Pub/sub is at-most-once, so
    events published while it reconnects are missed: this bounds duplicates, not losses."""

    def __init__(self, url: str):
        super().__init__(name="final-events", daemon=True)
        from batchd.client.connection import connect

        self.client = connect(url)
        self.counts: dict[str, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        from batchd.client.core import is_final_event
        from batchd.client.keys import Keys

        channel_prefix = Keys().channel("")
        pubsub = None
        while not self.stopped.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.psubscribe(channel_prefix + "*")
                message = pubsub.get_message(timeout=0.1)
            except Exception:  # the master is gone: subscribe again on the next one
                pubsub = None
                time.sleep(0.05)
                continue
            if message and message["type"] == "pmessage" and is_final_event(message["data"]):
                request_id = message["channel"].decode()[len(channel_prefix):]
                self.counts[request_id] = self.counts.get(request_id, 0) + 1


def run_cluster_setting(name: str, requests: int, producers: int, binary: str, logs: Path, shards: int) -> dict:
    """cluster-failover, cluster-reshard or cluster-durable (module docstring)."""
    previous = os.environ.get("BATCHD_SHARDS")
    os.environ["BATCHD_SHARDS"] = str(shards)  # every process this run starts: daemons and producers
    try:
        return _run_cluster_setting(name, requests, producers, binary, logs, shards)
    finally:
        if previous is None:
            os.environ.pop("BATCHD_SHARDS", None)
        else:
            os.environ["BATCHD_SHARDS"] = previous


def _run_cluster_setting(name: str, requests: int, producers: int, binary: str, logs: Path, shards: int) -> dict:
    from redis.crc import key_slot

    from batchd.client.connection import connect
    from batchd.client.keys import Keys
    from batchd.embedded import ClusterSet
    from batchd.status import stop_processes, wait_for_workers

    keys = Keys(shards=shards)
    durable = name in ("cluster-durable", "cluster-both")
    replicas_acked = 1 if durable else 0
    # Durable: two replicas per master, so the one promoted in a failover still has a replica to
    # acknowledge (with one, the shard's writes wait for the dead master to come back).
    with ClusterSet(binary, masters=3, replicas_per_master=2 if durable else 1, appendonly=durable,
                    server_args=["--appendfsync", "always"] if durable else []) as cluster:
        url = cluster.url
        daemons, load = _start_daemons(url, name, replicas_acked, logs), None
        try:
            wait_for_workers(url, 1, 120, daemons, shards=shards)
            wire = FinalEvents(url)
            wire.start()
            load = Producers(url, requests, producers, replicas_acked, logs, name)
            load.go()
            started = time.monotonic()
            load.wait_for_accepted(requests // 3)
            shard_0 = key_slot(keys.requests_of("", 0).encode())
            holder = next(m for m in cluster.masters() if _holds(m.port, shard_0))
            event_at = time.monotonic()
            if name in ("cluster-failover", "cluster-durable", "cluster-both"):
                cluster.kill_master(holder)
                event_s = cluster.wait_for_failover(holder.port)
                if name == "cluster-both":  # then shard 0 moves off the master just promoted
                    holder = next(m for m in cluster.masters() if _holds(m.port, shard_0))
            if name in ("cluster-reshard", "cluster-both"):
                target = next(m for m in cluster.masters() if m is not holder)
                first = _first_slot(holder.port)
                count = shard_0 - first + 1 + 100  # through shard 0's slot, and a little beyond
                cluster.move_slots(count, holder.port, target.port)
                event_s = time.monotonic() - event_at
                assert _holds(target.port, shard_0), "shard 0 moved"
            records = load.records()
            elapsed = time.monotonic() - started
            time.sleep(0.5)
            wire.stopped.set()
            stored = _stored_texts(connect(url), keys, [r["id"] for r in records if "id" in r])
        finally:
            if load is not None:
                stop_processes(load.processes, timeout_s=5)
            stop_processes(daemons, timeout_s=20)
    return {
        "setting": name, "requests": requests, "producers": producers, "shards": shards,
        **_outcomes(records, stored, wire),
        "failover_s": round(event_s, 2),
        "kill_after_s": round(event_at - started, 2),
        "elapsed_s": round(elapsed, 1),
    }


def _myself(port: int) -> dict:
    import redis

    return next(node for node in redis.Redis(port=port).cluster("nodes").values() if "myself" in node["flags"])


def _holds(port: int, slot: int) -> bool:
    return any(int(r[0]) <= slot <= int(r[-1]) for r in _myself(port)["slots"])


def _first_slot(port: int) -> int:
    return min(int(r[0]) for r in _myself(port)["slots"])


def run_setting(name: str, requests: int, producers: int, binary: str, logs: Path) -> dict:
    from batchd.client.connection import connect
    from batchd.client.keys import Keys
    from batchd.embedded import SentinelSet
    from batchd.status import stop_processes, wait_for_workers

    setting = SETTINGS[name]
    replicas_acked = setting["replicas_acked"]
    with SentinelSet(binary, appendonly=setting["appendonly"], server_args=setting["server_args"]) as sentinels:
        url = sentinels.url
        daemons, load = _start_daemons(url, name, replicas_acked, logs), None
        try:
            wait_for_workers(url, 1, 120, daemons)
            wire = FinalEvents(url)
            wire.start()
            load = Producers(url, requests, producers, replicas_acked, logs, name)
            load.go()
            started = time.monotonic()
            load.wait_for_accepted(requests // 3)
            old_port = sentinels.master_port()
            killed_at = time.monotonic()
            sentinels.kill_master()
            failover_s = sentinels.wait_for_failover(old_port)
            records = load.records()
            elapsed = time.monotonic() - started
            time.sleep(0.5)  # the last final events reach the observer
            wire.stopped.set()
            stored = _stored_texts(connect(url), Keys(), [r["id"] for r in records if "id" in r])
            traces = _traces(connect(url), Keys(), [r["id"] for r in records if r.get("error") == "result_timeout"])
        finally:
            if load is not None:
                stop_processes(load.processes, timeout_s=5)  # after a failure: no producer outlives its run
            stop_processes(daemons, timeout_s=20)
    return {
        "setting": name, "requests": requests, "producers": producers,
        **_outcomes(records, stored, wire),
        "lost_traces": traces,
        "failover_s": round(failover_s, 2),
        "kill_after_s": round(killed_at - started, 2),
        "elapsed_s": round(elapsed, 1),
    }


def _start_daemons(url: str, name: str, replicas_acked: int, logs: Path) -> list[subprocess.Popen]:
    """One scheduler and one echo worker on the URL, logging to logs/<name>-<daemon>.log."""
    daemons = []
    for argv in (["scheduler", "--max-wait-ms", "5"],
                 ["worker", "--engine", "echo", "--durable-replicas", str(replicas_acked)]):
        log_file = open(logs / f"{name}-{argv[0]}.log", "wb")
        daemons.append(subprocess.Popen([sys.executable, "-m", "batchd.cli", argv[0], "--redis", url, *argv[1:]],
                                        stdout=log_file, stderr=subprocess.STDOUT))
        log_file.close()
    return daemons


def _outcomes(records: list[dict], stored: dict[str, str], wire: "FinalEvents") -> dict:
    """What the producers' records and the wire say of every request of a run."""
    answered = [r for r in records if "text" in r]
    return {
        "accepted": sum("id" in r for r in records),
        "refused": sum("refused" in r for r in records),
        "lost": sum(r.get("error") == "result_timeout" for r in records),
        "errors": sum("error" in r and r["error"] != "result_timeout" for r in records),
        "answered": len(answered),
        "wrong": sum(r["text"] != r["prompt"] for r in answered),
        "answer_differs_from_stored": sum(stored.get(r["id"]) not in (None, r["text"]) for r in answered),
        "final_events_seen_twice": sum(n > 1 for n in wire.counts.values()),
        "final_events_seen_once": sum(n == 1 for n in wire.counts.values()),
    }


def _traces(client, keys, request_ids: list[str]) -> dict[str, dict]:
    """What the new master holds of each lost request: where it was dropped."""
    entries = client.xrange(keys.requests)
    traces = {}
    for request_id in request_ids[:20]:
        traces[request_id] = {
            "claim": _text(client.get(keys.accepted(request_id))), "lease": _text(client.get(keys.owner(request_id))),
            "result": client.exists(keys.result(request_id)) == 1,
            "stream_entries": [_text(e) for e, f in entries if f.get(b"id") == request_id.encode()]}
    return traces


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _stored_texts(client, keys, request_ids: list[str]) -> dict[str, str]:
    """Each request's stored result text on the new master."""
    from batchd.client.protocol import FinalEvent, decode_event

    from batchd.client.connection import is_cluster

    mget = client.mget_nonatomic if is_cluster(client) else client.mget
    texts = {}
    for start in range(0, len(request_ids), 500):
        chunk = request_ids[start:start + 500]
        for request_id, raw in zip(chunk, mget([keys.result(i) for i in chunk])):
            if raw is not None:
                event = decode_event(raw)
                if isinstance(event, FinalEvent):
                    texts[request_id] = event.result.text
    return texts


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--settings", default="durable,default",
                        help="comma-separated: durable, default, cluster-failover, cluster-reshard, cluster-durable, "
                             "cluster-both")
    parser.add_argument("--cluster-shards", type=int, default=6)
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    parser.add_argument("--logs", default=None, help="folder for daemon logs and producer records")
    parser.add_argument("--json", default=str(RESULTS / "failover_load.json"), help="'' to skip")
    args = parser.parse_args(argv)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="batchd-failover-"))
    logs.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in args.settings.split(","):
        print(f"{name}: {args.requests} requests from {args.producers} producers; kill -9 of the master "
              f"once a third are accepted...", flush=True)
        if name.startswith("cluster-"):
            reports.append(run_cluster_setting(name, args.requests, args.producers, args.redis_server, logs,
                                               args.cluster_shards))
        else:
            reports.append(run_setting(name, args.requests, args.producers, args.redis_server, logs))
    columns = ["setting", "accepted", "refused", "lost", "errors", "wrong", "answer_differs_from_stored",
               "final_events_seen_twice", "failover_s", "kill_after_s", "elapsed_s"]
    print(" | ".join(columns))
    for report in reports:
        print(" | ".join(str(report[c]) for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{os.cpu_count()} cores, {os.uname().nodename}",
                                               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "reports": reports}, indent=2) + "\n")
    return reports


if __name__ == "__main__":
    if sys.argv[1:2] == ["--produce"]:
        url, index, count, durable, go_file, out = sys.argv[2:8]
        produce(url, int(index), int(count), int(durable), go_file, out)
    else:
        main()

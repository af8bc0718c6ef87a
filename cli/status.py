"""A snapshot of a batchd deployment read from Redis, for `batchd status`."""

from __future__ import annotations

import subprocess
import time

import msgspec
import redis

from batchd.client.connection import connect
from batchd.client.keys import SCHEDULER_GROUP, Keys
from batchd.client.protocol import decode_heartbeat


def read_status(client: redis.Redis, keys: Keys) -> dict:
    worker_ids = [w.decode() for w in client.zrange(keys.workers, 0, -1)]
    beats = client.mget([keys.heartbeat(w) for w in worker_ids]) if worker_ids else []
    workers = []
    for raw in beats:
        if raw is None:
            continue
        try:
            beat = msgspec.structs.asdict(decode_heartbeat(raw))
            if beat["tokenizer"] is not None:  # nested: a dict too, for --json
                beat["tokenizer"] = msgspec.structs.asdict(beat["tokenizer"])
            workers.append(beat)
        except Exception:  # an unreadable heartbeat is shown as absent, not a crash
            continue
    streams = request_streams(client, keys)
    pending = 0
    for stream in streams:
        try:
            for group in client.xinfo_groups(stream):
                if group["name"] in (SCHEDULER_GROUP, SCHEDULER_GROUP.encode()):
                    pending += group["pending"]
        except redis.ResponseError:
            pass  # no stream yet
    stats: dict[str, int] = {}
    for shard in range(keys.shards):  # each shard keeps its own counters: the fleet's are their sum
        for name, value in client.hgetall(keys.stats_in(shard)).items():
            stats[name.decode()] = stats.get(name.decode(), 0) + int(value)
    for beat in workers:
        # A worker older than the can_take field counts its prefetch queue as free slots.
        beat["free_slots"] = min(beat["free_slots"], beat["total_slots"])
    return {
        "time": time.time(),
        "total_slots": sum(w["total_slots"] for w in workers),
        "free_slots": sum(w["free_slots"] for w in workers),
        "queue_depth": sum(client.xlen(stream) for stream in streams),
        "held_by_schedulers": pending,
        "dead_letters": sum(client.xlen(keys.dead_letters_in(shard)) for shard in range(keys.shards)),
        "workers": workers,
        "jobs": stats.get("jobs", 0),
        "requests_dispatched": stats.get("requests_dispatched", 0),
        "job_sizes": {int(k.split(":", 1)[1]): v for k, v in stats.items() if k.startswith("job_size:")},
    }


def request_streams(client: redis.Redis, keys) -> list[str]:
    """The shared request stream and every tenant's (docs/protocol.md, "Tenants") of every shard;
    the shared ones only for a user without SCAN."""
    streams = keys.shared_streams()
    try:
        streams += [key.decode() for key in client.scan_iter(match=keys.tenant_streams, count=1000, _type="stream")]
    except redis.exceptions.NoPermissionError:
        pass
    return streams


def render(snapshot: dict, previous: dict | None = None, interval: float = 0.0) -> str:
    lines = []
    workers = snapshot["workers"]
    total, free = snapshot["total_slots"], snapshot["free_slots"]
    lines.append(f"queue depth {snapshot['queue_depth']}  (held by schedulers {snapshot['held_by_schedulers']})"
                 f"   dead letters {snapshot['dead_letters']}")
    rate = ""
    if previous is not None:
        elapsed = max(1e-9, snapshot["time"] - previous["time"])
        rate = f"   {(snapshot['requests_dispatched'] - previous['requests_dispatched']) / elapsed:.1f} req/s"
    lines.append(f"jobs {snapshot['jobs']}  requests dispatched {snapshot['requests_dispatched']}{rate}")
    lines.append(f"live workers {len(workers)}  slots used {total - free}/{total}")
    if workers:
        lines.append(f"  {'worker':<32} {'engine':<6} {'model':<24} {'running':>7} {'waiting':>7} "
                     f"{'free':>5} {'kv':>6} {'vocab':>7} {'tokenizer':<12}")
        for w in workers:
            model = w["model"] + (f" vs {w['contrast_model']}" if w.get("contrast_model") else "")
            tokenizer = w.get("tokenizer") or {"vocab_size": "-", "hash": "-"}
            lines.append(f"  {w['worker_id']:<32} {w['engine']:<6} {model[:24]:<24} {w['running']:>7} "
                         f"{w['waiting']:>7} {w['free_slots']:>5} {w['kv_cache_usage']:>6.1%} "
                         f"{tokenizer['vocab_size']:>7} {tokenizer['hash'][:12]:<12}")
    else:
        lines.append("  no live workers: requests wait in the queue until one starts")
    return "\n".join(lines)


def wait_for_workers(url: str, count: int = 1, timeout_s: float = 60.0, processes=(), prefix: str = "batchd:",
                     shards: int = 1) -> float:
    """Block until `count` workers heartbeat; returns the seconds it took.

    Raises RuntimeError at once if one of `processes` (the daemons being
    waited on) exits, and after timeout_s otherwise.
    """
    client, keys = connect(url), Keys(prefix, shards)
    started = time.monotonic()
    try:
        while len(read_status(client, keys)["workers"]) < count:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args} exited with {process.returncode} before the workers came up")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{count} worker(s) did not come up within {timeout_s:.0f}s")
            time.sleep(0.1)
    finally:
        client.close()
    return time.monotonic() - started


def stop_processes(processes, timeout_s: float = 30.0) -> None:
    """SIGTERM every process (workers drain), then kill what is still running after timeout_s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

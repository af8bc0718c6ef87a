"""Broker round trip: batchd (echo engine, no delay) against arq, Celery and RQ.

Every system runs a no-op job on one private redis-server, one worker process
each, in one run on this machine. A producer keeps C requests outstanding
(closed loop) for a fixed window and counts round trips that completed in it
(submit to result in the producer), with p50 / p99 latency. Ratios are to arq.

    python benchmarks/broker_roundtrip.py peers      # batchd, arq, Celery, RQ at 1 / 64 / 512
    python benchmarks/broker_roundtrip.py overhead   # batchd latency beyond max_wait_ms at low load
    python benchmarks/broker_roundtrip.py scaling    # 1 / 2 / 4 echo workers x 1 / 2 schedulers
    python benchmarks/broker_roundtrip.py cpu        # CPU ms per round trip of each batchd process
    python benchmarks/broker_roundtrip.py cluster    # one server vs Redis Cluster of 1 / 3 / 6 masters
    python benchmarks/broker_roundtrip.py events --cluster-masters 3   # a token event's cost to each master
    python benchmarks/broker_roundtrip.py idle --cluster-masters 3   # CPU of an idle fleet, one server vs a cluster
    python benchmarks/broker_roundtrip.py all --plot docs

Peers come from the `bench` extra: pip install 'batchd[bench]'. Results go to
benchmarks/results/ as JSON (--out). The `streams` row is a bare-bones Python
round trip (one job stream, per-request pub/sub, no validation or
reliability): the ceiling of what a Python producer and worker reach here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = ("batchd", "arq", "celery", "rq")

# arq polls on both sides (0.5 s by default, which caps it near 2 round trips/s
# per outstanding job). Its worker polls every 2 ms here; each producer's result
# poll is tried at every value of --arq-result-polls and arq's best is reported:
# short polls cut latency, but 512 jobs each polling every 2 ms swamp the producer.
ARQ_WORKER_POLL_S = 0.002
ARQ_MAX_JOBS = 1024


# -- worker processes: `broker_roundtrip.py serve SYSTEM URL` ------------------------------------------
def serve(system: str, url: str) -> None:
    if system == "arq":
        from arq.connections import RedisSettings
        from arq.worker import func, run_worker

        async def noop(ctx):
            return None

        class Settings:
            functions = [func(noop, name="noop")]
            redis_settings = RedisSettings.from_dsn(url)
            max_jobs = ARQ_MAX_JOBS
            poll_delay = ARQ_WORKER_POLL_S
            keep_result = 60
            handle_signals = True

        run_worker(Settings)
    elif system == "celery":
        app = celery_app(url)
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--loglevel=WARNING",
                         "--without-heartbeat", "--without-mingle", "--without-gossip", "--prefetch-multiplier=64"])
    elif system == "rq":
        import redis
        from rq import Queue, Worker

        connection = redis.Redis.from_url(url)
        Worker([Queue("bench", connection=connection)], connection=connection).work(logging_level="WARNING")
    elif system == "streams":
        streams_worker(url)
    else:
        raise SystemExit(f"unknown system {system}")


def celery_app(url: str):
    from celery import Celery

    app = Celery("bench", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)

    @app.task(name="noop")
    def noop():
        return None

    return app


def streams_worker(url: str) -> None:
    """The bare-bones reference: read a batch, publish each reply, ack, in one pipeline."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        r.xgroup_create("rt:jobs", "w", id="0", mkstream=True)
    except redis.ResponseError:
        pass
    while True:
        reply = r.xreadgroup("w", "w1", {"rt:jobs": ">"}, count=512, block=1000)
        for _stream, entries in reply or ():
            pipe = r.pipeline(transaction=False)
            for _entry_id, fields in entries:
                pipe.publish(b"rt:res:" + fields[b"id"], b"ok")
            pipe.xack("rt:jobs", "w", *[e for e, _ in entries])
            pipe.execute()


# -- producers: each returns [(sent, done), ...] on the wall clock --------------------------------------
async def _lanes(concurrency: int, until: float, one) -> list[tuple[float, float]]:
    pairs: list[tuple[float, float]] = []

    async def lane() -> None:
        while time.time() < until:
            sent = time.time()
            await one()
            pairs.append((sent, time.time()))

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return pairs


async def drive_batchd(url: str, concurrency: int, until: float, start: float, shards: int = 1) -> list:
    from batchd import AsyncClient

    async with AsyncClient(url, shards=shards) as client:
        await _sleep_until(start)
        return await _lanes(concurrency, until,
                            lambda: client.generate(prompt="x", max_new_tokens=1, timeout=60))


async def drive_arq(url: str, concurrency: int, until: float, start: float, result_poll_s: float = 0.002) -> list:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url))

    async def one():
        job = await pool.enqueue_job("noop")
        await job.result(timeout=60, poll_delay=result_poll_s)

    await _sleep_until(start)
    pairs = await _lanes(concurrency, until, one)
    await pool.aclose()
    return pairs


async def drive_streams(url: str, concurrency: int, until: float, start: float) -> list:
    import itertools

    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    pubsub = r.pubsub()
    await pubsub.psubscribe("rt:res:*")
    waiting: dict[bytes, asyncio.Future] = {}
    ids = itertools.count()

    async def route():
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message and message["type"] == "pmessage":
                future = waiting.pop(message["channel"][7:], None)
                if future is not None:
                    future.set_result(message["data"])

    router = asyncio.create_task(route())

    async def one():
        request_id = str(next(ids)).encode()
        future = asyncio.get_running_loop().create_future()
        waiting[request_id] = future
        await r.xadd("rt:jobs", {"id": request_id})
        await future

    await _sleep_until(start)
    pairs = await _lanes(concurrency, until, one)
    router.cancel()
    await r.aclose()
    return pairs


def _fifo_window(concurrency: int, until: float, send, wait) -> list:
    """Synchronous clients: keep `concurrency` jobs out, always waiting on the oldest.

    The workers run jobs in FIFO order, so the oldest job is the next to finish
    and waiting on it costs no throughput.
    """
    pairs, window = [], deque()
    while True:
        while len(window) < concurrency and time.time() < until:
            window.append((time.time(), send()))
        if not window:
            return pairs
        sent, handle = window.popleft()
        wait(handle)
        pairs.append((sent, time.time()))


def drive_celery(url: str, concurrency: int, until: float, start: float) -> list:
    app = celery_app(url)
    app.send_task("noop").get(timeout=60)  # connect before the clock starts
    _sleep_until_sync(start)
    return _fifo_window(concurrency, until, lambda: app.send_task("noop"),
                        lambda result: result.get(timeout=60))


def drive_rq(url: str, concurrency: int, until: float, start: float) -> list:
    import redis
    from rq import Queue

    queue = Queue("bench", connection=redis.Redis.from_url(url))
    _sleep_until_sync(start)
    return _fifo_window(concurrency, until, lambda: queue.enqueue("os.getpid"),
                        lambda job: job.latest_result(timeout=120))


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


def _sleep_until_sync(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


DRIVERS = {"batchd": drive_batchd, "arq": drive_arq, "streams": drive_streams,
           "celery": drive_celery, "rq": drive_rq}


def _producer(system: str, url: str, concurrency: int, until: float, start: float, options: dict, out) -> None:
    try:
        driver = DRIVERS[system]
        if asyncio.iscoroutinefunction(driver):
            pairs = asyncio.run(driver(url, concurrency, until, start, **options))
        else:
            pairs = driver(url, concurrency, until, start, **options)
        out.put(("ok", (pairs, time.process_time())))
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(system: str, url: str, concurrency: int, seconds: float, warmup_s: float,
            producers: int = 1, **options) -> dict:
    """One closed-loop run; counts round trips that finished inside the window after warm-up."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 2.0 + 0.3 * producers  # time for the producers to import and connect
    until = start + warmup_s + seconds
    lanes = [concurrency // producers + (1 if i < concurrency % producers else 0) for i in range(producers)]
    procs = [ctx.Process(target=_producer, args=(system, url, n, until, start, options, out)) for n in lanes if n]
    for proc in procs:
        proc.start()
    pairs, producer_cpu_s, failure = [], 0.0, None
    for _ in procs:
        try:
            kind, payload = out.get(timeout=seconds + warmup_s + 90)
        except queue.Empty:
            kind, payload = "error", "no answer within 90 s of the window's end (a stuck client)"
        if kind == "error":
            failure = f"{system} producer failed: {payload}"
            break
        pairs.extend(payload[0])
        producer_cpu_s += payload[1]
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
    if failure:
        print(failure, flush=True)
        return {"system": system, "concurrency": concurrency, "producers": producers, **options,
                "round_trips_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"),
                "error": failure, "total_round_trips": 0, "producer_cpu_s": 0.0, "completed": 0, "samples": 0}
    window_start = start + warmup_s
    done_in_window = sum(1 for _sent, done in pairs if window_start <= done <= until)
    latencies = sorted(done - sent for sent, done in pairs if window_start <= sent <= until)
    return {"system": system, "concurrency": concurrency, "producers": producers, **options,
            "round_trips_per_s": done_in_window / seconds, "completed": done_in_window,
            "p50_ms": _pct(latencies, 50) * 1000, "p99_ms": _pct(latencies, 99) * 1000,
            "samples": len(latencies), "total_round_trips": len(pairs), "producer_cpu_s": producer_cpu_s}


def _pct(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- fleets ------------------------------------------------------------------------------------------
class Fleet:
    def __init__(self, url: str, log_dir: Path, server_pid: int = 0):
        self.url = url
        self.server_pid = server_pid
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        log.close()

    def batchd(self, workers: int = 1, schedulers: int = 1, max_wait_ms: float = 5.0, shards: int = 1) -> None:
        cli = [sys.executable, "-m", "batchd.cli", "--log-level", "WARNING"]
        sharded = ["--shards", str(shards)]
        for _ in range(schedulers):
            self.spawn("scheduler", [*cli, "scheduler", "--redis", self.url, *sharded, "--max-wait-ms", str(max_wait_ms)])
        for _ in range(workers):
            self.spawn("worker", [*cli, "worker", "--redis", self.url, *sharded, "--engine", "echo"])
        self._wait_for_workers(workers, shards)

    def peer(self, system: str) -> None:
        self.spawn(system, [sys.executable, str(Path(__file__).resolve()), "serve", system, self.url])
        time.sleep(3.0)  # each peer's worker logs readiness differently; give it time to connect
        self._check_alive()

    def _wait_for_workers(self, count: int, shards: int = 1) -> None:
        from batchd.status import wait_for_workers

        wait_for_workers(self.url, count, timeout_s=30, processes=self.procs, shards=shards)
        time.sleep(0.5)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited early; see {self.log_dir}")

    def stop(self) -> None:
        from batchd.status import stop_processes

        stop_processes(self.procs, timeout_s=15)
        self.procs = []


def with_fleet(url: str, log_dir: Path, start, body):
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    fleet = Fleet(url, log_dir, client.info("server")["process_id"])
    try:
        start(fleet)
        return body()
    finally:
        fleet.stop()
        redis.Redis.from_url(url).flushall()


# -- suites ------------------------------------------------------------------------------------------
def suite_peers(url: str, log_dir: Path, args) -> list[dict]:
    rows = []
    for repeat, system in [(r, s) for r in range(args.repeat) for s in args.systems]:
        def start(fleet, system=system):
            fleet.batchd() if system == "batchd" else fleet.peer(system)

        def body(system=system):
            out = []
            for concurrency in args.concurrency:
                producers = args.client_processes if system == "batchd" else 1
                variants = [{"result_poll_s": p} for p in args.arq_result_polls] if system == "arq" else [{}]
                for procs in sorted({1, producers}):
                    for options in variants:
                        row = measure(system, url, concurrency, args.seconds, args.warmup, procs, **options)
                        row["repeat"] = repeat
                        print(_row_line(row) + (f"  {options}" if options else ""), flush=True)
                        out.append(row)
            return out

        rows += with_fleet(url, log_dir, start, body)
    return rows


def suite_overhead(url: str, log_dir: Path, args) -> list[dict]:
    """Latency beyond max_wait_ms at 1 outstanding request; --repeat runs, windows interleaved, medians last."""
    rows = []
    for repeat in range(args.repeat):
        for max_wait_ms in (5.0, 0.0):
            def body(max_wait_ms=max_wait_ms):
                row = measure("batchd", url, 1, args.seconds, args.warmup)
                row["max_wait_ms"] = max_wait_ms
                row["repeat"] = repeat
                row["overhead_p50_ms"] = row["p50_ms"] - max_wait_ms
                row["overhead_p99_ms"] = row["p99_ms"] - max_wait_ms
                print(_row_line(row) + f"  max_wait_ms={max_wait_ms:g}: overhead p50 {row['overhead_p50_ms']:.2f} ms"
                      f" p99 {row['overhead_p99_ms']:.2f} ms", flush=True)
                return [row]

            rows += with_fleet(url, log_dir, lambda fleet, m=max_wait_ms: fleet.batchd(max_wait_ms=m), body)
    for max_wait_ms in (5.0, 0.0):
        runs = [r for r in rows if r["max_wait_ms"] == max_wait_ms]
        p50 = statistics.median(r["overhead_p50_ms"] for r in runs)
        p99 = statistics.median(r["overhead_p99_ms"] for r in runs)
        print(f"max_wait_ms={max_wait_ms:g}: overhead p50 {p50:.2f} ms, p99 {p99:.2f} ms (median of {len(runs)} runs)")
    return rows


def suite_cpu(url: str, log_dir: Path, args) -> list[dict]:
    """CPU time per round trip of each batchd process: a figure a busy machine barely moves."""
    rows = []
    for concurrency in args.concurrency:
        fleet_box = {}

        def start(fleet):
            fleet.batchd()
            fleet_box["fleet"] = fleet

        def body(concurrency=concurrency):
            fleet = fleet_box["fleet"]
            pids = {"redis-server": fleet.server_pid, "scheduler": fleet.procs[0].pid, "worker": fleet.procs[1].pid}
            before = {name: _cpu_s(pid) for name, pid in pids.items()}
            row = measure("batchd", url, concurrency, args.seconds, args.warmup)
            spent = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
            spent["producer"] = row["producer_cpu_s"]
            n = row["total_round_trips"]
            row["cpu_ms_per_round_trip"] = {name: 1000 * value / n for name, value in spent.items()}
            row["cpu_ms_per_round_trip"]["total"] = sum(row["cpu_ms_per_round_trip"].values())
            print(_row_line(row) + "  CPU ms per round trip: " + "  ".join(
                f"{k} {v:.3f}" for k, v in row["cpu_ms_per_round_trip"].items()), flush=True)
            return [row]

        rows += with_fleet(url, log_dir, start, body)
    return rows


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def suite_scaling(url: str, log_dir: Path, args) -> list[dict]:
    rows = []
    for schedulers in (1, 2):
        for workers in (1, 2, 4):
            def body(schedulers=schedulers, workers=workers):
                row = measure("batchd", url, args.scaling_concurrency, args.seconds, args.warmup,
                              args.client_processes)
                row.update(workers=workers, schedulers=schedulers)
                print(_row_line(row) + f"  workers={workers} schedulers={schedulers}", flush=True)
                return [row]

            rows += with_fleet(url, log_dir, lambda f, s=schedulers, w=workers: f.batchd(workers=w, schedulers=s),
                               body)
    return rows


def suite_cluster(url: str, log_dir: Path, args) -> list[dict]:
    """The same sharded fleet (--cluster-shards shards, so every master holds as many) on one
    plain server and on clusters of each --cluster-masters size, in one run; ratios to one
    cluster master. Each cluster is started fresh (no replicas: this measures throughput)."""
    from batchd.embedded import ClusterSet

    shards = args.cluster_shards
    layouts = [("server", 0)] + [("cluster", m) for m in args.cluster_masters]
    rows = []
    for repeat in range(args.repeat):
        for kind, masters in layouts:
            cluster = ClusterSet(args.redis_server, masters=masters, replicas_per_master=0).start() if masters else None
            target = cluster.url if cluster else url
            fleet = Fleet(target, log_dir)
            try:
                fleet.batchd(workers=args.cluster_workers, schedulers=args.cluster_schedulers, shards=shards)
                row = measure("batchd", target, args.scaling_concurrency, args.seconds, args.warmup,
                              args.client_processes, shards=shards)
                row.update(layout=kind, masters=masters or 1, repeat=repeat)
                print(_row_line(row) + f"  {kind} masters={masters or 1} shards={shards}", flush=True)
                rows.append(row)
            finally:
                fleet.stop()
                if cluster:
                    cluster.cleanup()
                else:
                    import redis

                    redis.Redis.from_url(url).flushall()
    return rows


def suite_idle(url: str, log_dir: Path, args) -> list[dict]:
    """What an idle fleet costs: CPU of one scheduler, one echo worker and the Redis server(s)
    over --seconds with no request, on one server and on a cluster of the first
    --cluster-masters size (--cluster-shards shards each: a cluster's daemons poll)."""
    from batchd.embedded import ClusterSet

    shards, masters = args.cluster_shards, args.cluster_masters[0]
    rows = []
    for kind in ("server", "cluster"):
        cluster = ClusterSet(args.redis_server, masters=masters, replicas_per_master=0).start() if kind == "cluster" else None
        fleet = Fleet(cluster.url if cluster else url, log_dir)
        servers = [s.process.pid for s in cluster.live()] if cluster else [_server_pid(url)]
        try:
            fleet.batchd(workers=1, schedulers=1, shards=shards)
            time.sleep(args.warmup)
            pids = {"scheduler": [fleet.procs[0].pid], "worker": [fleet.procs[1].pid], "redis": servers}
            before = {name: sum(map(_cpu_s, group)) for name, group in pids.items()}
            time.sleep(args.seconds)
            share = {name: 100 * (sum(map(_cpu_s, group)) - before[name]) / args.seconds
                     for name, group in pids.items()}
            row = {"layout": kind, "masters": masters if cluster else 1, "shards": shards,
                   "cpu_percent_of_a_core": {name: round(value, 2) for name, value in share.items()}}
            print(f"idle {kind:7s} masters={row['masters']} shards={shards}  % of a core: " +
                  "  ".join(f"{k} {v:.2f}" for k, v in share.items()), flush=True)
            rows.append(row)
        finally:
            fleet.stop()
            if cluster:
                cluster.cleanup()
    return rows


def suite_events(url: str, log_dir: Path, args) -> list[dict]:
    """What a token event costs the Redis nodes of a cluster: PUBLISH_STEP calls of 256 events
    each (one worker step), all of one shard, published plainly (PUBLISH, which the cluster bus
    carries to every node) and on shard channels (SPUBLISH), with a subscriber listening to
    every request; CPU seconds of each master over the run, per million events."""
    import threading

    import redis
    from batchd.client.keys import Keys
    from batchd.client.scripts import run_in_pipeline
    from batchd.daemon.scripts import publish_step_call
    from batchd.embedded import ClusterSet

    masters, steps, per_step = args.cluster_masters[-1], args.event_steps, 256
    rows = []
    with ClusterSet(args.redis_server, masters=masters, replicas_per_master=0) as cluster:
        from batchd.client.connection import open_redis

        client = open_redis(cluster.url)
        for sharded in (False, True):
            keys = Keys(shards=masters, shard_channels=sharded)
            ids = [f"req-{i}" for i in range(100_000) if keys.shard_of(f"req-{i}") == 0][:per_step]
            for request_id in ids:
                client.set(keys.owner(request_id), "w/0")
            pubsub = client.pubsub()
            if sharded:
                pubsub.ssubscribe(*[keys.channel(i) for i in ids])
            else:  # one pattern, on whichever node the cluster client picks
                pubsub.psubscribe(f"{keys.prefix}res:*")
            heard, stop = [0], threading.Event()

            def drain() -> None:
                while not stop.is_set():
                    message = pubsub.get_sharded_message(timeout=0.05) if sharded else pubsub.get_message(timeout=0.05)
                    heard[0] += bool(message and message["type"] in ("pmessage", "smessage"))

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            pids = {f"{s.port}": s.process.pid for s in cluster.masters()}
            before = {port: _cpu_s(pid) for port, pid in pids.items()}
            started = time.perf_counter()
            call = publish_step_call(keys, "w/0", [(i, b"x" * 40) for i in ids])
            for _ in range(steps):
                run_in_pipeline(client, [call])
            elapsed = time.perf_counter() - started
            time.sleep(0.5)
            stop.set()
            reader.join()
            pubsub.close()
            events = steps * per_step
            owner = client.get_node_from_key(keys.owner(ids[0])).port
            cpu = {port: (_cpu_s(pid) - before[port]) for port, pid in pids.items()}
            row = {"channels": "shard (SPUBLISH)" if sharded else "plain (PUBLISH)", "masters": masters,
                   "events": events, "events_per_s": events / elapsed, "heard": heard[0],
                   "cpu_s_per_million_events": {("publishing master" if int(p) == owner else f"other {p}"):
                                                round(v * 1e6 / events, 2) for p, v in cpu.items()}}
            print(f"events {row['channels']:17s} {events:,} in {elapsed:.1f} s ({row['events_per_s']:,.0f}/s), "
                  f"heard {heard[0]:,}; CPU s per million events: {row['cpu_s_per_million_events']}", flush=True)
            rows.append(row)
    return rows


def _server_pid(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).info("server")["process_id"])


def cluster_table(rows: list[dict]) -> str:
    """Markdown: median round trips/s per layout, with the ratio to a one-master cluster."""
    by_layout: dict[tuple, list[dict]] = {}
    for row in rows:
        by_layout.setdefault((row["layout"], row["masters"]), []).append(row)
    median = {key: sorted(runs, key=_rate)[(len(runs) - 1) // 2] for key, runs in by_layout.items()}
    base = median.get(("cluster", 1))
    lines = ["| layout | masters | round trips/s (runs) | p50 ms | p99 ms | x one master |", "|---|---|---|---|---|---|"]
    for (layout, masters), row in sorted(median.items(), key=lambda kv: (kv[0][0] != "server", kv[0][1])):
        ratio = row["round_trips_per_s"] / base["round_trips_per_s"] if base and base["round_trips_per_s"] else float("nan")
        runs = ", ".join(f"{r['round_trips_per_s']:,.0f}" for r in by_layout[(layout, masters)])
        lines.append(f"| {'one server' if layout == 'server' else 'cluster'} | {masters} | {runs} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def _row_line(row: dict) -> str:
    return (f"{row['system']:<8} c={row['concurrency']:<4} producers={row['producers']} "
            f"{row['round_trips_per_s']:>9,.0f}/s  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms")


def medians(rows: list[dict]) -> list[dict]:
    """One row per system, concurrency and producer count: the run with the median rate."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["concurrency"], row["producers"], row.get("result_poll_s")),
                          []).append(row)
    out = []
    for runs in groups.values():
        runs = sorted((r for r in runs if "error" not in r), key=lambda r: r["round_trips_per_s"]) or runs
        median = dict(runs[(len(runs) - 1) // 2])
        median["runs"] = [None if "error" in r else round(r["round_trips_per_s"]) for r in runs]
        out.append(median)
    return out


def _rate(row: dict) -> float:
    rate = row["round_trips_per_s"]
    return -1.0 if math.isnan(rate) else rate


def peers_table(rows: list[dict]) -> str:
    """Markdown: one line per system and concurrency (median of repeats, best producer count), ratio to arq."""
    best: dict[tuple[str, int], dict] = {}
    for row in medians(rows):
        key = (row["system"], row["concurrency"])
        if key not in best or _rate(row) > _rate(best[key]):
            best[key] = row
    lines = ["| system | outstanding | setting | round trips/s | p50 ms | p99 ms | x arq |",
             "|---|---|---|---|---|---|---|"]
    for (system, concurrency), row in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        arq = best.get(("arq", concurrency))
        ratio = row["round_trips_per_s"] / arq["round_trips_per_s"] if arq and arq["round_trips_per_s"] else float("nan")
        setting = (f"result poll {row['result_poll_s'] * 1000:g} ms" if row.get("result_poll_s")
                   else f"{row['producers']} producer process{'es' if row['producers'] > 1 else ''}")
        lines.append(f"| {system} | {concurrency} | {setting} | {row['round_trips_per_s']:,.0f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {ratio:.1f} |")
    return "\n".join(lines)


def plot_peers(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = medians(rows)
    systems = [s for s in ("batchd", "streams", "arq", "celery", "rq") if any(r["system"] == s for r in rows)]
    levels = sorted({r["concurrency"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        rates, p50s = [], []
        for level in levels:
            mine = [r for r in rows if r["system"] == system and r["concurrency"] == level]
            top = max(mine, key=lambda r: r["round_trips_per_s"]) if mine else None
            rates.append(top["round_trips_per_s"] if top else 0)
            p50s.append(top["p50_ms"] if top else float("nan"))
        xs = [j + i * width for j in range(len(levels))]
        left.bar(xs, rates, width, label=system)
        right.plot(levels, p50s, marker="o", label=system)
    left.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(levels))], [str(l) for l in levels])
    left.set_xlabel("outstanding requests")
    left.set_ylabel("round trips / s")
    left.set_title("throughput (higher is better)")
    left.legend()
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("outstanding requests")
    right.set_ylabel("p50 latency (ms)")
    right.set_title("latency (lower is better)")
    right.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict], path: Path, title: str = "batchd scaling") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for schedulers in sorted({r["schedulers"] for r in rows}):
        mine = sorted((r for r in rows if r["schedulers"] == schedulers), key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in mine], [r["round_trips_per_s"] for r in mine], marker="o",
                label=f"{schedulers} scheduler(s)")
    ax.set_xlabel("echo workers")
    ax.set_ylabel("round trips / s")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cluster(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layout, marker in (("server", "s"), ("cluster", "o")):
        mine = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["masters"])
        if mine:
            ax.plot([r["masters"] for r in mine], [r["round_trips_per_s"] for r in mine], marker=marker,
                    linestyle="" if layout == "server" else "-", label="one plain server" if layout == "server" else "cluster")
    ax.set_xlabel("masters")
    ax.set_ylabel("round trips / s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(server_binary: str) -> dict:
    """Versions of what ran: Python, the packages, and the server binary the run started."""
    import importlib.metadata as md

    versions = {}
    for name in ("batchd", "redis", "hiredis", "arq", "celery", "kombu", "rq", "msgspec"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    server = subprocess.run([server_binary, "--version"], capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "redis_server": server, "packages": versions,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=("peers", "overhead", "scaling", "cpu", "cluster", "idle", "events", "all", "serve"))
    parser.add_argument("serve_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--systems", default="batchd,streams,arq,celery,rq",
                        help="comma-separated subset of batchd,streams,arq,celery,rq")
    parser.add_argument("--concurrency", default="1,64,512", help="outstanding requests, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds discarded at the start of each run")
    parser.add_argument("--arq-result-polls", default="0.002,0.01,0.05",
                        help="arq producer poll intervals (s) to try; arq's best is reported")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every peers measurement this many times, systems interleaved; report medians")
    parser.add_argument("--client-processes", type=int, default=2,
                        help="batchd is also measured with this many producer processes (default 2)")
    parser.add_argument("--scaling-concurrency", type=int, default=512)
    parser.add_argument("--cluster-masters", default="1,3,6", help="cluster sizes of the cluster suite")
    parser.add_argument("--cluster-shards", type=int, default=6, help="request shards of the cluster suite's fleet")
    parser.add_argument("--cluster-workers", type=int, default=2, help="echo workers of the cluster suite")
    parser.add_argument("--cluster-schedulers", type=int, default=2, help="schedulers of the cluster suite")
    parser.add_argument("--event-steps", type=int, default=2000, help="PUBLISH_STEP calls of the events suite")
    parser.add_argument("--redis-server", default="redis-server", help="server binary to start privately")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON results")
    parser.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots here")
    args = parser.parse_args(argv)
    if args.suite == "serve":
        serve(*args.serve_args)
        return 0
    args.systems = [s for s in args.systems.split(",") if s]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.arq_result_polls = [float(p) for p in args.arq_result_polls.split(",")]
    args.cluster_masters = [int(m) for m in args.cluster_masters.split(",") if m]

    sys.path.insert(0, str(REPO))
    from batchd.embedded import EmbeddedServer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suites = ("peers", "overhead", "scaling", "cpu") if args.suite == "all" else (args.suite,)
    with EmbeddedServer(binary=args.redis_server) as server:
        log_dir = server.data_dir
        for suite in suites:
            rows = {"peers": suite_peers, "overhead": suite_overhead, "scaling": suite_scaling, "cpu": suite_cpu,
                    "cluster": suite_cluster, "idle": suite_idle, "events": suite_events}[suite](
                server.url, log_dir, args)
            report = {"suite": suite, "settings": {k: v for k, v in vars(args).items() if k != "serve_args"},
                      "environment": environment(args.redis_server), "rows": rows}
            (out_dir / f"broker_{suite}.json").write_text(json.dumps(report, indent=2))
            if suite == "peers":
                print(peers_table(rows))
                if args.plot:
                    plot_peers(rows, Path(args.plot) / "broker-roundtrip.png",
                               f"broker round trip, {os.cpu_count()} CPUs, one worker process each")
            if suite == "cluster":
                print(cluster_table(rows))
                if args.plot:
                    plot_cluster(rows, Path(args.plot) / "broker-cluster.png",
                                 f"batchd on Redis Cluster, {os.cpu_count()} CPUs, {args.cluster_shards} shards, "
                                 f"{args.scaling_concurrency} outstanding")
            if suite == "scaling" and args.plot:
                plot_scaling(rows, Path(args.plot) / "broker-scaling.png",
                             f"batchd scaling, {os.cpu_count()} CPUs, {args.scaling_concurrency} outstanding")
    return 0


if __name__ == "__main__":
    sys.exit(main())

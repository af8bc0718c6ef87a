"""What each `batchd` subcommand does (argument parsing lives in cli.py)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time

log = logging.getLogger("batchd")

_SIZE = re.compile(r"^\s*([\d.]+(?:e\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str | None) -> int | None:
    """'2GiB', '500MB', '1e9' -> bytes."""
    if text is None:
        return None
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise SystemExit(f"cannot read size {text!r}: use e.g. 2GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


# -- daemons -------------------------------------------------------------------
def scheduler(args) -> int:
    from batchd.cli import install_stop_handlers
    from batchd.scheduler.daemon import Scheduler, SchedulerConfig

    config = SchedulerConfig(redis_url=args.redis, prefix=args.prefix, shards=_shards(args), max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_attempts=args.max_attempts, claim_idle_ms=args.claim_idle_ms,
                             read_ahead=args.read_ahead, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                             result_ttl_s=args.result_ttl, read_shards=args.read_shards)
    beyond = [shard for shard in config.read_shards or () if shard >= config.shards]
    if beyond:
        log.error("scheduler cannot start: --read-shards names %s, but the fleet has %d shard(s), numbered 0 to %d",
                  ",".join(map(str, beyond)), config.shards, config.shards - 1)
        return 2
    daemon = Scheduler(config)
    install_stop_handlers(daemon.stop)
    daemon.run()
    return 0


def build_engine(args):
    if args.engine == "echo":
        from batchd.workers.echo import EchoEngine

        return EchoEngine(slots=1024 if args.slots is None else args.slots, token_delay_s=args.token_delay_ms / 1000.0)
    from batchd.workers.hf import build_engine as build_hf

    return build_hf(args.model, slots=16 if args.slots is None else args.slots, max_context=args.max_context,
                    kv_memory=parse_size(args.kv_memory), max_prefill_tokens=args.max_prefill_tokens,
                    burst_prefill_tokens=args.burst_prefill_tokens, dtype=args.dtype, device=args.device,
                    contrast_model=args.contrast_model, quantize=args.quantize, kv_dtype=args.kv_dtype,
                    max_pinned_blocks=args.max_pinned_blocks)


def worker(args) -> int:
    from batchd.cli import install_stop_handlers
    from batchd.daemon import metrics
    from batchd.workers.worker import Worker, WorkerConfig

    config = WorkerConfig(redis_url=args.redis, prefix=args.prefix, shards=_shards(args), drain_timeout_s=args.drain_timeout,
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host, lease_ms=args.lease_ms,
                          heartbeat_interval_s=args.heartbeat_interval, abandoned_after_s=args.abandoned_after,
                          served_models=args.served_model_names or [], result_ttl_s=args.result_ttl,
                          scoring_result_ttl_s=args.scoring_result_ttl, durable_replicas=args.durable_replicas)
    if args.worker_id:
        config.worker_id = args.worker_id
    _check_shards(config.redis_url, config.prefix, config.shards, "this worker")  # before a minute of loading
    # /metrics and /health answer while the model loads (a minute or more on a GPU),
    # so a loading worker reads as loading, not as down.
    state = metrics.WorkerState(config.worker_id)
    metrics.serve(config.metrics_port, metrics.WORKER_REGISTRY, config.metrics_host, state.current)
    if config.metrics_port:
        log.info("worker %s loading its model; /metrics and /health on %s:%d", config.worker_id,
                 config.metrics_host, config.metrics_port)
    try:
        engine = build_engine(args)
    except (ValueError, FileNotFoundError) as exc:  # a setting the operator has to change, not a crash
        log.error("worker cannot start: %s", exc)
        return 2
    daemon = Worker(config, engine, state=state)
    install_stop_handlers(daemon.stop)
    daemon.run()
    return 0


class Fleet:
    """Child processes of `up` and `demo`: one owner that starts and stops them all."""

    def __init__(self):
        self.server = None
        self.children: list[subprocess.Popen] = []

    def start_server(self, url: str | None) -> str:
        if url:
            return url
        from batchd.embedded import EmbeddedServer

        self.server = EmbeddedServer(appendonly=True).start()
        print(f"embedded Redis-compatible server at {self.server.url} ({self.server.binary})", flush=True)
        return self.server.url

    def spawn(self, *argv: str, quiet: bool = False) -> subprocess.Popen:
        command = [sys.executable, "-m", "batchd.cli", *argv]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL if quiet else None,
                                 stderr=subprocess.DEVNULL if quiet else None)
        self.children.append(child)
        return child

    def stop(self) -> None:
        from batchd.status import stop_processes

        stop_processes(self.children, timeout_s=40)
        if self.server is not None:
            self.server.cleanup()


def _daemon_argv(args, url: str) -> tuple[list[str], list[str]]:
    common = ["--redis", url, "--prefix", args.prefix, "--shards", str(_shards(args)),
              "--result-ttl", str(args.result_ttl)]
    sched = ["scheduler", *common, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
             "--max-queue", str(args.max_queue), "--max-attempts", str(args.max_attempts),
             "--claim-idle-ms", str(args.claim_idle_ms), "--read-ahead", str(args.read_ahead)]
    work = ["worker", *common, "--engine", args.engine, "--model", args.model,
            "--drain-timeout", str(args.drain_timeout),
            "--token-delay-ms", str(args.token_delay_ms), "--lease-ms", str(args.lease_ms),
            "--heartbeat-interval", str(args.heartbeat_interval), "--abandoned-after", str(args.abandoned_after),
            "--scoring-result-ttl", str(args.scoring_result_ttl), "--durable-replicas", str(args.durable_replicas)]
    for name in args.served_model_names or ():
        work += ["--served-model-name", name]
    for flag, value in (("--slots", args.slots), ("--kv-memory", args.kv_memory),
                        ("--max-prefill-tokens", args.max_prefill_tokens),
                        ("--burst-prefill-tokens", args.burst_prefill_tokens),
                        ("--max-context", args.max_context), ("--dtype", args.dtype), ("--device", args.device),
                        ("--contrast-model", args.contrast_model), ("--quantize", args.quantize),
                        ("--kv-dtype", args.kv_dtype), ("--max-pinned-blocks", args.max_pinned_blocks)):
        if value is not None:
            work += [flag, str(value)]
    if args.metrics_port:
        sched += ["--metrics-port", str(args.metrics_port), "--metrics-host", args.metrics_host]
        work += ["--metrics-port", str(args.metrics_port + 1), "--metrics-host", args.metrics_host]
    return sched, work


def up(args) -> int:
    from batchd.cli import install_stop_handlers

    fleet = Fleet()
    stopping = {"now": False}
    install_stop_handlers(lambda: stopping.update(now=True))
    try:
        url = fleet.start_server(args.redis)
        sched, work = _daemon_argv(args, url)
        fleet.spawn(*sched)
        fleet.spawn(*work)
        print(f"batchd up: producers connect with Client({url!r}); Ctrl-C stops", flush=True)
        while not stopping["now"] and all(child.poll() is None for child in fleet.children):
            time.sleep(0.2)
    finally:
        dead = [child for child in fleet.children if child.poll() is not None]
        fleet.stop()
    if stopping["now"]:
        return 0
    for child in dead:  # a daemon died on its own: the whole `up` failed
        print(f"batchd up: `batchd {child.args[3]}` exited with code {child.returncode}; stopped the rest",
              file=sys.stderr)
    return 1 if dead else 0


def demo(args) -> int:
    from batchd.demo import run_demo

    return run_demo(args, Fleet())


# -- talking to a deployment -------------------------------------------------------
def submit(args) -> int:
    from batchd import Client
    from batchd.client import BatchdError, Delta, StreamRestarted

    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, timeout=args.timeout)
    if args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        kwargs["prompt"] = args.prompt
    with Client(args.redis, prefix=args.prefix, shards=_shards(args)) as client:
        try:
            if not args.stream:
                result = client.generate(**kwargs)
                print(result.text)
            else:
                for item in client.stream(**kwargs):
                    if isinstance(item, Delta):
                        print(item.text, end="", flush=True)
                    elif isinstance(item, StreamRestarted):
                        print(f"\n[worker died; restarting (attempt {item.attempt})]", flush=True)
                    else:
                        result = item
                print()
        except BatchdError as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return 1
    print(f"[{result.finish_reason}; {result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} "
          f"generated tokens; first token {result.timings.first_token_s or 0:.3f}s, "
          f"total {result.timings.total_s:.3f}s]", file=sys.stderr)
    return 0


def status(args) -> int:
    from batchd.status import read_status, render

    import redis as redis_lib

    from batchd.client.connection import connect
    from batchd.client.keys import Keys

    client, keys = connect(args.redis), Keys(args.prefix, _shards(args))
    previous = None
    while True:
        try:
            snapshot = read_status(client, keys)
        except redis_lib.ConnectionError as exc:
            print(f"cannot reach Redis: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(snapshot, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(snapshot, previous, args.interval))
        if not args.watch:
            return 0
        previous = snapshot
        time.sleep(args.interval)


def health(args) -> int:
    import redis as redis_lib

    from batchd.client.connection import connect
    from batchd.client.keys import Keys
    from batchd.status import read_status

    try:
        client, keys = connect(args.redis), Keys(args.prefix, _shards(args))
        client.ping()
        if args.worker_id and not client.exists(keys.heartbeat(args.worker_id)):
            state = local_worker_state(args.metrics_port)
            if state in ("loading", "draining"):
                print(f"{state}: worker {args.worker_id} has no heartbeat yet; its /health says {state}")
            else:
                print(f"unhealthy: worker {args.worker_id} has no live heartbeat")
            return 1
        live = len(read_status(client, keys)["workers"])
        if live < args.require_workers:
            print(f"unhealthy: {live} live workers, need {args.require_workers}")
            return 1
    except redis_lib.RedisError as exc:
        print(f"unhealthy: Redis: {exc}")
        return 1
    print("ok")
    return 0




def local_worker_state(port: int | None) -> str | None:
    """What the worker serving /health on this host's port says it is doing (loading, serving,
    draining: daemon/metrics.py), or None when nothing answers there."""
    import urllib.error
    import urllib.request

    if not port:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.read().decode().strip()
    except urllib.error.HTTPError as exc:  # 503: loading or draining
        return exc.read().decode().strip()
    except (OSError, ValueError):
        return None


def gateway(args) -> int:
    from batchd.daemon import metrics

    try:
        from batchd.gateway import GatewayConfig, is_loopback, key_digest, read_keys_file, serve
    except ImportError as exc:
        log.error("the gateway needs its extra: pip install 'batchd[gateway]' (%s)", exc)
        return 2
    try:
        keys = read_keys_file(args.api_keys_file) if args.api_keys_file else {}
    except (OSError, ValueError) as exc:
        log.error("cannot read --api-keys-file: %s", exc)
        return 2
    for key in args.api_key:
        digest = key_digest(key)
        keys[digest] = (f"key-{digest[:8]}", None)
    if not keys and not is_loopback(args.host):
        log.error("refusing to serve %s without API keys: give --api-key or --api-keys-file, or listen on "
                  "127.0.0.1", args.host)
        return 2
    config = GatewayConfig(redis_url=args.redis, prefix=args.prefix, shards=_shards(args), api_keys=keys,
                           request_timeout_s=args.request_timeout, durable_replicas=args.durable_replicas,
                           metrics_on_api_port=not args.metrics_port)
    metrics.serve(args.metrics_port, metrics.GATEWAY_REGISTRY, args.metrics_host)
    serve(config, args.host, args.port)
    return 0


def bench(args) -> int:
    from batchd.bench import run

    return run(args)


def _check_shards(url: str, prefix: str, shards: int, who: str) -> None:
    """WrongShards (one line from the command, exit 2) when the fleet's schedulers run another
    --shards: a worker of another count would read job streams no scheduler writes."""
    from batchd.client.connection import close_redis, fleet_shards, open_redis
    from batchd.client.core import check_fleet_shards
    from batchd.client.keys import Keys

    keys = Keys(prefix, shards)
    client = open_redis(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        check_fleet_shards(fleet_shards(client, keys), keys.shards, who)
    finally:
        close_redis(client)


def _shards(args) -> int:
    """--shards, else $BATCHD_SHARDS, else 1."""
    if getattr(args, "shards", None):
        return args.shards
    from batchd.client.core import default_shards

    return default_shards()

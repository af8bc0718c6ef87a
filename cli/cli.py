"""The `batchd` command: run daemons, the demo, and talk to a deployment."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys

from batchd.client.connection import redact, redis_url
from batchd.daemon.toolkit import DEFAULT_MAX_ATTEMPTS
from batchd.workers.hf.models import DTYPES, QUANTIZATIONS

DEFAULT_MODEL = "smollm2-135m"
# Commands that talk to an existing Redis and are checked against it before they start.
NEEDS_REDIS = ("scheduler", "worker", "submit", "status", "bench")


def _number(kind, low, what: str, inclusive: bool = True, high=None):
    """An argparse type: a finite number of `kind` at least (or above) `low`, at most `high`;
    anything else is refused with one line, never silently replaced by a default."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value < low if inclusive else value <= low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: {what}")
        return value
    return parse


COUNT = _number(int, 1, "must be at least 1")
NON_NEGATIVE = _number(int, 0, "must be 0 or more")
PORT = _number(int, 0, "must be a port number, 0 to 65535 (0: off)", high=65535)
SHARDS = _number(int, 1, "must be 1 to 256", high=256)


def shard_list(text: str) -> tuple[int, ...]:
    """--read-shards: shard numbers and ranges, "0-2,5"."""
    shards: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            shards.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of shard numbers and ranges like 0-2,5") from None
    if not shards or min(shards) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} names no shard (shards are numbered from 0)")
    return tuple(sorted(shards))
ZERO_OR_MORE = _number(float, 0, "must be 0 or more")
ABOVE_ZERO = _number(float, 0, "must be more than 0", inclusive=False)


def _add_redis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="Redis URL (redis://, rediss:// for TLS, redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE "
                             "for a Sentinel-managed master); default $BATCHD_REDIS_URL or redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="batchd:", help="key prefix shared by all batchd processes")
    parser.add_argument("--shards", type=SHARDS, default=None,
                        help="request shards, the same for every process of a fleet (docs/deploy.md, \"Redis "
                             "Cluster\"); default $BATCHD_SHARDS or 1")


def _add_result_ttl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-ttl", type=COUNT, default=3600, metavar="SECONDS",
                        help="how long a generate request's final result stays readable in Redis (default 3600)")


def _add_scheduler_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scheduler")
    group.add_argument("--max-batch", type=COUNT, default=32, help="most requests in one job (default 32)")
    group.add_argument("--max-wait-ms", type=ZERO_OR_MORE, default=5.0,
                       help="close a batch this long after its first request (default 5)")
    group.add_argument("--max-queue", type=NON_NEGATIVE, default=100_000,
                       help="backlog beyond which submits fail with Overloaded (0: unbounded)")
    group.add_argument("--max-attempts", type=COUNT, default=DEFAULT_MAX_ATTEMPTS,
                       help="dead-letter a request after this many worker failures (workers read it from Redis)")
    group.add_argument("--read-ahead", type=COUNT, default=4096,
                       help="most requests one scheduler holds undispatched, over all request streams (default 4096)")
    group.add_argument("--claim-idle-ms", type=COUNT, default=10_000,
                       help="take over requests another scheduler held this long without touching (default 10000)")
    group.add_argument("--read-shards", type=shard_list, default=None, metavar="LIST",
                       help="read only these request shards, e.g. 0-2,5 (default all of --shards): several "
                            "schedulers can split a sharded fleet's streams; every shard needs one")


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("worker")
    group.add_argument("--engine", choices=("hf", "echo"), default="hf",
                       help="hf: a real model with continuous batching; echo: no model, echoes prompts")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help="Hugging Face checkpoint folder, .gguf file, or alias smollm2-135m (default)")
    group.add_argument("--slots", type=COUNT, default=None,
                       help="concurrent requests in the engine (default: 16 for hf, 1024 for echo)")
    group.add_argument("--kv-memory", default=None,
                       help="KV cache pool, e.g. 40GiB or 500MB, shared by all live requests (default: on a GPU "
                            "what is free after the weights less 10%% of the device, at most slots x max context; "
                            "on a CPU slots x max context)")
    group.add_argument("--max-context", type=COUNT, default=None,
                       help="longest prompt + output of one request; reserves nothing (default: the model's context)")
    group.add_argument("--max-prefill-tokens", type=COUNT, default=None,
                       help="prompt tokens a step computes, so long prompts never stall decoding (default: 512 on "
                            "a GPU, which keeps the inter-token tail low; 2048 on a CPU)")
    group.add_argument("--burst-prefill-tokens", type=COUNT, default=None,
                       help="prompt tokens a step may compute while a backlog of prompts waits (a burst, long "
                            "prompts): the budget grows with the backlog up to this (default: 4x "
                            "--max-prefill-tokens on a GPU, the same on a CPU)")
    group.add_argument("--max-pinned-blocks", type=NON_NEGATIVE, default=None, metavar="BLOCKS",
                       help="KV blocks pinned prefixes (client.pin) may hold; a pin beyond it is refused with "
                            "PinLimitReached (default: a quarter of the pool)")
    group.add_argument("--served-model-name", action="append", default=None, metavar="NAME", dest="served_model_names",
                       help="a name requests give as model= to reach this worker (repeatable; default: the model's "
                            "own name, 'echo' for the echo engine)")
    group.add_argument("--contrast-model", default=None, metavar="MODEL",
                       help="a second model (the same one before fine-tuning) that requests with contrast_alpha "
                            "decode against: logits + alpha * (logits - logits_of_this_model)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                       help="fp8: float8 weights read by float8 products (GPUs of compute capability 8.9+: "
                            "Ada, Hopper; faster decoding); int8: weight-only int8 linear layers, a memory saver "
                            "(torchao; pip install 'batchd[int8]'; slower than bf16 on a GPU, docs/contrast-and-weights.md)")
    group.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                       help="the KV cache's storage: auto (the model's dtype) or fp8 (float8 e4m3 with per-layer "
                            "scales: twice the tokens of bf16 in the same memory, and a faster decode step on GPUs "
                            "of compute capability 8.9+; docs/contrast-and-weights.md has its agreement with bf16)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    group.add_argument("--token-delay-ms", type=ZERO_OR_MORE, default=0.0, help="echo engine: delay per step")
    group.add_argument("--drain-timeout", type=ZERO_OR_MORE, default=30.0,
                       help="on SIGTERM, finish in-flight requests for this many seconds, then hand back")
    group.add_argument("--worker-id", default=None, help="stable id (default: host-pid-random)")
    group.add_argument("--lease-ms", type=COUNT, default=5000,
                       help="a worker silent this long is presumed dead and its requests re-dispatched (default 5000)")
    group.add_argument("--heartbeat-interval", type=ABOVE_ZERO, default=1.0,
                       help="seconds between heartbeats; keep well under the lease (default 1.0)")
    group.add_argument("--durable-replicas", type=NON_NEGATIVE, default=0, metavar="N",
                       help="count a stored result (and its job) as done only once N replicas hold it (WAIT); "
                            "with a Sentinel-managed master, a failover then loses no finished result (default 0)")
    group.add_argument("--abandoned-after", type=ZERO_OR_MORE, default=10.0,
                       help="cancel a request nobody has listened to for this many seconds (0: never)")
    group.add_argument("--scoring-result-ttl", type=COUNT, default=5, metavar="SECONDS",
                       help="how long a scoring request's result (a full next-token vector: 4 bytes a "
                            "vocabulary entry) stays readable in Redis (default 5)")


def _add_metrics(parser: argparse.ArgumentParser, port_help: str) -> None:
    parser.add_argument("--metrics-port", type=PORT, default=0, help=port_help)
    parser.add_argument("--metrics-host", default="0.0.0.0", metavar="ADDRESS",
                        help="address /metrics listens on (default 0.0.0.0, every interface; "
                             "127.0.0.1 keeps it on this host)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchd", description="Dynamic-batching LLM inference on a Redis queue broker.")
    parser.add_argument("--log-level", default=os.environ.get("BATCHD_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scheduler", help="run a scheduler daemon (any number may run)")
    _add_redis(p)
    _add_result_ttl(p)
    _add_scheduler_options(p)
    _add_metrics(p, "serve Prometheus /metrics and /health here (0: off)")

    p = sub.add_parser("worker", help="run a worker daemon with an engine")
    _add_redis(p)
    _add_result_ttl(p)
    _add_worker_options(p)
    _add_metrics(p, "serve Prometheus /metrics and /health here from process start, while the model "
                    "loads too (0: off)")

    p = sub.add_parser("up", help="scheduler + worker (+ an embedded server unless --redis is given)")
    _add_redis(p)
    _add_result_ttl(p)
    _add_scheduler_options(p)
    _add_worker_options(p)
    _add_metrics(p, "scheduler /metrics on this port, worker on the next (0: off)")

    p = sub.add_parser("demo", help="the README demo: a burst of chat prompts from several producer processes")
    _add_redis(p)
    p.add_argument("--engine", choices=("hf", "echo"), default="hf")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--producers", type=COUNT, default=4, help="producer processes")
    p.add_argument("--prompts", type=COUNT, default=12, help="prompts in the burst")
    p.add_argument("--max-new-tokens", type=COUNT, default=48)
    p.add_argument("--slots", type=COUNT, default=16)

    p = sub.add_parser("submit", help="send one prompt and print the answer")
    _add_redis(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send as a user chat message (chat template)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-new-tokens", type=COUNT, default=256)
    p.add_argument("--temperature", type=ZERO_OR_MORE, default=0.0)
    p.add_argument("--timeout", type=ABOVE_ZERO, default=None)

    p = sub.add_parser("status", help="live workers, free slots, queue depth, dead letters")
    _add_redis(p)
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds")
    p.add_argument("--interval", type=ABOVE_ZERO, default=2.0)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("bench", help="load generator: throughput and latency against a deployment")
    _add_redis(p)
    from batchd.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)

    p = sub.add_parser("gateway", help="an OpenAI-compatible HTTP server in front of the queue (pip install 'batchd[gateway]')")
    _add_redis(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs API keys)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key callers send as 'Authorization: Bearer KEY' (repeatable; producer identity "
                        "key-<first 8 hex of its sha256>)")
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="lines of 'KEY PRODUCER [REDIS_URL]': each key's producer identity (and Redis user)")
    p.add_argument("--durable-replicas", type=NON_NEGATIVE, default=0, metavar="N",
                   help="accept a call's submit only once N replicas hold it (WAIT), so a Redis failover "
                        "cannot lose it (default 0)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="deadline of a call that gives none, in seconds; past it the caller gets 504 (default 600)")
    _add_metrics(p, "serve Prometheus /metrics here instead of on --port, where callers reach it (0: on --port)")

    p = sub.add_parser("health", help="exit 0 when healthy (for probes)")
    _add_redis(p)
    p.add_argument("--worker-id", default=None, help="check this worker's heartbeat")
    p.add_argument("--metrics-port", type=PORT, default=None,
                   help="with --worker-id, the worker's /health on this host: a worker with no heartbeat yet "
                        "is reported as loading its model (still exit 1), not as down")
    p.add_argument("--require-workers", type=NON_NEGATIVE, default=0, help="fail unless this many workers are live")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "redis", None) is None and args.command not in ("up", "demo"):
        args.redis = redis_url(None)
    checked = args.command in NEEDS_REDIS or (args.command in ("up", "demo") and args.redis)
    problem = check_redis(args.redis) if checked else None
    if problem:
        print(f"batchd {args.command}: {problem}", file=sys.stderr)
        return 2
    from batchd import commands
    from batchd.client.errors import CannotListen, WrongShards

    try:
        return getattr(commands, args.command)(args) or 0
    except (CannotListen, WrongShards) as exc:
        print(f"batchd {args.command}: {exc}", file=sys.stderr)
        return 2


def check_redis(url: str) -> str | None:
    """One line saying why Redis at url cannot be used, or None when it answers.

    Every command asks before it starts, so a wrong URL, password or TLS setting
    is one clear line instead of a traceback, and a worker learns it before it
    spends a minute loading its model.
    """
    import redis

    from batchd.client.connection import close_redis, open_redis

    where = redact(url)
    try:
        client = open_redis(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        return (f"{where!r} is not a Redis URL ({exc}); use redis://HOST:PORT/DB, rediss:// for TLS, or "
                "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE for a Sentinel-managed master")
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return f"Redis at {where} refused the credentials ({exc}); check the user and password in the URL"
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return (f"cannot reach Redis at {where} ({str(exc).rstrip('.')}); check --redis or $BATCHD_REDIS_URL "
                "(rediss:// for TLS)")
    except redis.RedisError as exc:
        return f"Redis at {where} answered PING with an error: {exc}"
    finally:
        close_redis(client)
    return None


def install_stop_handlers(stop) -> None:
    """SIGTERM / SIGINT begin a clean stop; a second one exits at once."""
    hits = {"n": 0}

    def handler(signum, _frame):
        hits["n"] += 1
        if hits["n"] > 1:
            os._exit(128 + signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main())

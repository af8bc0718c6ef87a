"""Soak: many requests through the whole fleet while a hostile producer attacks it.

One private redis-server with the ACL users of docs/security.md, two schedulers and two echo
workers (each as its own ACL user), honest producers (AsyncClient, as `batchd-producer`) keeping
--concurrency requests in flight, and one hostile producer with the same ACL user. The hostile
one learns the ids in flight from PSUBSCRIBE and, at random, re-submits them with its own text
(raw XADD and the SUBMIT function), sends malformed entries and 64 KiB of garbage carrying them,
PUBLISHes forged final, token and restart events on their channels, submits fresh requests
claiming attempt=10**6, XADDs an entry with the largest id there is (at most every 5 s: every
later `XADD *` fails until a scheduler sets the stream's last id back), and tries commands its
ACL refuses (SET on the stream and the config, SCRIPT LOAD).

Counted at the end: lost (an honest request without its result), wrong (a result that is not its
own text), streamed_wrong (a stream whose deltas are not its own text, or that restarted),
duplicated (more than one real final event on the wire for one id), hostile requests
that did not run as attempt 0, daemons that exited, and Redis memory (peak used_memory and the
dead-letter stream's size).

    python benchmarks/soak_hostile.py --requests 20000     # the issue-16 bar; JSON to benchmarks/results/
    python benchmarks/soak_hostile.py --requests 300       # what tests/faults/test_soak.py runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import redis

from batchd import AsyncClient, BatchdError
from batchd.client.core import Delta, StreamRestarted
from batchd.client.keys import Keys
from batchd.client.protocol import (PROTOCOL_VERSION, FinalEvent, Request, RestartEvent, Result, TokenEvent,
                                   decode_event, encode)
from batchd.embedded import EmbeddedServer
from batchd.status import read_status, stop_processes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEYS = Keys()
ADMIN = ("admin", "admin-password")
PASSWORDS = {"batchd-producer": "producer-password", "batchd-scheduler": "scheduler-password",
             "batchd-worker-gpu-0": "worker-password", "batchd-worker-gpu-1": "worker-password"}
FORGED_TEXT = "FORGED"
ATTACKER_TEXT = "ATTACKER"


def documented_acl() -> list[str]:
    text = (REPO / "docs" / "security.md").read_text()
    return [line for line in re.search(r"```acl\n(.*?)```", text, re.S).group(1).splitlines() if line.strip()]


def start_server(binary: str | None) -> EmbeddedServer:
    server = EmbeddedServer(binary=binary).start()
    setup = redis.Redis.from_url(server.url)
    acl = documented_acl()
    for line in acl:
        setup.execute_command(*line.split())
    [gpu0] = [line for line in acl if "batchd-worker-gpu-0" in line]
    setup.execute_command(*gpu0.replace("gpu-0", "gpu-1").split())
    setup.execute_command("ACL", "SETUSER", ADMIN[0], "on", f">{ADMIN[1]}", "~*", "&*", "+@all")
    setup.execute_command("ACL", "SETUSER", "default", "off")
    setup.close()
    return server


def url(server: EmbeddedServer, user: str) -> str:
    password = ADMIN[1] if user == ADMIN[0] else PASSWORDS[user]
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def start_daemons(server: EmbeddedServer, log_dir: Path, token_delay_ms: float) -> list[subprocess.Popen]:
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = [("scheduler", "batchd-scheduler", ["--max-wait-ms", "5"]),
                ("scheduler", "batchd-scheduler", ["--max-wait-ms", "5"])]
    for worker_id in ("gpu-0", "gpu-1"):
        commands.append(("worker", f"batchd-worker-{worker_id}",
                         ["--engine", "echo", "--worker-id", worker_id, "--token-delay-ms", str(token_delay_ms)]))
    processes = []
    for index, (role, user, extra) in enumerate(commands):
        log = open(log_dir / f"{role}-{index}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "batchd.cli", role, "--redis", url(server, user), *extra],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=log_dir,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        process.log_path = log_dir / f"{role}-{index}.log"
        processes.append(process)
    admin = redis.Redis.from_url(url(server, ADMIN[0]))
    deadline = time.monotonic() + 60
    while len(read_status(admin, KEYS)["workers"]) < 2:
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError("the fleet did not come up:\n" + "\n".join(p.log_path.read_text() for p in processes))
        time.sleep(0.1)
    return processes


class Wire:
    """Every final event published, by request id (forged ones told apart by their payload)."""

    def __init__(self, redis_url: str):
        self.pubsub = redis.Redis.from_url(redis_url).pubsub()
        self.pubsub.psubscribe(KEYS.channel_pattern(""))
        self.finals: dict[str, list[Result]] = defaultdict(list)
        self.forged: set[bytes] = set()
        self.in_flight: deque[str] = deque(maxlen=200)  # ids seen streaming, newest last (what an attacker learns)
        self._running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        prefix = len(KEYS.channel(""))
        while self._running:
            message = self.pubsub.get_message(timeout=0.1)
            if message is None or message["type"] != "pmessage":
                continue
            request_id = message["channel"].decode()[prefix:]
            if message["data"] in self.forged:
                continue
            try:
                event = decode_event(message["data"])
            except Exception:
                continue
            if isinstance(event, FinalEvent):
                self.finals[request_id].append(event.result)
            else:
                self.in_flight.append(request_id)

    def stop(self) -> None:
        self._running = False
        self.thread.join(timeout=2)


# The hostile producer shares the honest producers' user, so their tenant and stream
# (docs/protocol.md, "Tenants"): the only stream it may XADD to, and the hardest case.
OWN = KEYS.requests_of("batchd-producer")
OWN_OVERLOADED = KEYS.overloaded_of("batchd-producer")


class Attacker(threading.Thread):
    """The hostile producer: the documented producer ACL, used as badly as it allows."""

    def __init__(self, redis_url: str, wire: Wire, rate_per_s: float, seed: int):
        super().__init__(daemon=True)
        self.redis = redis.Redis.from_url(redis_url)
        self.wire = wire
        self.rate_per_s = rate_per_s
        self.random = random.Random(seed)
        self.counts: dict[str, int] = defaultdict(int)
        self.fresh_ids: list[str] = []
        self.running = True
        self.last_end_of_time = 0.0

    def run(self) -> None:
        attacks = [self.duplicate_raw, self.duplicate_submit, self.malformed, self.garbage, self.forge_final,
                   self.forge_token, self.forge_restart, self.end_of_time, self.chosen_attempt,
                   self.refused_commands]
        while self.running:
            time.sleep(self.random.expovariate(self.rate_per_s))
            attack = self.random.choice(attacks)
            try:
                attack()
                self.counts[attack.__name__] += 1
            except SkippedAttack:
                pass
            except redis.RedisError as exc:
                self.counts[f"{attack.__name__}: {type(exc).__name__}"] += 1

    def victim(self) -> str | None:
        recent = list(self.wire.in_flight)
        return self.random.choice(recent) if recent else None

    def duplicate_raw(self) -> None:
        if (victim := self.victim()) is not None:
            self.redis.xadd(OWN, {"id": victim, "data": payload(victim, ATTACKER_TEXT, priority=100)})

    def duplicate_submit(self) -> None:
        if (victim := self.victim()) is not None:
            self.redis.fcall("batchd_v1_submit", 3, OWN, KEYS.config, OWN_OVERLOADED, victim,
                             payload(victim, ATTACKER_TEXT))

    def malformed(self) -> None:
        if (victim := self.victim()) is not None:
            self.redis.xadd(OWN, {"id": victim, "data": b"\xc1 not msgpack"})

    def garbage(self) -> None:
        victim = self.victim() or "batchd-producer/garbage"
        self.redis.xadd(OWN, {"id": victim, "data": os.urandom(64 * 1024)})

    def forge_final(self) -> None:
        if (victim := self.victim()) is not None:
            forged = encode(FinalEvent(Result(victim, "stop", text=FORGED_TEXT)))
            self.wire.forged.add(forged)
            self.redis.publish(KEYS.channel(victim), forged)

    def forge_token(self) -> None:
        if (victim := self.victim()) is not None:
            self.publish_forged(victim, TokenEvent(index=self.random.randint(0, 8), token_ids=[70], text=FORGED_TEXT))

    def forge_restart(self) -> None:
        if (victim := self.victim()) is not None:
            self.publish_forged(victim, RestartEvent(attempt=1, reason=FORGED_TEXT))

    def publish_forged(self, victim: str, event) -> None:
        forged = encode(event)
        self.wire.forged.add(forged)
        self.redis.publish(KEYS.channel(victim), forged)

    def end_of_time(self) -> None:
        if time.monotonic() - self.last_end_of_time < 5.0:
            raise SkippedAttack
        self.last_end_of_time = time.monotonic()
        self.redis.xadd(OWN, {"id": "batchd-producer/end-of-time", "data": b"\xc1"},
                        id="18446744073709551615-18446744073709551615")

    def chosen_attempt(self) -> None:
        request_id = f"batchd-producer/hostile-{self.counts['chosen_attempt']}"
        self.redis.xadd(OWN, {"id": request_id, "data": payload(request_id, "hostile", attempt=10**6)})
        self.fresh_ids.append(request_id)  # once queued: an XADD refused while the stream is at its end is not

    def refused_commands(self) -> None:
        for command in (("SET", OWN, "x"), ("SET", KEYS.config, "x"), ("SCRIPT", "LOAD", "return 1"),
                        ("XADD", KEYS.requests, "MAXLEN", "0", "*", "id", "x")):
            try:
                self.redis.execute_command(*command)
                self.counts["NOT REFUSED " + command[0]] += 1
            except redis.exceptions.NoPermissionError:
                pass


class SkippedAttack(Exception):
    """An attack that would come too often now (end_of_time)."""


def payload(request_id: str, prompt: str, **fields) -> bytes:
    return encode(Request(v=PROTOCOL_VERSION, id=request_id, prompt=prompt, submitted_at=time.time(), **fields))


async def produce(redis_url: str, requests: int, concurrency: int, seed: int,
                  streamed_wrong: list[str]) -> dict[str, tuple[str, object]]:
    """Submit and stream `requests` honest requests, `concurrency` at a time; each id's (expected
    text, outcome). Ids whose stream showed other text, or restarted, go to streamed_wrong."""
    rng = random.Random(seed)
    outcomes: dict[str, tuple[str, object]] = {}
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(client: AsyncClient, index: int) -> None:
        nonlocal done
        text = f"request {index} " + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(4, 24)))
        async with gate:
            try:
                handle = await client.submit(text, timeout=120)
                items = [item async for item in handle]
                outcomes[handle.request_id] = (text, items[-1])
                if any(isinstance(item, StreamRestarted) for item in items) \
                        or "".join(item.text for item in items if isinstance(item, Delta)) != text:
                    streamed_wrong.append(handle.request_id)
            except BatchdError as exc:
                outcomes[f"failed-{index}"] = (text, exc)
        done += 1
        if done % max(1, requests // 10) == 0:
            print(f"  {done}/{requests} requests finished", flush=True)

    async with AsyncClient(redis_url) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
    return outcomes


def run(requests: int, concurrency: int, hostile_rate: float, token_delay_ms: float, seed: int,
        redis_binary: str | None, log_dir: Path) -> dict:
    server = start_server(redis_binary)
    processes: list[subprocess.Popen] = []
    try:
        processes = start_daemons(server, log_dir, token_delay_ms)
        admin = redis.Redis.from_url(url(server, ADMIN[0]))
        baseline = admin.info("memory")["used_memory"]
        wire = Wire(url(server, ADMIN[0]))
        attacker = Attacker(url(server, "batchd-producer"), wire, hostile_rate, seed)
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], admin.info("memory")["used_memory"])

        threading.Thread(target=sample, daemon=True).start()
        attacker.start()
        started = time.perf_counter()
        streamed_wrong: list[str] = []
        outcomes = asyncio.run(produce(url(server, "batchd-producer"), requests, concurrency, seed, streamed_wrong))
        elapsed = time.perf_counter() - started
        attacker.running = False
        attacker.join(timeout=5)
        time.sleep(1.0)  # late duplicates would be published now
        sampling.set()
        wire.stop()
        lost = [i for i, (_text, outcome) in outcomes.items() if not isinstance(outcome, Result)]
        wrong = [i for i, (text, outcome) in outcomes.items() if isinstance(outcome, Result) and outcome.text != text]
        duplicated = [i for i in outcomes if len(wire.finals.get(i, [])) > 1]
        hostile_wrong = [i for i in attacker.fresh_ids
                         if [(r.text, r.attempt) for r in wire.finals.get(i, [])] != [("hostile", 0)]]
        exited = [" ".join(p.args[3:4]) for p in processes if p.poll() is not None]
        report = {
            "requests": requests, "concurrency": concurrency, "seconds": round(elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1),
            "lost": len(lost), "wrong": len(wrong), "streamed_wrong": len(streamed_wrong),
            "duplicated": len(duplicated),
            "hostile_fresh_not_attempt_0": len(hostile_wrong), "daemons_exited": exited,
            "attacks": dict(sorted(attacker.counts.items())),
            "redis_used_memory_baseline_mb": round(baseline / 2**20, 1),
            "redis_used_memory_peak_mb": round(peak[0] / 2**20, 1),
            "redis_used_memory_end_mb": round(admin.info("memory")["used_memory"] / 2**20, 1),
            "dead_letters": admin.xlen(KEYS.dead_letters),
            "dead_letter_stream_mb": round((admin.memory_usage(KEYS.dead_letters) or 0) / 2**20, 2),
            "examples": {"lost": [str(outcomes[i][1])[:200] for i in lost[:3]], "wrong": wrong[:3],
                         "streamed_wrong": streamed_wrong[:3],
                         "duplicated": duplicated[:3], "hostile": hostile_wrong[:3]},
            "redis_version": admin.info("server")["redis_version"],
        }
        return report
    finally:
        stop_processes(processes, timeout_s=20)
        server.cleanup()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--hostile-rate", type=float, default=50.0, help="attacks per second")
    parser.add_argument("--token-delay-ms", type=float, default=1.0, help="echo engine delay per step")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--redis-server", default=None, help="redis-server binary (default: the embedded one)")
    parser.add_argument("--logs", type=Path, default=Path("soak-logs"))
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print only)")
    args = parser.parse_args(argv)
    report = run(args.requests, args.concurrency, args.hostile_rate, args.token_delay_ms, args.seed,
                 args.redis_server, args.logs)
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""What `batchd gateway` adds: latency and throughput through HTTP against AsyncClient directly.

One private redis-server, one scheduler, one echo worker (no delay) and one or two
gateway processes, all in this run on this machine. Three measurements:

1. Added latency at low load: one request at a time, alternating AsyncClient.generate and a
   POST /v1/completions of the same request through the gateway; p50 of each, and the
   difference (what the HTTP hop, the JSON and the gateway's own AsyncClient add).
2. Throughput of one gateway: C calls outstanding (closed loop) for a window; completed
   calls/s, against AsyncClient round trips/s with the same C in the same run.
3. A second gateway process: the same load split over two gateways; what it adds.

The HTTP load generator is a minimal keep-alive HTTP/1.1 client on asyncio (a request is a
few hundred bytes each way), so it costs less than the server it measures; it runs in this
process, sharing the machine's cores with the daemons and gateways.

    python benchmarks/gateway_overhead.py [--window 8] [--concurrency 64] [--plot docs]

Writes benchmarks/results/gateway_overhead.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = json.dumps({"model": "echo", "prompt": "ping", "max_tokens": 4}).encode()


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs BODY and reads the JSON reply."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY

    async def open(self) -> "HttpConnection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def post(self) -> bytes:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {body[:200]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "batchd.cli", *argv], stdout=out, stderr=subprocess.STDOUT)


async def wait_http(port: int) -> None:
    for _ in range(300):
        try:
            connection = await HttpConnection("127.0.0.1", port).open()
            await connection.post()
            connection.close()
            return
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
    raise SystemExit(f"gateway on port {port} did not answer")


async def latency(client, ports: list[int], samples: int) -> dict:
    connection = await HttpConnection("127.0.0.1", ports[0]).open()
    direct, through = [], []
    for _ in range(samples):
        started = time.perf_counter()
        await client.generate("ping", max_new_tokens=4)
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        await connection.post()
        through.append(time.perf_counter() - started)
    connection.close()
    p50_direct, p50_gateway = statistics.median(direct), statistics.median(through)
    return {"samples": samples, "p50_asyncclient_ms": p50_direct * 1e3, "p50_gateway_ms": p50_gateway * 1e3,
            "p50_added_ms": (p50_gateway - p50_direct) * 1e3,
            "p90_asyncclient_ms": sorted(direct)[int(samples * 0.9)] * 1e3,
            "p90_gateway_ms": sorted(through)[int(samples * 0.9)] * 1e3}


async def closed_loop(call_factories, window_s: float) -> float:
    """Each factory makes one caller's next call; calls completed per second over the window."""
    done = 0
    stop_at = time.perf_counter() + window_s

    async def caller(call) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(call) for call in call_factories))
    return done / (time.perf_counter() - started)


async def throughput_direct(client, concurrency: int, window_s: float) -> float:
    return await closed_loop([lambda: client.generate("ping", max_new_tokens=4)] * concurrency, window_s)


async def throughput_gateways(ports: list[int], concurrency: int, window_s: float) -> float:
    connections = [await HttpConnection("127.0.0.1", ports[i % len(ports)]).open() for i in range(concurrency)]
    try:
        return await closed_loop([c.post for c in connections], window_s)
    finally:
        for connection in connections:
            connection.close()


async def _load(kind: str, url: str, ports: list[int], concurrency: int, window_s: float) -> float:
    if kind == "asyncclient":
        from batchd import AsyncClient

        async with AsyncClient(url) as client:
            return await throughput_direct(client, concurrency, window_s)
    return await throughput_gateways(ports, concurrency, window_s)


def _load_process(job: tuple) -> float:
    """One load process's calls/s (--load-processes): a process of its own, so the load
    generator is not what a second gateway is measured against."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(*job))


async def spread_load(kind: str, args, url: str, ports: list[int]) -> float:
    """calls/s of args.concurrency callers, split over args.load_processes processes (1: this one)."""
    if args.load_processes == 1:
        return await _load(kind, url, ports, args.concurrency, args.window)
    import concurrent.futures
    import multiprocessing

    each = args.concurrency // args.load_processes
    # Gateway connections are spread over the ports by index: offset each process's share.
    jobs = [(kind, url, ports[n % len(ports):] + ports[:n % len(ports)], each, args.window)
            for n in range(args.load_processes)]
    with concurrent.futures.ProcessPoolExecutor(args.load_processes,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(await asyncio.gather(*(asyncio.wrap_future(pool.submit(_load_process, job)) for job in jobs)))


async def measure(args, url: str, ports: list[int]) -> dict:
    from batchd import AsyncClient

    async with AsyncClient(url) as client:
        for port in ports:
            await wait_http(port)
        await throughput_direct(client, args.concurrency, 1.0)  # warm up every path
        await throughput_gateways(ports, args.concurrency, 1.0)
        print("latency at one request at a time ...", flush=True)
        results = {"latency": await latency(client, ports, args.samples)}
        rates = {"asyncclient": [], "one_gateway": [], "two_gateways": []}
        # Interleaved rounds, so a neighbour's load on the shared machine hits every row alike.
        for round_ in range(args.rounds):
            print(f"throughput round {round_ + 1}/{args.rounds} ...", flush=True)
            rates["asyncclient"].append(await spread_load("asyncclient", args, url, ports))
            rates["one_gateway"].append(await spread_load("gateways", args, url, ports[:1]))
            rates["two_gateways"].append(await spread_load("gateways", args, url, ports))
        results["throughput_per_round"] = rates
        results["throughput"] = {name: statistics.median(values) for name, values in rates.items()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=6.0, help="seconds of each throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (median reported)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls outstanding in the throughput runs")
    parser.add_argument("--samples", type=int, default=400, help="sequential calls of each kind for latency")
    parser.add_argument("--max-wait-ms", type=float, default=0.5, help="the scheduler's batch window")
    parser.add_argument("--schedulers", type=int, default=1, help="scheduler processes behind the gateways")
    parser.add_argument("--workers", type=int, default=1, help="echo worker processes behind the gateways")
    parser.add_argument("--load-processes", type=int, default=1,
                        help="processes generating the throughput load (the concurrency split between them)")
    parser.add_argument("--out", default=str(HERE / "results" / "gateway_overhead.json"))
    parser.add_argument("--plot", default=None, metavar="DIR", help="write gateway-overhead.png there")
    args = parser.parse_args()

    from batchd.embedded import EmbeddedServer, free_port

    server = EmbeddedServer().start()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-bench-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    ports = [free_port(), free_port()]
    processes = [
        *(start(["scheduler", "--redis", server.url, "--max-wait-ms", str(args.max_wait_ms)], logs / f"scheduler-{n}.log")
          for n in range(args.schedulers)),
        *(start(["worker", "--redis", server.url, "--engine", "echo", "--slots", "4096"], logs / f"worker-{n}.log")
          for n in range(args.workers)),
        *(start(["gateway", "--redis", server.url, "--port", str(port)], logs / f"gateway-{port}.log")
          for port in ports),
    ]
    try:
        from batchd.status import wait_for_workers

        wait_for_workers(server.url, args.workers, 60, processes)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        results = asyncio.run(measure(args, server.url, ports))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        server.cleanup()

    rates, lat = results["throughput"], results["latency"]
    report = {
        "benchmark": "gateway_overhead", "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "concurrency": args.concurrency,
        "window_s": args.window, "max_wait_ms": args.max_wait_ms, "schedulers": args.schedulers,
        "workers": args.workers, "load_processes": args.load_processes, **results,
        "one_gateway_vs_asyncclient": rates["one_gateway"] / rates["asyncclient"],
        "second_gateway_adds_x_first": (rates["two_gateways"] - rates["one_gateway"]) / rates["one_gateway"],
    }
    print()
    print(f"{'':34}{'AsyncClient':>14}{'gateway':>12}{'added':>10}")
    print(f"{'p50 latency, one at a time (ms)':34}{lat['p50_asyncclient_ms']:14.2f}{lat['p50_gateway_ms']:12.2f}"
          f"{lat['p50_added_ms']:10.2f}")
    print(f"{'p90 latency, one at a time (ms)':34}{lat['p90_asyncclient_ms']:14.2f}{lat['p90_gateway_ms']:12.2f}")
    print()
    print(f"{'calls/s at C=' + str(args.concurrency):34}{'AsyncClient':>14}{'1 gateway':>12}{'2 gateways':>12}")
    print(f"{'median of ' + str(args.rounds) + ' rounds':34}{rates['asyncclient']:14.0f}{rates['one_gateway']:12.0f}"
          f"{rates['two_gateways']:12.0f}")
    print(f"\none gateway = {report['one_gateway_vs_asyncclient']:.0%} of AsyncClient; a second gateway adds "
          f"{report['second_gateway_adds_x_first']:.2f}x the first ({os.cpu_count()} CPUs shared by everything)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        plot(report, Path(args.plot) / "gateway-overhead.png")
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, rates = report["latency"], report["throughput"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.bar(["AsyncClient", "gateway"], [lat["p50_asyncclient_ms"], lat["p50_gateway_ms"]], color=["#888", "#3a7"])
    left.set_ylabel("p50 latency, one at a time (ms)")
    right.bar(["AsyncClient", "1 gateway", "2 gateways"],
              [rates["asyncclient"], rates["one_gateway"], rates["two_gateways"]], color=["#888", "#3a7", "#2a5"])
    right.set_ylabel(f"calls/s, {report['concurrency']} outstanding")
    figure.suptitle(f"batchd gateway overhead, echo engine ({report['cpus']} CPUs shared, {report['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

"""`batchd bench`: a load generator users run against their own deployment.

N producer processes, each with one AsyncClient, send requests open-loop
(Poisson arrivals at --rate) or closed-loop (--concurrency outstanding). Each
request is streamed, so the producer sees its first token and every gap
between tokens. At the end it prints throughput and latency percentiles, and
optionally writes JSON and a PNG (matplotlib, the `bench` extra).

Prompts are token ids by default, so prompt lengths are exact for any model
(ids 32..126, printable bytes, so the echo engine takes them too); a JSONL
file gives real text instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import os
import queue
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)
# Producers report progress this often; the bar redraws at the same pace.
PROGRESS_INTERVAL_S = 0.25


def add_arguments(parser) -> None:
    from batchd.cli import ABOVE_ZERO, COUNT, NON_NEGATIVE, ZERO_OR_MORE

    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=COUNT, default=1000, help="requests in all (default 1000)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=COUNT, default=None,
                      help="closed loop: keep this many requests outstanding (default 64)")
    mode.add_argument("--rate", type=ABOVE_ZERO, default=None,
                      help="open loop: Poisson arrivals at this many requests/s in all")
    load.add_argument("--producers", type=COUNT, default=1, help="producer processes (default 1)")
    load.add_argument("--warmup", type=NON_NEGATIVE, default=0,
                      help="requests per producer sent and discarded before measuring")
    shape = parser.add_argument_group("requests")
    shape.add_argument("--prompt-len", default="32", metavar="N|LO:HI",
                       help="prompt tokens: a fixed value or a uniform range (default 32)")
    shape.add_argument("--output-len", default="16", metavar="N|LO:HI",
                       help="max_new_tokens: a fixed value or a uniform range (default 16); "
                            "EOS is ignored so outputs reach it (the echo engine stops at the prompt's end)")
    shape.add_argument("--prompts-file", default=None, metavar="JSONL",
                       help='text prompts, one JSON per line: a string or {"prompt": ..., "max_new_tokens": ...} '
                            'or {"messages": [...]} (overrides --prompt-len)')
    shape.add_argument("--temperature", type=ZERO_OR_MORE, default=0.0)
    shape.add_argument("--timeout", type=ABOVE_ZERO, default=300.0, help="per-request timeout in seconds")
    shape.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="PATH", help="write the summary and settings as JSON ('-': stdout)")
    out.add_argument("--plot", default=None, metavar="PNG",
                     help="latency against time and a latency histogram (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no live progress bar")


# -- what one request measured -------------------------------------------------------------
@dataclass
class Sample:
    """One finished request, seconds on the producer's clock (time.time)."""

    sent_at: float
    e2e_s: float
    ttft_s: float | None
    queue_s: float
    prompt_tokens: int
    output_tokens: int
    itl_s: list[float]
    error: str | None = None


@dataclass
class Spec:
    """What one producer process sends."""

    url: str
    prefix: str
    count: int
    warmup: int
    concurrency: int | None
    rate: float | None
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    prompts: list[dict] = field(default_factory=list)
    temperature: float = 0.0
    timeout: float = 300.0
    seed: int = 0


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'16' -> (16, 16); '8:64' -> (8, 64)."""
    try:
        lo, _, hi = str(text).partition(":")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise SystemExit(f"--{name} takes N or LO:HI, not {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise SystemExit(f"--{name} needs 1 <= LO <= HI, got {text!r}")
    return bounds


def load_prompts(path: str) -> list[dict]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not ({"prompt", "messages"} & item.keys()):
                raise SystemExit(f"{path}:{number}: expected a string or an object with prompt or messages")
            prompts.append({k: item[k] for k in ("prompt", "messages", "max_new_tokens") if k in item})
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return prompts


def request_kwargs(spec: Spec, rng: random.Random, index: int) -> dict:
    """The generate() arguments of request `index` of this producer."""
    kwargs = {"max_new_tokens": rng.randint(*spec.output_len), "temperature": spec.temperature,
              "ignore_eos": True, "timeout": spec.timeout}
    if spec.prompts:
        kwargs.update(spec.prompts[index % len(spec.prompts)])
    else:
        kwargs["prompt_token_ids"] = [rng.randint(32, 126) for _ in range(rng.randint(*spec.prompt_len))]
    return kwargs


# -- one producer process -------------------------------------------------------------------
async def _one(client, kwargs: dict) -> Sample:
    from batchd.client import BatchdError
    from batchd.client import Delta, StreamRestarted

    sent_at = time.time()
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    try:
        async for item in client.stream(**kwargs):
            now = time.perf_counter()
            if isinstance(item, Delta):
                if not item.token_ids:
                    continue
                if first is None:
                    first = now
                elif last is not None:
                    gaps.append((now - last) / len(item.token_ids))
                last = now
            elif isinstance(item, StreamRestarted):
                first = last = None
                gaps = []
            else:
                end = time.perf_counter()
                return Sample(sent_at, end - start, None if first is None else first - start,
                              item.timings.queued_s, item.usage.prompt_tokens, item.usage.completion_tokens, gaps)
    except BatchdError as exc:
        return Sample(sent_at, time.perf_counter() - start, None, 0.0, 0, 0, [], error=exc.code)
    raise AssertionError("stream ended without a result")


async def _produce(spec: Spec, ready, go, stop, progress) -> list[Sample]:
    """Send this producer's requests; when `stop` is set (the user pressed Ctrl-C), drop
    what is in flight and return the samples finished so far."""
    from batchd import AsyncClient

    rng = random.Random(spec.seed)
    samples: list[Sample] = []
    async with AsyncClient(spec.url, prefix=spec.prefix) as client:
        if spec.warmup:
            await asyncio.gather(*(_one(client, request_kwargs(spec, rng, i)) for i in range(spec.warmup)))
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        reporter = asyncio.create_task(_report(samples, progress))
        kwargs = [request_kwargs(spec, rng, i) for i in range(spec.count)]
        if spec.rate:
            load = asyncio.ensure_future(_open_loop(client, kwargs, spec.rate, rng, samples))
        else:
            load = asyncio.ensure_future(_closed_loop(client, kwargs, spec.concurrency or 1, samples))
        while not load.done():
            await asyncio.wait([load], timeout=PROGRESS_INTERVAL_S)
            if stop.is_set():
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
        if not load.cancelled():
            load.result()
        reporter.cancel()
    progress.put(("done", os.getpid(), len(samples)))
    return samples


async def _closed_loop(client, kwargs: list[dict], concurrency: int, samples: list[Sample]) -> None:
    queue_of_work = iter(kwargs)

    async def lane() -> None:
        for item in queue_of_work:
            samples.append(await _one(client, item))

    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(kwargs)))))


async def _open_loop(client, kwargs: list[dict], rate: float, rng: random.Random, samples: list[Sample]) -> None:
    async def fire(item: dict) -> None:
        samples.append(await _one(client, item))

    tasks = []
    due = time.perf_counter()
    try:
        for item in kwargs:
            due += rng.expovariate(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(fire(item)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # stopped: requests fired and unfinished are dropped
            task.cancel()


async def _report(samples: list[Sample], progress) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        progress.put(("count", os.getpid(), len(samples)))


def _producer_main(spec: Spec, ready, go, stop, progress, results) -> None:
    # Ctrl-C reaches every process of the terminal's group; the parent alone decides
    # (through `stop`) so that the samples finished so far come back to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        samples = asyncio.run(_produce(spec, ready, go, stop, progress))
        results.put(("ok", [asdict(s) for s in samples]))
    except BaseException as exc:  # the parent must hear about it instead of waiting forever
        ready.set()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


# -- the parent: start producers, draw progress, summarise -----------------------------------------
def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def build_specs(args) -> list[Spec]:
    producers = max(1, args.producers)
    counts = split(args.requests, producers)
    concurrency = None if args.rate else (args.concurrency or 64)
    lanes = split(concurrency, producers) if concurrency else [None] * producers
    prompts = load_prompts(args.prompts_file) if args.prompts_file else []
    return [Spec(url=args.redis, prefix=args.prefix, count=counts[i], warmup=args.warmup,
                 concurrency=max(1, lanes[i]) if lanes[i] is not None else None,
                 rate=args.rate / producers if args.rate else None,
                 prompt_len=parse_range(args.prompt_len, "prompt-len"),
                 output_len=parse_range(args.output_len, "output-len"),
                 prompts=prompts, temperature=args.temperature, timeout=args.timeout, seed=args.seed + i)
            for i in range(producers)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    out = {}
    for p in PERCENTILES:
        if not ordered:
            out[f"p{p}"] = None
            continue
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        out[f"p{p}"] = ordered[rank]
    out["mean"] = sum(ordered) / len(ordered) if ordered else None
    return out


def summarise(samples: list[Sample], elapsed_s: float) -> dict:
    ok = [s for s in samples if s.error is None]
    errors: dict[str, int] = {}
    for s in samples:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    output_tokens = sum(s.output_tokens for s in ok)
    prompt_tokens = sum(s.prompt_tokens for s in ok)
    return {
        "requests": len(samples),
        "completed": len(ok),
        "errors": errors,
        "duration_s": elapsed_s,
        "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": output_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_s": {
            "ttft": percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
            "itl": percentiles([gap for s in ok for gap in s.itl_s]),
            "queue": percentiles([s.queue_s for s in ok]),
            "e2e": percentiles([s.e2e_s for s in ok]),
        },
    }


def render(summary: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value * 1000:,.2f}"

    lines = [
        *(["stopped by the user: the figures cover the requests finished by then"]
          if summary.get("interrupted") else []),
        f"requests     {summary['completed']:,} completed of {summary['requests']:,}"
        + (f"  errors: {summary['errors']}" if summary["errors"] else ""),
        f"duration     {summary['duration_s']:.2f} s",
        f"throughput   {summary['requests_per_s']:,.1f} requests/s   "
        f"{summary['output_tokens_per_s']:,.1f} output tokens/s   "
        f"{summary['total_tokens_per_s']:,.1f} total tokens/s",
        "",
        f"{'latency (ms)':<24}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    names = {"ttft": "time to first token", "itl": "inter-token latency", "queue": "queue time",
             "e2e": "end-to-end latency"}
    for key, label in names.items():
        stats = summary["latency_s"][key]
        lines.append(f"{label:<24}" + "".join(f"{ms(stats[k]):>10}" for k in ("p50", "p90", "p99", "mean")))
    return "\n".join(lines)


class Progress:
    """One redrawn line on stderr: done / total, rate, elapsed."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled and total > 0
        self.started = time.perf_counter()

    def draw(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        width = 30
        filled = int(width * done / self.total)
        rate = done / elapsed if elapsed > 0 else 0.0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} "
                         f"{rate:,.0f} req/s {elapsed:.1f}s ")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_producers(specs: list[Spec], show_progress: bool = True) -> tuple[list[Sample], float, bool]:
    """Start every producer, fire them together, and collect their samples.

    Returns the samples, the seconds they span, and whether the user stopped the run
    (Ctrl-C): then the samples are those finished by then, and a second Ctrl-C gives up.
    """
    ctx = mp.get_context("spawn")
    progress, results, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    readies = [ctx.Event() for _ in specs]
    processes = [ctx.Process(target=_producer_main, args=(spec, ready, go, stop, progress, results), daemon=True)
                 for spec, ready in zip(specs, readies)]
    for process in processes:
        process.start()
    stopped_at: list[float] = []

    def interrupt(_signum, _frame):
        if stopped_at:
            raise KeyboardInterrupt
        stopped_at.append(time.time())
        stop.set()
        sys.stderr.write("\nstopping: finishing the summary with the requests done so far (Ctrl-C again to quit)\n")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        for ready, process in zip(readies, processes):
            while not ready.wait(0.5):
                if not process.is_alive():
                    raise SystemExit("a producer process exited before it was ready")
                if stopped_at:
                    raise SystemExit("stopped before the producers were ready: nothing measured")
        bar = Progress(sum(s.count for s in specs), show_progress)
        started = time.time()
        go.set()
        samples = _collect(processes, results, progress, bar)
    finally:
        signal.signal(signal.SIGINT, previous)
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    end = max((s.sent_at + s.e2e_s for s in samples), default=started)
    if stopped_at:
        end = max(end, stopped_at[0])
    return samples, max(1e-9, end - started), bool(stopped_at)


def _collect(processes, results, progress, bar: Progress) -> list[Sample]:
    """Every producer's samples, drawing the progress bar until the last one reports."""
    counts: dict[int, int] = {}
    samples: list[Sample] = []
    pending = len(processes)
    while pending:
        try:
            kind, payload = results.get(timeout=PROGRESS_INTERVAL_S)
        except queue.Empty:
            kind = None
        else:
            pending -= 1
            if kind == "error":
                raise SystemExit(f"a producer failed: {payload}")
            samples.extend(Sample(**s) for s in payload)
        while True:
            try:
                _, pid, done = progress.get_nowait()
            except queue.Empty:
                break
            counts[pid] = done
        if not pending:
            break
        if not any(p.is_alive() for p in processes) and results.empty():
            raise SystemExit("producer processes exited without reporting")
        bar.draw(max(sum(counts.values()), len(samples)))
    bar.draw(len(samples), final=True)
    return samples


def plot(samples: list[Sample], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'batchd[bench]'") from None
    ok = sorted((s for s in samples if s.error is None), key=lambda s: s.sent_at)
    if not ok:
        return
    t0 = ok[0].sent_at
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.scatter([s.sent_at - t0 for s in ok], [s.e2e_s * 1000 for s in ok], s=3, alpha=0.5, label="end-to-end")
    ttft = [s for s in ok if s.ttft_s is not None]
    left.scatter([s.sent_at - t0 for s in ttft], [s.ttft_s * 1000 for s in ttft], s=3, alpha=0.5,
                 label="first token")
    left.set_xlabel("time since start (s)")
    left.set_ylabel("latency (ms)")
    left.set_title("latency over the run")
    left.legend(markerscale=4)
    right.hist([s.e2e_s * 1000 for s in ok], bins=60, alpha=0.7, label="end-to-end")
    right.hist([s.ttft_s * 1000 for s in ttft], bins=60, alpha=0.7, label="first token")
    right.set_xlabel("latency (ms)")
    right.set_ylabel("requests")
    right.set_title("latency histogram")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings(args) -> dict:
    return {"requests": args.requests, "mode": "open" if args.rate else "closed",
            "rate": args.rate, "concurrency": None if args.rate else (args.concurrency or 64),
            "producers": args.producers, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "prompts_file": args.prompts_file, "temperature": args.temperature, "seed": args.seed}


def run(args) -> int:
    if args.requests < 1:
        raise SystemExit("--requests must be at least 1")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be positive")
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install 'batchd[bench]'") from None
    specs = build_specs(args)
    samples, elapsed, interrupted = run_producers(specs, show_progress=not args.no_progress)
    summary = summarise(samples, elapsed)
    summary["interrupted"] = interrupted
    report = {"settings": settings(args), **summary}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(render(summary))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2)
    if args.plot:
        mode = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency or 64}"
        plot(samples, args.plot, f"batchd bench: {summary['completed']} requests, {mode}, "
                                 f"{args.producers} producer(s)")
    if interrupted:
        return 130  # the shell's code for a run stopped by SIGINT
    return 0 if summary["completed"] == summary["requests"] else 1

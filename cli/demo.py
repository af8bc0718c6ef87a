"""`batchd demo`: a scheduler, a worker and a burst from several producer processes.

It shows what batchd is for: producers that know nothing of each other send
single chat prompts at the same moment, and the scheduler turns them into a
few batched jobs on one worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "What is 7 times 8?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "Translate 'thank you' into Spanish.",
    "Give me one tip for sleeping better.",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about the sea.",
    "What gas do plants absorb from the air?",
    "How many continents are there?",
    "What is the opposite of 'hot'?",
    "Name a mammal that can fly.",
    "What language is spoken in Brazil?",
    "What is the square root of 81?",
    "Which ocean is the largest?",
]


def _producer(url: str, prompts: list[tuple[int, str]], max_new_tokens: int, chat: bool, start, out) -> None:
    from batchd import AsyncClient

    async def run() -> None:
        async with AsyncClient(url) as client:
            start.wait()

            async def one(index: int, prompt: str):
                kwargs = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
                result = await client.generate(max_new_tokens=max_new_tokens, timeout=600, **kwargs)
                out.put((index, prompt, result.text, result.usage.completion_tokens,
                         result.timings.first_token_s, result.timings.total_s, result.finish_reason))

            await asyncio.gather(*(one(i, p) for i, p in prompts))

    asyncio.run(run())


def run_demo(args, fleet) -> int:
    from batchd.client.connection import connect
    from batchd.client.keys import Keys
    from batchd.status import read_status, wait_for_workers

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    try:
        url = fleet.start_server(args.redis)
        fleet.spawn("--log-level", "WARNING", "scheduler", "--redis", url, "--max-batch", str(args.slots),
                    "--max-wait-ms", "20")
        fleet.spawn("worker", "--redis", url, "--engine", args.engine, "--model", args.model,
                    "--slots", str(args.slots))
        print(f"starting a worker with the {args.engine} engine"
              + (f" and model {args.model} (the first run converts and caches it)" if args.engine == "hf" else ""),
              flush=True)
        try:
            waited = wait_for_workers(url, timeout_s=900, processes=fleet.children)
        except RuntimeError as exc:
            raise SystemExit(f"{exc}; see the daemon log above") from None
        print(f"worker ready after {waited:.1f}s", flush=True)
        before = read_status(connect(url), Keys())

        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        shares = [[(i, p) for i, p in enumerate(prompts) if i % args.producers == k] for k in range(args.producers)]
        producers = [ctx.Process(target=_producer, args=(url, share, args.max_new_tokens, args.engine == "hf",
                                                         start, out)) for share in shares if share]
        for process in producers:
            process.start()
        time.sleep(1.0)  # let every producer connect, so the burst really is simultaneous
        print(f"\n{len(producers)} producer processes send {len(prompts)} prompts at once...\n", flush=True)
        began = time.monotonic()
        start.set()
        answers = [out.get(timeout=900) for _ in prompts]
        wall = time.monotonic() - began
        for process in producers:
            process.join(timeout=30)
        after = read_status(connect(url), Keys())
    finally:
        fleet.stop()
    _report(sorted(answers), before, after, wall)
    return 0


def _report(answers, before: dict, after: dict, wall: float) -> None:
    for _, prompt, text, tokens, first_token_s, total_s, reason in answers:
        answer = " ".join(text.split())
        print(f"> {prompt}\n  {answer}\n  [{tokens} tokens, {reason}, first token {first_token_s or 0:.2f}s, "
              f"done {total_s:.2f}s]")
    jobs = after["jobs"] - before["jobs"]
    sizes = {n: count - before["job_sizes"].get(n, 0) for n, count in after["job_sizes"].items()}
    sizes = {n: c for n, c in sorted(sizes.items()) if c}
    tokens = sum(a[3] for a in answers)
    print("\nbatching:")
    print(f"  {len(answers)} requests from separate processes became {jobs} jobs")
    print("  requests per job: " + ", ".join(f"{n} x{c}" for n, c in sizes.items()))
    print(f"  {tokens} tokens generated in {wall:.2f}s = {tokens / wall:.1f} tokens/s")
    sys.stdout.flush()

"""A particle filter over a language model: batchd's scoring calls against one model call per call in process.

Sequential Monte Carlo samplers extend many particles (partial texts) a token
at a time; each step every particle asks for the next-token distribution of
its prefix. Here 64 particles x 50 steps each ask next_token_logprobs(top_k)
concurrently through AsyncClient, against `batchd up`-style daemons started as
real processes (embedded Redis, scheduler, hf worker), and then the same calls
are made one at a time in process with the Hugging Face model. Both runs
follow the same seeded random choices. The in-process side runs a forward pass
of each call's whole prefix; batchd runs the calls as rows of its engine steps
and skips the part of a prefix that a free slot's cache still holds (a
particle's previous prefix), as a worker serving such a client would.

    python benchmarks/particle_filter.py                          # SmolLM2-135M on the CPU
    python benchmarks/particle_filter.py --steps 10 --model /path/to/checkpoint
    # BENCHMARKS.md section 4 through the daemons on a GPU host: 256 particles share a
    # 256-token prompt, 30 steps (the in-process side, one call at a time, is skipped)
    python benchmarks/particle_filter.py --model /tmp/qwen3-0.6b --device cuda --particles 256 --steps 30 \
        --prompt-tokens 256 --no-in-process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea,"


@dataclass
class Particle:
    token_ids: list[int]
    log_weight: float = 0.0
    proposals: list[float] = field(default_factory=list)


class Filter:
    """Proposal: sample from the renormalised top-k. Weight: the probability mass the top-k covers.

    Particles whose prefix leaves most of the mass outside the top-k lose
    weight; when the effective sample size falls under half, resample.
    """

    def __init__(self, prompt_ids: list[int], particles: int, seed: int):
        self.particles = [Particle(list(prompt_ids)) for _ in range(particles)]
        self.rng = random.Random(seed)
        self.resamples = 0
        self.first_answers: list[tuple[list[int], list[float]]] = []  # the first step's, to compare runs

    def prefixes(self) -> list[list[int]]:
        return [p.token_ids for p in self.particles]

    def advance(self, answers: list[tuple[list[int], list[float]]]) -> None:
        if not self.first_answers:
            self.first_answers = [(list(ids), list(values)) for ids, values in answers]
        for particle, (token_ids, logprobs) in zip(self.particles, answers):
            mass = _logsumexp(logprobs)
            weights = [math.exp(lp - mass) for lp in logprobs]
            particle.token_ids = particle.token_ids + self.rng.choices(token_ids, weights)
            particle.log_weight += mass
        if self.effective_sample_size() < len(self.particles) / 2:
            self._resample()

    def effective_sample_size(self) -> float:
        weights = self._normalised_weights()
        return 1.0 / sum(w * w for w in weights)

    def _normalised_weights(self) -> list[float]:
        top = max(p.log_weight for p in self.particles)
        weights = [math.exp(p.log_weight - top) for p in self.particles]
        total = sum(weights)
        return [w / total for w in weights]

    def _resample(self) -> None:
        chosen = self.rng.choices(self.particles, self._normalised_weights(), k=len(self.particles))
        self.particles = [Particle(list(p.token_ids)) for p in chosen]
        self.resamples += 1


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


async def run_batchd(url: str, prompt_ids: list[int], args) -> tuple[float, Filter]:
    """Each particle's question as a call of its own (as a sampler written call by call sends them)."""
    from batchd import AsyncClient

    async with AsyncClient(url) as client:
        await client.next_token_logprobs(prompt_ids, top_k=args.top_k, timeout=600)  # warm-up
        particles = Filter(prompt_ids, args.particles, args.seed)
        began = time.perf_counter()
        for step in range(args.steps):
            answers = await asyncio.gather(*(client.next_token_logprobs(prefix, top_k=args.top_k, timeout=600)
                                             for prefix in particles.prefixes()))
            particles.advance([(a.top_token_ids, a.top_logprobs) for a in answers])
            _progress("batchd, a call each", step, args.steps, began)
        return time.perf_counter() - began, particles


async def run_batchd_rows(url: str, prompt_ids: list[int], args) -> tuple[float, Filter]:
    """A step's questions as rows of one request (256 at most each) on the pinned prompt: what
    batchd.integrations send for genlm-control's and LLaMPPL's batched steps. Each row carries
    only the particle's own drawn tokens."""
    from batchd import AsyncClient
    from batchd.client.protocol import MAX_ROWS

    async with AsyncClient(url) as client:
        pin = await client.pin(prompt_ids, timeout=600)
        await client.next_token_logprobs_rows([[]], prefix_pin=pin.handle, top_k=args.top_k, timeout=600)  # warm-up
        particles = Filter(prompt_ids, args.particles, args.seed)
        began = time.perf_counter()
        for step in range(args.steps):
            drawn = [prefix[len(prompt_ids):] for prefix in particles.prefixes()]
            parts = await asyncio.gather(*(
                client.next_token_logprobs_rows(drawn[at:at + MAX_ROWS], prefix_pin=pin.handle, top_k=args.top_k,
                                                timeout=600)
                for at in range(0, len(drawn), MAX_ROWS)))
            particles.advance([pair for part in parts for pair in zip(part.top_token_ids, part.top_logprobs)])
            _progress("batchd, a step's rows", step, args.steps, began)
        wall = time.perf_counter() - began
        await client.unpin(pin.handle, timeout=600)
        return wall, particles


def run_in_process(model, prompt_ids: list[int], args) -> tuple[float, Filter]:
    import torch

    def next_token_top_k(prefix: list[int]) -> tuple[list[int], list[float]]:
        with torch.inference_mode():
            logits = model(torch.tensor([prefix])).logits[0, -1].float()
        top = torch.topk(torch.log_softmax(logits, dim=-1), args.top_k)
        return top.indices.tolist(), top.values.tolist()

    next_token_top_k(prompt_ids)  # warm-up
    particles = Filter(prompt_ids, args.particles, args.seed)
    began = time.perf_counter()
    for step in range(args.steps):
        particles.advance([next_token_top_k(prefix) for prefix in particles.prefixes()])
        _progress("in process", step, args.steps, began)
    return time.perf_counter() - began, particles


def first_step_difference(runs: list[Filter]) -> dict:
    """How far the ways' answers to the same first questions (every particle: the prompt) are
    apart: rows whose top-k ids come in the same order, and the largest difference of a
    log-probability of a token both list. Sampling from near-equal top-k values (random
    weights) turns any difference into another draw."""
    first, *others = runs
    same_order, largest = 0, 0.0
    for other in others:
        for (ids_a, values_a), (ids_b, values_b) in zip(first.first_answers, other.first_answers):
            same_order += ids_a == ids_b
            b_of = dict(zip(ids_b, values_b))
            largest = max([largest] + [abs(value - b_of[token]) for token, value in zip(ids_a, values_a)
                                       if token in b_of])
    return {"rows_same_top_k_order": same_order, "rows": len(first.first_answers) * len(others),
            "largest_logprob_difference": largest,
            "top1_minus_top2_median": sorted(v[0] - v[1] for _, v in first.first_answers)[len(first.first_answers) // 2]}


def _progress(label: str, step: int, steps: int, began: float) -> None:
    if (step + 1) % max(1, steps // 5) == 0:
        print(f"  {label}: step {step + 1}/{steps} ({time.perf_counter() - began:.1f}s)", file=sys.stderr,
              flush=True)


def _write_profiles(folder: Path) -> None:
    """Each process's profile as text, by own time and by cumulative time."""
    import io
    import pstats

    for name in ("client", "scheduler", "worker"):
        path = folder / f"{name}.prof"
        if not path.exists():
            continue
        text = io.StringIO()
        stats = pstats.Stats(str(path), stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        (folder / f"{name}_profile.txt").write_text(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint folder or alias (as batchd worker)")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on a CPU, bfloat16 on a GPU")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="a shared prompt of this many random token ids instead of the text prompt")
    parser.add_argument("--no-in-process", action="store_true", help="skip the one-call-at-a-time comparison")
    parser.add_argument("--ways", default="calls,rows",
                        help="how batchd is asked, in this order: calls (a request per question), rows (a step's "
                             "questions as rows of one request on the pinned prompt)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write each process's host time by function (cProfile) to this folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/particle_filter.json"))
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    from batchd.embedded import EmbeddedServer
    from batchd.status import stop_processes, wait_for_workers
    from batchd.workers.hf.models import load_model

    # Only the tokenizer and vocabulary are needed here when nothing runs in process.
    loaded = load_model(args.model, dtype=dtype, device="cpu" if args.no_in_process else args.device)
    if args.prompt_tokens:
        vocab = random.Random(args.seed)
        prompt_ids = [vocab.randrange(loaded.model.config.vocab_size) for _ in range(args.prompt_tokens)]
    else:
        prompt_ids = loaded.tokenizer(PROMPT)["input_ids"]

    def command(name: str) -> list[str]:
        if args.profile is None:
            return [sys.executable, "-m", "batchd.cli"]
        return [sys.executable, "-m", "cProfile", "-o", str(args.profile / f"{name}.prof"), "-m", "batchd.cli"]

    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer() as server:
        # Scoring requests take no engine slot, but schedulers still count them
        # against a worker's advertised slots: give the worker one per particle.
        daemons = [
            subprocess.Popen([*command("scheduler"), "--log-level", "WARNING", "scheduler", "--redis",
                              server.url, "--max-batch", str(args.particles), "--max-wait-ms", "5"]),
            subprocess.Popen([*command("worker"), "--log-level", "WARNING", "worker", "--redis",
                              server.url, "--engine", "hf", "--model", args.model, "--slots", str(args.particles),
                              "--device", args.device, "--dtype", dtype]),
        ]
        try:
            wait_for_workers(server.url, timeout_s=600, processes=daemons)
            print(f"batchd: {args.particles} particles x {args.steps} steps through Redis...", file=sys.stderr,
                  flush=True)
            profile = None
            if args.profile is not None:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            ways = {"calls": run_batchd, "rows": run_batchd_rows}
            runs = {way: asyncio.run(ways[way](server.url, prompt_ids, args)) for way in args.ways.split(",")}
            if profile is not None:
                profile.disable()
                profile.dump_stats(str(args.profile / "client.prof"))
        finally:
            stop_processes(daemons, timeout_s=60)
    if args.profile is not None:
        _write_profiles(args.profile)

    calls = args.particles * args.steps
    figures = {"model": args.model, "device": args.device, "dtype": dtype, "particles": args.particles,
               "steps": args.steps, "top_k": args.top_k, "calls": calls, "prompt_tokens": len(prompt_ids),
               "batchd": {way: {"wall_s": wall, "calls_per_s": calls / wall, "resamples": run.resamples}
                          for way, (wall, run) in runs.items()}}
    if len(runs) > 1:  # the same seeded draws from (within float error) the same log-probabilities
        first, *others = (run.particles for _, run in runs.values())
        figures["particles_identical_across_ways"] = min(
            sum(a.token_ids == b.token_ids for a, b in zip(first, other)) for other in others)
        figures["first_step_across_ways"] = first_step_difference([run for _, run in runs.values()])
    table = "".join(f"| batchd, {way} | {calls / wall:,.1f} | {wall:.2f} |\n" for way, (wall, _) in runs.items())
    batchd_wall, batchd_filter = next(iter(runs.values()))
    if args.no_in_process:
        print(f"\n{calls} calls ({args.particles} particles x {args.steps} steps, top_k {args.top_k})\n"
              f"| path | calls/s | wall (s) |\n|---|---|---|\n{table}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
        return
    print(f"in process: the same {calls} calls one at a time...", file=sys.stderr, flush=True)
    alone_wall, alone_filter = run_in_process(loaded.model.eval(), prompt_ids, args)

    same = sum(a.token_ids == b.token_ids for a, b in zip(batchd_filter.particles, alone_filter.particles))
    figures |= {
        "in_process": {"wall_s": alone_wall, "calls_per_s": calls / alone_wall, "resamples": alone_filter.resamples},
        "speedup": alone_wall / batchd_wall,
        # Same seed and (within float error) the same log-probabilities: the runs should draw the same texts.
        "particles_identical": same,
        "sample_text": loaded.tokenizer.decode(batchd_filter.particles[0].token_ids),
    }
    print(f"\n| path | calls/s | wall (s) |\n|---|---|---|\n"
          f"| model called once per call, in process | {calls / alone_wall:,.1f} | {alone_wall:.1f} |\n{table}"
          f"\nspeedup of batchd, {next(iter(runs))}: {figures['speedup']:.2f}x ({calls} calls, {args.particles} "
          f"particles x {args.steps} steps, top_k {args.top_k}; {same}/{args.particles} final particles identical "
          "in both runs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

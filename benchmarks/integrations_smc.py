"""LLaMPPL's and genlm-control's own SMC examples, in process and through batchd, with Redis's memory
and what the producer sends.

Runs each library's example (LLaMPPL's hard-constraints model, genlm-control's
README regular-expression example) with the library's own in-process Hugging
Face backend, then through batchd (`batchd.integrations`: an embedded Redis, a
scheduler and an hf worker as real processes, default scoring result TTL):
with `--before REV`, first with the integrations as of that git revision (one
request per call, the whole prefix each time: the client side before
many-prefix requests and pins; the fleet answers those requests as it always
did), then with this checkout's (an SMC step's calls in one request, the
prompt pinned by `cache_kv` and named by its handle), in float32 and float16.
A thread samples Redis's `used_memory` every 20 ms; the table gives each run's
peak. Every next-token request the producer builds is counted (requests,
encoded bytes, token ids, questions). Same seeds for every run, so the texts
can be compared too.

    python benchmarks/integrations_smc.py --before main --json-schema   # -> benchmarks/results/integrations_smc_rows_pins.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import random
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy
import redis
import torch

# A prompt of about the length of the one in LLaMPPL's example (written for this benchmark).
LLAMPPL_PROMPT = """Three things to know this morning.

1. The city council meets tonight to vote on the new transit budget, which adds two bus lines and \
extends the evening service of the harbour ferry. Supporters say the plan finally connects the \
eastern neighbourhoods to the centre; critics argue the fare increase that pays for it falls on \
the riders who can least afford it, and several council members have asked for a delay.

2. The weather service expects the first frost of the season over the weekend. Farmers in the \
valley have started bringing in the last of the apple harvest early, and the public gardens will \
close their greenhouses to visitors until further notice.

3."""
GENLM_PROMPT = "Here is my honest opinion:"
GENLM_REGEX = r" SMC is (🔥🔥|😍😍|🤌🤌) with LMs"


def make_masks(LLM) -> dict[int, set[int]]:
    """LLaMPPL's examples/hard_constraints.py: tokens that keep every word at most five letters."""
    return {
        i: set(
            j for (j, v) in enumerate(LLM.str_vocab)
            if j != LLM.tokenizer.eos_token_id and "\n" not in v
            and any(c.isalpha() or c in string.punctuation for c in v)
            and len(v.strip()) <= 5 and (not v[0].isalpha() or i + len(v) <= 5)
        )
        for i in range(6)
    }


async def llamppl_example(LLM, max_tokens: int, n_particles: int) -> list[str]:
    """LLaMPPL's hard-constraints example: its ConstraintModel under smc_standard."""
    from llamppl import LMContext, Model, smc_standard

    class ConstraintModel(Model):
        def __init__(self):
            super().__init__()
            self.context = LMContext(LLM, LLAMPPL_PROMPT)
            self.max_tokens = max_tokens
            self.masks = make_masks(LLM)
            self.eos_token_id = LLM.tokenizer.eos_token_id

        async def start(self):
            await self.observe(self.context.mask_dist(self.active_constraint_mask()), True)

        async def step(self):
            token = await self.sample(self.context.next_token())
            self.max_tokens -= 1
            if token == self.eos_token_id or self.max_tokens == 0:
                self.finish()
                return
            await self.observe(self.context.mask_dist(self.active_constraint_mask()), True)

        def active_constraint_mask(self):
            words = str(self.context).split()
            return self.masks[min(5, len(words[-1]) if words else 0)]

        def immutable_properties(self):
            return ["masks"]

    LLM.cache_kv(LLM.tokenizer.encode(LLAMPPL_PROMPT))
    particles = await smc_standard(ConstraintModel(), n_particles, 0.5)
    return [str(p.context)[len(LLAMPPL_PROMPT):] for p in particles]


async def genlm_example(async_lm, n_particles: int, max_tokens: int) -> dict[str, float]:
    """genlm-control's README example: an LLM constrained by a regular expression, AWRS and SMC."""
    from genlm.control import AWRS, BoolFSA, PromptedLLM

    llm = PromptedLLM(async_lm)
    llm.set_prompt_from_str(GENLM_PROMPT)
    fsa = BoolFSA.from_regex(GENLM_REGEX)
    sequences = await AWRS(llm, fsa.coerce(llm, f=b"".join)).smc(n_particles=n_particles, ess_threshold=0.5,
                                                                  max_tokens=max_tokens)
    return {text: float(p) for text, p in sequences.decoded_posterior.items()}


# genlm-control's README JSON-schema example: its schemas, its prompt, its settings.
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["Alice", "Bob", "Charlie"], "description": "The name of the person"},
    "age": {"type": "integer", "minimum": 20, "maximum": 80, "description": "The age of the person"}}}
BOOK_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 1, "description": "The title of the book"},
    "pages": {"type": "integer", "minimum": 1, "maximum": 2000, "description": "The number of pages in the book"},
    "genre": {"type": "string", "enum": ["fiction", "non-fiction", "mystery"], "description": "The genre of the book"}}}


async def genlm_json_example(async_lm) -> dict[str, float]:
    """genlm-control's README JSON-schema example (written for Llama-3.2-1B-Instruct; here the
    served model, with its own end-of-turn strings)."""
    from genlm.control import AWRS, JsonSchema, PromptedLLM

    llm = PromptedLLM(async_lm, eos_byte_strings=[b"<|im_end|>", b"<|endoftext|>"], temperature=0.8)
    llm.prompt_ids = async_lm.tokenizer.apply_chat_template(conversation=[
        {"role": "system", "content": "You need to generate a JSON object that matches the schema below. "
                                      "Only generate the JSON object on a single line with no other text."},
        {"role": "user", "content": json.dumps(PERSON_SCHEMA)},
        {"role": "assistant", "content": '{"name": "Alice", "age": 30}'},
        {"role": "user", "content": json.dumps(BOOK_SCHEMA)}], tokenize=True, add_generation_prompt=True,
        return_dict=False)  # the README's call predates transformers 5, whose default is a dict
    sampler = AWRS(llm, JsonSchema(BOOK_SCHEMA).coerce(llm, f=b"".join))
    sequences = await sampler.smc(n_particles=2, ess_threshold=0.5, max_tokens=30)
    return {text: float(p) for text, p in sequences.decoded_posterior.items()}


def seeded(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


class MemoryPeak:
    """Redis's used_memory, sampled every 20 ms by a thread while the block runs: its peak, and
    how far that is above the start (what the block added: results of an earlier block may
    still be stored)."""

    def __init__(self, url: str):
        self._redis = redis.Redis.from_url(url)
        self._stop = threading.Event()
        self.start = self._redis.info("memory")["used_memory"]
        self.peak = self.start

    @property
    def added(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> "MemoryPeak":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._redis.close()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._redis.info("memory")["used_memory"])
            self._stop.wait(0.02)


def timed(label: str, run) -> tuple[float, object]:
    print(f"  {label}...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    outcome = run()
    return time.perf_counter() - started, outcome


def in_process(loaded, args) -> dict:
    from genlm.backend.llm import AsyncTransformer
    from llamppl import CachedCausalLM

    print("in process (the libraries' own Hugging Face backend):", file=sys.stderr, flush=True)
    figures = {}
    lm = AsyncTransformer(loaded.model, loaded.tokenizer)
    seeded(args.seed)
    wall, texts = timed("LLaMPPL hard constraints",
                        lambda: asyncio.run(llamppl_example(CachedCausalLM(lm), args.max_tokens, args.particles)))
    figures["llamppl"] = {"wall_s": wall, "texts": texts}
    lm = AsyncTransformer(loaded.model, loaded.tokenizer)  # a fresh cache, as a separate program would have
    seeded(args.seed)
    wall, posterior = timed("genlm-control regex",
                            lambda: asyncio.run(genlm_example(lm, args.genlm_particles, args.genlm_max_tokens)))
    figures["genlm"] = {"wall_s": wall, "posterior": posterior}
    return figures


def through_batchd(args) -> dict:
    from batchd.embedded import EmbeddedServer
    from batchd.status import stop_processes, wait_for_workers

    print("through batchd:", file=sys.stderr, flush=True)
    cli = [sys.executable, "-m", "batchd.cli", "--log-level", "WARNING"]
    variants = [(f"before ({args.before}), float32", integrations_as_of(args.before), {})] if args.before else []
    variants += [(f"this checkout, {dtype}", "batchd.integrations", {"logprobs_dtype": dtype})
                 for dtype in args.dtypes.split(",") if dtype]
    variants += [(f"this checkout, top-{k}", "batchd.integrations", {"top_k": int(k)})
                 for k in args.top_k.split(",") if k]
    with EmbeddedServer() as server:
        daemons = [
            subprocess.Popen([*cli, "scheduler", "--redis", server.url, "--max-batch", "64", "--max-wait-ms", "2"]),
            subprocess.Popen([*cli, "worker", "--redis", server.url, "--engine", "hf", "--model", args.model,
                              "--slots", "32", "--device", "cpu", "--dtype", "float32"]),
        ]
        try:
            wait_for_workers(server.url, timeout_s=600, processes=daemons)
            stats = redis.Redis.from_url(server.url)
            figures = {"used_memory_idle_bytes": stats.info("memory")["used_memory"]}
            for label, package, options in variants:
                genlm = importlib.import_module(package + ".genlm")
                llamppl = importlib.import_module(package + ".llamppl")
                lm = genlm.BatchdLM(server.url, timeout=300, **options)  # the served tokenizer
                figures[label] = run_examples(lm, llamppl.BatchdCausalLM, server.url, args, label)
                lm.close()
            stats.close()
        finally:
            stop_processes(daemons, timeout_s=60)
    return figures


def integrations_as_of(revision: str) -> str:
    """The integrations package as of a git revision, importable under another name (its
    relative imports stay inside it; batchd.client is this checkout's)."""
    folder = Path(tempfile.mkdtemp()) / "integrations_before"
    folder.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", revision, "integrations/"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        source = subprocess.run(["git", "show", f"{revision}:{name}"], check=True, capture_output=True).stdout
        (folder / Path(name).name).write_bytes(source)
    sys.path.insert(0, str(folder.parent))
    return "integrations_before"


class SentRequests:
    """Every next-token request the producer builds in a block: count, encoded bytes, token ids,
    questions (rows). Wraps the one function both clients build them with."""

    def __init__(self):
        self.requests = self.bytes = self.token_ids = self.questions = 0

    def __enter__(self) -> "SentRequests":
        from batchd.client import scoring

        self._original = original = scoring.next_token_request

        def counted(*args, **kwargs):
            request, payload = original(*args, **kwargs)
            self.requests += 1
            self.bytes += len(payload)
            self.token_ids += len(request.prompt_token_ids or ()) + sum(len(row) for row in request.rows or ())
            self.questions += len(request.rows) if request.rows is not None else 1
            return request, payload

        scoring.next_token_request = counted
        return self

    def __exit__(self, *exc) -> None:
        from batchd.client import scoring

        scoring.next_token_request = self._original

    def figures(self) -> dict:
        return {"requests": self.requests, "request_bytes": self.bytes, "token_ids_sent": self.token_ids,
                "questions": self.questions}


def sent_bytes(stats: redis.Redis) -> int:
    return stats.info("stats")["total_net_output_bytes"]


# The worker's default --scoring-result-ttl: an example's results are gone this long after it.
SCORING_RESULT_TTL_S = 5


def run_examples(lm, causal_lm, url: str, args, label: str) -> dict:
    """Each example once, after the results of the one before expired, so its Redis peak is its own."""
    figures = {}
    stats = redis.Redis.from_url(url)
    time.sleep(SCORING_RESULT_TTL_S + 1)
    seeded(args.seed)
    sent = sent_bytes(stats)
    with MemoryPeak(url) as memory, SentRequests() as requests:
        wall, texts = timed(f"LLaMPPL hard constraints ({label})", lambda: asyncio.run(
            llamppl_example(causal_lm(lm=lm), args.max_tokens, args.particles)))
    figures["llamppl"] = {"wall_s": wall, "texts": texts, "redis_peak_bytes": memory.peak,
                          "redis_added_bytes": memory.added, "redis_sent_bytes": sent_bytes(stats) - sent,
                          **requests.figures()}
    causal_lm(lm=lm).clear_kv_cache()  # the example's pinned prompt (cache_kv), as a program ending would
    time.sleep(SCORING_RESULT_TTL_S + 1)
    seeded(args.seed)
    sent = sent_bytes(stats)
    with MemoryPeak(url) as memory, SentRequests() as requests:
        wall, posterior = timed(f"genlm-control regex ({label})", lambda: asyncio.run(
            genlm_example(lm, args.genlm_particles, args.genlm_max_tokens)))
    figures["genlm"] = {"wall_s": wall, "posterior": posterior, "redis_peak_bytes": memory.peak,
                        "redis_added_bytes": memory.added, "redis_sent_bytes": sent_bytes(stats) - sent,
                        **requests.figures()}
    if args.json_schema:
        time.sleep(SCORING_RESULT_TTL_S + 1)
        seeded(args.seed)
        sent = sent_bytes(stats)
        with MemoryPeak(url) as memory, SentRequests() as requests:
            wall, posterior = timed(f"genlm-control JSON schema ({label})",
                                    lambda: asyncio.run(genlm_json_example(lm)))
        figures["genlm_json"] = {"wall_s": wall, "posterior": posterior, "redis_peak_bytes": memory.peak,
                                 "redis_added_bytes": memory.added, "redis_sent_bytes": sent_bytes(stats) - sent,
                                 **requests.figures()}
    stats.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--particles", type=int, default=20, help="LLaMPPL example's n_particles (its default)")
    parser.add_argument("--max-tokens", type=int, default=50, help="LLaMPPL example's max_tokens (its default)")
    parser.add_argument("--genlm-particles", type=int, default=10, help="genlm README's n_particles")
    parser.add_argument("--genlm-max-tokens", type=int, default=30, help="genlm README's max_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-schema", action="store_true",
                        help="also run genlm-control's README JSON-schema example, through batchd only (in "
                             "process it took 179 s on this machine)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also run the integrations as of this git revision (e.g. main), first")
    parser.add_argument("--dtypes", default="float32,float16",
                        help="this checkout's full-vector variants (logprobs_dtype), comma-separated; empty: none")
    parser.add_argument("--top-k", default="", help="this checkout's top-k variants (BatchdLM(top_k=)), e.g. 256")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/integrations_smc_rows_pins.json"))
    args = parser.parse_args()

    from batchd.workers.hf.models import load_model

    loaded = load_model(args.model, dtype="float32", device="cpu")
    figures = {"model": args.model, "machine": f"{platform.node()} ({torch.get_num_threads()} torch threads)",
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {"out": str(args.out)},
               "in_process": in_process(loaded, args), "batchd": through_batchd(args)}
    runs = [(name, run) for name, run in figures["batchd"].items() if isinstance(run, dict)]
    print("\n| example | run | wall (s) | Redis peak (MiB) | added (MiB) | Redis sent (MiB) | requests "
          "| questions | bytes a question | token ids a question | output as in process |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    examples = [("LLaMPPL hard constraints", "llamppl"), ("genlm-control README regex", "genlm")]
    for label, key in examples + ([("genlm-control README JSON schema", "genlm_json")] if args.json_schema else []):
        alone = figures["in_process"].get(key)  # the JSON example runs through batchd only
        if alone is not None:
            print(f"| {label} | in process | {alone['wall_s']:.2f} | | | | | | | | |")
        for name, run in runs:
            output = "texts" if key == "llamppl" else "posterior"
            got = run[key]
            got["same_output_as_in_process"] = same = got[output] == alone[output] if alone else "-"
            questions = max(1, got["questions"])
            print(f"| {label} | {name} | {got['wall_s']:.2f} | {got['redis_peak_bytes'] / 2**20:.1f} "
                  f"| {got['redis_added_bytes'] / 2**20:.1f} | {got['redis_sent_bytes'] / 2**20:.1f} "
                  f"| {got['requests']} | {got['questions']} | {got['request_bytes'] / questions:.0f} "
                  f"| {got['token_ids_sent'] / questions:.1f} | {same} |")
    idle = figures["batchd"]["used_memory_idle_bytes"]
    print(f"\nRedis idle, the tokenizer stored: {idle / 2**20:.1f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

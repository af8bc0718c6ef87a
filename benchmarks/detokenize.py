"""What detokenizing costs the engine's host per generated token: the Python window (two
decodes a token) against the tokenizers library's DecodeStream (one call), on the default
model's tokenizer (SmolLM2, byte-level BPE) and real text.

Every running request detokenizes each token it generates, on the host, every step: at 256
rows that is 256 of these a step (benchmarks/engine_host.py for the whole of a step's host work).

    python benchmarks/detokenize.py --out benchmarks/results/detokenize_2core.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TEXT = ("Continuous batching keeps every slot busy while requests come and go. Café, naïve, résumé: "
        "accents are two bytes; 日本語 is three; 🙂 is four. def fib(n): return n if n < 2 else fib(n - 1) "
        "+ fib(n - 2). Paris is the capital of France; Berlin is the capital of Germany. ")


def default_tokenizer():
    from transformers import AutoTokenizer

    from batchd.workers.hf.models import SMOLLM2_ALIAS, _converted, resolve

    return AutoTokenizer.from_pretrained(_converted(resolve(SMOLLM2_ALIAS)).directory)


def per_token_us(tokenizer, streams: list[list[int]], prompt: list[int], use_stream: bool) -> float:
    from batchd.workers.hf.detokenizer import Detokenizer

    detokenizers = [Detokenizer(tokenizer, prompt) for _ in streams]
    if not use_stream:
        for detok in detokenizers:
            detok._stream = None
    started = time.perf_counter()
    for position in range(len(streams[0])):  # a step: every request's next token
        for detok, tokens in zip(detokenizers, streams):
            detok.add(tokens[position])
    return (time.perf_counter() - started) / (len(streams) * len(streams[0])) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/detokenize.json")
    args = parser.parse_args()
    tokenizer = default_tokenizer()
    ids = tokenizer(TEXT * 40, add_special_tokens=False)["input_ids"]
    streams = [ids[(7 * r) % 500:][:args.tokens] for r in range(args.requests)]
    prompt = tokenizer("Write a paragraph.")["input_ids"]
    results = {"window": [], "stream": []}
    for repeat in range(args.repeats):  # alternated, so drift on a shared machine hits both
        for name in results:
            results[name].append(round(per_token_us(tokenizer, streams, prompt, name == "stream"), 3))
        print(f"repeat {repeat + 1}/{args.repeats}: window {results['window'][-1]} us, stream {results['stream'][-1]} us a token")
    best = {name: min(values) for name, values in results.items()}
    report = {"benchmark": "detokenize", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "tokenizer": "SmolLM2-135M-Instruct (the default model)", "requests": args.requests,
              "tokens": args.tokens, "us_per_token": results, "best_us_per_token": best,
              "ratio": round(best["window"] / best["stream"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"best of {args.repeats}: window {best['window']} us a token, stream {best['stream']} us "
          f"({report['ratio']}x); at 256 rows a step: {best['window'] * 256 / 1e3:.2f} ms against "
          f"{best['stream'] * 256 / 1e3:.2f} ms")


if __name__ == "__main__":
    main()

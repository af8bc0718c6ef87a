"""How the fast path's layers compile: one graph reused by every layer, or one per layer.

The engine compiles each layer's dense parts (`LlamaRunner._project`, `_finish`) with
torch.compile, with the token count dynamic for steps that carry prompts. If the
compiler sees each layer's weights as something other than module state, it compiles
every layer anew (on an H200 that made the 0.6B engine take ~3 minutes to start). This
script compiles a 6-layer tiny Qwen3 on the CPU at two token counts and prints the
compiled graphs, the inductor cache's hits and misses, the time per layer call and the
largest difference from the uncompiled layers.

    .venv/bin/python benchmarks/compile_reuse.py
"""

from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from batchd.workers.hf.runner import PagedRunner
from engine_gpu import qwen3_config  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

LAYERS = 6


def main() -> None:
    config = qwen3_config(small=True)
    config.num_hidden_layers, config.layer_types = LAYERS, ["full_attention"] * LAYERS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    runner = PagedRunner(model, slots=4, num_blocks=64, block_size=16, max_context=256, attention="sdpa")
    torch._dynamo.config.cache_size_limit = 8 * LAYERS
    project, finish = torch.compile(runner._project, dynamic=True), torch.compile(runner._finish, dynamic=True)
    seconds, worst = [], 0.0
    with torch.inference_mode():
        for tokens in (8, 13):
            hidden = torch.randn(1, tokens, config.hidden_size)
            cos, sin = model.model.rotary_emb(hidden, torch.arange(tokens)[None])
            attention_out = torch.randn(1, tokens, config.num_attention_heads * config.head_dim)
            for index, layer in enumerate(runner._layers):
                started = time.perf_counter()
                compiled = project(layer, hidden, cos, sin), finish(layer, hidden, attention_out)
                seconds.append(time.perf_counter() - started)
                print(f"  {tokens} tokens, layer {index}: {seconds[-1]:.2f}s", flush=True)
                eager = runner._project(layer, hidden, cos, sin), runner._finish(layer, hidden, attention_out)
                worst = max([worst] + [float((a - b).abs().max()) for a, b in zip((*compiled[0], compiled[1]),
                                                                                  (*eager[0], eager[1]))])
    print(f"\n{LAYERS} layers, 2 token counts: {counters['stats']['unique_graphs']} compiled graphs; inductor cache "
          f"{counters['inductor']['fxgraph_cache_hit']} hits, {counters['inductor']['fxgraph_cache_miss']} misses; "
          f"first call {seconds[0]:.1f}s, the others {max(seconds[1:]):.2f}s at most; "
          f"largest difference from eager {worst:.1e}")


if __name__ == "__main__":
    main()

"""Per-request sampling over one step's logits: greedy rows in one argmax, the rest batched.

Every sampling request owns a torch.Generator (seeded from its seed, or from
the engine's generator when it has none) and draws exactly one uniform number
per token from it, so a seeded request's tokens never depend on its batch mates.
"""

from __future__ import annotations

import torch
from batchd.client.protocol import SamplingParams

from .kv_cache import to_device


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        self._device = device
        self._seeds = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
        if seed is None:
            self._seeds.seed()

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        """A new generator for one request; None for greedy requests."""
        if params.temperature == 0:
            return None
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return torch.Generator(device=self._device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row of logits [rows, vocab], in row order, left on the device:
        the engine reads them when it needs them, which may be after the next step is queued."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if rows:
            index = to_device(rows, torch.long, logits.device)
            picked = self._sample_rows(logits.index_select(0, index), [params[i] for i in rows],
                                       [generators[i] for i in rows])
            tokens.index_copy_(0, index, picked)
        return tokens

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        device = logits.device
        count = len(params)
        settings = to_device([p.temperature for p in params] + [float(p.top_k or logits.shape[-1]) for p in params]
                             + [p.top_p for p in params], torch.float32, device)
        temperature, top_p = settings[:count], settings[2 * count:]
        top_k = settings[count:2 * count].long()
        values, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
        probs = values.softmax(dim=-1)
        rank = torch.arange(probs.shape[-1], device=device)
        # A token survives top-p while the mass before it is under top_p, so the first always does.
        cut = (rank[None, :] >= top_k[:, None]) | (probs.cumsum(dim=-1) - probs >= top_p[:, None])
        probs = probs.masked_fill(cut, 0.0)
        cdf = probs.cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])
        choice = (cdf < (uniform * cdf[:, -1])[:, None]).sum(dim=-1).clamp(max=probs.shape[-1] - 1)
        return order.gather(1, choice[:, None]).squeeze(1)

"""LLaMPPL's `CachedCausalLM` answered by a batchd fleet.

    from batchd.integrations.llamppl import BatchdCausalLM

    LLM = BatchdCausalLM("redis://localhost:6379", tokenizer=tokenizer)
    # then LMContext(LLM, prompt), smc_standard(...) as with CachedCausalLM.from_pretrained

LLaMPPL's CachedCausalLM wraps a genlm-backend AsyncLM, so this wraps a
`BatchdLM` (batchd.integrations.genlm). docs/integrations.md has the
measurements.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy
from llamppl.llms import CachedCausalLM, Masks

from .genlm import BatchdLM


class BatchdCausalLM(CachedCausalLM):
    """A CachedCausalLM whose next-token distributions come from batchd workers.

    Takes BatchdLM's arguments (url, tokenizer=, model=, timeout=, ...), or a
    BatchdLM as lm= to share one connection between several.
    """

    def __init__(self, url: str | None = None, *, lm: BatchdLM | None = None, **batchd_lm_options: Any):
        # CachedCausalLM.__init__ accepts only the AsyncLM classes it knows (it switches on them to
        # name its backend) and otherwise only copies the model's vocabularies: done here instead.
        self.backend = "batchd"
        self.model = lm if lm is not None else BatchdLM(url, **batchd_lm_options)
        self.tokenizer = self.model.tokenizer
        self.str_vocab = self.model.str_vocab
        self.byte_vocab = self.model.byte_vocab
        self.masks = Masks(self)

    async def next_token_logprobs(self, token_ids: Sequence[int]) -> numpy.ndarray:
        return (await self.model.next_token_logprobs(token_ids)).numpy()

    def next_token_logprobs_unbatched(self, token_ids: Sequence[int]) -> numpy.ndarray:
        return self.model.next_token_logprobs_sync(token_ids).numpy()

    # The KV cache is the worker's: cache_kv pins the prompt's blocks there (BatchdLM.cache_kv),
    # and calls that start with it send only what follows it.
    def cache_kv(self, prompt_tokens: Sequence[int]) -> None:
        self.model.cache_kv(prompt_tokens)

    def clear_kv_cache(self) -> None:
        self.model.clear_kv_cache()

    def clear_cache(self) -> None:
        pass

    def reset_async_queries(self) -> None:
        pass

    def close(self) -> None:
        self.model.close()

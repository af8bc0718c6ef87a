"""genlm-backend's `AsyncLM` answered by a batchd fleet, for genlm-control and LLaMPPL.

    from batchd.integrations.genlm import BatchdLM, ScoredPromptedLLM
    
    llm = PromptedLLM(BatchdLM("redis://localhost:6379"))        # genlm-control, unchanged
    llm = ScoredPromptedLLM(BatchdLM("redis://localhost:6379"))  # the same, with one `score`
                                                                 # request per sequence probability

Each `next_token_logprobs` is one batchd request; the worker batches every
caller's requests into its engine steps and reuses the cached prefix a
particle's previous call left, so the library's own batching is not needed.
Vectors are read straight from the result's bytes into tensors (no Python
floats). docs/integrations.md has the measurements.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy
import torch
from genlm.backend.llm.base import UNKNOWN_ADAPTER, AsyncLM

from batchd.client import scoring
from batchd.client.aio import AsyncClient

from .bridge import ClientThread
from .hf_tokenizer import hf_tokenizer


class BatchdLM(AsyncLM):
    """An AsyncLM whose log-probabilities come from batchd workers.

    url: the fleet's Redis (None: $BATCHD_REDIS_URL or localhost); model: the served
    model to ask (None: the fleet's only one); tokenizer: a Hugging Face tokenizer,
    which must be the one the workers serve (else TokenizerMismatch); None: the
    workers' own, read from Redis. timeout: seconds a call may wait. logprobs_dtype
    "float16" halves each vector on the wire and in Redis, at float16 precision (it can
    change which token a sampler draws: docs/integrations.md). Other keyword arguments
    go to AsyncClient (prefix, producer, ...).
    """

    def __init__(self, url: str | None = None, *, tokenizer: Any = None, model: str | None = None,
                 timeout: float | None = None, logprobs_dtype: str = "float32", **client_options: Any):
        self._bridge = ClientThread(url, **client_options)
        self.model_name = model
        self.timeout = timeout
        self.logprobs_dtype = logprobs_dtype
        client = self._bridge.client
        try:
            if tokenizer is None:
                tokenizer = hf_tokenizer(self._bridge.call(lambda: client.served_tokenizer(model)))
            else:
                self._bridge.call(lambda: client.check_tokenizer(tokenizer, model))
        except BaseException:
            self._bridge.close()
            raise
        super().__init__(tokenizer)

    async def next_token_logprobs(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        _no_adapters(lora_name)
        answer = await self._bridge.run(lambda client: self._ask(client, token_ids))
        return torch.from_numpy(answer.array())

    def next_token_logprobs_sync(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        _no_adapters(lora_name)
        answer = self._bridge.call(lambda: self._ask(self._bridge.client, token_ids))
        return torch.from_numpy(answer.array())

    async def batch_next_token_logprobs(self, token_ids_list: Sequence[Sequence[int]],
                                        lora_name: str | None = None) -> torch.Tensor:
        _no_adapters(lora_name)

        async def ask_all(client: AsyncClient) -> list[scoring.NextTokenLogprobs]:
            return await asyncio.gather(*(self._ask(client, ids) for ids in token_ids_list))

        answers = await self._bridge.run(ask_all)
        # One copy per row, from each result's bytes into its row of the batch.
        rows = numpy.empty((len(answers), len(self.byte_vocab)), dtype=numpy.float32)
        for row, answer in zip(rows, answers):
            scoring.logprobs_array(answer.result, out=row)
        return torch.from_numpy(rows)

    def batch_next_token_logprobs_sync(self, token_ids_list: Sequence[Sequence[int]],
                                       lora_name: str | None = None) -> torch.Tensor:
        async def ask_all() -> torch.Tensor:
            return await self.batch_next_token_logprobs(token_ids_list, lora_name)

        return asyncio.run(ask_all())

    async def continuation_logprobs(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[float]:
        """The log-probability of each continuation token after the prompt and the ones before it:
        one `score` request where next-token vectors would take one request per token."""
        async def ask(client: AsyncClient) -> list[float]:
            answer = await client.score(prompt_token_ids=list(prompt_ids), continuation_token_ids=list(continuation_ids),
                                        timeout=self.timeout, model=self.model_name)
            return answer.token_logprobs

        return await self._bridge.run(ask)

    async def _ask(self, client: AsyncClient, token_ids: Sequence[int]) -> scoring.NextTokenLogprobs:
        return await client.next_token_logprobs(list(token_ids), timeout=self.timeout, model=self.model_name,
                                                logprobs_dtype=self.logprobs_dtype)

    def clear_cache(self) -> None:
        """Nothing to clear here: the worker's paged KV cache keeps or evicts prefixes on its own."""

    def close(self) -> None:
        """Close the connection to batchd."""
        self._bridge.close()


def __getattr__(name: str) -> Any:
    # ScoredPromptedLLM needs genlm-control; LLaMPPL users have only genlm-backend.
    if name == "ScoredPromptedLLM":
        from .prompted import ScoredPromptedLLM

        return ScoredPromptedLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _no_adapters(lora_name: str | None) -> None:
    if lora_name is not None:
        raise ValueError(UNKNOWN_ADAPTER.format(lora_name) + " (batchd serves no LoRA adapters)")

"""genlm-control's PromptedLLM with a sequence's probability in one batchd `score` request."""

from __future__ import annotations

from typing import Any

from genlm.control import PromptedLLM


class ScoredPromptedLLM(PromptedLLM):
    """genlm-control's PromptedLLM, asking a BatchdLM for a sequence's probability in one request.

    PromptedLLM computes the log-probability of a context of L tokens from L
    full next-token vectors (196 KiB each for SmolLM2) and picks one entry of
    each; a batchd `score` request returns just those L numbers. Everything else
    is PromptedLLM's own; a temperature other than 1 needs the full vectors, so
    it takes PromptedLLM's way.
    """

    async def _log_probability(self, context_ids: list[int]) -> float:
        if not context_ids or not self.prompt_ids or self.temperature != 1 or self.lora_name is not None:
            return await super()._log_probability(context_ids)
        return sum(await self.model.continuation_logprobs(self.prompt_ids, context_ids))

    def spawn(self, *args: Any, **kwargs: Any) -> "ScoredPromptedLLM":
        spawned = super().spawn(*args, **kwargs)  # a plain PromptedLLM: keep its maps, change its kind
        return type(self)(spawned.model, prompt_ids=spawned.prompt_ids, temperature=spawned.temperature,
                          token_maps=spawned.token_maps, lora_name=spawned.lora_name)

"""Scoring: log-probabilities of given tokens in one batched forward pass, no decoding.

Pure: a model and token ids in, log-probabilities out; the worker shell routes
scoring requests here (docs/scoring.md). Every sequence of a batch is
right-padded to the longest with an attention mask, so a sequence's real
tokens attend only to themselves and its results do not depend on its batch
mates. Only the positions whose log-probabilities are wanted go through the
output head: a full-vocabulary row per padded position would cost batch x
length x vocab floats.
"""

from __future__ import annotations

from typing import Any

import torch
from batchd.client.errors import InvalidRequest
from batchd.client.protocol import Request

from ..engine import ScoreItem, ScoreOutput
from ..validation import check_context, check_vocabulary
from .models import tokenize

# Tokens of one forward pass (padding included); a larger batch is split.
MAX_BATCH_TOKENS = 16_384


def score_batch(model: Any, items: list[ScoreItem], pad_token_id: int = 0,
                max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[ScoreOutput]:
    """Answer every item, in as few forward passes as max_batch_tokens allows."""
    outputs: list[ScoreOutput] = []
    for batch in _split(items, max_batch_tokens):
        outputs += _score_one_pass(model, batch, pad_token_id)
    return outputs


def _split(items: list[ScoreItem], max_batch_tokens: int) -> list[list[ScoreItem]]:
    batches: list[list[ScoreItem]] = []
    current: list[ScoreItem] = []
    longest = 0
    for item in items:
        length = _length(item)
        if current and max(longest, length) * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def _length(item: ScoreItem) -> int:
    return len(item.prompt_token_ids) + len(item.continuation_token_ids or ())


@torch.inference_mode()
def _score_one_pass(model: Any, items: list[ScoreItem], pad_token_id: int) -> list[ScoreOutput]:
    device = next(model.parameters()).device
    longest = max(_length(item) for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    # (row, position) pairs whose next-token distribution is wanted, item by item.
    rows, positions, spans = [], [], []
    for row, item in enumerate(items):
        tokens = item.prompt_token_ids + (item.continuation_token_ids or [])
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        attention_mask[row, :len(tokens)] = 1
        first = len(item.prompt_token_ids) - 1
        wanted = range(first, len(tokens) - 1) if item.continuation_token_ids else range(first, first + 1)
        spans.append((len(positions), len(wanted)))
        rows += [row] * len(wanted)
        positions += list(wanted)
    hidden = _hidden_states(model, input_ids.to(device), attention_mask.to(device))
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    logprobs = torch.log_softmax(_logits(model, picked).float(), dim=-1).cpu()
    return [_output(item, logprobs[start:start + count]) for item, (start, count) in zip(items, spans)]


def _hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last layer's hidden states (final norm applied), before the output head."""
    head = model.get_output_embeddings()
    if head is None:  # no separate head to apply: logits straight from the model
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    return hidden if head is None else head(hidden)


def _output(item: ScoreItem, logprobs: torch.Tensor) -> ScoreOutput:
    if item.continuation_token_ids:
        wanted = torch.tensor(item.continuation_token_ids)
        token_logprobs = logprobs.gather(1, wanted[:, None])[:, 0]
        return ScoreOutput(token_logprobs=token_logprobs.tolist(), total_logprob=float(token_logprobs.sum()))
    vector = logprobs[0]
    if item.top_k is None:
        return ScoreOutput(next_token_logprobs=vector)
    top = torch.topk(vector, min(item.top_k, vector.numel()))
    return ScoreOutput(top_token_ids=top.indices.tolist(), top_logprobs=top.values.tolist())


def rows_answer(answers: list[ScoreOutput]) -> ScoreOutput:
    """One answer for an item with rows, from its rows' answers in order: the vectors
    stacked, or each row's top_k pairs one row after another (every row has k of them)."""
    if answers[0].next_token_logprobs is not None:
        return ScoreOutput(next_token_logprobs=torch.stack([answer.next_token_logprobs for answer in answers]))
    return ScoreOutput(top_token_ids=[token for answer in answers for token in answer.top_token_ids],
                       top_logprobs=[value for answer in answers for value in answer.top_logprobs])


class Scorer:
    """A model (and its tokenizer, for text continuations) that answers scoring requests
    (the Scorer of batchd.workers.engine)."""

    def __init__(self, model: Any, tokenizer: Any, max_context: int, pad_token_id: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.vocab_size = model.config.vocab_size
        self.pad_token_id = pad_token_id

    def prepare(self, request: Request) -> ScoreItem:
        """The item for a wire request; raises InvalidRequest / RequestTooLarge."""
        # The limit is checked below on prompt + continuation: nothing is decoded,
        # so max_new_tokens takes no room here.
        prompt_token_ids = tokenize(self.tokenizer, request, None, self.vocab_size)
        continuation = request.continuation_token_ids
        if request.continuation is not None:
            continuation = self.tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
            if not continuation:
                raise InvalidRequest("the continuation has no tokens", request.id)
        check_vocabulary(continuation or (), self.vocab_size, request.id, what="continuation")
        check_context(request.id, self.max_context, len(prompt_token_ids), continuation_tokens=len(continuation or ()))
        item = ScoreItem(prompt_token_ids, continuation, request.top_logprobs, request.rows)
        for question in item.questions() if item.rows is not None else ():
            check_vocabulary(question.prompt_token_ids, self.vocab_size, request.id)
            check_context(request.id, self.max_context, len(question.prompt_token_ids))
        return item

    def score(self, items: list[ScoreItem]) -> list[ScoreOutput]:
        """Every item's answer, an item with rows answered by one pass over its questions too."""
        questions = [item.questions() for item in items]
        answers = iter(score_batch(self.model, [q for qs in questions for q in qs], self.pad_token_id))
        outputs = []
        for item, asked in zip(items, questions):
            mine = [next(answers) for _ in asked]
            outputs.append(mine[0] if item.rows is None else rows_answer(mine))
        return outputs

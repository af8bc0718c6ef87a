"""The hf engine: continuous batching over a fixed slot table with a per-slot KV cache.

One step reads top to bottom: finish what was cancelled or ran out of time
(freeing slots at once), admit waiting requests into free slots, build the
step's chunks (one decode token per running slot, then prompt pieces under the
prefill budget), run them in one forward pass, sample each row with its own
request's parameters, and finish what stopped.

On a GPU the engine keeps one step in flight: it queues step N+1 (whose decode
tokens are step N's samples, read on the device) before it reads step N's
tokens back and does the host's share of N (detokenising, stop checks,
streaming), so the GPU is not idle while the host works. A request that step N
stops still had its row in N+1; that token is dropped and its slot is free from
the step after.

With a contrast model (`--contrast-model`, the "before" of a fine-tune), a
second runner keeps its own cache for the same slots; requests that ask for
contrast_alpha run their chunks through both models in the same step and are
sampled from logits_after + alpha * (logits_after - logits_before).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from batchd.client.errors import BatchdError, InvalidRequest
from batchd.client.protocol import FinishReason, Request

from .detokenizer import Detokenizer
from ..engine import Clock, EngineBase, EngineRequest, ScoreItem, ScoreOutput, StepOutput
from ..validation import check_context, check_contrast, check_vocabulary
from .models import LoadedModel, load_model, tokenize
from .runner import (
    Chunk,
    GenericRunner,
    LlamaRunner,
    cache_length,
    kv_bytes_per_token,
    supports_fast_path,
    to_device,
)
from .scoring import Scorer
from .sampler import Sampler
from .sequence import Sequence, Status

log = logging.getLogger("batchd.engine.hf")

# Without a memory budget a slot holds this many tokens (or the model's context if less).
DEFAULT_MAX_CONTEXT = 4096


class HFEngine(EngineBase):
    name = "hf"

    def __init__(self, loaded: LoadedModel, *, slots: int = 16, max_context: int | None = None,
                 kv_memory: int | None = None, max_prefill_tokens: int = 2048, clock: Clock = time.time,
                 seed: int | None = None, attention: str | None = None, cuda_graph: bool | None = None,
                 compile_decode: bool | None = None, contrast: LoadedModel | None = None,
                 overlap: bool | None = None, cuda_graph_sizes: tuple[int, ...] | None = None):
        if slots < 1 or max_prefill_tokens < 1:
            raise ValueError("slots and max_prefill_tokens must be at least 1")
        if contrast is not None:
            _check_pair(loaded, contrast)
        self.model_name = loaded.name
        self.contrast_model_name = contrast.name if contrast is not None else ""
        self.total_slots = slots
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self._config = loaded.model.config
        self._clock = clock
        self._max_prefill_tokens = max_prefill_tokens
        self._dtype = dtype = next(loaded.model.parameters()).dtype
        device = next(loaded.model.parameters()).device
        attention = attention or ("flex" if device.type == "cuda" else "sdpa")
        models = [loaded.model] + ([contrast.model] if contrast is not None else [])
        fast = all(supports_fast_path(model) for model in models)
        length = (lambda context: cache_length(context, attention)) if fast else (lambda context: context)
        # Both caches come out of one budget: a contrast request holds a slot in each.
        self._kv_bytes_per_token = sum(kv_bytes_per_token(model.config, dtype) for model in models)
        self.max_context = _slot_context(self._config, slots, max_context, kv_memory, self._kv_bytes_per_token,
                                         length)

        def runner(model):
            if fast:
                return LlamaRunner(model, slots, self.max_context, attention, cuda_graph, compile_decode,
                                   cuda_graph_sizes)
            return GenericRunner(model, slots, self.max_context)

        self._runner = runner(loaded.model)
        self._contrast_runner = runner(contrast.model) if contrast is not None else None
        self._sampler = Sampler(self._runner.device, seed)
        # Overlap pays where kernels run asynchronously (CUDA); on a CPU each op runs in
        # the calling thread, so it is off there by default (tests turn it on to check it).
        if overlap is None:
            overlap = self._runner.device.type == "cuda"
        self.overlap = overlap and all(r.supports_overlap for r in (self._runner, self._contrast_runner) if r)
        self._in_flight: _Launched | None = None
        # The fast path's cache outlives a slot's owner: what each free slot still holds
        # (its tokens, and whether the contrast model's cache holds them too), so a request
        # that starts with those tokens takes that slot and skips recomputing them.
        self._reuse_prefixes = isinstance(self._runner, LlamaRunner)
        self._cached: list[tuple[list[int], bool] | None] = [None] * slots
        self.prefix_tokens_reused = 0  # prompt tokens not computed again, in place or copied
        self.prefix_tokens_copied = 0  # of those, copied from another slot's cache
        # Scoring requests join the steps as prefill-only rows where the runner can return
        # several rows of logits per chunk (the fast path); else they go to the Scorer.
        self.scores_in_steps = isinstance(self._runner, LlamaRunner)
        # Seconds spent blocked on the device reading tokens back: near the step time when
        # the GPU is the bottleneck, near zero when the host is (batchd:engine_device_wait_seconds_total).
        self.device_wait_s = 0.0
        self._eos_ids = _eos_ids(loaded.model, loaded.tokenizer)
        self._slots: list[Sequence | None] = [None] * slots
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._by_id: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._to_cancel: dict[str, FinishReason] = {}
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self._scorer = Scorer(loaded.model, loaded.tokenizer, self.max_context, pad_id)
        allocated = sum(r.cache_bytes for r in (self._runner, self._contrast_runner) if r is not None)
        log.info("hf engine: model=%s contrast_model=%s path=%s slots=%d max_context=%d kv_cache=%.1f MiB "
                 "(allocated %.1f MiB) device=%s dtype=%s weights=%s overlap=%s", self.model_name,
                 self.contrast_model_name or "-", f"fast/{self._runner.attention}" if fast else "generic",
                 slots, self.max_context, self.kv_cache_bytes / 2**20, allocated / 2**20, self._runner.device,
                 dtype, loaded.weights, self.overlap)

    # -- the Engine protocol ------------------------------------------------------

    def tokenize(self, request: Request) -> list[int]:
        return tokenize(self.tokenizer, request, self.max_context, self._config.vocab_size)

    def scorer(self) -> Scorer:
        return self._scorer

    def add(self, request: EngineRequest) -> None:
        self._check_fits(request)
        check_contrast(request.params, request.request_id, self._contrast_runner is not None,
                       f"this one serves {self.model_name} alone")
        params = request.params
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_ids)
        self._enqueue(Sequence(request, Detokenizer(self.tokenizer, request.prompt_token_ids, params.stop),
                               frozenset(stop_ids)), self._sampler.generator(params))

    def add_score(self, request: EngineRequest, item: ScoreItem) -> None:
        """Queue a scoring request (next_token_logprobs / score, already checked by the
        Scorer's prepare): it prefills its prompt and continuation in the engine's steps,
        beside generate requests, reusing a free slot's cached prefix, and finishes with
        the log-probabilities asked for. Needs scores_in_steps."""
        tokens = list(item.prompt_token_ids) + list(item.continuation_token_ids or ())
        check_context(request.request_id, self.max_context, len(item.prompt_token_ids),
                      continuation_tokens=len(item.continuation_token_ids or ()))
        request = EngineRequest(request.request_id, tokens, request.params, request.deadline, request.arrival_time)
        self._enqueue(Sequence(request, Detokenizer(self.tokenizer, [], ()), frozenset(), score=item), None)

    def _enqueue(self, sequence: Sequence, generator: torch.Generator | None) -> None:
        request_id = sequence.request_id
        if request_id in self._by_id:
            raise InvalidRequest(f"request {request_id!r} is already running on this engine", request_id)
        self._generators[request_id] = generator
        self._by_id[request_id] = sequence
        self._waiting.append(sequence)

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        if request_id in self._by_id:
            self._to_cancel[request_id] = reason

    def step(self) -> list[StepOutput]:
        outputs = self._finish_cancelled_and_expired()
        self._admit()
        chunks = self._schedule()
        previous, self._in_flight = self._in_flight, None
        if chunks:
            launched, failed = self._launch(chunks, previous)
            outputs += failed
            if launched is not None and self.overlap:
                self._in_flight = launched  # read back at the next step, after that one is queued
            elif launched is not None:
                outputs += self._collect(launched)
        if previous is not None:
            outputs += self._collect(previous)
        return outputs

    def has_work(self) -> bool:
        return bool(self._by_id) or self._in_flight is not None

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - self.num_running - self.num_waiting)

    @property
    def kv_cache_usage(self) -> float:
        used = sum(s.num_cached for s in self._slots if s is not None)
        return used / (self.total_slots * self.max_context)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the cache can hold: allocated up front on the fast path."""
        return self.total_slots * self.max_context * self._kv_bytes_per_token

    # -- one step, in order ----------------------------------------------------------

    def _check_fits(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt has no tokens", request.request_id)
        check_vocabulary(prompt, self._config.vocab_size, request.request_id)
        check_context(request.request_id, self.max_context, len(prompt), request.params.max_new_tokens)

    def _finish_cancelled_and_expired(self) -> list[StepOutput]:
        now = self._clock()
        ending: list[tuple[Sequence, FinishReason]] = []
        for sequence in self._by_id.values():
            reason = self._to_cancel.get(sequence.request_id)
            deadline = sequence.request.deadline
            if reason is None and deadline is not None and now >= deadline:
                reason = "deadline"
            if reason is not None:
                ending.append((sequence, reason))
        self._to_cancel.clear()
        return [self._finish(sequence, reason, []) for sequence, reason in ending]

    def _admit(self) -> None:
        free = [slot for slot, owner in enumerate(self._slots) if owner is None]
        while self._waiting and free:
            sequence = self._waiting.popleft()
            slot, shared, source = self._slot_for(sequence, free)
            free.remove(slot)
            if source is not None:
                # Queued before any step that reads it, after every step that wrote the source.
                self._runner.copy_prefix(source, slot, shared)
                if sequence.request.params.contrast_alpha is not None:  # its source is paired too
                    self._contrast_runner.copy_prefix(source, slot, shared)
                self.prefix_tokens_copied += shared
            sequence.status, sequence.slot, sequence.num_cached = Status.RUNNING, slot, shared
            self.prefix_tokens_reused += shared
            self._slots[slot] = sequence
            self._cached[slot] = None  # the new owner writes past `shared`; recorded again when it ends

    def _slot_for(self, sequence: Sequence, free: list[int]) -> tuple[int, int, int | None]:
        """A free slot for this request, how many of its leading tokens it can skip (never its
        last prompt token, whose logits it needs), and the slot to copy them from (None: the
        chosen slot's cache holds them already).

        First choice: the free slot whose cache still holds the longest start of its tokens.
        A running request's slot holding a longer one is copied from instead (a shared system
        prompt, particles sharing a prompt). With no match, a slot holding nothing worth keeping."""
        if not self._reuse_prefixes:
            return free[0], 0, None
        tokens = sequence.request.prompt_token_ids
        limit = (len(sequence.score.prompt_token_ids) if sequence.score is not None else sequence.prompt_len) - 1
        paired = sequence.request.params.contrast_alpha is not None
        # A slot that holds nothing worth keeping, for a request that reuses none in place.
        spare = next((slot for slot in free if self._cached[slot] is None), free[0])
        best, shared = spare, 0
        for slot in free:
            held = self._cached[slot]
            if held is None or (paired and not held[1]) or not held[0] or held[0][0] != tokens[0]:
                continue
            length = _common_prefix(held[0], tokens, limit)
            if length > shared:
                best, shared = slot, length
        source, copied = None, shared
        for owner in self._slots:
            if owner is None or owner.num_cached <= copied or (paired and owner.request.params.contrast_alpha is None):
                continue
            held = owner.request.prompt_token_ids
            if not held or held[0] != tokens[0]:
                continue
            # Positions below num_cached hold these tokens, or will once the queued steps run.
            length = _common_prefix(held + owner.generated if owner.generated else held, tokens,
                                    min(limit, owner.num_cached))
            if length > copied:
                source, copied = owner.slot, length
        if source is None:
            return best, shared, None
        return spare, copied, source

    def _schedule(self) -> list[Chunk]:
        chunks = []
        budget = self._max_prefill_tokens
        running = [s for s in self._slots if s is not None]
        for sequence in running:
            if sequence.needs_decode:
                chunks.append(Chunk(sequence.slot, sequence.next_chunk(1), sequence.num_cached,
                                    from_previous=sequence.in_flight_row if sequence.in_flight else None))
        # Prompts go in arrival order under the budget,
        # so a long prompt takes several steps and never stalls the decodes for long.
        for sequence in sorted((s for s in running if s.prefilling), key=lambda s: s.request.arrival_time):
            if budget <= 0:
                break
            piece = sequence.next_chunk(budget)
            budget -= len(piece)
            if sequence.score is not None:
                offsets = sequence.scored_offsets(sequence.num_cached, len(piece))
                chunks.append(Chunk(sequence.slot, piece, sequence.num_cached, want_logits=bool(offsets),
                                    logit_offsets=offsets))
                continue
            last = sequence.num_cached + len(piece) == sequence.prompt_len
            chunks.append(Chunk(sequence.slot, piece, sequence.num_cached, want_logits=last))
        return chunks

    def _launch(self, chunks: list[Chunk], previous: _Launched | None) -> tuple[_Launched | None, list[StepOutput]]:
        """Queue one step (forward pass and sampling) without waiting for it."""
        earlier = previous.tokens if previous is not None else None
        try:
            logits, rows = self._runner.forward(chunks, earlier)
            if self._contrast_runner is not None:
                logits = self._contrast(chunks, rows, logits, earlier)
            sequences = [self._slots[c.slot] for c in rows]
            if any(s.score is not None for s in sequences):
                logits, sequences = self._take_scores(logits, rows, sequences)
            tokens = self._sampler.sample(logits, [s.request.params for s in sequences],
                                          [self._generators[s.request_id] for s in sequences])
        except Exception as exc:  # one bad step must not take the worker down
            return None, self._fail([self._slots[c.slot] for c in chunks], exc)
        scored = []
        for chunk in chunks:
            sequence = self._slots[chunk.slot]
            sequence.num_cached += len(chunk.token_ids)
            if sequence.score is not None and not sequence.prefilling:
                scored.append(sequence)  # all its rows are in: it ends when this step is read back
        for row, sequence in enumerate(sequences):
            sequence.in_flight += 1
            sequence.in_flight_row = row
        return _Launched.queue(sequences, tokens, scored), []

    def _take_scores(self, logits: torch.Tensor, rows: list[Chunk], sequences: list[Sequence]):
        """Keep the scoring rows' log-probabilities (reduced on the device to what each request
        asked for) and return the logits and sequences left to sample."""
        scoring = [i for i, s in enumerate(sequences) if s.score is not None]
        device = logits.device
        logprobs = torch.log_softmax(logits.index_select(0, to_device(scoring, torch.long, device)), dim=-1)
        # A request has one chunk per step, and that chunk's rows come one after another.
        at = 0
        while at < len(scoring):
            chunk, sequence = rows[scoring[at]], sequences[scoring[at]]
            offsets = chunk.logit_rows()
            taken, at = logprobs[at:at + len(offsets)], at + len(offsets)
            item = sequence.score
            if item.continuation_token_ids:
                tokens = sequence.request.prompt_token_ids
                wanted = to_device([tokens[chunk.start + o + 1] for o in offsets], torch.long, device)
                sequence.score_parts.append(taken.gather(1, wanted[:, None])[:, 0])
            elif item.top_k is not None:
                sequence.score_parts.append(torch.topk(taken[0], min(item.top_k, taken.shape[-1])))
            else:
                sequence.score_parts.append(taken[0])
        keep = [i for i, s in enumerate(sequences) if s.score is None]
        if not keep:
            return logits[:0], []
        return logits.index_select(0, to_device(keep, torch.long, device)), [sequences[i] for i in keep]

    @staticmethod
    def _score_output(sequence: Sequence) -> ScoreOutput:
        item, parts = sequence.score, sequence.score_parts
        if item.continuation_token_ids:
            values = torch.cat(parts).cpu()
            return ScoreOutput(token_logprobs=values.tolist(), total_logprob=float(values.sum()))
        if item.top_k is not None:
            top = parts[0]
            return ScoreOutput(top_token_ids=top.indices.cpu().tolist(), top_logprobs=top.values.cpu().tolist())
        return ScoreOutput(next_token_logprobs=parts[0].cpu())

    def _collect(self, launched: _Launched) -> list[StepOutput]:
        """Read a queued step's tokens back (the host's one wait per step) and act on them."""
        started = time.perf_counter()
        try:
            tokens = launched.read()
        except Exception as exc:
            return self._fail([s for s in launched.sequences + launched.scored if s.status is not Status.FINISHED], exc)
        finally:
            self.device_wait_s += time.perf_counter() - started
        outputs = []
        for sequence, token in zip(launched.sequences, tokens):
            sequence.in_flight -= 1
            # Cancelled, expired or stopped while this token was on its way: it is dropped.
            if sequence.status is not Status.FINISHED:
                outputs.append(self._emit(sequence, token))
        for sequence in launched.scored:
            if sequence.status is not Status.FINISHED:
                outputs.append(self._finish(sequence, "stop", [], score=self._score_output(sequence)))
        return outputs

    def _fail(self, sequences: list[Sequence], exc: Exception) -> list[StepOutput]:
        log.error("engine step failed; finishing its %d requests with an error", len(sequences), exc_info=exc)
        error = BatchdError(f"engine step failed: {exc}")
        return [self._finish(sequence, "error", [], error=error) for sequence in sequences]

    @torch.inference_mode()
    def _contrast(self, chunks: list[Chunk], rows: list[Chunk], logits: torch.Tensor,
                  previous: torch.Tensor | None) -> torch.Tensor:
        """Run the contrast requests' chunks through the before model too, and mix their logits."""
        paired = [c for c in chunks if self._slots[c.slot].request.params.contrast_alpha is not None]
        if not paired:
            return logits
        before, before_rows = self._contrast_runner.forward(paired, previous)
        if not before_rows:  # only prompt pieces that are not the last: their caches filled, nothing to sample
            return logits
        row_of = {chunk.slot: row for row, chunk in enumerate(rows)}
        device = logits.device
        index = to_device([row_of[c.slot] for c in before_rows], torch.long, device)
        alpha = to_device([self._slots[c.slot].request.params.contrast_alpha for c in before_rows],
                          logits.dtype, device)[:, None]
        after = logits[index]
        logits[index] = after + alpha * (after - before.to(logits.dtype))
        return logits

    def _emit(self, sequence: Sequence, token: int) -> StepOutput:
        sequence.generated.append(token)
        stopped = token in sequence.stop_token_ids
        text = sequence.detokenizer.add(token, visible=not stopped)
        reason: FinishReason | None = None
        if stopped or sequence.detokenizer.stopped_by is not None:
            reason = "stop"
        elif len(sequence.generated) >= sequence.request.params.max_new_tokens:
            reason = "length"
        if reason is None:
            return self._output(sequence, [token], text)
        return self._finish(sequence, reason, [token], text)

    def _finish(self, sequence: Sequence, reason: FinishReason, new_tokens: list[int], text: str = "",
                error: BatchdError | None = None, score: ScoreOutput | None = None) -> StepOutput:
        """End a request now and free its slot for the next one."""
        text += sequence.detokenizer.flush()
        sequence.status, sequence.finish_reason = Status.FINISHED, reason
        if sequence.slot >= 0:
            if self._reuse_prefixes and error is None:
                # What the slot's cache now holds (or will, once the steps queued for this
                # request have run, which come before any step of the next owner).
                held = (sequence.request.prompt_token_ids + sequence.generated)[:sequence.num_cached]
                self._cached[sequence.slot] = (held, sequence.request.params.contrast_alpha is not None)
            self._slots[sequence.slot] = None
            self._runner.release(sequence.slot)
            if self._contrast_runner is not None:
                self._contrast_runner.release(sequence.slot)
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        del self._by_id[sequence.request_id]
        del self._generators[sequence.request_id]
        output = self._output(sequence, new_tokens, text)
        output.finish_reason, output.error, output.score = reason, error, score
        return output

    @staticmethod
    def _output(sequence: Sequence, new_tokens: list[int], text: str) -> StepOutput:
        return StepOutput(sequence.request_id, new_tokens, text, prompt_tokens=sequence.prompt_len,
                          completion_tokens=len(sequence.generated))


@dataclass
class _Launched:
    """A queued step: the sequences its rows belong to and their sampled tokens."""

    sequences: list[Sequence]
    tokens: torch.Tensor  # on the device, for the next step's inputs
    host: torch.Tensor  # the same tokens, copied to pinned memory as soon as they exist
    ready: torch.cuda.Event | None
    scored: list[Sequence]  # scoring requests whose last rows this step computes

    @classmethod
    def queue(cls, sequences: list[Sequence], tokens: torch.Tensor, scored: list[Sequence]) -> _Launched:
        if tokens.device.type != "cuda":
            return cls(sequences, tokens, tokens, None, scored)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(sequences, tokens, host, ready, scored)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def _common_prefix(held: list[int], tokens: list[int], limit: int) -> int:
    """How many leading tokens two lists share, at most limit."""
    length = min(len(held), len(tokens), limit)
    for index in range(length):
        if held[index] != tokens[index]:
            return index
    return length


def _slot_context(config: Any, slots: int, max_context: int | None, kv_memory: int | None,
                  bytes_per_token: int, allocated_length) -> int:
    """Tokens a slot holds; allocated_length(context) is what the runner really allocates
    for it (flex attention rounds up to whole blocks), which must fit kv_memory."""
    model_context = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    context = min(max_context or (model_context if kv_memory else DEFAULT_MAX_CONTEXT), model_context)
    if kv_memory is not None:
        affordable = kv_memory // (slots * bytes_per_token)
        low, high = 0, context  # the longest context whose allocation fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if allocated_length(middle) <= affordable else (low, middle - 1)
        context = low
        if context < 1:
            per_slot = allocated_length(1) * bytes_per_token
            raise ValueError(f"kv_memory of {kv_memory} bytes cannot hold a cache for each of {slots} slots "
                             f"(at least {per_slot} bytes each); raise kv_memory or lower slots")
    return context


def _check_pair(after: LoadedModel, before: LoadedModel) -> None:
    """A contrast pair must read and write the same tokens (a model before and after fine-tuning)."""
    sizes = (after.model.config.vocab_size, before.model.config.vocab_size)
    if sizes[0] != sizes[1] or len(after.tokenizer) != len(before.tokenizer):
        raise ValueError(f"--contrast-model {before.name} does not share the tokenizer of --model {after.name} "
                         f"(vocabulary {sizes[1]} vs {sizes[0]}); a contrast pair is one model before and after "
                         "fine-tuning")
    if after.tokenizer.get_vocab() != before.tokenizer.get_vocab():
        raise ValueError(f"--contrast-model {before.name} maps tokens differently from --model {after.name}; "
                         "a contrast pair must share one tokenizer")
    params = [next(m.model.parameters()) for m in (after, before)]
    if params[0].device != params[1].device or params[0].dtype != params[1].dtype:
        raise ValueError("both models of a contrast pair must be on one device with one dtype")


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def build_engine(model: str, *, slots: int = 16, max_context: int | None = None, kv_memory: int | None = None,
                 max_prefill_tokens: int = 2048, dtype: str | None = None, device: str | None = None,
                 clock: Clock = time.time, attention: str | None = None, cuda_graph: bool | None = None,
                 compile_decode: bool | None = None, contrast_model: str | None = None,
                 quantize: str | None = None, overlap: bool | None = None,
                 cuda_graph_sizes: tuple[int, ...] | None = None) -> HFEngine:
    """Load `model` (checkpoint folder, .gguf file or alias) and start an engine on it.

    contrast_model: the "before" model that contrast_alpha requests decode against.
    quantize: "int8" for weight-only int8 linear layers (both models of a pair).
    attention ("sdpa" | "flex"), cuda_graph, compile_decode and overlap default to what
    suits the device: sdpa on CPU; flex, decode CUDA graphs, compiled layers and one
    step in flight on CUDA. cuda_graph_sizes: the decode graphs' numbers of requests
    (default: powers of two from 8 and all slots, each kept only if it replays faster
    than the graph over every slot).
    """
    loaded = load_model(model, dtype=dtype, device=device, quantize=quantize)
    contrast = load_model(contrast_model, dtype=dtype, device=device, quantize=quantize) if contrast_model else None
    return HFEngine(loaded, slots=slots, max_context=max_context, kv_memory=kv_memory,
                    max_prefill_tokens=max_prefill_tokens, clock=clock, attention=attention, cuda_graph=cuda_graph,
                    compile_decode=compile_decode, contrast=contrast, overlap=overlap,
                    cuda_graph_sizes=cuda_graph_sizes)

"""The hf engine: continuous batching over a paged KV cache with shared prefix blocks.

One step reads top to bottom: finish what was cancelled or ran out of time
(its blocks are free at once), let the scheduler decide the step (decode rows,
prompt pieces under the budget, admissions by free blocks, preemptions;
workers/hf/scheduler.py), run its chunks in one forward pass, sample each row
with its own request's parameters, and finish what stopped.

On a GPU the engine keeps one step in flight: it queues step N+1 (whose decode
tokens are step N's samples, read on the device) before it reads step N's
tokens back and does the host's share of N (detokenising, stop checks,
streaming), so the GPU is not idle while the host works. A request that step N
stops still had its row in N+1; that token is dropped and its blocks are free
from the step after.

With a contrast model (`--contrast-model`, the "before" of a fine-tune), a
second runner keeps its own pool with the same blocks; requests that ask for
contrast_alpha run their chunks through both models in the same step and are
sampled from logits_after + alpha * (logits_after - logits_before).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from batchd.client.errors import BatchdError, InvalidRequest, PinLimitReached
from batchd.client.protocol import FinishReason, Request, TokenLogprob, TopLogprob

from ..engine import Clock, EngineBase, EngineRequest, ScoreItem, ScoreOutput, StepOutput
from ..validation import check_context, check_contrast, check_vocabulary
from .blocks import ROOT, Block, BlockManager
from .detokenizer import Detokenizer
from .graphs import mixed_graph_sizes
from .kv_cache import CPU_BLOCK_SIZE, GPU_BLOCK_SIZE, kv_bytes_per_token, to_device
from .kv_cache import kv_dtype as kv_storage_dtype
from .models import LoadedModel, load_model, tokenize
from .runner import Chunk, GenericRunner, PagedRunner, supports_fast_path
from .scoring import Scorer, rows_answer
from .sampler import Sampler
from .scheduler import Scheduler, StepPlan
from .sequence import Sequence, Status

log = logging.getLogger("batchd.engine.hf")

# Without a memory budget on a CPU, the pool holds this many tokens per slot (or the model's
# context if less), and a request at most that many.
DEFAULT_MAX_CONTEXT = 4096
# On a GPU with no --kv-memory, the pool takes the device's free memory after the weights
# less this share of its total: activations, the logits, CUDA graphs and the compiler's
# workspace live there (vLLM's default leaves the same 10%).
GPU_HEADROOM = 0.10
DEFAULT_PREFILL_TOKENS = {"cpu": 2048, "cuda": 512}
# While a backlog of prompts waits, a step may carry up to this many times the base budget
# (workers/hf/scheduler.py, step_budget). On an H200 a 0.6B-shape step with 255 requests
# decoding and 2,048 prompt tokens stays under twice a decode step, and a burst's prompts
# are admitted in a quarter of the steps (docs/performance.md).
BURST_FACTOR = {"cpu": 1, "cuda": 4}
# Pinned prefixes may hold at most this share of the pool unless --max-pinned-blocks says
# otherwise: the rest stays for the requests themselves.
PINNED_SHARE = 0.25
# Ids of the engine's own sequences: a request's rows ("<id>#<row>") and pins' prefills
# ("#pin:<handle>"). '#' is never in a wire request id (protocol.RequestId).
ROW_MARK = "#"
PIN_PREFILL = "#pin:"


class HFEngine(EngineBase):
    name = "hf"

    def __init__(self, loaded: LoadedModel, *, slots: int = 16, max_context: int | None = None,
                 kv_memory: int | None = None, max_prefill_tokens: int | None = None,
                 burst_prefill_tokens: int | None = None, block_size: int | None = None, clock: Clock = time.time, seed: int | None = None, attention: str | None = None,
                 cuda_graph: bool | None = None, compile_decode: bool | None = None,
                 contrast: LoadedModel | None = None, overlap: bool | None = None,
                 cuda_graph_sizes: tuple[int, ...] | None = None, kv_layout: str = "head",
                 kv_dtype: str | None = None, max_pinned_blocks: int | None = None):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if contrast is not None:
            _check_pair(loaded, contrast)
        self.model_name = loaded.name
        self.contrast_model_name = contrast.name if contrast is not None else ""
        self.total_slots = slots
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self._config = loaded.model.config
        self._clock = clock
        dtype = next(loaded.model.parameters()).dtype
        device = next(loaded.model.parameters()).device
        attention = attention or ("flex" if device.type == "cuda" else "sdpa")
        models = [loaded.model] + ([contrast.model] if contrast is not None else [])
        fast = all(supports_fast_path(model) for model in models)
        block_size = block_size or (GPU_BLOCK_SIZE if attention == "flex" else CPU_BLOCK_SIZE)
        storage = kv_storage_dtype(kv_dtype)
        if storage is not None:
            _check_fp8_kv(fast, attention, device)
        # Both pools come out of one budget: a contrast request holds the same blocks in each.
        bytes_per_token = sum(kv_bytes_per_token(model.config, storage or dtype) for model in models)
        elements = max(kv_bytes_per_token(m.config, dtype) // (2 * m.config.num_hidden_layers * dtype.itemsize)
                       for m in models)
        self.max_context, num_blocks = _size_pool(self._config, slots, max_context, kv_memory, block_size,
                                                  bytes_per_token, device, elements)

        max_prefill_tokens = max_prefill_tokens or DEFAULT_PREFILL_TOKENS.get(device.type, 2048)
        burst_prefill_tokens = burst_prefill_tokens or max_prefill_tokens * BURST_FACTOR.get(device.type, 1)
        if burst_prefill_tokens < max_prefill_tokens:
            raise ValueError(f"burst_prefill_tokens ({burst_prefill_tokens}) must be at least "
                             f"max_prefill_tokens ({max_prefill_tokens})")

        def runner(model):
            if fast:
                return PagedRunner(model, slots, num_blocks, block_size, self.max_context, attention, cuda_graph,
                                   compile_decode, cuda_graph_sizes, kv_layout,
                                   mixed_graph_sizes(max_prefill_tokens, burst_prefill_tokens), storage)
            return GenericRunner(model, slots, self.max_context)

        self._runner = runner(loaded.model)
        self._contrast_runner = runner(contrast.model) if contrast is not None else None
        self.capabilities = self._runner.capabilities
        self._sampler = Sampler(self._runner.device, seed)
        # Overlap pays where kernels run asynchronously (CUDA); on a CPU each op runs in
        # the calling thread, so it is off there by default (tests turn it on to check it).
        if overlap is None:
            overlap = self._runner.device.type == "cuda"
        self.overlap = overlap and self.capabilities.overlap
        self._in_flight: _Launched | None = None
        # Scoring requests join the steps as prefill-only rows where the runner can return
        # several rows of logits per chunk; else they go to the Scorer.
        self.scores_in_steps = self.capabilities.multi_row_logits
        self._blocks = BlockManager(num_blocks, block_size, prefix_caching=self.capabilities.prefix_caching)
        self._scheduler = Scheduler(self._blocks, slots, max_prefill_tokens,
                                    burst_prefill_tokens=burst_prefill_tokens)
        self.max_pinned_blocks = (int(PINNED_SHARE * self._blocks.capacity) if max_pinned_blocks is None
                                  else max_pinned_blocks)
        self._pins: dict[str, _Pin] = {}
        self._row_groups: dict[str, _Rows] = {}
        # Seconds spent blocked on the device reading tokens back: near the step time when
        # the GPU is the bottleneck, near zero when the host is (batchd:engine_device_wait_seconds_total).
        self.device_wait_s = 0.0
        self._eos_ids = _eos_ids(loaded.model, loaded.tokenizer)
        self._by_id: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._to_cancel: dict[str, FinishReason] = {}
        # (deadline, order, sequence) of requests with a deadline, earliest first: a step looks
        # at every request only when one is cancelled or the earliest deadline has passed.
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._deadline_order = itertools.count()
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self._scorer = Scorer(loaded.model, loaded.tokenizer, self.max_context, pad_id)
        self.kv_dtype = str(storage or dtype).removeprefix("torch.")
        log.info("hf engine: model=%s contrast_model=%s path=%s slots=%d max_context=%d kv_cache=%.1f MiB of %s "
                 "(%d blocks of %d tokens, %d tokens) max_prefill_tokens=%d burst_prefill_tokens=%d device=%s dtype=%s "
                 "weights=%s overlap=%s max_pinned_blocks=%d",
                 self.model_name, self.contrast_model_name or "-",
                 f"paged/{self._runner.attention}" if fast else "generic", slots, self.max_context,
                 self.kv_cache_bytes / 2**20, self.kv_dtype, self._blocks.capacity, block_size, self._blocks.capacity * block_size,
                 max_prefill_tokens, burst_prefill_tokens, self._runner.device, dtype, loaded.weights, self.overlap,
                 self.max_pinned_blocks)

    # -- the Engine protocol ------------------------------------------------------

    def served_tokenizer(self) -> Any:
        return self.tokenizer

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
        beside generate requests, reading any cached prefix in place, and finishes with
        the log-probabilities asked for. Needs scores_in_steps."""
        if item.rows is not None:
            self._add_rows(request, item)
            return
        tokens = list(item.prompt_token_ids) + list(item.continuation_token_ids or ())
        check_context(request.request_id, self.max_context, len(item.prompt_token_ids),
                      continuation_tokens=len(item.continuation_token_ids or ()))
        request = EngineRequest(request.request_id, tokens, request.params, request.deadline, request.arrival_time)
        self._enqueue(Sequence(request, Detokenizer(self.tokenizer, [], ()), frozenset(), score=item), None)

    def _add_rows(self, request: EngineRequest, item: ScoreItem) -> None:
        """A request of many next-token questions: one sequence per row, sharing the prompt's
        blocks, answered together once every row is (_gather)."""
        request_id = request.request_id
        if request_id in self._row_groups:
            raise InvalidRequest(f"request {request_id!r} is already running on this engine", request_id)
        questions = item.questions()
        for question in questions:
            check_context(request_id, self.max_context, len(question.prompt_token_ids))
        for row, question in enumerate(questions):
            self.add_score(EngineRequest(f"{request_id}{ROW_MARK}{row}", question.prompt_token_ids, request.params,
                                         request.deadline, request.arrival_time), question)
        self._row_groups[request_id] = _Rows(len(questions))

    def _enqueue(self, sequence: Sequence, generator: torch.Generator | None) -> None:
        request_id = sequence.request_id
        if request_id in self._by_id:
            raise InvalidRequest(f"request {request_id!r} is already running on this engine", request_id)
        self._generators[request_id] = generator
        self._by_id[request_id] = sequence
        if sequence.request.deadline is not None:
            heapq.heappush(self._deadlines, (sequence.request.deadline, next(self._deadline_order), sequence))
        self._scheduler.add(sequence)

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        if request_id in self._by_id:
            self._to_cancel[request_id] = reason
        group = self._row_groups.get(request_id)
        for row in range(group.count if group is not None else 0):
            self.cancel(f"{request_id}{ROW_MARK}{row}", reason)

    # -- pinned prefixes ---------------------------------------------------------------

    def pin(self, handle: str, token_ids: list[int]) -> None:
        """Keep the full blocks of this prefix resident until unpin: computed by a prefill of
        the engine's own if the cache lacks them, then held (BlockManager.hold_prefix)."""
        if handle in self._pins or not self.scores_in_steps:
            return  # a runner without a paged cache has no blocks to keep
        wanted = len(token_ids) // self._blocks.block_size
        planned = sum(pin.planned for pin in self._pins.values())
        if planned + wanted > self.max_pinned_blocks:
            raise PinLimitReached(f"pinning {len(token_ids)} tokens takes {wanted} KV blocks; this worker keeps "
                                  f"{planned} pinned of at most {self.max_pinned_blocks} (--max-pinned-blocks): "
                                  "unpin a prefix you no longer need, or send this one in full")
        if wanted:
            prefill = EngineRequest(PIN_PREFILL + handle, list(token_ids))
            self.add_score(prefill, ScoreItem(list(token_ids), None, top_k=1))
        self._pins[handle] = _Pin(list(token_ids), wanted)

    def unpin(self, handle: str) -> None:
        pin = self._pins.pop(handle, None)
        if pin is not None:
            self._blocks.let_go(pin.blocks)
            self.cancel(PIN_PREFILL + handle)

    @property
    def pinned_blocks(self) -> int:
        return sum(len(pin.blocks) for pin in self._pins.values())

    def step(self) -> list[StepOutput]:
        return self._gather(self._step())

    def _gather(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """The outputs of the engine's own sequences turned into what the caller asked for: a
        request's rows into one answer (or its first failure), a pin's prefill into held blocks."""
        if not self._row_groups and not self._pins:
            return outputs
        kept = []
        for output in outputs:
            owner, mark, row = output.request_id.partition(ROW_MARK)
            if not mark:
                kept.append(output)
            elif not owner:
                self._hold_pinned(output.request_id[len(PIN_PREFILL):], output)
            elif owner in self._row_groups:
                kept += self._gather_row(owner, int(row), output)
        return kept

    def _gather_row(self, owner: str, row: int, output: StepOutput) -> list[StepOutput]:
        group = self._row_groups[owner]
        if output.score is None:  # cancelled, expired or failed: the request ends so, its other rows too
            del self._row_groups[owner]
            for other in range(group.count):
                self.cancel(f"{owner}{ROW_MARK}{other}", output.finish_reason or "cancelled")
            output.request_id = owner
            return [output]
        group.answers[row] = output.score
        group.prompt_tokens += output.prompt_tokens
        if len(group.answers) < group.count:
            return []
        del self._row_groups[owner]
        answer = rows_answer([group.answers[r] for r in range(group.count)])
        return [StepOutput(owner, [], finish_reason="stop", prompt_tokens=group.prompt_tokens, score=answer)]

    def _hold_pinned(self, handle: str, output: StepOutput) -> None:
        pin = self._pins.get(handle)
        if pin is None or pin.blocks:
            return
        if output.score is None:
            log.warning("pinned prefix %s could not be computed (%s); it stays pinned by handle only",
                        handle[:8], output.error.message if output.error else output.finish_reason)
            return
        pin.blocks = self._blocks.hold_prefix(pin.token_ids, ROOT)

    def _step(self) -> list[StepOutput]:
        outputs = self._finish_cancelled_and_expired()
        plan = self._scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if plan.chunks:
            launched, failed = self._launch(plan, previous)
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
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - self.num_running - self.num_waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Share of the pool's blocks held by requests (cached prefixes nobody holds count as free)."""
        return self._blocks.num_used / self._blocks.capacity

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV pools, allocated at start."""
        return sum(r.cache_bytes for r in (self._runner, self._contrast_runner) if r is not None)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the pool holds: what all live requests together may hold."""
        return self._blocks.capacity * self._blocks.block_size

    @property
    def num_prefilling(self) -> int:
        """Running requests still computing their prompt."""
        return sum(s.prefilling for s in self._scheduler.running)

    @property
    def max_prefill_tokens(self) -> int:
        return self._scheduler.max_prefill_tokens

    @property
    def burst_prefill_tokens(self) -> int:
        return self._scheduler.burst_prefill_tokens

    @property
    def cuda_graph_sizes(self) -> list[int]:
        """Decode steps' numbers of rows that replay a CUDA graph (empty: none)."""
        graphs = getattr(self._runner, "graphs", None)
        return graphs.sizes if graphs is not None else []

    def use_cuda_graph_sizes(self, sizes: list[int]) -> None:
        """Replay only some of the captured graphs (benchmarks compare sets on one engine)."""
        self._runner.graphs.use(sizes)

    def stats(self) -> dict[str, int]:
        """Monotonic counts for the worker's metrics, in vLLM's meanings."""
        counts = self._scheduler.stats
        return {"num_preemptions": counts.preemptions, "prefix_cache_queries": counts.prefix_cache_queries,
                "prefix_cache_hits": counts.prefix_cache_hits, "prompt_tokens_computed": counts.prompt_tokens_computed}

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix that no request holds (vLLM's reset_prefix_cache)."""
        self._scheduler.reset_prefix_cache()

    # -- one step, in order ----------------------------------------------------------

    def _check_fits(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt has no tokens", request.request_id)
        check_vocabulary(prompt, self._config.vocab_size, request.request_id)
        check_context(request.request_id, self.max_context, len(prompt), request.params.max_new_tokens)

    def _finish_cancelled_and_expired(self) -> list[StepOutput]:
        now = self._clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].status is Status.FINISHED:
            heapq.heappop(deadlines)
        if not self._to_cancel and not (deadlines and now >= deadlines[0][0]):
            return []  # the common step: no request to look at (a loop over 256 would be ~3% of its host work)
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

    def _launch(self, plan: StepPlan, previous: _Launched | None) -> tuple[_Launched | None, list[StepOutput]]:
        """Queue one step (copies, forward pass, sampling) without waiting for it."""
        earlier = previous.tokens if previous is not None else None
        sequence_of = {id(chunk): sequence for chunk, sequence in zip(plan.chunks, plan.sequences)}
        try:
            if plan.copies:
                copies = [(c.source.id, c.target.id, c.length) for c in plan.copies]
                for runner in (self._runner, self._contrast_runner):
                    if runner is not None:
                        runner.copy_blocks(copies)
            logits, rows = self._runner.forward(plan.chunks, earlier)
            sequences = [sequence_of[id(chunk)] for chunk in rows]
            if self._contrast_runner is not None:
                logits = self._contrast(plan, sequence_of, rows, logits, earlier)
            if any(s.score is not None for s in sequences):
                logits, sequences = self._take_scores(logits, rows, sequences)
            tokens = self._sampler.sample(logits, [s.request.params for s in sequences],
                                          [self._generators[s.request_id] for s in sequences])
            logprobs = _SampledLogprobs.take(logits, tokens, sequences)
        except Exception as exc:  # one bad step must not take the worker down
            return None, self._fail(plan.sequences, exc)
        self._scheduler.launched(plan)
        # A scoring request whose last rows this step computes ends when it is read back.
        scored = [s for s in plan.sequences if s.score is not None and not s.prefilling]
        for row, sequence in enumerate(sequences):
            sequence.in_flight += 1
            sequence.in_flight_row = row
        return _Launched.queue(sequences, tokens, scored, logprobs), []

    def _take_scores(self, logits: torch.Tensor, rows: list[Chunk], sequences: list[Sequence]):
        """Keep the scoring rows' log-probabilities, reduced on the device to what each request
        asked for, in one tensor per kind of answer, each copied back once; returns the logits
        and sequences left to sample."""
        device = logits.device
        scoring = [i for i, s in enumerate(sequences) if s.score is not None]
        logprobs = torch.log_softmax(logits.index_select(0, to_device(scoring, torch.long, device)), dim=-1)
        continued, by_k, full = [], {}, []  # (row in logprobs, sequence[, wanted token])
        seen: dict[int, int] = {}  # a chunk's rows come one after another, in offset order
        for at, row in enumerate(scoring):
            chunk, sequence = rows[row], sequences[row]
            item = sequence.score
            if item.continuation_token_ids:
                nth = seen[id(chunk)] = seen.get(id(chunk), -1) + 1
                offset = chunk.logit_rows()[nth]
                continued.append((at, sequence, sequence.token_ids[chunk.start + offset + 1]))
            elif item.top_k is not None:
                by_k.setdefault(min(item.top_k, logprobs.shape[-1]), []).append((at, sequence))
            else:
                full.append((at, sequence))
        if continued:
            index = to_device([at for at, _, _ in continued] + [t for _, _, t in continued], torch.long, device)
            values = _HostRows(logprobs[index[:len(continued)], index[len(continued):]])
            for place, (_, sequence, _) in enumerate(continued):
                sequence.score_parts.append((values, place))
        for k, group in by_k.items():
            picked = logprobs.index_select(0, to_device([at for at, _ in group], torch.long, device))
            top = torch.topk(picked, k)
            values, indices = _HostRows(top.values), _HostRows(top.indices)
            for place, (_, sequence) in enumerate(group):
                sequence.score_parts.append((values, indices, place))
        if full:
            vectors = _to_host(logprobs.index_select(0, to_device([at for at, _ in full], torch.long, device)))
            for place, (_, sequence) in enumerate(full):
                sequence.score_parts.append((vectors, place))
        keep = [i for i, s in enumerate(sequences) if s.score is None]
        if not keep:
            return logits[:0], []
        return logits.index_select(0, to_device(keep, torch.long, device)), [sequences[i] for i in keep]

    @staticmethod
    def _score_output(sequence: Sequence) -> ScoreOutput:
        """The answer from the host copies of its rows (read after the step's event)."""
        item, parts = sequence.score, sequence.score_parts
        if item.continuation_token_ids:
            values = [host.rows()[place] for host, place in parts]
            return ScoreOutput(token_logprobs=values, total_logprob=sum(values))
        if item.top_k is not None:
            values, indices, place = parts[0]
            return ScoreOutput(top_token_ids=indices.rows()[place], top_logprobs=values.rows()[place])
        vectors, place = parts[0]
        return ScoreOutput(next_token_logprobs=vectors[place])

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
        logprobs = launched.logprobs
        for row, (sequence, token) in enumerate(zip(launched.sequences, tokens)):
            sequence.in_flight -= 1
            # Cancelled, expired or stopped while this token was on its way: it is dropped.
            if sequence.status is not Status.FINISHED:
                entry = logprobs.entry(row, token, self.tokenizer, sequence) if logprobs is not None else None
                outputs.append(self._emit(sequence, token, entry))
        for sequence in launched.scored:
            if sequence.status is not Status.FINISHED:
                outputs.append(self._finish(sequence, "stop", [], score=self._score_output(sequence)))
        return outputs

    def _fail(self, sequences: list[Sequence], exc: Exception) -> list[StepOutput]:
        log.error("engine step failed; finishing its %d requests with an error", len(sequences), exc_info=exc)
        error = BatchdError(f"engine step failed: {exc}")
        return [self._finish(sequence, "error", [], error=error) for sequence in sequences
                if sequence.status is not Status.FINISHED]

    @torch.inference_mode()
    def _contrast(self, plan: StepPlan, sequence_of: dict, rows: list[Chunk], logits: torch.Tensor,
                  previous: torch.Tensor | None) -> torch.Tensor:
        """Run the contrast requests' chunks through the before model too, and mix their logits."""
        paired = [c for c in plan.chunks if sequence_of[id(c)].request.params.contrast_alpha is not None]
        if not paired:
            return logits
        before, before_rows = self._contrast_runner.forward(paired, previous)
        if not before_rows:  # only prompt pieces that are not the last: their caches filled, nothing to sample
            return logits
        row_of = {id(chunk): row for row, chunk in enumerate(rows)}
        device = logits.device
        index = to_device([row_of[id(c)] for c in before_rows], torch.long, device)
        alpha = to_device([sequence_of[id(c)].request.params.contrast_alpha for c in before_rows],
                          logits.dtype, device)[:, None]
        after = logits[index]
        logits[index] = after + alpha * (after - before.to(logits.dtype))
        return logits

    def _emit(self, sequence: Sequence, token: int, logprob: TokenLogprob | None = None) -> StepOutput:
        output = self._emit_token(sequence, token)
        if logprob is not None:
            # The text this token added, as streamed: "" for a stop token or the first bytes of a
            # character the next token completes, so a choice's tokens join into its text.
            logprob.token = output.text
            output.logprobs = [logprob]
        return output

    def _emit_token(self, sequence: Sequence, token: int) -> StepOutput:
        sequence.generated.append(token)
        sequence.token_ids.append(token)
        if sequence.status is Status.RUNNING:
            self._scheduler.learn(sequence)
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
        """End a request now and free its blocks for the next ones. Positions a step still
        queued for it writes land in blocks the next owner writes only after that step."""
        text += sequence.detokenizer.flush()
        if sequence.slot >= 0:
            for runner in (self._runner, self._contrast_runner):
                if runner is not None:
                    runner.release(sequence.slot)
        self._scheduler.finish(sequence, keep=error is None)
        sequence.finish_reason = reason
        del self._by_id[sequence.request_id]
        del self._generators[sequence.request_id]
        output = self._output(sequence, new_tokens, text)
        output.finish_reason, output.error, output.score = reason, error, score
        return output

    @staticmethod
    def _output(sequence: Sequence, new_tokens: list[int], text: str) -> StepOutput:
        return StepOutput(sequence.request_id, new_tokens, text, prompt_tokens=sequence.prompt_len,
                          completion_tokens=len(sequence.generated))


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """Start copying a result back to pinned host memory; it is read after the step's event."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


@dataclass
class _Rows:
    """The answers of a request with rows, gathered as its row sequences finish."""

    count: int
    answers: dict = field(default_factory=dict)  # row -> its ScoreOutput
    prompt_tokens: int = 0


@dataclass
class _Pin:
    """A pinned prefix: its tokens, the full blocks it takes, and those held once computed."""

    token_ids: list[int]
    planned: int
    blocks: list[Block] = field(default_factory=list)


class _HostRows:
    """A step's results of one kind, copied back once and turned into lists once: a step
    answers hundreds of scoring calls, and one conversion each cost more than the step."""

    def __init__(self, values: torch.Tensor):
        self._host, self._rows = _to_host(values), None

    def rows(self) -> list:
        if self._rows is None:
            self._rows = self._host.tolist()
        return self._rows


class _SampledLogprobs:
    """The log-probabilities of a step's sampled tokens, for the rows whose requests ask for them
    (SamplingParams.logprobs), and their most likely alternatives: reduced on the device to one
    value and k pairs a row, copied back with the tokens."""

    def __init__(self, place: dict[int, int], own: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
        self._place = place  # row of the step -> row here
        self._own, self._values, self._indices = _HostRows(own), _HostRows(values), _HostRows(indices)

    @classmethod
    def take(cls, logits: torch.Tensor, tokens: torch.Tensor, sequences: list[Sequence]) -> _SampledLogprobs | None:
        wanted = [row for row, s in enumerate(sequences) if s.request.params.logprobs is not None]
        if not wanted:
            return None
        index = to_device(wanted, torch.long, logits.device)
        # The model's own distribution, before temperature, top_k and top_p (vLLM's default).
        logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        own = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
        k = min(max(sequences[row].request.params.logprobs for row in wanted), logprobs.shape[-1])
        top = torch.topk(logprobs, k)
        return cls({row: at for at, row in enumerate(wanted)}, own, top.values, top.indices)

    def entry(self, row: int, token: int, tokenizer: Any, sequence: Sequence) -> TokenLogprob | None:
        """The entry of a step row's token; the alternatives' texts each decoded alone."""
        at = self._place.get(row)
        if at is None:
            return None
        k = sequence.request.params.logprobs
        top = [TopLogprob(token_id, tokenizer.decode([token_id]), value) for token_id, value
               in zip(self._indices.rows()[at][:k], self._values.rows()[at][:k])]
        return TokenLogprob(token, "", self._own.rows()[at], top)  # its text: _emit's


@dataclass
class _Launched:
    """A queued step: the sequences its rows belong to and their sampled tokens."""

    sequences: list[Sequence]
    tokens: torch.Tensor  # on the device, for the next step's inputs
    host: torch.Tensor  # the same tokens, copied to pinned memory as soon as they exist
    ready: torch.cuda.Event | None
    scored: list[Sequence]  # scoring requests whose last rows this step computes
    logprobs: _SampledLogprobs | None = None

    @classmethod
    def queue(cls, sequences: list[Sequence], tokens: torch.Tensor, scored: list[Sequence],
              logprobs: _SampledLogprobs | None = None) -> _Launched:
        if tokens.device.type != "cuda":
            return cls(sequences, tokens, tokens, None, scored, logprobs)
        host = _to_host(tokens)
        ready = torch.cuda.Event()
        ready.record()
        return cls(sequences, tokens, host, ready, scored, logprobs)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def _check_fp8_kv(fast: bool, attention: str, device: torch.device) -> None:
    """Where --kv-dtype fp8 cannot run, why, in words a user can act on."""
    from .quant import fp8_supported

    if not fast:
        raise ValueError("--kv-dtype fp8 needs the paged path (Llama, Qwen2, Qwen3 and Mistral models without "
                         "sliding windows); use --kv-dtype auto for this model")
    if attention == "flex" and device.type != "cuda":
        raise ValueError("--kv-dtype fp8 with flex attention needs a GPU; on a CPU the sdpa path reads it")
    if (refused := fp8_supported(device, "--kv-dtype fp8")) is not None:
        raise ValueError(refused)


def _size_pool(config: Any, slots: int, max_context: int | None, kv_memory: int | None, block_size: int,
               bytes_per_token: int, device: torch.device, elements_per_position: int) -> tuple[int, int]:
    """The longest request (max_context) and the pool's blocks (one of them the scratch block).

    --kv-memory sizes the pool. With none, a GPU's pool takes what the device has left, but no
    more than every slot at max_context (more could only keep cached prefixes of requests gone),
    and a CPU's holds slots x max_context tokens. max_context limits a request and reserves
    nothing. Either way one layer's keys (elements_per_position = kv_heads x head_dim a
    position) stay under 2**31 elements: the attention kernels index them with 32-bit offsets
    (a tiny test model's pool of all free memory went past it)."""
    model_context = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    per_block = block_size * bytes_per_token
    most_blocks = (2**31 - 1) // elements_per_position // block_size
    if kv_memory is None and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        kv_memory = int(free - GPU_HEADROOM * total)
        if kv_memory < 2 * per_block:
            raise ValueError(f"the GPU has {free / 2**30:.1f} GiB free after the weights, too little for a KV cache "
                             f"beside {GPU_HEADROOM:.0%} of its memory for activations; set --kv-memory")
        context = min(max_context or model_context, model_context)
        kv_memory = min(kv_memory, (slots * -(-context // block_size) + 1) * per_block)
    if kv_memory is not None:
        num_blocks = min(kv_memory // per_block, most_blocks)
        if num_blocks < 2:
            raise ValueError(f"kv_memory of {kv_memory} bytes holds less than one block of {block_size} tokens "
                             f"({per_block} bytes); raise kv_memory")
        context = min(max_context or model_context, model_context, (num_blocks - 1) * block_size)
        return context, num_blocks
    context = min(max_context or DEFAULT_MAX_CONTEXT, model_context)
    return context, min(slots * -(-context // block_size) + 1, most_blocks)


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
                 max_prefill_tokens: int | None = None, burst_prefill_tokens: int | None = None,
                 block_size: int | None = None, dtype: str | None = None,
                 device: str | None = None, clock: Clock = time.time, attention: str | None = None,
                 cuda_graph: bool | None = None, compile_decode: bool | None = None,
                 contrast_model: str | None = None, quantize: str | None = None, overlap: bool | None = None,
                 cuda_graph_sizes: tuple[int, ...] | None = None, kv_layout: str = "head",
                 kv_dtype: str | None = None, max_pinned_blocks: int | None = None) -> HFEngine:
    """Load `model` (checkpoint folder, .gguf file or alias) and start an engine on it.

    kv_memory: bytes of the KV pool (default: on a GPU what is left after the weights, less
    10% of the device; on a CPU slots x max_context tokens). max_context: the longest
    prompt + output of one request (default: the model's context). block_size: tokens a
    block holds (128 with flex attention, 16 otherwise). max_prefill_tokens: prompt tokens
    a step computes (512 on a GPU, 2048 on a CPU); burst_prefill_tokens: what a step may
    carry while a backlog of prompts waits (4x that on a GPU; the same on a CPU).
    contrast_model: the "before" model that contrast_alpha requests decode against.
    quantize: "int8" for weight-only int8 linear layers (both models of a pair).
    attention ("sdpa" | "flex"), cuda_graph, compile_decode and overlap default to what
    suits the device: sdpa on CPU; flex, decode CUDA graphs, compiled layers and one
    step in flight on CUDA. cuda_graph_sizes: the decode graphs' numbers of requests
    (default: powers of two from 8 and all slots, each kept only if it replays faster
    than the graph over every slot). kv_layout: the pool's layout, "head" or "token"
    (workers/hf/kv_cache.py). kv_dtype: "auto" (the model's dtype) or "fp8" (float8 e4m3
    with per-layer scales: twice the tokens of bf16 in the same memory). max_pinned_blocks:
    KV blocks pinned prefixes may hold (default: a quarter of the pool).
    """
    loaded = load_model(model, dtype=dtype, device=device, quantize=quantize)
    contrast = load_model(contrast_model, dtype=dtype, device=device, quantize=quantize) if contrast_model else None
    return HFEngine(loaded, slots=slots, max_context=max_context, kv_memory=kv_memory,
                    max_prefill_tokens=max_prefill_tokens, burst_prefill_tokens=burst_prefill_tokens,
                    block_size=block_size, clock=clock, attention=attention,
                    cuda_graph=cuda_graph, compile_decode=compile_decode, contrast=contrast, overlap=overlap,
                    cuda_graph_sizes=cuda_graph_sizes, kv_layout=kv_layout, kv_dtype=kv_dtype,
                    max_pinned_blocks=max_pinned_blocks)

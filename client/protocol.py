"""The wire contract: versioned msgpack messages shared by every batchd process.

Every message is a msgspec Struct encoded as a msgpack map with field names as
keys, so a producer in any language with a msgpack library can speak it
(docs/protocol.md). Decoding validates types and ranges in one pass and rejects
unknown fields: a newer client's parameter must never be silently ignored by an
older worker. `v` is the major version; a reader refuses any other.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from .errors import InvalidRequest, UnsupportedVersion
from .keys import TENANT_PATTERN

PROTOCOL_VERSION = 1

# Size limits protect every process from a single hostile request. A worker
# still checks the prompt against its model's context after tokenising.
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKENS = 262_144
MAX_MESSAGES = 1_024
MAX_NEW_TOKENS = 131_072
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_ID_CHARS = 128
MAX_CONTRAST_ALPHA = 100.0
# Alternatives a generated token's logprobs may list (OpenAI's top_logprobs allows 20).
MAX_TOP_LOGPROBS = 20
# Unix times beyond this (the year 5138) are refused, inf and NaN with them.
MAX_UNIX_TIME_S = 1e11
MAX_MODEL_CHARS = 256
MAX_SERVED_MODELS = 64
# Questions one next_token_logprobs request may carry (`rows`): an SMC step's particles.
MAX_ROWS = 256
# A pin lasts at most a day unless renewed (client.pin with its handle).
MAX_PIN_TTL_S = 86_400

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]
# generate decodes new tokens; the other two score tokens the caller gives in one
# forward pass (prefill only) and finish with "stop" (docs/scoring.md).
# pin / unpin keep a token prefix resident in the workers' KV caches, or let it go
# (docs/integrations.md, "Pinned prefixes"); they decode nothing either.
Task = Literal["generate", "next_token_logprobs", "score", "pin", "unpin"]
# How a full next-token vector travels: little-endian float32 (4 bytes a token), or float16
# on request (2 bytes; log-probabilities above about -65,504 keep 3 significant digits).
LogprobsDtype = Literal["float32", "float16"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled", "deadline", "error")

# An id of a tenant's request starts with its tenant's name and "/" (client/keys.py, tenant_id);
# the schedulers run it only from that tenant's stream, so no other producer can take it.
RequestId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS + 65,
                                pattern=rf"^(?:{TENANT_PATTERN}/)?[A-Za-z0-9._:\-]{{1,{MAX_ID_CHARS}}}$")]


def is_request_id(text: str) -> bool:
    """Whether text is a request id the protocol accepts (the RequestId rule itself)."""
    try:
        msgspec.convert(text, RequestId)
    except msgspec.ValidationError:
        return False
    return True
TokenId = Annotated[int, Meta(ge=0, lt=2**31)]
# What a worker returns for a pinned prefix (Result.pin_handle): 128 random bits, the only way
# to name the prefix, so a producer uses only the pins it made or was handed.
PinHandle = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
ModelName = Annotated[str, Meta(max_length=MAX_MODEL_CHARS)]


class SamplingParams(Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """How to decode one request. temperature 0 means greedy."""

    max_new_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)] = 256
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]], Meta(max_length=MAX_STOP_STRINGS)] = []
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] = []
    ignore_eos: bool = False
    # Each generated token's log-probability under the model (before temperature, top_k and
    # top_p, as vLLM reports them), with this many most likely alternatives: TokenEvent.logprobs
    # and Result.generated_logprobs. None: none.
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Contrastive decoding against the worker's --contrast-model ("before"):
    # logits_after + alpha * (logits_after - logits_before). None: the model alone.
    contrast_alpha: Annotated[float, Meta(ge=-MAX_CONTRAST_ALPHA, le=MAX_CONTRAST_ALPHA)] | None = None


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]


class Request(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One generation request as a producer submits it.

    Exactly one of prompt, messages (rendered with the model's chat template)
    or prompt_token_ids is given.
    """

    v: int
    id: RequestId
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None = None
    params: SamplingParams = SamplingParams()
    # Higher runs first; within one priority, producers share fairly.
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    producer: Annotated[str, Meta(max_length=128)] = ""
    # Absolute unix time in seconds after which the result is useless. Both times are
    # finite and non-negative (NaN compares false with every clock: it never expires).
    deadline: Annotated[float, Meta(ge=0.0, le=MAX_UNIX_TIME_S)] | None = None
    submitted_at: Annotated[float, Meta(ge=0.0, le=MAX_UNIX_TIME_S)] = 0.0
    # How many times a worker already took this request and died; set by schedulers.
    attempt: Annotated[int, Meta(ge=0)] = 0
    task: Task = "generate"
    # score: the tokens after the prompt whose log-probabilities are wanted (ids or text).
    continuation_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None = None
    continuation: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    # next_token_logprobs: the k most likely tokens only; None = the full vector.
    top_logprobs: Annotated[int, Meta(ge=1)] | None = None
    # next_token_logprobs, full vector: its encoding on the wire (docs/integrations.md).
    logprobs_dtype: LogprobsDtype = "float32"
    # SHA-1 (hex) of the secret a cancel must present (docs/protocol.md): only the submitter
    # can cancel. None: anyone who knows the id can (producers that predate it).
    cancel_hash: Annotated[str, Meta(pattern=r"^[0-9a-f]{40}$")] | None = None
    # Key of the tags on this request's token and restart events (seal_event): anyone may
    # PUBLISH on a result channel, but only the submitter and the fleet read request payloads,
    # so a client that sent it drops events without a valid tag (docs/security.md).
    event_key: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")] | None = None
    # The model to answer with, as workers advertise it (Heartbeat.models). "" (and a
    # producer older than routing by model, which never sends it): the fleet's only model.
    model: ModelName = ""
    # The prompt starts with the tokens of this pinned prefix (task pin's handle);
    # prompt_token_ids, if given, follow them. An unknown or expired handle is UnknownPrefix.
    # pin: renew this handle instead of pinning new tokens. unpin: the pin to let go.
    prefix_pin: PinHandle | None = None
    # next_token_logprobs: one question per row, each the prompt followed by the row's tokens
    # (the particles of one SMC step in one request); the result holds one vector per row,
    # or with top_logprobs each row's k pairs, one row after another.
    rows: Annotated[list[Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]],
                    Meta(min_length=1, max_length=MAX_ROWS)] | None = None
    # pin: seconds the prefix stays pinned unless renewed or unpinned first.
    pin_ttl_s: Annotated[int, Meta(ge=1, le=MAX_PIN_TTL_S)] = 600


class Job(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A batch a scheduler hands to one worker."""

    v: int
    job_id: str
    scheduler: str
    created_at: float
    requests: list[Request]


class TopLogprob(Struct, omit_defaults=True):
    """One of the most likely tokens at a position: its id, its text alone, its log-probability."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(Struct, omit_defaults=True):
    """A generated token's log-probability (SamplingParams.logprobs), with the alternatives asked
    for, most likely first. token: the text it added to the output, as streamed ("" for a stop
    token, or for a token whose character the next one completes), so the tokens join into
    the text; an alternative's token is its text decoded alone."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = []


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(Struct, omit_defaults=True):
    """Seconds measured from submitted_at (the producer's clock)."""

    queued_s: float = 0.0
    first_token_s: float | None = None
    total_s: float = 0.0


class ErrorInfo(Struct):
    type: str
    message: str


class Result(Struct, omit_defaults=True):
    request_id: str
    finish_reason: FinishReason
    text: str = ""
    token_ids: list[int] = []
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    error: ErrorInfo | None = None
    worker: str = ""
    attempt: int = 0
    # Scoring results (docs/scoring.md). The full next-token vector travels as
    # little-endian float32 bytes: 4 bytes a token instead of msgpack's 9 per float
    # (float16, 2 bytes, when the request asked for it: logprobs_dtype says which).
    logprobs: bytes | None = None
    logprobs_dtype: LogprobsDtype = "float32"
    top_token_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    token_logprobs: list[float] | None = None
    total_logprob: float | None = None
    # generate with SamplingParams.logprobs: one entry per token of token_ids.
    generated_logprobs: list[TokenLogprob] | None = None
    # pin: the handle requests name as prefix_pin.
    pin_handle: str | None = None
    # seal_final's, when the request carried an event_key: the submitter's proof that this
    # outcome is its own request's, not that of another submission that took the id first.
    tag: bytes = b""


class TokenEvent(Struct, tag="token", omit_defaults=True):
    """New tokens of one request, in order; index is the position of the first."""

    index: int
    token_ids: list[int]
    text: str = ""
    # With SamplingParams.logprobs: one entry per token of token_ids.
    logprobs: list[TokenLogprob] | None = None
    tag: bytes = b""  # seal_event's; empty when the request carries no event_key


class RestartEvent(Struct, tag="restart", omit_defaults=True):
    """The worker running this request died; decoding starts over on another."""

    attempt: int
    reason: str = ""
    tag: bytes = b""


class FinalEvent(Struct, tag="final"):
    result: Result


Event = Union[TokenEvent, RestartEvent, FinalEvent]


class TokenizerInfo(Struct, omit_defaults=True, frozen=True):
    """What a worker advertises of its tokenizer, for callers that tokenise themselves
    (docs/integrations.md). hash: SHA-256 (hex) of the vocabulary (every token and its id,
    added tokens included) and the special token ids (client/tokenizers.py)."""

    hash: str
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


class Heartbeat(Struct, omit_defaults=True):
    """What a worker advertises: who it is and how much it can take now."""

    v: int
    worker_id: str
    model: str
    engine: str
    total_slots: int
    # Engine slots no request holds or waits for: never above total_slots. What
    # operators see as free (`batchd status`, batchd:free_slots).
    free_slots: int
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    # KV blocks held by pinned prefixes (docs/integrations.md, "Pinned prefixes").
    pinned_blocks: int = 0
    # The model contrast_alpha requests decode against; "" when the worker has none.
    contrast_model: str = ""
    # The names requests may give as `model` to be sent here (--served-model-name; default
    # the model's own name). Empty from a worker older than routing by model: [model].
    models: list[str] = []
    # Stream id of the last job this worker read: schedulers subtract what
    # they dispatched after it from can_take.
    last_job_read: str = "0-0"
    lease_ms: int = 5000
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    sent_at: float = 0.0
    # Requests the worker accepts now: free slots plus room in its own prefetch
    # queue, so schedulers may send more than free_slots. None from a worker
    # older than this field, whose free_slots carried this number.
    can_take: int | None = None
    # The tokenizer of the served model; None from an engine without one (echo) or a
    # worker older than this field.
    tokenizer: TokenizerInfo | None = None
    # The worker's --shards: it reads one job stream per shard of its own count, so a
    # scheduler of another count sends it nothing. None from a worker older than this field.
    shards: int | None = None

    def requests_it_can_take(self) -> int:
        return self.free_slots if self.can_take is None else self.can_take


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_job_decoder = msgspec.msgpack.Decoder(Job)
_event_decoder = msgspec.msgpack.Decoder(Event)
_heartbeat_decoder = msgspec.msgpack.Decoder(Heartbeat)
_tokenizer_info_decoder = msgspec.msgpack.Decoder(TokenizerInfo)


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def seal_event(event: TokenEvent | RestartEvent, request: Request) -> bytes:
    """An event as the fleet publishes it: tagged with the request's event_key, if it has one.

    The tag covers the request id and attempt too, so an event copied from another request or
    from an earlier attempt of this one does not verify (EventParser also drops repeats)."""
    if request.event_key is None:
        return encode(event)
    attempt = event.attempt if isinstance(event, RestartEvent) else request.attempt
    tag = event_tag(request.event_key, request.id, attempt, encode(event))
    return encode(msgspec.structs.replace(event, tag=tag))


def seal_final(result: Result, request: Request) -> bytes:
    """The final event of a request, tagged like seal_event (the attempt read "final")."""
    if request.event_key is not None:
        result = msgspec.structs.replace(result, tag=event_tag(request.event_key, request.id, "final", encode(result)))
    return encode(FinalEvent(result))


def event_tag(event_key: str, request_id: str, attempt: int | str, unsigned: bytes) -> bytes:
    """Keyed BLAKE2b (16 bytes) of an event or result encoded without its tag: a MAC by design,
    and a quarter of HMAC-SHA256's cost, which matters since a worker tags every request's
    tokens every step (measured in docs/protocol.md, Events)."""
    message = f"{request_id}\0{attempt}\0".encode() + unsigned
    return hashlib.blake2b(message, key=bytes.fromhex(event_key), digest_size=16).digest()


def is_sealed(event: TokenEvent | RestartEvent | Result, event_key: str, request_id: str, attempt: int | str) -> bool:
    unsigned = encode(msgspec.structs.replace(event, tag=b""))
    return hmac.compare_digest(event.tag, event_tag(event_key, request_id, attempt, unsigned))


class PinnedPrefix(Struct, forbid_unknown_fields=True):
    """A pin as the fleet's registry holds it (Keys.pin(handle), written by the worker that
    pinned it, with the pin's TTL): what a worker that has not seen the handle yet reads."""

    model: str
    prompt_token_ids: list[TokenId]


def _check_version(v: int, what: str) -> None:
    if v != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"{what} has protocol version {v}; this batchd speaks version {PROTOCOL_VERSION}. "
            "Upgrade the older side."
        )


def validate_request(request: Request) -> Request:
    """Checks that types alone cannot express; raises InvalidRequest."""
    _check_version(request.v, "request")
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name) is not None]
    if request.prefix_pin is not None or request.rows is not None or request.task == "unpin":
        _validate_compact(request, given)
    elif len(given) != 1:
        raise InvalidRequest(
            "give exactly one of prompt, messages or prompt_token_ids"
            + (f" (got {', '.join(given)})" if given else " (got none)"),
            request.id,
        )
    if request.messages is not None:
        total = sum(len(m.content) for m in request.messages)
        if total > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"messages hold {total} characters; the limit is {MAX_PROMPT_CHARS}", request.id)
    _validate_task(request)
    return request


def _validate_task(request: Request) -> None:
    if request.task == "pin" and (request.prompt is not None or request.messages is not None):
        raise InvalidRequest("a pin request pins token ids: give prompt_token_ids", request.id)
    continuations = [n for n in ("continuation", "continuation_token_ids") if getattr(request, n) is not None]
    if request.task == "score":
        if len(continuations) != 1:
            raise InvalidRequest("a score request needs exactly one of continuation or continuation_token_ids",
                                 request.id)
    elif continuations:
        raise InvalidRequest(f"{continuations[0]} is only for task 'score', not {request.task!r}", request.id)
    if request.top_logprobs is not None and request.task != "next_token_logprobs":
        raise InvalidRequest(f"top_logprobs is only for task 'next_token_logprobs', not {request.task!r}",
                             request.id)
    if request.logprobs_dtype != "float32" and (request.task != "next_token_logprobs"
                                                or request.top_logprobs is not None):
        raise InvalidRequest("logprobs_dtype is only for the full vector of a next_token_logprobs request "
                             "(no top_logprobs)", request.id)
    if request.task != "generate" and request.params != SamplingParams():
        raise InvalidRequest(f"a {request.task} request decodes nothing: leave the sampling params "
                             "(max_new_tokens, temperature, ...) at their defaults", request.id)


def _validate_compact(request: Request, given: list[str]) -> None:
    """A request on a pinned prefix, with rows, or an unpin: token ids only, the prompt optional."""
    if set(given) - {"prompt_token_ids"}:
        raise InvalidRequest("prefix_pin and rows take token ids: give prompt_token_ids (or nothing), "
                             f"not {given[0]}", request.id)
    if request.rows is not None and request.task != "next_token_logprobs":
        raise InvalidRequest(f"rows are for next_token_logprobs requests, not {request.task!r}", request.id)
    if request.task == "unpin" and (request.prefix_pin is None or given):
        raise InvalidRequest("an unpin request names its pin (prefix_pin) and nothing else", request.id)
    if request.task == "pin" and request.prefix_pin is not None and given:
        raise InvalidRequest("a pin request gives token ids to pin, or a prefix_pin to renew, not both", request.id)


def decode_request(data: bytes, request_id: str | None = None) -> Request:
    """Decode and validate a request; every failure is an InvalidRequest."""
    if len(data) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"request is {len(data)} bytes; the limit is {MAX_REQUEST_BYTES}", request_id)
    try:
        request = _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        version = _peek_version(data)
        if version is not None and version != PROTOCOL_VERSION:
            _check_version(version, "request")
        raise InvalidRequest(f"invalid request: {exc}", request_id) from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: strings that are not UTF-8
        raise InvalidRequest(f"request is not valid msgpack: {exc}", request_id) from None
    except RecursionError:
        raise InvalidRequest("request is nested too deeply to be a request", request_id) from None
    if request_id is not None and request.id != request_id:
        raise InvalidRequest(f"request id {request.id!r} does not match the stream entry's id {request_id!r}", request_id)
    return validate_request(request)


def _peek_version(data: bytes) -> int | None:
    try:
        raw = msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    version = raw.get("v") if isinstance(raw, dict) else None
    return version if isinstance(version, int) else None


def decode_job(data: bytes) -> Job:
    job = _job_decoder.decode(data)
    _check_version(job.v, "job")
    return job


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    beat = _heartbeat_decoder.decode(data)
    _check_version(beat.v, "heartbeat")
    return beat


def decode_tokenizer_info(data: bytes) -> TokenizerInfo:
    return _tokenizer_info_decoder.decode(data)


def models_served(beat: Heartbeat) -> list[str]:
    """The model names a worker answers to (a worker older than routing by model: its model)."""
    return list(beat.models) or [beat.model]


def error_result(request_id: str, error: Exception, finish_reason: FinishReason = "error",
                 submitted_at: float = 0.0, worker: str = "") -> Result:
    """A final result that carries an error instead of text."""
    code = getattr(error, "code", "error")
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    total = time.time() - submitted_at if submitted_at else 0.0
    return Result(
        request_id=request_id,
        finish_reason=finish_reason,
        error=ErrorInfo(type=code, message=message),
        timings=Timings(total_s=total),
        worker=worker,
    )

"""OpenAI's HTTP API in batchd's terms: request bodies in, submit arguments out, results
back as OpenAI's response, chunk and error shapes. Pure (no I/O), so the gateway's
translation is tested without a server; cli/gateway.py does the serving.

Bodies are read with msgspec: types and ranges are checked in one pass, and a field
batchd cannot honour (tools, penalties, echo) is refused with a 400 that names it
rather than silently ignored. Fields the API has that change nothing here (user,
metadata) are accepted and ignored, as vLLM does.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

from batchd.client.errors import (
    BatchdError,
    BrokerUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ResultTimeout,
    UnknownModel,
    WorkerFailed,
)
from batchd.client.protocol import MAX_NEW_TOKENS, MAX_STOP_STRINGS, Result, TokenLogprob

# OpenAI's default when a request gives no max_tokens is "as many as fit"; batchd's
# clients default to 256, and so does the gateway (a request may ask for more).
DEFAULT_MAX_TOKENS = 256
# Choices one request may ask for (n); each is its own batchd request.
MAX_CHOICES = 16
# Seconds the gateway tells a client to wait after a 429 (Overloaded).
RETRY_AFTER_S = 1


class StreamOptions(Struct, omit_defaults=True):
    include_usage: bool = False


class TextPart(Struct):
    type: str
    text: str = ""


class Message(Struct):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: Union[str, list[TextPart], None] = None


class _Common(Struct, kw_only=True):
    """What chat and text completions share."""

    model: Annotated[str, Meta(max_length=256)] = ""
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, Annotated[list[str], Meta(max_length=MAX_STOP_STRINGS)], None] = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # batchd's own, as vLLM has them: top_k sampling and ignoring the end-of-sequence token.
    top_k: Annotated[int, Meta(ge=0)] | None = None
    ignore_eos: bool = False


class BadBody(InvalidRequest):
    """A request body the gateway refuses, naming the parameter at fault (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ChatCompletionRequest(_Common, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of such lists (msgspec reads one
    # list type per union: completion_prompts checks that the items agree).
    prompt: Union[str, list[Union[str, int, list[int]]]]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


def parse_chat(body: bytes) -> ChatCompletionRequest:
    request = _decode(_chat_decoder, body)
    _refuse_unsupported(request)
    if request.tools:
        raise BadBody("tools are not supported by batchd's gateway", param="tools")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise BadBody("response_format: only {'type': 'text'} is supported")
    if request.top_logprobs and not request.logprobs:
        raise BadBody("top_logprobs needs logprobs: true", param="top_logprobs")
    return request


def parse_completion(body: bytes) -> CompletionRequest:
    request = _decode(_completion_decoder, body)
    _refuse_unsupported(request)
    if request.echo:
        raise BadBody("echo is not supported by batchd's gateway")
    if request.suffix:
        raise BadBody("suffix is not supported by batchd's gateway")
    if request.best_of not in (None, 1, request.n):
        raise BadBody("best_of other than n is not supported")
    completion_prompts(request)  # a mixed prompt list is refused here, with the body's other faults
    return request


def logprobs_asked(request: _Common) -> int | None:
    """How many alternatives each generated token's logprob comes with (0: its own only); None:
    no logprobs. Chat: logprobs true and top_logprobs; completions: logprobs."""
    if isinstance(request, ChatCompletionRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def _decode(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadBody(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None


def _refuse_unsupported(request: _Common) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise BadBody(f"{name} is not supported by batchd's gateway (leave it at 0)", param=name)
    if request.logit_bias:
        raise BadBody("logit_bias is not supported by batchd's gateway", param="logit_bias")


def chat_messages(request: ChatCompletionRequest) -> list[dict]:
    """The messages as batchd's protocol carries them (content as text)."""
    messages = []
    for message in request.messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise BadBody("only text content parts are supported")
            content = "".join(part.text for part in content)
        # OpenAI's newer name for system instructions; chat templates know "system".
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content or ""})
    return messages


def completion_prompts(request: CompletionRequest) -> list[dict]:
    """One submit argument (prompt or prompt_token_ids) per prompt in the body."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise BadBody("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise BadBody("prompt: give a string, a list of strings, a list of token ids or a list of such lists",
                  param="prompt")


def sampling(request: _Common, max_tokens: int | None) -> dict:
    """The submit arguments for decoding, in batchd's names."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return dict(max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k or 0,
                seed=request.seed, stop=stop or None, ignore_eos=request.ignore_eos,
                logprobs=logprobs_asked(request))


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n decodes with seed + i, so n seeded choices differ yet each is reproducible."""
    return None if seed is None else (seed + index) % 2**63


# -- responses -------------------------------------------------------------------------
def check_finished(result: Result) -> Result:
    """A result that ended by deadline or cancel has no OpenAI finish_reason: it is an error
    (batchd's clients hand it back as a partial result)."""
    if result.finish_reason == "deadline":
        raise DeadlineExceeded(f"request {result.request_id} reached its deadline after "
                               f"{result.usage.completion_tokens} tokens; give a longer timeout "
                               "(the gateway's --request-timeout)", result.request_id)
    if result.finish_reason == "cancelled":
        raise Cancelled(f"request {result.request_id} was cancelled", result.request_id)
    return result


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(results: list[Result]) -> dict:
    prompt = sum(r.usage.prompt_tokens for r in results[:1])  # every choice shares the prompt
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """A chat choice's logprobs (or a chunk's): choices[].logprobs.content[]."""
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                                          for t in e.top]} for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], alternatives: int, offset: int = 0) -> dict:
    """A completion choice's logprobs (or a chunk's), its text starting at offset in the choice's."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries] if alternatives else None,
            "text_offset": offsets}


def choice_logprobs(chat: bool, result: Result, alternatives: int) -> dict:
    entries = result.generated_logprobs or []
    return chat_logprobs(entries) if chat else completion_logprobs(entries, alternatives)


def chat_completion(response_id: str, model: str, results: list[Result],
                    logprobs: list[dict] | None = None) -> dict:
    return {
        "id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "logprobs": logprobs[i] if logprobs else None, "finish_reason": finish_reason(r)}
                    for i, r in enumerate(results)],
        "usage": usage(results), "system_fingerprint": None,
    }


def text_completion(response_id: str, model: str, results: list[Result],
                    logprobs: list[dict] | None = None) -> dict:
    return {
        "id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": r.text, "logprobs": logprobs[i] if logprobs else None,
                     "finish_reason": finish_reason(r)} for i, r in enumerate(results)],
        "usage": usage(results), "system_fingerprint": None,
    }


class Chunks:
    """The chunks of one streamed response, in the shape of its endpoint."""

    def __init__(self, response_id: str, model: str, chat: bool, alternatives: int | None = None):
        self.response_id = response_id
        self.model = model
        self.chat = chat
        self.created = int(time.time())
        self.alternatives = alternatives  # logprobs_asked: None, no logprobs
        self._offsets: dict[int, int] = {}  # a completion choice's text so far, for text_offset

    def _chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}

    def role(self, index: int) -> dict:
        """A chat stream's first chunk of a choice: the assistant's role, no text yet."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def text(self, index: int, text: str, finish: str | None = None,
             logprobs: list[TokenLogprob] | None = None) -> dict:
        shown = self._logprobs(index, logprobs) if self.alternatives is not None and logprobs else None
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            return self._chunk([{"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish}])
        return self._chunk([{"index": index, "text": text, "logprobs": shown, "finish_reason": finish}])

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict:
        if self.chat:
            return chat_logprobs(entries)
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + sum(len(e.token) for e in entries)
        return completion_logprobs(entries, self.alternatives, offset)

    def usage(self, results: list[Result]) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the usage of them all."""
        return self._chunk([], usage=usage(results))


# -- errors ----------------------------------------------------------------------------
def error_status(error: BaseException) -> int:
    """OpenAI's status code for a batchd error."""
    if isinstance(error, UnknownModel):
        return 404
    if isinstance(error, InvalidRequest):
        return 400
    if isinstance(error, Overloaded):
        return 429
    if isinstance(error, (DeadlineExceeded, ResultTimeout)):
        return 504
    if isinstance(error, WorkerFailed):
        return 502
    if isinstance(error, BrokerUnavailable):
        return 503
    if isinstance(error, Cancelled):
        return 499  # the caller (or someone with its id) cancelled it
    return 500


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                429: "rate_limit_exceeded", 504: "timeout"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_of(error: BaseException) -> tuple[int, dict, dict]:
    """Status, body and headers of the response for an error."""
    status = error_status(error)
    if isinstance(error, BatchdError):
        code = "model_not_found" if isinstance(error, UnknownModel) else error.code
        body = error_body(status, error.message, code, getattr(error, "param", None))
    else:
        body = error_body(status, f"{type(error).__name__}: {error}", "internal_error")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
    return status, body, headers


Endpoint = Literal["chat", "completions"]

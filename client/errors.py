"""The errors a caller can see, each with a message that says what to do.

The same names travel on the wire (`ErrorInfo.type`), so a worker's error
becomes the matching exception in the producer.
"""

from __future__ import annotations


class BatchdError(Exception):
    """Base class of every error batchd raises to a caller."""

    code = "error"

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class InvalidRequest(BatchdError):
    """The request is malformed or its parameters are out of range."""

    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """Prompt plus max_new_tokens do not fit the model's context or the worker's cache."""

    code = "request_too_large"


class UnsupportedVersion(InvalidRequest):
    """The message uses a protocol version this side does not speak."""

    code = "unsupported_version"


class UnknownModel(InvalidRequest):
    """The request names a model no live worker serves (the message lists those served)."""

    code = "unknown_model"


class UnknownPrefix(InvalidRequest):
    """The request names a pinned prefix (prefix_pin) that is not pinned: it expired, was
    unpinned, or belongs to another fleet. Send the whole prefix instead (or pin it again);
    the integrations do so on their own."""

    code = "unknown_prefix"


class PinLimitReached(BatchdError):
    """The worker keeps as many pinned KV blocks as its --max-pinned-blocks allows: unpin a
    prefix you no longer need, or send this one in full."""

    code = "pin_limit"


class TokenizerMismatch(BatchdError):
    """The caller's tokenizer is not the one the workers serve for its model: token ids would
    mean other tokens. Raised by the client, before anything is sent (the message says how
    they differ; client.served_tokenizer(model) gives the right one)."""

    code = "tokenizer_mismatch"


class WrongShards(BatchdError):
    """This client or daemon splits requests into another number of shards than the fleet's
    schedulers (--shards, $BATCHD_SHARDS): its requests would go to streams nobody reads.
    The message names the fleet's count; use it everywhere."""

    code = "wrong_shards"


class Overloaded(BatchdError):
    """The request queue is full (max_queue); retry later with backoff."""

    code = "overloaded"


class DeadlineExceeded(BatchdError):
    """The request's deadline passed before it could finish."""

    code = "deadline_exceeded"


class Cancelled(BatchdError):
    """The request was cancelled by its caller."""

    code = "cancelled"


class WorkerFailed(BatchdError):
    """Workers failed on this request too many times; it is in the dead-letter stream."""

    code = "worker_failed"


class ResultTimeout(BatchdError):
    """No final result arrived within the caller's timeout (the request may still run)."""

    code = "result_timeout"


class BrokerUnavailable(BatchdError):
    """Redis could not be reached, or kept answering an error batchd cannot act on (BUSY,
    LOADING, a key of the wrong type, a missing function), for the whole retry budget
    (docs/reliability.md). Safe to retry: a submit is idempotent by request id."""

    code = "broker_unavailable"


class CannotListen(BatchdError):
    """A daemon or the gateway could not bind the address it was told to serve on (another
    process holds the port, or the address is not this host's); it exits with this one line."""

    code = "cannot_listen"


class NoWorkers(BatchdError):
    """No live worker is registered (reported by status; requests wait in the queue)."""

    code = "no_workers"


_BY_CODE = {
    cls.code: cls
    for cls in (
        BatchdError,
        InvalidRequest,
        RequestTooLarge,
        UnsupportedVersion,
        UnknownModel,
        UnknownPrefix,
        PinLimitReached,
        TokenizerMismatch,
        Overloaded,
        DeadlineExceeded,
        Cancelled,
        WorkerFailed,
        ResultTimeout,
        BrokerUnavailable,
        NoWorkers,
    )
}


# Every error type a result can carry, as the wire spells it.
ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)


def error_from_code(code: str, message: str, request_id: str | None = None) -> BatchdError:
    """Rebuild the exception a remote side reported; unknown codes stay BatchdError."""
    return _BY_CODE.get(code, BatchdError)(message, request_id)

"""Producer-side API of batchd and the wire contract every side shares.

Imports no torch and nothing of the scheduler or workers. Client and
AsyncClient load on first use, so `import batchd.client.protocol` stays cheap.
"""

from .core import Delta, StreamRestarted
from .errors import (
    BatchdError,
    BrokerUnavailable,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    NoWorkers,
    Overloaded,
    PinLimitReached,
    RequestTooLarge,
    ResultTimeout,
    TokenizerMismatch,
    UnknownModel,
    UnknownPrefix,
    UnsupportedVersion,
    WorkerFailed,
    WrongShards,
)
from .protocol import Result, SamplingParams, Timings, Usage

__all__ = [
    "AsyncClient", "BatchdError", "BrokerUnavailable", "Cancelled", "Client", "DeadlineExceeded", "Delta", "InvalidRequest",
    "NextTokenLogprobs", "NextTokenLogprobsRows", "NoWorkers", "Overloaded", "Pin", "PinLimitReached",
    "RequestTooLarge", "Result", "ResultTimeout", "SamplingParams",
    "Score", "StreamRestarted", "Timings", "TokenizerMismatch", "UnknownModel", "UnknownPrefix",
    "UnsupportedVersion", "Usage", "WorkerFailed", "WrongShards",
]


def __getattr__(name):
    if name == "Client":
        from .sync import Client
        return Client
    if name == "AsyncClient":
        from .aio import AsyncClient
        return AsyncClient
    if name in ("NextTokenLogprobs", "NextTokenLogprobsRows", "Pin", "Score"):
        from . import scoring
        return getattr(scoring, name)
    raise AttributeError(name)

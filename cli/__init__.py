"""batchd: a dynamic-batching LLM inference scheduler on a Redis queue broker.

Producer services need only this import; it pulls in no torch:

    from batchd import Client
    with Client("redis://localhost:6379") as client:
        print(client.generate("What is the capital of France?").text)
"""

from batchd.client import (
    AsyncClient,
    BatchdError,
    BrokerUnavailable,
    Cancelled,
    Client,
    DeadlineExceeded,
    Delta,
    InvalidRequest,
    Overloaded,
    PinLimitReached,
    RequestTooLarge,
    Result,
    ResultTimeout,
    StreamRestarted,
    TokenizerMismatch,
    UnknownModel,
    UnknownPrefix,
    WorkerFailed,
    WrongShards,
)

__all__ = [
    "AsyncClient",
    "BatchdError",
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Delta",
    "InvalidRequest",
    "Overloaded",
    "PinLimitReached",
    "RequestTooLarge",
    "Result",
    "ResultTimeout",
    "StreamRestarted",
    "TokenizerMismatch",
    "UnknownModel",
    "UnknownPrefix",
    "WorkerFailed",
    "WrongShards",
]
__version__ = "0.1.0"

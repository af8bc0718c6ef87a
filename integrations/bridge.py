"""One AsyncClient on a thread of its own, usable from any event loop and from none.

Samplers call a language model from whatever loop they run in, and LLaMPPL's and
genlm's examples start a new one per run (`asyncio.run`); an AsyncClient belongs
to the loop that created it. So the backends own one client on a private loop and
hand it coroutines: a caller's loop awaits the answer through a future, a caller
with no loop blocks on it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, TypeVar

from batchd.client.aio import AsyncClient

T = TypeVar("T")


class ClientThread:
    """Owns an AsyncClient, its event loop and the thread that runs the loop."""

    def __init__(self, url: str | None, **client_options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batchd-backend", daemon=True)
        self._thread.start()
        self.client: AsyncClient = self.call(lambda: self._open(url, client_options))

    async def _open(self, url: str | None, options: dict) -> AsyncClient:
        return await AsyncClient(url, **options).__aenter__()

    async def run(self, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
        """work(client) run on the client's loop, awaited from the caller's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work(self.client), self._loop))

    def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """work() run on the client's loop, waited for from a thread with no running loop."""
        return asyncio.run_coroutine_threadsafe(work(), self._loop).result()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self.call(self.client.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

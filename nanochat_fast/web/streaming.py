"""Streaming a reply: its characters from the engine's thread to the asyncio handler (`ReplyStream`),
and from there to the client as Server-Sent Events (`ReplyEventStream`, `sse_event`).
"""

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from starlette.responses import StreamingResponse

from nanochat_fast.engine import Sequence
from nanochat_fast.engine_thread import EngineThread, QueueFull, Request
from nanochat_fast.web import ApiError


class _Finished:
    def __init__(self, reason: str):
        self.reason = reason


class ReplyStream:
    """One reply in the engine, read as batches of text pieces: whatever the engine wrote since the
    reader last looked (one character per piece). The engine thread appends to a deque and wakes the
    event loop once per batch, not once per character, so a fast engine cannot flood the loop.
    Leaving the iteration early cancels the reply, which frees its slot; a streamed response must not
    count on that alone (see ReplyEventStream) and calls `cancel` itself when it ends.

    `start` submits it to the engine (429 when the queue is full); after_finish(finish_reason, state)
    runs in the engine's thread when the reply ends, before the reader hears of it."""

    def __init__(self, engine: EngineThread, texts: list[str], sequence: Sequence,
                 after_finish: Callable[[str, tuple | None], None] | None = None):
        self._engine, self._texts, self._after_finish = engine, texts, after_finish
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._items = deque()  # text pieces, then a _Finished; appended by the engine's thread only
        self._wake_pending = False
        self.finish_reason = None  # "stop", "length", "cancelled" or "error" once it ends
        self.chars = 0
        self.request = Request(sequence, on_token=self._on_token, on_finish=self._on_finish)

    def start(self) -> "ReplyStream":
        try:
            self._engine.submit(self.request)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry shortly", code="queue_full") from None
        return self

    def _deliver(self, item):  # from the engine's thread
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

    def _wake(self):  # on the event loop; cleared before set, so no item goes unannounced
        self._wake_pending = False
        self._arrived.set()

    def _on_token(self, token: int):
        self._deliver(self._texts[token])

    def _on_finish(self, reason: str, state):
        if self._after_finish is not None:
            self._after_finish(reason, state)  # first, so the next message already finds the state
        self._deliver(_Finished(reason))

    def cancel(self):
        """Stop the reply unless it has ended, freeing its slot; does nothing the second time."""
        if self.finish_reason is None:
            self._engine.cancel(self.request)

    async def batches(self) -> AsyncIterator[list[str]]:
        try:
            while True:
                self._arrived.clear()
                batch = []
                while self._items:
                    item = self._items.popleft()
                    if isinstance(item, _Finished):
                        self.finish_reason = item.reason
                        break
                    batch.append(item)
                if batch:
                    self.chars += len(batch)
                    yield batch
                if self.finish_reason is not None:
                    return
                if not self._items:
                    await self._arrived.wait()
        finally:
            self.cancel()


def sse_event(data) -> str:
    """One Server-Sent Event carrying data (JSON-encoded unless already a string)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the stream back


class ReplyEventStream(StreamingResponse):
    """The Server-Sent Events of one reply (events: an async generator reading `reply.batches()`).
    However the response ends (written out, failed, or the client gone) the reply is cancelled,
    which does nothing once it has ended, and events is closed, before the handler returns.

    Needed because Starlette does not close the body iterator it leaves early. It notices a client
    that went away in a second task and cancels the one sending the body: cancelled inside
    `await send(...)` (the next chunk on its way, which is often) rather than inside the generator,
    it drops the generator unclosed, and a generator left suspended runs its `finally` only when
    garbage collected. Held in a reference cycle it waits for a full collection, seconds or never,
    and meanwhile the reply keeps writing for nobody and holds its slot; one dropped before its
    first `batches()` step would never run that `finally` at all."""

    def __init__(self, events: AsyncGenerator[str, None], reply: ReplyStream):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.reply = reply

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.cancel()  # first, and synchronous: the slot frees even if closing is interrupted
            await self.body_iterator.aclose()

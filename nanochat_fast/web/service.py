"""What the HTTP endpoints share: the model (loaded in the background), the batching engine, the
conversation cache, and `ReplyStream`, which hands a reply's characters from the engine's thread to
the asyncio handler that streams them.
"""

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import torch
from starlette.responses import StreamingResponse

from nanochat_fast.checkpoint import Checkpoint
from nanochat_fast.generation import SamplingConfig, token_texts
from nanochat_fast.web.batching_engine import BatchingEngine, QueueFull, Reply
from nanochat_fast.web.conversations import ConversationCache
from nanochat_fast.web.settings import ApiError, ServerSettings

log = logging.getLogger(__name__)


class _Finished:
    def __init__(self, reason: str):
        self.reason = reason


class ReplyStream:
    """One reply in the engine, read as batches of text pieces: whatever the engine wrote since the
    reader last looked (one character per piece). The engine thread appends to a deque and wakes the
    event loop once per batch, not once per character, so a fast engine cannot flood the loop.
    Leaving the iteration early cancels the reply, which frees its slot; a streamed response must not
    count on that alone (see ReplyEventStream) and calls `cancel` itself when it ends."""

    def __init__(self, engine: BatchingEngine, texts: list[str], reply_args: dict,
                 after_finish: Callable[[str, tuple | None], None] | None):
        self._engine, self._texts, self._after_finish = engine, texts, after_finish
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._items = deque()  # text pieces, then a _Finished; appended by the engine's thread only
        self._wake_pending = False
        self.finish_reason = None  # "stop", "length", "cancelled" or "error" once it ends
        self.chars = 0
        self.reply = Reply(**reply_args, on_token=self._on_token, on_finish=self._on_finish)

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
            self._engine.cancel(self.reply)

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


class ChatService:
    """The model behind the endpoints. `load` runs in a background thread; until it is done (or if it
    failed) every model endpoint answers 503."""

    def __init__(self, load: Callable[[], Checkpoint], settings: ServerSettings):
        self._load = load
        self.settings = settings
        self.conversations = ConversationCache(settings.max_conversations)
        self.checkpoint: Checkpoint | None = None
        self.engine: BatchingEngine | None = None  # set last: the service is ready once it is
        self.texts: list[str] = []
        self.load_error: str | None = None

    def start_loading(self):
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()

    def _load_model(self):
        try:
            checkpoint = self._load()
            engine = BatchingEngine(checkpoint.model, checkpoint.tokenizer.end_id,
                                    self.settings.max_concurrent, self.settings.max_queue, self.settings.threads)
            engine.start()
        except Exception as error:  # any failure must reach /health, not die silently in this thread
            log.exception("loading the model failed")
            self.load_error = f"{type(error).__name__}: {error}"
            return
        self.checkpoint, self.texts = checkpoint, token_texts(checkpoint.tokenizer)
        self.engine = engine
        log.info("model loaded from %s", checkpoint.directory)

    def stop(self):
        if self.engine is not None:
            self.engine.stop()

    def require_ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; try again in a moment", code="model_loading")

    def new_generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.engine.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def start_reply(self, prompt_ids: torch.Tensor, sampling: SamplingConfig, max_new_chars: int,
                    state=None, generator: torch.Generator | None = None,
                    after_finish: Callable[[str, tuple | None], None] | None = None) -> ReplyStream:
        """Queue a reply in the engine; 429 when the queue is full."""
        stream = ReplyStream(self.engine, self.texts,
                             dict(prompt_ids=prompt_ids, sampling=sampling, max_new_tokens=max_new_chars,
                                  state=state, generator=generator), after_finish)
        try:
            self.engine.submit(stream.reply)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry shortly", code="queue_full") from None
        return stream


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

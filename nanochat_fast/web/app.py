"""The FastAPI app: the chat page and its streaming chat endpoint, health and config, and the
OpenAI-compatible API, all over one engine thread that batches every active reply.

`POST /api/chat` answers one message with a stream of Server-Sent Events, each `data: {json}`:
{"type": "start", "conversation_id", "unknown_chars", "notice"} (the message's characters outside
the vocabulary, and the terminal chat's one-line note on them or null), then {"type": "text", "text":
<one character>} per character, then {"type": "done", "finish_reason": "stop" | "length" |
"cancelled"} (or {"type": "error", "message"}). Without a conversation_id it starts a conversation.
With one, the message continues the state the server kept, and costs only its own characters; an
unknown or evicted id gets 404, and the client then sends the message again with `history` (the
earlier messages) to have the state rebuilt.

`POST /api/chat/stop` with {"conversation_id"} stops that conversation's reply: its stream ends
with every character written so far and done "cancelled", and the conversation goes on from the
reply as cut there, closed in its state as a reply cut at the length cap is. A reply whose client
goes away is cut and kept the same way; one still waiting for a slot never read its prompt, and its
conversation is forgotten (404 next time, as for an evicted one).

`POST /v1/chat/completions` and `GET /v1/models` answer in OpenAI's shapes, so existing clients (the
`openai` package, tools that take a base URL) work unchanged. Stateless: each request reads the whole
conversation from its messages (system messages are skipped: the chat format has no place for them)
and writes the reply to the last, user, message. Streamed replies are `data: {chat.completion.chunk}`
events, one character each, then `data: [DONE]`.
"""

import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import aclosing
from importlib import resources
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from nanochat_fast.chat_format import encode_conversation, prompt_for_reply
from nanochat_fast.checkpoint import Checkpoint
from nanochat_fast.engine import Sequence
from nanochat_fast.engine_thread import EngineThread
from nanochat_fast.generation import token_texts, unknown_chars_notice
from nanochat_fast.sampling import SamplingConfig, new_generator
from nanochat_fast.web import ApiError, ServerSettings
from nanochat_fast.web.conversations import Conversation, ConversationBusy, ConversationCache, ConversationUnknown
from nanochat_fast.web.streaming import ReplyEventStream, ReplyStream, sse_event

PROTECTED_PREFIXES = ("/api/", "/v1/")  # the page itself and /health stay open
CREATED = int(time.time())  # when this server started: the model's "created" time for /v1/models
log = logging.getLogger(__name__)


class HistoryMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    message: str
    conversation_id: str | None = None
    history: list[HistoryMessage] | None = None  # earlier messages, to rebuild a forgotten conversation
    temperature: float | None = Field(None, ge=0, le=10)  # None: the server's default (see /api/config)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)  # None: the server's default
    seed: int | None = None  # restarts the conversation's random stream


class StopRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    conversation_id: str


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)  # unknown fields (e.g. name) are ignored, as OpenAI's clients expect
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str  # any name: this server has one model
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


async def read_json(request: Request, schema: type[BaseModel], max_bytes: int) -> BaseModel:
    """The request body parsed into schema: 413 past max_bytes (counted as it arrives, so a body
    without Content-Length cannot slip past), 422 for invalid JSON or a field of the wrong type or value."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {max_bytes} bytes")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(422, f"{where + ': ' if where else ''}{first['msg']}" +
                       (f" ({error.error_count() - 1} more problems)" if error.error_count() > 1 else ""),
                       param=where or None, code=first["type"]) from None


def reply_prompt(tokenizer, settings: ServerSettings, earlier: list[dict], message: str) -> torch.Tensor:
    """The token ids read before a reply to message, after the earlier messages ({"role", "content"}),
    checked against the limits: 422 for an empty message, 413 for one or a history over its limit."""
    if not message:
        raise ApiError(422, "the message is empty", param="message")
    if len(message) > settings.max_message_chars:
        raise ApiError(413, f"the message is {len(message)} characters; the limit is {settings.max_message_chars}",
                       param="message", code="message_too_long")
    history_chars = sum(len(earlier_message["content"]) for earlier_message in earlier)
    if history_chars > settings.max_history_chars:
        raise ApiError(413, f"the earlier messages hold {history_chars} characters; the limit is "
                       f"{settings.max_history_chars} (start a new conversation)", code="history_too_long")
    prompt = prompt_for_reply(tokenizer, message)
    return torch.cat([encode_conversation(tokenizer, earlier)[0], prompt]) if earlier else prompt


class ChatService:
    """The model behind the endpoints: `load` runs in a background thread, then an engine thread
    serves it; until then (or if loading failed) every model endpoint answers 503."""

    def __init__(self, load: Callable[[], Checkpoint], settings: ServerSettings):
        self._load = load
        self.settings = settings
        self.conversations = ConversationCache(settings.max_conversations)
        self.checkpoint: Checkpoint | None = None
        self.engine: EngineThread | None = None  # set last: the service is ready once it is
        self.texts: list[str] = []
        self.load_error: str | None = None
        self.replies: dict[str, ReplyStream] = {}  # the page's replies being streamed, by conversation id

    def start_loading(self):
        threading.Thread(target=self._load_checkpoint, name="model-loader", daemon=True).start()

    def _load_checkpoint(self):
        try:
            checkpoint = self._load()
            engine = EngineThread(checkpoint.model, self.settings.max_concurrent, self.settings.max_queue,
                                  self.settings.threads)
            engine.start()
        except Exception as error:  # any failure must reach /health, not die silently in this thread
            log.exception("loading the model failed")
            self.load_error = f"{type(error).__name__}: {error}"
            return
        self.checkpoint, self.texts = checkpoint, token_texts(checkpoint.tokenizer)
        self.engine = engine
        log.info("model loaded from %s", checkpoint.directory)
        if checkpoint.note:  # a run folder's latest/ standing in for its missing best/
            log.warning(checkpoint.note)

    def stop(self):
        if self.engine is not None:
            self.engine.stop()

    def require_ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; try again in a moment", code="model_loading")

    def reply_stream(self, prompt_ids: torch.Tensor, sampling: SamplingConfig, max_reply_chars: int,
                     conversation: Conversation, after_finish=None) -> ReplyStream:
        """A reply continuing the conversation, queued in the engine; 429 when the queue is full."""
        sequence = Sequence(prompt_ids, sampling, max_reply_chars, stop_id=self.checkpoint.tokenizer.end_id,
                            state=conversation.state, generator=conversation.generator)
        return ReplyStream(self.engine, self.texts, sequence, after_finish).start()


def create_app(load, settings: ServerSettings | None = None) -> FastAPI:
    """The app; load() returns the Checkpoint and runs in a background thread once the server starts,
    so the server answers (503) while the model loads."""
    settings = settings or ServerSettings()
    service = ChatService(load, settings)

    async def lifespan(app):
        service.start_loading()
        yield
        service.stop()

    app = FastAPI(title="nanochat_fast", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown routes, wrong methods
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if settings.api_key is not None and request.url.path.startswith(PROTECTED_PREFIXES):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
                return await api_error(request, ApiError(
                    401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                    code="invalid_api_key"))
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("nanochat_fast.web").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        service.require_ready()
        return {"status": "ok"}

    @app.get("/api/config")
    async def config():
        service.require_ready()
        checkpoint = service.checkpoint
        return {"model": checkpoint.model.config.to_dict(), "model_name": settings.model_name,
                "checkpoint": str(checkpoint.directory),
                "parameters": sum(parameter.numel() for parameter in checkpoint.model.parameters()),
                "vocabulary_chars": checkpoint.tokenizer.chars,  # the chat markers aside
                "limits": {name: getattr(settings, name) for name in (
                    "max_message_chars", "max_history_chars", "max_reply_chars", "max_body_bytes",
                    "max_concurrent", "max_queue")},
                "sampling": {"temperature": settings.temperature, "top_p": settings.top_p}}

    @app.post("/api/chat")
    async def chat(request: Request):
        service.require_ready()
        body = await read_json(request, ChatRequest, settings.max_body_bytes)
        rebuilding = body.history is not None
        history = [message.model_dump() for message in body.history or []]  # [] unless rebuilding
        prompt_ids = reply_prompt(service.checkpoint.tokenizer, settings, history, body.message)
        sampling = SamplingConfig(settings.temperature if body.temperature is None else body.temperature,
                                  body.top_k, settings.top_p if body.top_p is None else body.top_p)

        conversation_id = body.conversation_id or service.conversations.new_id()
        try:
            kept = service.conversations.check_out(conversation_id, must_exist=body.conversation_id is not None
                                                   and not rebuilding)
        except ConversationBusy as error:
            raise ApiError(409, f"{error}; wait for it to finish", param="conversation_id") from None
        except ConversationUnknown as error:
            raise ApiError(404, f"{error}; send the message again with `history` (the earlier messages) to "
                           "continue it", param="conversation_id", code="conversation_not_found") from None
        if rebuilding or kept is None:  # a new conversation, or one rebuilt from its history
            conversation = Conversation(state=None, generator=new_generator(service.engine.device, body.seed))
        else:
            generator = kept.generator if body.seed is None else new_generator(service.engine.device, body.seed)
            conversation = Conversation(kept.state, generator)

        def keep_state(reason, state):  # in the engine's thread, before the client hears "done"
            # Failed, or cancelled before its prompt was read (no state): forgotten; the page rebuilds
            # it from its history. A reply cut or stopped part-way comes closed: the conversation goes on.
            kept_after = None if state is None else Conversation(state, conversation.generator)
            service.conversations.put_back(conversation_id, kept_after)

        try:
            stream = service.reply_stream(prompt_ids, sampling, settings.max_reply_chars, conversation, keep_state)
        except ApiError:
            service.conversations.put_back(conversation_id, kept)  # untouched: the client may try again
            raise

        tokenizer = service.checkpoint.tokenizer
        start = {"type": "start", "conversation_id": conversation_id,
                 "unknown_chars": list(tokenizer.unknown_chars(body.message)),
                 "notice": unknown_chars_notice(tokenizer, body.message)}

        async def events():
            service.replies[conversation_id] = stream  # for /api/chat/stop; a body never started needs none
            try:
                yield sse_event(start)
                async with aclosing(stream.batches()) as batches:  # one chunk per batch, one event per character
                    async for pieces in batches:
                        yield "".join(sse_event({"type": "text", "text": piece}) for piece in pieces)
                if stream.finish_reason in ("stop", "length", "cancelled"):
                    yield sse_event({"type": "done", "finish_reason": stream.finish_reason})
                else:
                    yield sse_event({"type": "error", "message": f"the reply failed ({stream.finish_reason})"})
            finally:
                if service.replies.get(conversation_id) is stream:  # not the conversation's next reply
                    del service.replies[conversation_id]

        return ReplyEventStream(events(), stream)

    @app.post("/api/chat/stop")
    async def stop_reply(request: Request):
        service.require_ready()
        body = await read_json(request, StopRequest, settings.max_body_bytes)
        reply = service.replies.get(body.conversation_id)
        if reply is not None:
            reply.cancel()  # its stream still delivers what was written, then done "cancelled"
        return {"stopped": reply is not None}

    @app.get("/v1/models")
    async def models():
        service.require_ready()
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": CREATED, "owned_by": "nanochat_fast"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        service.require_ready()
        body = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
        messages = [{"role": "system" if message.role == "developer" else message.role, "content": message.text()}
                    for message in body.messages]
        *earlier, last = messages
        if last["role"] != "user":
            raise ApiError(422, f"the last message must be from the user, not {last['role']}", param="messages")
        prompt_ids = reply_prompt(service.checkpoint.tokenizer, settings, earlier, last["content"])
        max_chars = body.max_completion_tokens or body.max_tokens or settings.max_reply_chars
        if max_chars > settings.max_reply_chars:
            raise ApiError(422, f"max_tokens is {max_chars}; this server writes at most {settings.max_reply_chars} "
                           "characters per reply", param="max_tokens")
        conversation = Conversation(state=None, generator=new_generator(service.engine.device, body.seed))
        stream = service.reply_stream(prompt_ids, SamplingConfig(body.temperature, top_p=body.top_p), max_chars,
                                      conversation)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}

        def usage():
            completion_tokens = stream.chars + (stream.finish_reason == "stop")  # <|end|> is a token too
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}

        if not body.stream:
            text = "".join([piece async for pieces in stream.batches() for piece in pieces])
            if stream.finish_reason not in ("stop", "length"):
                raise ApiError(500, f"the reply failed ({stream.finish_reason})")
            return {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": stream.finish_reason}], "usage": usage()}

        def chunk(delta: dict, finish_reason=None) -> str:
            return sse_event({**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def chunks():
            yield chunk({"role": "assistant", "content": ""})
            async with aclosing(stream.batches()) as batches:  # one write per batch, one chunk per character
                async for pieces in batches:
                    yield "".join(chunk({"content": piece}) for piece in pieces)
            if stream.finish_reason in ("stop", "length"):
                yield chunk({}, stream.finish_reason)
            else:
                yield sse_event(ApiError(500, f"the reply failed ({stream.finish_reason})").body())
            yield sse_event("[DONE]")

        return ReplyEventStream(chunks(), stream)

    return app

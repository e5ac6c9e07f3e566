"""The FastAPI app: the chat page, its streaming chat endpoint, health and config, and the
OpenAI-compatible API (see openai_api.py).

`POST /api/chat` answers one message with a stream of Server-Sent Events, each `data: {json}`:
{"type": "start", "conversation_id"}, then {"type": "text", "text": <one character>} per character,
then {"type": "done", "finish_reason": "stop" | "length"} (or {"type": "error", "message"}).
Without a conversation_id it starts a conversation. With one, the message continues the state the
server kept, and costs only its own characters; an unknown or evicted id gets 404, and the client
then sends the message again with `history` (the earlier messages) to have the state rebuilt.
"""

import hmac
from contextlib import aclosing
from importlib import resources
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanochat_fast.chat_format import encode_conversation, prompt_for_reply
from nanochat_fast.generation import SamplingConfig
from nanochat_fast.web.conversations import Conversation, ConversationBusy
from nanochat_fast.web.openai_api import router as openai_router
from nanochat_fast.web.service import ChatService, ReplyEventStream, sse_event
from nanochat_fast.web.settings import ApiError, ServerSettings, check_lengths, read_json

PROTECTED_PREFIXES = ("/api/", "/v1/")  # the page itself and /health stay open


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


def create_app(load, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The app; load() returns the Checkpoint and runs in a background thread once the server starts,
    so the server answers (503) while the model loads."""
    service = ChatService(load, settings)

    async def lifespan(app):
        service.start_loading()
        yield
        service.stop()

    app = FastAPI(title="nanochat_fast", lifespan=lifespan)
    app.state.service = service
    app.include_router(openai_router)

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
                "limits": {name: getattr(settings, name) for name in (
                    "max_message_chars", "max_history_chars", "max_reply_chars", "max_body_bytes",
                    "max_concurrent", "max_queue")},
                "sampling": {"temperature": settings.temperature, "top_p": settings.top_p}}

    @app.post("/api/chat")
    async def chat(request: Request):
        service.require_ready()
        body = await read_json(request, ChatRequest, settings.max_body_bytes)
        history = [message.model_dump() for message in body.history or []]
        check_lengths(settings, body.message, sum(len(message["content"]) for message in history))
        sampling = SamplingConfig(settings.temperature if body.temperature is None else body.temperature,
                                  body.top_k, settings.top_p if body.top_p is None else body.top_p)
        tokenizer = service.checkpoint.tokenizer
        prompt_ids = prompt_for_reply(tokenizer, body.message)

        conversation_id = body.conversation_id or service.conversations.new_id()
        try:
            kept = service.conversations.take(conversation_id)
        except ConversationBusy as error:
            raise ApiError(409, f"{error}; wait for it to finish", param="conversation_id") from None
        if body.conversation_id is not None and kept is None and body.history is None:
            service.conversations.release(conversation_id)
            raise ApiError(404, f"conversation {conversation_id} is unknown or was forgotten; send the message "
                           "again with `history` (the earlier messages) to continue it",
                           param="conversation_id", code="conversation_not_found")
        cached = kept
        if body.history is not None or kept is None:  # a new conversation, or one rebuilt from its history
            if history:
                prompt_ids = torch.cat([encode_conversation(tokenizer, history)[0], prompt_ids])
            kept = Conversation(state=None, generator=service.new_generator(body.seed))
        elif body.seed is not None:
            kept.generator.manual_seed(body.seed)

        def keep_state(reason, state):  # in the engine's thread, before the client hears "done"
            if state is None:  # cancelled or failed: forget it; the page rebuilds it from its history
                service.conversations.release(conversation_id)
            else:
                service.conversations.put(conversation_id, Conversation(state, kept.generator))

        try:
            stream = service.start_reply(prompt_ids, sampling, settings.max_reply_chars, kept.state,
                                         kept.generator, after_finish=keep_state)
        except ApiError:
            if cached is not None:
                service.conversations.put(conversation_id, cached)  # untouched: the client may try again
            else:
                service.conversations.release(conversation_id)
            raise

        async def events():
            yield sse_event({"type": "start", "conversation_id": conversation_id})
            async with aclosing(stream.batches()) as batches:  # one chunk per batch, one event per character
                async for pieces in batches:
                    yield "".join(sse_event({"type": "text", "text": piece}) for piece in pieces)
            if stream.finish_reason in ("stop", "length"):
                yield sse_event({"type": "done", "finish_reason": stream.finish_reason})
            else:
                yield sse_event({"type": "error", "message": f"the reply failed ({stream.finish_reason})"})

        return ReplyEventStream(events(), stream)

    return app

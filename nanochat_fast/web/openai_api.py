"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`, in OpenAI's shapes,
so existing clients (the `openai` package, tools that take a base URL) work unchanged.

Stateless: each request reads the whole conversation from its messages (system messages are
skipped: the chat format has no place for them) and writes the reply to the last, user, message.
Streamed replies are `data: {chat.completion.chunk}` events, one character each, then `data: [DONE]`.
"""

import time
import uuid
from contextlib import aclosing
from typing import Literal

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from nanochat_fast.chat_format import encode_conversation, prompt_for_reply
from nanochat_fast.generation import SamplingConfig
from nanochat_fast.web.service import ReplyEventStream, sse_event
from nanochat_fast.web.settings import ApiError, check_lengths, read_json

router = APIRouter(prefix="/v1")
CREATED = int(time.time())  # when this server started: the model's "created" time


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


def completion_prompt(request: ChatCompletionRequest, tokenizer, settings) -> tuple[torch.Tensor, int]:
    """The token ids to read before the reply, checked against the limits, and the reply's cap."""
    messages = [{"role": "system" if message.role == "developer" else message.role, "content": message.text()}
                for message in request.messages]
    *earlier, last = messages
    if last["role"] != "user":
        raise ApiError(422, f"the last message must be from the user, not {last['role']}", param="messages")
    check_lengths(settings, last["content"], sum(len(message["content"]) for message in earlier))
    max_chars = request.max_completion_tokens or request.max_tokens or settings.max_reply_chars
    if max_chars > settings.max_reply_chars:
        raise ApiError(422, f"max_tokens is {max_chars}; this server writes at most {settings.max_reply_chars} "
                       "characters per reply", param="max_tokens")
    prompt = torch.cat([encode_conversation(tokenizer, earlier)[0], prompt_for_reply(tokenizer, last["content"])])
    return prompt, max_chars


@router.get("/models")
async def models(request: Request):
    service = request.app.state.service
    service.require_ready()
    return {"object": "list", "data": [{"id": service.settings.model_name, "object": "model",
                                        "created": CREATED, "owned_by": "nanochat_fast"}]}


@router.post("/chat/completions")
async def chat_completions(request: Request):
    service = request.app.state.service
    service.require_ready()
    settings = service.settings
    body = await read_json(request, ChatCompletionRequest, settings.max_body_bytes)
    prompt_ids, max_chars = completion_prompt(body, service.checkpoint.tokenizer, settings)
    stream = service.start_reply(prompt_ids, SamplingConfig(body.temperature, top_p=body.top_p), max_chars,
                                 generator=service.new_generator(body.seed))
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

"""The server's limits and defaults, its one error type, and reading a JSON body within the limits.

Every error, from the page's endpoints and the OpenAI-compatible ones alike, has OpenAI's shape:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}, so one client-side reader fits all.
"""

from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel, ValidationError

from nanochat_fast.generation import CHAT_SAMPLING


@dataclass(frozen=True)
class ServerSettings:
    max_concurrent: int = 32  # replies written at once: the engine's batch size
    max_queue: int = 64  # requests waiting for a slot; one more gets 429
    max_message_chars: int = 2000  # the new message
    max_history_chars: int = 20000  # all earlier messages together (a resent history, or OpenAI's messages)
    max_reply_chars: int = 300  # a reply is cut here; OpenAI's max_tokens may ask for less, not more
    max_body_bytes: int = 1_000_000
    max_conversations: int = 1000  # conversation states kept (about 4 KB each for a 2x256 model)
    threads: int = 1  # CPU threads for the engine's batches of 8 replies or more
    api_key: str | None = None  # when set, /api and /v1 need `Authorization: Bearer <key>`
    model_name: str = "nanochat-fast"  # the model id the OpenAI API reports
    temperature: float = CHAT_SAMPLING.temperature  # the page's defaults
    top_p: float | None = CHAT_SAMPLING.top_p

    def __post_init__(self):
        for name in ("max_concurrent", "threads", "max_message_chars", "max_history_chars", "max_reply_chars",
                     "max_body_bytes", "max_conversations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class ApiError(Exception):
    """An error response: HTTP status and a message saying what to change."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        error_type = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


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


def check_lengths(settings: ServerSettings, message: str, history_chars: int):
    """413 when the new message or the earlier messages are longer than the limits; 422 for an empty message."""
    if not message:
        raise ApiError(422, "the message is empty", param="message")
    if len(message) > settings.max_message_chars:
        raise ApiError(413, f"the message is {len(message)} characters; the limit is {settings.max_message_chars}",
                       param="message", code="message_too_long")
    if history_chars > settings.max_history_chars:
        raise ApiError(413, f"the earlier messages hold {history_chars} characters; the limit is "
                       f"{settings.max_history_chars} (start a new conversation)", code="history_too_long")

"""The web chat and its OpenAI-compatible API (`python -m nanochat_fast.serve`).

- `app.py`: the FastAPI app: the model (loaded in the background) and the engine, the page, its chat
  and stop endpoints, health and config, and `/v1/chat/completions` and `/v1/models` in OpenAI's shapes.
- `streaming.py`: a reply's characters from the engine's thread to the response, as Server-Sent Events.
- `conversations.py`: the LSTM state of each web conversation, in a bounded LRU cache.
- `chat.html`: the page, one self-contained file (its conversation kept in the browser's localStorage).

Here, where every module can import them: the server's limits and defaults, and its one error type.
Every error, from the page's endpoints and the OpenAI-compatible ones alike, has OpenAI's shape:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}, so one client-side reader fits all.
"""

from dataclasses import dataclass

from nanochat_fast.sampling import CHAT_SAMPLING


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

"""The web chat and its OpenAI-compatible API (`python -m nanochat_fast.serve`).

- `batching_engine.py`: one generation loop that batches every active reply into one LSTM step.
- `conversations.py`: the LSTM state of each web conversation, in a bounded LRU cache.
- `settings.py`: the server's limits, its error shape, and reading a request body within the limits.
- `service.py`: the model (loaded in the background), the engine and the cache, as the endpoints share them.
- `app.py`: the FastAPI app: the page, its chat endpoint, health and config.
- `openai_api.py`: `/v1/chat/completions` and `/v1/models` in OpenAI's shapes.
- `chat.html`: the page, one self-contained file.
- `server_thread.py`: the app on a free local port in a background thread (tests, benchmarks).
"""

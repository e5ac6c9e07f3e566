"""The OpenAI-compatible API against a real server: the official `openai` package, pointed at it,
gets replies streamed and not, and lists the model; the raw shapes of chunks, [DONE] and errors."""

import json

import httpx
import openai
import pytest

from nanochat_fast.chat_format import encode_conversation
from nanochat_fast.generation import Chatbot
from web_support import GREEDY, TOKENIZER, float64_loader, running_server, saved_checkpoint

MAX_REPLY_CHARS = 40
CONVERSATION = [{"role": "system", "content": "You are terse."},  # skipped: the chat format has no system role
                {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "How are you?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(saved_checkpoint(tmp_path_factory.mktemp("openai") / "best", seed=2),
                        max_reply_chars=MAX_REPLY_CHARS, max_message_chars=100, model_name="tiny-lstm") as server:
        yield server


@pytest.fixture(scope="module")
def expected_reply(server):
    """The greedy reply to CONVERSATION from a Chatbot alone with the model, told the same turns."""
    bot = Chatbot(float64_loader(server.app.state.service.checkpoint.directory)().model, TOKENIZER, GREEDY,
                  MAX_REPLY_CHARS)
    bot.read(encode_conversation(TOKENIZER, CONVERSATION[1:3])[0])
    return bot.reply("How are you?")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)


def test_openai_client_gets_a_reply(client, expected_reply):
    completion = client.chat.completions.create(model="tiny-lstm", messages=CONVERSATION, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected_reply
    assert choice.finish_reason == "length" and completion.model == "tiny-lstm"
    assert completion.usage.completion_tokens == len(expected_reply) == MAX_REPLY_CHARS


def test_openai_client_streams_the_same_reply_one_character_per_chunk(client, expected_reply):
    chunks = list(client.chat.completions.create(model="tiny-lstm", messages=CONVERSATION, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [chunk.choices[0].delta.content for chunk in chunks[1:-1]]
    assert all(len(content) == 1 for content in contents) and "".join(contents) == expected_reply
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({chunk.id for chunk in chunks}) == 1 and all(chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_openai_client_lists_the_model(client):
    assert [model.id for model in client.models.list()] == ["tiny-lstm"]


def test_max_tokens_and_seed(client):
    short = client.chat.completions.create(model="m", messages=CONVERSATION, temperature=0, max_tokens=5)
    assert len(short.choices[0].message.content) == 5 and short.choices[0].finish_reason == "length"
    sampled = [client.chat.completions.create(model="m", messages=CONVERSATION, temperature=1.0, seed=seed)
               .choices[0].message.content for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_the_stream_ends_with_done(server):
    body = {"model": "m", "messages": CONVERSATION, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) == 1 + 3 + 1 + 1  # role, 3 characters, finish, [DONE]
    assert json.loads(data[-2])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


@pytest.mark.parametrize("changes, status, fragment", [
    ({"messages": []}, 422, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "last message must be from the user"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 422, "messages.0.role"),
    ({"temperature": "hot"}, 422, "temperature: Input should be a valid number"),
    ({"max_tokens": MAX_REPLY_CHARS + 1}, 422, f"at most {MAX_REPLY_CHARS} characters"),
    ({"n": 2}, 422, "n: Input should be less than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, 413, "101 characters; the limit is 100"),
], ids=["no-messages", "last-not-user", "unknown-role", "temperature-not-a-number", "max-tokens-over-cap",
        "several-choices", "message-too-long"])
def test_errors_come_in_openai_shape(server, changes, status, fragment):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **changes}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_openai_client_raises_on_an_error(client):
    with pytest.raises(openai.UnprocessableEntityError, match="last message must be from the user"):
        client.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "hi"}])

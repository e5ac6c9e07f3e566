"""The web chat's HTTP API against a real uvicorn server on 127.0.0.1, driven by httpx: streaming,
conversation state (kept, forgotten and rebuilt, never mixed), every limit, bad requests, a client
that goes away, a reply stopped part-way, loading, and the API key. The OpenAI-compatible endpoints
are in test_openai_api.py."""

import asyncio
import gc
import itertools
import json
import threading

import httpx
import pytest
import torch

from nanochat_fast.engine import Sequence
from nanochat_fast.engine_thread import EngineThread
from nanochat_fast.generation import Chatbot, unknown_chars_notice
from nanochat_fast.sampling import GREEDY, SamplingConfig
from nanochat_fast.web.app import create_app
from nanochat_fast.web.streaming import ReplyEventStream, ReplyStream
from server_thread import ServerThread
from web_support import (TOKENIZER, chat, chat_model, float64_loader, read_events, running_server, saved_checkpoint,
                         single_user_replies)

MAX_REPLY_CHARS = 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_checkpoint(tmp_path_factory.mktemp("web") / "best")


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory):
    """A model that never writes <|end|>: its replies run to the cap, which the slot tests set huge."""
    return saved_checkpoint(tmp_path_factory.mktemp("endless") / "best", seed=1, end_bias=-30.0)


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, max_reply_chars=MAX_REPLY_CHARS, max_message_chars=50,
                        max_history_chars=400, max_body_bytes=4000) as server:
        yield server


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def test_a_reply_streams_one_character_per_event_then_done(client, checkpoint):
    reply, events = chat(client, "Hello there")
    assert events[0]["type"] == "start" and events[0]["conversation_id"]
    assert events[-1] == {"type": "done", "finish_reason": "length"}  # this model never ends a reply
    texts = [event["text"] for event in events[1:-1]]
    assert all(event["type"] == "text" for event in events[1:-1]) and all(len(text) == 1 for text in texts)
    assert reply == single_user_replies(checkpoint, ["Hello there"], MAX_REPLY_CHARS)[0]
    assert len(reply) == MAX_REPLY_CHARS  # the reply cap


def test_a_conversation_keeps_its_state_between_messages(client, checkpoint):
    user_texts = ["Hello there", "How are you?", "Tell me more"]
    conversation_id, replies = None, []
    for text in user_texts:
        reply, events = chat(client, text, conversation_id=conversation_id)
        conversation_id = events[0]["conversation_id"]
        replies.append(reply)
    assert replies == single_user_replies(checkpoint, user_texts, MAX_REPLY_CHARS)
    # The kept state matters: later messages are answered differently in a fresh conversation.
    assert all(single_user_replies(checkpoint, [text], MAX_REPLY_CHARS) != [reply]
               for text, reply in zip(user_texts[1:], replies[1:], strict=True))


def test_concurrent_conversations_never_mix_states(server, checkpoint):
    conversations = [[f"Hi {name}", f"I am {name}.", f"Bye {name}!"] for name in
                     ("Ann", "Bob", "Cyd", "Dee", "Eve", "Fay", "Gus", "Hal")]

    async def talk(client, user_texts):
        conversation_id, replies = None, []
        for text in user_texts:
            body = {"message": text, "temperature": 0, "conversation_id": conversation_id}
            async with client.stream("POST", "/api/chat", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
            events = read_events_from_lines(lines)
            conversation_id = events[0]["conversation_id"]
            replies.append("".join(event["text"] for event in events if event["type"] == "text"))
        return replies

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            return await asyncio.gather(*(talk(client, texts) for texts in conversations))

    served = asyncio.run(all_at_once())
    expected = [single_user_replies(checkpoint, texts, MAX_REPLY_CHARS) for texts in conversations]
    assert served == expected
    assert len({reply for replies in expected for reply in replies}) > len(conversations)  # not all alike


def read_events_from_lines(lines):
    class Lines:  # read_events wants a response; these lines were read asynchronously
        def iter_lines(self):
            return iter(lines)
    return read_events(Lines())


def test_a_forgotten_conversation_gets_404_then_is_rebuilt_from_its_history(checkpoint):
    with running_server(checkpoint, max_reply_chars=MAX_REPLY_CHARS, max_conversations=1) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        first_reply, events = chat(client, "Hello there")
        conversation_id = events[0]["conversation_id"]
        chat(client, "Someone else")  # a second conversation pushes the first out of the cache
        response = client.post("/api/chat", json={"message": "How are you?", "conversation_id": conversation_id})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "conversation_not_found"
        history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first_reply}]
        rebuilt_reply, events = chat(client, "How are you?", conversation_id=conversation_id, history=history)
        assert events[0]["conversation_id"] == conversation_id
        # The rebuilt state answers as the kept state would have.
        assert rebuilt_reply == single_user_replies(checkpoint, ["Hello there", "How are you?"], MAX_REPLY_CHARS)[1]
        third, _ = chat(client, "And then?", conversation_id=conversation_id)  # kept again after the rebuild
        assert third == single_user_replies(checkpoint, ["Hello there", "How are you?", "And then?"],
                                            MAX_REPLY_CHARS)[2]


@pytest.mark.parametrize("body, status, fragment", [
    ({"message": "x" * 51}, 413, "51 characters; the limit is 50"),
    ({"message": "hi", "history": [{"role": "user", "content": "y" * 45}] * 9}, 413,
     "405 characters; the limit is 400"),
    ({"message": "hi", "history": [{"role": "user", "content": "z" * 50}] * 80}, 413, "the limit is 4000"),
    ({"message": ""}, 422, "empty"),
    ({}, 422, "message: Field required"),
    ({"message": 5}, 422, "message: Input should be a valid string"),
    ({"message": "hi", "temperature": "0.5"}, 422, "temperature: Input should be a valid number"),
    ({"message": "hi", "temperature": -1}, 422, "temperature: Input should be greater than or equal to 0"),
    ({"message": "hi", "top_k": 0}, 422, "top_k"),
    ({"message": "hi", "top_p": 1.5}, 422, "top_p"),
    ({"message": "hi", "history": [{"role": "system", "content": "x"}]}, 422, "history.0.role"),
    ({"message": "hi", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ([1, 2], 422, "Input should be an object"),
], ids=["message-too-long", "history-too-long", "body-too-large", "empty-message", "no-message",
        "message-not-text", "temperature-as-string", "negative-temperature", "top-k-zero", "top-p-over-1",
        "system-in-history", "unknown-field", "not-an-object"])
def test_bad_requests_get_a_clear_error(client, body, status, fragment):
    response = client.post("/api/chat", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_invalid_json_gets_422(client):
    response = client.post("/api/chat", content=b'{"message": "hi"', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "Invalid JSON" in response.json()["error"]["message"]


def test_a_large_body_without_content_length_gets_413(client):
    def chunks():  # chunked transfer: no Content-Length to refuse it by
        yield b'{"message": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'
    response = client.post("/api/chat", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over the limit of 4000 bytes" in response.json()["error"]["message"]


def first_text_event(response):
    """Read a streamed reply until its first character has arrived. Keep the returned line iterator
    while the stream should stay open: dropping it closes the connection."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: ") and '"text"' in line:
            return lines
    raise AssertionError("the reply ended before writing anything")


def test_a_full_queue_gets_429_and_a_disconnect_frees_its_slot(endless_checkpoint):
    with running_server(endless_checkpoint, max_concurrent=1, max_queue=1, max_reply_chars=10**7) as server, \
            httpx.Client(base_url=server.url, timeout=10) as first, \
            httpx.Client(base_url=server.url, timeout=10) as second, \
            httpx.Client(base_url=server.url, timeout=10) as third:
        engine = server.app.state.service.engine
        with first.stream("POST", "/api/chat", json={"message": "one"}) as running:
            running_lines = first_text_event(running)  # generating: it holds the only slot
            with second.stream("POST", "/api/chat", json={"message": "two"}) as waiting:
                assert waiting.status_code == 200  # accepted, waiting in the queue
                while engine.in_flight < 2:
                    threading.Event().wait(0.005)
                refused = third.post("/api/chat", json={"message": "three"})
                assert refused.status_code == 429
                assert "all 1 generation slots are busy and 1 more requests are already waiting" in \
                    refused.json()["error"]["message"]
                running.close()  # the first client goes away mid-reply...
                del running_lines
                assert first_text_event(waiting)  # ...and the waiting reply gets its slot
        for _ in range(500):  # the second client went away too: nothing is left running
            if engine.in_flight == 0:
                break
            threading.Event().wait(0.01)
        assert engine.in_flight == 0


def test_a_reply_is_cancelled_when_its_response_is_left_mid_send(endless_checkpoint):
    """The client goes away while a chunk is being sent: Starlette cancels the sending task inside
    send() and drops the event generator unclosed. The reply must still be cancelled when the
    response ends, not when the generator is garbage collected (maybe never: gc is off here)."""
    engine = EngineThread(float64_loader(endless_checkpoint)().model, max_batch=1, max_queue=1)

    async def scenario():  # the engine is not started: the reply waits in its queue throughout
        stream = ReplyStream(engine, [], Sequence(torch.tensor([1]), SamplingConfig(0), 10)).start()

        async def events():
            yield "data: start\n\n"
            async for _ in stream.batches():
                yield "data: text\n\n"

        body_sending = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                body_sending.set()
                await asyncio.Event().wait()  # the socket is full: this send never ends

        async def receive():
            await body_sending.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
        await asyncio.wait_for(ReplyEventStream(events(), stream)(scope, receive, send), 5)
        return engine.in_flight, stream.request.cancelled

    gc.disable()
    try:
        assert asyncio.run(scenario()) == (0, True)
    finally:
        gc.enable()


def test_a_second_message_while_a_reply_runs_gets_409(endless_checkpoint):
    with running_server(endless_checkpoint, max_reply_chars=10**7) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client, \
            httpx.Client(base_url=server.url, timeout=10) as other:
        with client.stream("POST", "/api/chat", json={"message": "one"}) as running:
            lines = running.iter_lines()
            start = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
            conversation_id = start["conversation_id"]
            response = other.post("/api/chat", json={"message": "two", "conversation_id": conversation_id})
            assert response.status_code == 409
            assert "already has a reply in progress" in response.json()["error"]["message"]


def test_503_until_the_model_has_loaded(checkpoint):
    loaded = threading.Event()
    load = float64_loader(checkpoint)

    def slow_load():
        loaded.wait(10)
        return load()

    with ServerThread(create_app(slow_load)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for method, path in (("GET", "/health"), ("GET", "/api/config"), ("POST", "/api/chat"),
                             ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            response = client.request(method, path, json={"message": "hi"})
            assert response.status_code == 503 and "still loading" in response.json()["error"]["message"], path
        assert client.get("/").status_code == 200  # the page itself is served meanwhile
        loaded.set()
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/api/config").json()["model"]["hidden_size"] == 32


def test_a_failed_load_is_reported_by_health(tmp_path):
    def failing_load():
        raise FileNotFoundError("no checkpoint here")
    with ServerThread(create_app(failing_load)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(500):
            if client.get("/health").json()["error"]["code"] == "model_load_failed":
                break
            threading.Event().wait(0.01)
        response = client.get("/health")
        assert response.status_code == 503 and "no checkpoint here" in response.json()["error"]["message"]


def test_config_reports_the_model_and_limits(client):
    config = client.get("/api/config").json()
    assert config["model"] == {"vocab_size": 62, "hidden_size": 32, "num_layers": 2, "dropout": 0.2, "cell": "lstm",
                               "weight_drop": 0.0, "embedding_size": None, "members": 1}
    assert config["parameters"] == sum(parameter.numel() for parameter in chat_model(0).parameters()) > 0
    assert config["vocabulary_chars"] == TOKENIZER.chars and config["model_name"] == "nanochat-fast"
    assert config["limits"]["max_reply_chars"] == MAX_REPLY_CHARS and config["limits"]["max_message_chars"] == 50


def test_an_api_key_guards_the_api_but_not_the_page(checkpoint):
    with running_server(checkpoint, api_key="s3cret") as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/api/config", "/v1/models"):
                response = client.get(path, headers=headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/api/config", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/").status_code == 200 and client.get("/health").status_code == 200


def test_the_page_is_served_and_sets_model_text_as_text(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "textContent" in page.text and "innerHTML" not in page.text


def test_each_conversation_samples_by_its_own_settings_and_seed(client):
    greedy, _ = chat(client, "Hello there")
    assert chat(client, "Hello there", temperature=1.0, top_k=1)[0] == greedy  # top-1 is the argmax
    seeded = [chat(client, "Hello there", temperature=1.5, seed=seed)[0] for seed in (5, 5, 6)]
    assert seeded[0] == seeded[1] != seeded[2] and greedy not in seeded


def test_the_server_default_sampling_applies_when_a_request_names_none(checkpoint):
    with running_server(checkpoint, max_reply_chars=MAX_REPLY_CHARS, temperature=0.0) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/api/chat", json={"message": "Hello there"})  # no temperature: the default, greedy
        reply = "".join(event["text"] for event in read_events(response) if event["type"] == "text")
        assert reply == chat(client, "Hello there", temperature=0)[0]


def test_the_start_event_names_the_characters_outside_the_vocabulary(client):
    _, events = chat(client, "héllo wörld é")
    assert events[0]["unknown_chars"] == ["é", "ö"]
    assert events[0]["notice"] == unknown_chars_notice(TOKENIZER, "héllo wörld é") == \
        "(note: 'é', 'ö' are not in the model's vocabulary; treated as unknown)"  # the terminal chat's line
    _, events = chat(client, "hello")
    assert events[0]["unknown_chars"] == [] and events[0]["notice"] is None


def next_event(lines) -> dict:
    """The next `data: {json}` event from a streamed response's iter_lines()."""
    return json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])


def test_a_stopped_reply_ends_with_what_it_wrote_and_the_conversation_goes_on_from_it(endless_checkpoint):
    cap = 60
    with running_server(endless_checkpoint, seconds_per_step=0.02, max_reply_chars=cap) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", "/api/chat", json={"message": "Hello there", "temperature": 0}) as response:
            lines = response.iter_lines()
            events = [next_event(lines)]
            while sum(event["type"] == "text" for event in events) < 3:
                events.append(next_event(lines))
            conversation_id = events[0]["conversation_id"]
            assert client.post("/api/chat/stop", json={"conversation_id": conversation_id}).json() == {"stopped": True}
            events += [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
        assert events[-1] == {"type": "done", "finish_reason": "cancelled"}
        stopped = "".join(event["text"] for event in events if event["type"] == "text")
        assert 3 <= len(stopped) < cap
        # At once, no 409: the conversation was put back before the stream said "done".
        after, _ = chat(client, "How are you?", conversation_id=conversation_id)
        assert client.post("/api/chat/stop", json={"conversation_id": conversation_id}).json() == {"stopped": False}

    bot = Chatbot(float64_loader(endless_checkpoint)().model, TOKENIZER, GREEDY, cap)
    first = bot.stream("Hello there")
    assert "".join(itertools.islice(first, len(stopped))) == stopped
    first.close()  # cut where the server's reply was stopped
    assert after == bot.reply("How are you?")


def test_a_reply_whose_client_went_away_is_kept_cut_and_a_stopped_waiting_one_is_forgotten(endless_checkpoint):
    with running_server(endless_checkpoint, max_concurrent=1, max_reply_chars=10**7) as server, \
            httpx.Client(base_url=server.url, timeout=10) as first, \
            httpx.Client(base_url=server.url, timeout=10) as second:
        conversations = server.app.state.service.conversations
        with first.stream("POST", "/api/chat", json={"message": "one"}) as running:
            running_lines = running.iter_lines()
            running_id = next_event(running_lines)["conversation_id"]
            assert next_event(running_lines)["type"] == "text"  # generating: it holds the only slot
            with second.stream("POST", "/api/chat", json={"message": "two"}) as waiting:
                waiting_lines = waiting.iter_lines()
                waiting_id = next_event(waiting_lines)["conversation_id"]  # and this one waits for it
                assert second.post("/api/chat/stop", json={"conversation_id": waiting_id}).json() == {"stopped": True}
                assert next_event(waiting_lines) == {"type": "done", "finish_reason": "cancelled"}  # no text
        del running_lines  # the first client went away mid-reply
        for _ in range(500):
            if running_id in conversations:
                break
            threading.Event().wait(0.01)
        assert running_id in conversations and waiting_id not in conversations
        with first.stream("POST", "/api/chat", json={"message": "three", "conversation_id": running_id}) as going_on:
            assert going_on.status_code == 200 and next_event(going_on.iter_lines())["type"] == "start"
        assert second.post("/api/chat", json={"message": "three", "conversation_id": waiting_id}).status_code == 404

"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright as a user would.
It watches a reply grow character by character, continues a conversation the server forgot (404,
then the page resends the history), starts a new one, stops a reply part-way and goes on from it,
writes a message on two lines, sends its sampling settings and keeps them, keeps the conversation across reloads,
shows the terminal's notice for characters outside the vocabulary, names the model when empty (an ensemble too),
follows the system's light or dark theme, and has a favicon and no failed request.

Skips where /usr/bin/chromium is missing, except under CI=true, where that is a failure."""

import itertools
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import torch

from nanochat_fast.checkpoint import save_checkpoint
from nanochat_fast.ensemble import CharEnsemble
from nanochat_fast.generation import Chatbot, unknown_chars_notice
from nanochat_fast.model import ModelConfig
from nanochat_fast.sampling import GREEDY
from nanochat_fast.web import ServerSettings
from nanochat_fast.web.app import create_app
from server_thread import ServerThread
from web_support import TOKENIZER, float64_loader, saved_checkpoint, single_user_replies, slow_loader, wait_until_ready

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
REPLY_CHARS = 60  # the model never writes <|end|>: every reply runs to this cap
SECONDS_PER_STEP = 0.01  # slow enough to watch the reply grow, ~0.6 s per reply


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"no browser at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_checkpoint(tmp_path_factory.mktemp("browser") / "best", seed=3, end_bias=-30.0)


def serve(checkpoint, seconds_per_step=SECONDS_PER_STEP, **settings) -> ServerThread:
    return ServerThread(create_app(slow_loader(checkpoint, seconds_per_step),
                                   ServerSettings(max_reply_chars=REPLY_CHARS, **settings)))


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve(checkpoint) as server:
        wait_until_ready(server.url)
        yield server


def open_chat(context, url):
    """The chat page, its config read (which sets the sampling fields), then set to greedy: replies
    to compare with a single-user run."""
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('model-name').textContent === 'nanochat-fast'")
    page.fill("#temperature", "0")
    return page


@pytest.fixture
def page(browser, server):
    """A fresh greedy page, with its own localStorage, on the shared server."""
    context = browser.new_context()
    yield open_chat(context, server.url)
    context.close()


def wait_for_reply(page, timeout_s=20) -> str:
    """The last reply on the page, once it has ended (call it while the page has one reply in the
    making, or none); fails on an error notice."""
    reply = page.locator(".message.assistant").last
    deadline = time.monotonic() + timeout_s
    while reply.get_attribute("data-finish") is None:
        assert time.monotonic() < deadline, "the reply never finished"
        assert not page.locator(".error").count(), page.locator(".error").last.text_content()
        time.sleep(0.03)
    return reply.text_content()


def send_and_watch(page, text) -> tuple[str, list[int]]:
    """Send text from the page; (the finished reply, the reply's lengths seen while it streamed)."""
    replies_before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.click("#send")
    reply = page.locator(".message.assistant").nth(replies_before)
    lengths = []
    deadline = time.monotonic() + 20
    while reply.get_attribute("data-finish") is None:
        assert time.monotonic() < deadline, "the reply never finished"
        assert not page.locator(".error").count(), page.locator(".error").last.text_content()
        lengths.append(len(reply.text_content()))
        time.sleep(0.03)
    return reply.text_content(), lengths


def chat_requests(page) -> list[dict]:
    """The bodies the page posts to /api/chat from now on, appended as they go."""
    bodies = []
    page.on("request", lambda request: bodies.append(json.loads(request.post_data))
            if request.url.endswith("/api/chat") else None)
    return bodies


def test_chat_page_streams_replies_and_starts_new_conversations(browser, checkpoint):
    with serve(checkpoint, max_conversations=1) as server:
        wait_until_ready(server.url)
        page = open_chat(browser, server.url)

        first, lengths = send_and_watch(page, "Hello there")
        assert first == single_user_replies(checkpoint, ["Hello there"], REPLY_CHARS)[0]
        growing = [length for length in lengths if 0 < length < REPLY_CHARS]
        assert len(set(growing)) >= 3 and growing == sorted(growing)  # seen part-way, several times, growing
        assert page.locator(".message.user").last.text_content() == "Hello there"

        # Another client's conversation pushes this one out of the server's cache (it keeps one):
        # the page's next message gets 404 and the page resends the history to rebuild the state.
        with httpx.Client(base_url=server.url, timeout=10) as other:
            assert other.post("/api/chat", json={"message": "Hi", "temperature": 0}).status_code == 200
        second, _ = send_and_watch(page, "How are you?")
        assert second == single_user_replies(checkpoint, ["Hello there", "How are you?"], REPLY_CHARS)[1]

        page.click("#new-conversation")
        assert page.locator(".message").count() == 0  # the view is cleared
        fresh, _ = send_and_watch(page, "How are you?")
        assert fresh == single_user_replies(checkpoint, ["How are you?"], REPLY_CHARS)[0] != second
        assert page.locator(".message").count() == 2
        page.close()


def test_stop_ends_a_reply_part_way_and_the_next_message_goes_on_from_it(browser, checkpoint):
    with serve(checkpoint, seconds_per_step=0.03) as server:  # ~1.8 s per reply: time to click Stop
        wait_until_ready(server.url)
        page = open_chat(browser, server.url)
        assert page.is_hidden("#stop")
        page.fill("#input", "Hello there")
        page.click("#send")
        reply = page.locator(".message.assistant").last
        page.wait_for_function("document.querySelector('.message.assistant')?.textContent.length >= 3")
        assert page.is_visible("#stop") and page.is_hidden("#send")
        page.click("#stop")
        stopped = wait_for_reply(page)
        assert reply.get_attribute("data-finish") == "cancelled" and 3 <= len(stopped) < REPLY_CHARS
        assert page.is_hidden("#stop") and page.is_visible("#send")

        requests = chat_requests(page)
        after, _ = send_and_watch(page, "How are you?")  # at once: no 409, no error
        assert "history" not in requests[-1]  # the server kept the conversation, the stopped reply in it
        page.close()

    bot = Chatbot(float64_loader(checkpoint)().model, TOKENIZER, GREEDY, REPLY_CHARS)
    first = bot.stream("Hello there")
    assert "".join(itertools.islice(first, len(stopped))) == stopped
    first.close()  # cut where the page stopped it
    assert after == bot.reply("How are you?")


def test_enter_sends_and_shift_enter_breaks_the_line(page, checkpoint):
    page.click("#input")
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there")
    assert page.input_value("#input") == "Hello\nthere" and page.locator(".message").count() == 0
    page.keyboard.press("Enter")
    assert wait_for_reply(page) == single_user_replies(checkpoint, ["Hello\nthere"], REPLY_CHARS)[0]
    assert page.locator(".message.user").text_content() == "Hello\nthere" and page.input_value("#input") == ""


def test_the_sampling_controls_are_sent_with_each_message(page, server):
    assert page.input_value("#top-p") == "0.9"  # the server's default, from /api/config
    requests = chat_requests(page)
    page.fill("#temperature", "0.5")
    page.fill("#top-k", "5")
    page.fill("#top-p", "0.8")
    send_and_watch(page, "Hello there")
    page.fill("#top-k", "0")  # off
    page.fill("#top-p", "")  # the server's default
    send_and_watch(page, "Hi")
    assert [{name: body[name] for name in ("temperature", "top_k", "top_p")} for body in requests] == [
        {"temperature": 0.5, "top_k": 5, "top_p": 0.8}, {"temperature": 0.5, "top_k": None, "top_p": None}]


def test_the_sampling_settings_survive_a_reload_over_the_servers_defaults(page):
    page.fill("#temperature", "1.3")
    page.fill("#top-k", "7")
    page.fill("#top-p", "")  # the server's default: kept empty, not refilled from /api/config
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'nanochat-fast'")
    assert [page.input_value(f"#{field}") for field in ("temperature", "top-k", "top-p")] == ["1.3", "7", ""]
    requests = chat_requests(page)
    send_and_watch(page, "Hi")
    assert {name: requests[-1][name] for name in ("temperature", "top_k", "top_p")} == {
        "temperature": 1.3, "top_k": 7, "top_p": None}


def test_the_conversation_survives_a_reload_until_a_new_one_begins(page, checkpoint):
    first, _ = send_and_watch(page, "Hello there")
    page.reload()
    assert page.locator(".message").all_text_contents() == ["Hello there", first]
    assert page.is_hidden("#empty-state")
    requests = chat_requests(page)
    page.wait_for_function("document.getElementById('model-name').textContent === 'nanochat-fast'")
    page.fill("#temperature", "0")
    second, _ = send_and_watch(page, "How are you?")
    assert "history" not in requests[-1]  # the same conversation on the server: its kept state goes on
    assert [first, second] == single_user_replies(checkpoint, ["Hello there", "How are you?"], REPLY_CHARS)

    # Reloaded mid-reply: that turn is lost, and the next message rebuilds the state without it.
    page.fill("#input", "Never mind")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 3")
    page.reload()
    assert page.locator(".message").count() == 4
    page.wait_for_function("document.getElementById('model-name').textContent === 'nanochat-fast'")
    page.fill("#temperature", "0")
    third, _ = send_and_watch(page, "Tell me more")
    assert requests[-1]["history"] == [{"role": "user", "content": "Hello there"},
                                       {"role": "assistant", "content": first},
                                       {"role": "user", "content": "How are you?"},
                                       {"role": "assistant", "content": second}]
    assert third == single_user_replies(checkpoint, ["Hello there", "How are you?", "Tell me more"], REPLY_CHARS)[2]

    page.click("#new-conversation")
    page.reload()
    assert page.locator(".message").count() == 0 and page.is_visible("#empty-state")


def test_characters_outside_the_vocabulary_get_the_terminals_notice(page, checkpoint):
    reply, _ = send_and_watch(page, "héllo")
    assert page.locator(".notice").all_text_contents() == [unknown_chars_notice(TOKENIZER, "héllo")]
    assert page.locator(".message").all_text_contents() == ["héllo", unknown_chars_notice(TOKENIZER, "héllo"), reply]
    send_and_watch(page, "hello")
    assert page.locator(".notice").count() == 1  # none for a message the model can read


def test_an_ensembles_empty_state_says_how_many_models_it_averages_and_it_replies(browser, tmp_path):
    torch.manual_seed(5)
    ensemble = CharEnsemble(ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=2, members=2))
    save_checkpoint(tmp_path / "best", ensemble, TOKENIZER)
    with serve(tmp_path / "best", seconds_per_step=0.0) as server:
        wait_until_ready(server.url)
        parameters = httpx.get(server.url + "/api/config").json()["parameters"]
        context = browser.new_context()
        page = open_chat(context, server.url)
        assert page.text_content("#model-size") == f"2 averaged 2-layer LSTMs, 32 units per layer, " \
            f"{parameters / 1000:.1f}K parameters"
        reply, _ = send_and_watch(page, "Hello there")
        assert reply == single_user_replies(tmp_path / "best", ["Hello there"], REPLY_CHARS)[0]  # the average's
        context.close()


def test_the_empty_state_names_the_model_its_size_and_vocabulary(page, server):
    config = httpx.get(server.url + "/api/config").json()
    page.wait_for_function("document.getElementById('model-name').textContent === 'nanochat-fast'")
    assert page.is_visible("#empty-state")
    assert page.text_content("#model-size") == f"2-layer LSTM, 32 units per layer, " \
        f"{config['parameters'] / 1000:.1f}K parameters"
    assert page.text_content("#model-vocabulary").startswith("62 tokens: 58 characters and 4 chat markers")
    assert page.text_content("#model-chars") == TOKENIZER.chars.replace(" ", "␣")
    send_and_watch(page, "Hello there")
    assert page.is_hidden("#empty-state")
    page.click("#new-conversation")
    assert page.is_visible("#empty-state")


@pytest.mark.parametrize("scheme, dark", [("light", False), ("dark", True)])
def test_the_theme_follows_the_system(browser, server, scheme, dark):
    context = browser.new_context(color_scheme=scheme)
    page = context.new_page()
    page.goto(server.url)
    brightness = """([selector, property]) => {
        const [r, g, b] = getComputedStyle(document.querySelector(selector))[property].match(/\\d+/g).map(Number);
        return (r + g + b) / 3;
    }"""
    for selector in ("body", "header", "#input"):
        assert (page.evaluate(brightness, [selector, "backgroundColor"]) < 64) == dark, selector
        assert (page.evaluate(brightness, [selector, "color"]) > 192) == dark, selector
    context.close()


def test_the_page_has_a_favicon_and_no_request_fails(browser, server):
    context = browser.new_context()
    failed = []
    context.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    context.on("requestfailed", lambda request: failed.append(request.url))
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_load_state("networkidle")
    assert page.locator("link[rel=icon]").count() == 1
    icon = page.get_attribute("link[rel=icon]", "href")
    width = page.evaluate("""href => new Promise(resolve => {
        const image = new Image();
        image.onload = () => resolve(image.naturalWidth);
        image.onerror = () => resolve(0);
        image.src = href;
    })""", icon)
    assert icon.startswith("data:image/svg+xml,") and width > 0  # inline: no /favicon.ico to ask for
    page.fill("#input", "Hello")
    page.click("#send")
    wait_for_reply(page)
    page.reload()
    page.wait_for_load_state("networkidle")
    assert failed == []
    context.close()

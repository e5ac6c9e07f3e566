"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright. It loads the
page, sends a message, watches the reply grow character by character, continues the conversation
after the server forgot it (404, then the page resends the history), and starts a new conversation.

Skips where /usr/bin/chromium is missing, except under CI=true, where that is a failure."""

import os
import time
from pathlib import Path

import httpx
import pytest

from nanochat_fast.web import ServerSettings
from nanochat_fast.web.app import create_app
from server_thread import ServerThread
from web_support import float64_loader, saved_checkpoint, single_user_replies, wait_until_ready

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
REPLY_CHARS = 60
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


def slow_loader(directory):
    """The checkpoint, with every generation step slowed down so the page's progress can be watched."""
    load = float64_loader(directory)

    def loader():
        checkpoint = load()
        step = checkpoint.model.step

        def slow_step(ids, state):
            time.sleep(SECONDS_PER_STEP)
            return step(ids, state)
        checkpoint.model.step = slow_step
        return checkpoint
    return loader


def send_and_watch(page, text) -> tuple[str, list[int]]:
    """Send text from the page; (the finished reply, the reply's lengths seen while it streamed)."""
    page.fill("#input", text)
    page.click("#send")
    reply = page.locator(".message.assistant").last
    lengths = []
    deadline = time.monotonic() + 20
    while reply.get_attribute("data-done") != "true":
        assert time.monotonic() < deadline, "the reply never finished"
        assert not page.locator(".notice").count(), page.locator(".notice").last.text_content()
        lengths.append(len(reply.text_content()))
        time.sleep(0.03)
    return reply.text_content(), lengths


def test_chat_page_streams_replies_and_starts_new_conversations(browser, checkpoint):
    settings = ServerSettings(max_reply_chars=REPLY_CHARS, max_conversations=1)
    with ServerThread(create_app(slow_loader(checkpoint), settings)) as server:
        wait_until_ready(server.url)
        page = browser.new_page()
        page.goto(server.url)
        page.fill("#temperature", "0")  # greedy: replies to compare with a single-user run

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

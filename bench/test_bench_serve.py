"""Serving over HTTP: `python -m nanochat_fast.serve` in a subprocess on a random 2x256 model, 32
concurrent conversations of several turns, greedy; p50/p99 time to first character and characters/s,
and every reply checked against a single-user run of the same conversation. (The engine thread
alone: test_bench_batching.py.)

    pytest bench/test_bench_serve.py -s

Nothing here asserts a time: the numbers go to extra_info and the printed summary.
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import pytest

from nanochat_fast.checkpoint import load_checkpoint, save_checkpoint
from nanochat_fast.generation import Chatbot
from test_bench_batching import GREEDY, REPLY_CHARS, TOKENIZER, make_model

HTTP_CONVERSATIONS, HTTP_TURNS = 32, 3
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m nanochat_fast.serve` on a random 2x256 checkpoint, in its own process."""
    directory = save_checkpoint(tmp_path_factory.mktemp("serve") / "best", make_model().cpu(), TOKENIZER)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "nanochat_fast.serve", "--ckpt", str(directory), "--port", str(port),
         "--max-reply-chars", str(REPLY_CHARS), "--max-concurrent", str(HTTP_CONVERSATIONS)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the server exited"
            time.sleep(0.05)
        yield url, directory
    finally:
        process.terminate()
        process.wait(timeout=10)


async def conversation(client, user_texts, timings):
    """One user's conversation; each turn's (time to first character, reply chars, turn seconds) go to timings."""
    conversation_id, replies = None, []
    for text in user_texts:
        started, first = time.perf_counter(), None
        reply = []
        body = {"message": text, "temperature": 0, "conversation_id": conversation_id}
        async with client.stream("POST", "/api/chat", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if event["type"] == "start":
                    conversation_id = event["conversation_id"]
                elif event["type"] == "text":
                    first = first or time.perf_counter()
                    reply.append(event["text"])
        timings.append((first - started, len(reply), time.perf_counter() - started))
        replies.append("".join(reply))
    return replies


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def test_http_32_concurrent_conversations(benchmark, server):
    url, directory = server
    user_texts = [[f"Hi, I am user {index}.", "How are you today?", f"Bye from {index}!"][:HTTP_TURNS]
                  for index in range(HTTP_CONVERSATIONS)]
    timings, results = [], {}

    async def everyone():
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=HTTP_CONVERSATIONS)) as client:
            return await asyncio.gather(*(conversation(client, texts, timings) for texts in user_texts))

    def run():
        timings.clear()
        started = time.perf_counter()
        results["replies"] = asyncio.run(everyone())
        results["seconds"] = time.perf_counter() - started

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    # Correctness, not speed: every reply equals a single-user run of the same conversation.
    model = load_checkpoint(directory).model
    expected = []
    for texts in user_texts:
        bot = Chatbot(model, TOKENIZER, GREEDY, REPLY_CHARS)
        expected.append([bot.reply(text) for text in texts])
    assert results["replies"] == expected

    first_char_ms = [first * 1e3 for first, _, _ in timings]
    chars = sum(count for _, count, _ in timings)
    per_reply_chars_per_second = [count / seconds for _, count, seconds in timings]
    summary = {"conversations": HTTP_CONVERSATIONS, "turns": HTTP_TURNS, "chars": chars,
               "p50_first_char_ms": round(percentile(first_char_ms, 0.5), 1),
               "p99_first_char_ms": round(percentile(first_char_ms, 0.99), 1),
               "aggregate_chars_per_second": round(chars / results["seconds"]),
               "median_reply_chars_per_second": round(statistics.median(per_reply_chars_per_second))}
    benchmark.extra_info.update(summary)
    print(f"\nserver, {HTTP_CONVERSATIONS} concurrent conversations x {HTTP_TURNS} turns: " +
          ", ".join(f"{name} {value}" for name, value in summary.items()))

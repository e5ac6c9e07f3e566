"""What the web tests share: a tiny random chat model saved as a checkpoint, a server running it,
and the single-user replies that served replies must equal."""

import contextlib
import json
import time

import httpx
import torch

from nanochat_fast.checkpoint import load_checkpoint, save_checkpoint
from nanochat_fast.generation import Chatbot
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.sampling import GREEDY
from nanochat_fast.tokenizer import CharTokenizer
from nanochat_fast.web import ServerSettings
from nanochat_fast.web.app import create_app
from server_thread import ServerThread

TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.!?'")


def chat_model(seed, end_bias=0.0) -> CharLSTM:
    """A random model whose greedy replies depend on the conversation (weights scaled up: at the
    default scale every prompt gets the same reply, which would hide mixed-up states) and hold no
    role markers or <|unk|>, so a transcript re-encodes to the very ids the model wrote."""
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(6.0)
        model.head.bias[[TOKENIZER.unk_id, TOKENIZER.user_id, TOKENIZER.assistant_id]] = -30.0
        model.head.bias[TOKENIZER.end_id] += end_bias
    return model


def saved_checkpoint(directory, seed=0, end_bias=0.0):
    save_checkpoint(directory, chat_model(seed, end_bias), TOKENIZER)
    return directory


def float64_loader(directory):
    """Load the checkpoint in float64, so batched and one-at-a-time steps agree on every argmax."""
    def load():
        checkpoint = load_checkpoint(directory)
        checkpoint.model.double()
        return checkpoint
    return load


def slow_loader(directory, seconds_per_step):
    """float64_loader's checkpoint, every generation step slowed down so a reply can be watched (or
    stopped) part-way."""
    load = float64_loader(directory)

    def loader():
        checkpoint = load()
        step = checkpoint.model.step

        def slow_step(ids, state):
            time.sleep(seconds_per_step)
            return step(ids, state)
        checkpoint.model.step = slow_step
        return checkpoint
    return loader


@contextlib.contextmanager
def running_server(directory, seconds_per_step=0.0, **settings):
    """A real uvicorn server on 127.0.0.1 serving the checkpoint, ready (model loaded) when entered;
    seconds_per_step slows its generation down (see slow_loader)."""
    load = slow_loader(directory, seconds_per_step) if seconds_per_step else float64_loader(directory)
    with ServerThread(create_app(load, ServerSettings(**settings))) as server:
        wait_until_ready(server.url)
        yield server


def wait_until_ready(url, timeout_s=10.0):
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for _ in range(int(timeout_s / 0.02)):
            if client.get("/health").status_code == 200:
                return
            time.sleep(0.02)
    raise AssertionError(f"{url} never became ready")


def single_user_replies(directory, user_texts, max_reply_chars):
    """The greedy replies of one Chatbot alone with the model: what the server must answer."""
    bot = Chatbot(float64_loader(directory)().model, TOKENIZER, GREEDY, max_reply_chars)
    return [bot.reply(text) for text in user_texts]


def read_events(response) -> list[dict]:
    """The `data: {json}` events of a streamed response, in order."""
    return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def chat(client, message, **fields) -> tuple[str, list[dict]]:
    """Send one message to /api/chat (greedy unless told); (reply text, events). Fails on an error status."""
    with client.stream("POST", "/api/chat", json={"message": message, "temperature": 0, **fields}) as response:
        assert response.status_code == 200, response.read()
        events = read_events(response)
    return "".join(event["text"] for event in events if event["type"] == "text"), events

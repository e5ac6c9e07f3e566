"""Benchmarks of generation on a random 2x256 model (the default size; weights do not change speed).

- Chat turn latency as the conversation grows from 0 to 10,000 characters: it should stay flat,
  because a turn feeds only its new characters into the kept LSTM state.
- Generation speed in characters per second (the LSTM's lean step on CPU, one CUDA-graph replay a
  character on CUDA).

    pytest bench/test_bench_chat.py --benchmark-only

Nothing here asserts a timing: the numbers go to the benchmark table and its extra_info.
"""

import pytest
import torch

from nanochat_fast.chat_format import encode_conversation
from nanochat_fast.generation import Chatbot, generate
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.sampling import SamplingConfig
from nanochat_fast.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.!?'\"-:;\n")
REPLY_CHARS = 100
GENERATED_CHARS = 1000
USER_MESSAGE = "How are you today?"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """As the CLIs run: one intra-op thread, which suits batch-1 generation (see sample.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=256, num_layers=2))
    with torch.no_grad():
        # No specials: replies never end early and every step writes exactly one character.
        model.head.bias[:TOKENIZER.end_id + 1] = -1e4
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def conversation_ids(chars):
    """Token ids of a made-up conversation about `chars` characters long (random 100-char messages)."""
    generator = torch.Generator().manual_seed(chars)
    messages = []
    for index in range(chars // 100):
        content = TOKENIZER.decode(torch.randint(4, TOKENIZER.vocab_size, (98,), generator=generator))
        messages.append({"role": ("user", "assistant")[index % 2], "content": content})
    return encode_conversation(TOKENIZER, messages)[0]


@pytest.mark.parametrize("history_chars", [0, 1000, 10000])
def test_chat_turn_latency(benchmark, model, history_chars):
    bot = Chatbot(model, TOKENIZER, SamplingConfig(temperature=0), max_reply_chars=REPLY_CHARS)
    history = conversation_ids(history_chars)

    def start_from_history():  # untimed: every round answers after the same history
        bot.reset()
        bot.read(history)
        if torch.cuda.is_available():  # the history's forward is queued: finish it here, not in the timed reply
            torch.cuda.synchronize()
        return (USER_MESSAGE,), {}

    reply = benchmark.pedantic(bot.reply, setup=start_from_history, rounds=10, warmup_rounds=1)
    assert len(reply) == REPLY_CHARS
    benchmark.extra_info.update(history_chars=len(history), reply_chars=len(reply),
                                user_message_chars=len(USER_MESSAGE), device=str(bot.engine.device))


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0), SamplingConfig(temperature=0.8, top_p=0.9)],
                         ids=["greedy", "temperature-0.8-top-p-0.9"])
def test_generation_chars_per_second(benchmark, model, sampling):
    prompt = TOKENIZER.encode("Hello")

    def generate_text():
        return "".join(generate(model, TOKENIZER, prompt, GENERATED_CHARS, sampling, seed=0, stop_at_end=False))

    text = benchmark.pedantic(generate_text, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(generated_chars=GENERATED_CHARS, device=str(next(model.parameters()).device))
    if benchmark.stats:  # absent with --benchmark-disable
        benchmark.extra_info["chars_per_second"] = round(GENERATED_CHARS / benchmark.stats.stats.mean)
        benchmark.extra_info["best_chars_per_second"] = round(GENERATED_CHARS / benchmark.stats.stats.min)
    assert len(text) == GENERATED_CHARS

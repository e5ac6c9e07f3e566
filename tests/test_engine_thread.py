"""The engine on its own thread, without HTTP (continuous batching): batched replies equal
one-at-a-time replies (greedy, and seeded sampling), whatever joins or leaves the batch around them;
the states they leave with; the slot and queue accounting; cancelling; a failed step."""

import threading

import pytest
import torch

from generation_reference import read, reference_reply
from nanochat_fast.engine import Sequence
from nanochat_fast.engine_thread import ROWS_FOR_ALL_THREADS, EngineThread, QueueFull, Request
from nanochat_fast.sampling import SamplingConfig
from web_support import GREEDY, TOKENIZER, chat_model

END = TOKENIZER.end_id


class Collector:
    """A reply's callbacks: the tokens written and how it ended."""

    def __init__(self):
        self.tokens, self.reason, self.state = [], None, None
        self.done = threading.Event()

    def on_token(self, token):
        self.tokens.append(token)

    def on_finish(self, reason, state):
        self.reason, self.state = reason, state
        self.done.set()


def reply(prompt, sampling, max_new_tokens, collector, state=None, seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return Request(Sequence(prompt, sampling, max_new_tokens, stop_id=END, state=state, generator=generator),
                   collector.on_token, collector.on_finish)


def one_at_a_time(model, prompt, sampling, max_new_tokens, state=None, seed=None):
    """The reference, without the engine, closing a cut reply with <|end|> as the chat does."""
    return reference_reply(model, prompt, sampling, max_new_tokens, stop_id=END, state=state, seed=seed)


def random_requests(count, seed):
    """Prompts of 1 to 20 random characters, caps of 1 to 25 tokens, and every third reply starting
    from the state of an earlier made-up conversation."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for index in range(count):
        prompt = torch.randint(4, TOKENIZER.vocab_size, (int(torch.randint(1, 21, (1,), generator=generator)),),
                               generator=generator)
        history = torch.randint(4, TOKENIZER.vocab_size, (15,), generator=generator) if index % 3 == 0 else None
        requests.append((prompt, int(torch.randint(1, 26, (1,), generator=generator)), history))
    return requests


def start_state(model, history):
    return None if history is None else read(model, history)[1]


@pytest.fixture
def engine_for():
    engines = []

    def make(model, **kwargs):
        engines.append(EngineThread(model, **kwargs))
        engines[-1].start()
        return engines[-1]
    yield make
    for engine in engines:
        engine.stop()


@pytest.mark.parametrize("sampling, seeded", [(GREEDY, False), (SamplingConfig(1.0, top_k=8, top_p=0.95), True)],
                         ids=["greedy", "seeded-sampling"])
def test_batched_replies_equal_one_at_a_time_replies(engine_for, sampling, seeded):
    model = chat_model(1, end_bias=2.0).double()  # float64: batch size cannot flip an argmax
    engine = engine_for(model, max_batch=4)  # 12 replies through 4 slots: rows join and leave mid-batch
    requests = random_requests(12, seed=7)
    collectors = [Collector() for _ in requests]
    for index, ((prompt, cap, history), collector) in enumerate(zip(requests, collectors, strict=True)):
        engine.submit(reply(prompt, sampling, cap, collector, start_state(model, history),
                            seed=index if seeded else None))
    for collector in collectors:
        assert collector.done.wait(10)
    reasons = set()
    for index, ((prompt, cap, history), collector) in enumerate(zip(requests, collectors, strict=True)):
        tokens, reason, state = one_at_a_time(model, prompt, sampling, cap, start_state(model, history),
                                              seed=index if seeded else None)
        assert collector.tokens == tokens and collector.reason == reason, f"reply {index}"
        torch.testing.assert_close(collector.state, state)
        reasons.add(reason)
    assert reasons == {"stop", "length"}  # both ways out of the batch were taken
    assert engine.in_flight == 0


def test_a_mixed_batch_keeps_each_replys_sampling():
    model = chat_model(2, end_bias=-30.0).double()
    prompt = TOKENIZER.encode("Hello")
    alone = one_at_a_time(model, prompt, GREEDY, 20)[0]
    engine = EngineThread(model, max_batch=8)
    greedy, sampled = Collector(), [Collector() for _ in range(3)]
    for index, collector in enumerate(sampled):  # submitted before the engine starts: one batch from step one
        engine.submit(reply(prompt, SamplingConfig(1.5), 20, collector, seed=index))
    engine.submit(reply(prompt, GREEDY, 20, greedy))
    engine.start()
    try:
        assert greedy.done.wait(10) and all(collector.done.wait(10) for collector in sampled)
    finally:
        engine.stop()
    assert greedy.tokens == alone
    for index, collector in enumerate(sampled):
        assert collector.tokens == one_at_a_time(model, prompt, SamplingConfig(1.5), 20, seed=index)[0]
    assert len({tuple(collector.tokens) for collector in sampled}) == 3  # seeds 0, 1, 2 differ


def test_a_full_queue_refuses_and_a_cancelled_waiting_reply_frees_its_place():
    model = chat_model(3).double()
    engine = EngineThread(model, max_batch=1, max_queue=1)  # not started: everything waits
    first, second = Collector(), Collector()
    engine.submit(reply(TOKENIZER.encode("a"), GREEDY, 5, first))
    waiting = reply(TOKENIZER.encode("b"), GREEDY, 5, second)
    engine.submit(waiting)
    with pytest.raises(QueueFull, match="1 generation slots are busy and 1 more"):
        engine.submit(reply(TOKENIZER.encode("c"), GREEDY, 5, Collector()))
    engine.cancel(waiting)
    assert second.reason == "cancelled" and second.state is None and engine.in_flight == 1
    engine.submit(reply(TOKENIZER.encode("c"), GREEDY, 5, Collector()))  # its place is free again
    engine.stop()  # never started: the waiting replies end as cancelled
    assert first.reason == "cancelled" and engine.in_flight == 0


def test_cancelling_a_running_reply_ends_it_closed_and_frees_its_slot(engine_for):
    model = chat_model(4, end_bias=-30.0).double()
    engine = engine_for(model, max_batch=2)
    endless, other = Collector(), Collector()
    running = reply(TOKENIZER.encode("Hi"), GREEDY, 10**9, endless)
    engine.submit(running)
    engine.submit(reply(TOKENIZER.encode("Hey"), GREEDY, 50, other))
    while len(endless.tokens) < 5:
        threading.Event().wait(0.001)
    engine.cancel(running)
    assert endless.done.wait(10) and endless.reason == "cancelled"
    # Its state is closed as a reply cut at its cap would be: as if it had been capped where it stopped.
    _, _, cut_state = one_at_a_time(model, TOKENIZER.encode("Hi"), GREEDY, len(endless.tokens))
    for got, expected in zip(endless.state, cut_state, strict=True):
        torch.testing.assert_close(got, expected)
    assert other.done.wait(10) and other.tokens == one_at_a_time(model, TOKENIZER.encode("Hey"), GREEDY, 50)[0]
    assert engine.in_flight == 0


def test_bad_replies_are_refused():
    engine = EngineThread(chat_model(5))
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit(reply(torch.tensor([], dtype=torch.long), GREEDY, 5, Collector()))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(reply(TOKENIZER.encode("a"), GREEDY, 0, Collector()))


@pytest.mark.parametrize("replies, main_thread_threads, expected", [(1, 2, 1), (ROWS_FOR_ALL_THREADS, 1, 2)])
def test_a_batch_runs_on_all_the_engines_threads_only_from_enough_rows_on(replies, main_thread_threads,
                                                                           expected, monkeypatch):
    # The main thread's count is the one a new thread would inherit: the engine must set its own.
    model = chat_model(7, end_bias=-30.0).double()  # no early stops: every step holds every reply
    step, seen = model.step, set()

    def recording(ids, state):
        seen.add(torch.get_num_threads())
        return step(ids, state)
    monkeypatch.setattr(model, "step", recording)
    saved = torch.get_num_threads()
    torch.set_num_threads(main_thread_threads)
    engine = EngineThread(model, max_batch=ROWS_FOR_ALL_THREADS, threads=2)
    try:
        collectors = [Collector() for _ in range(replies)]
        for collector in collectors:  # all queued before the loop starts, so they join together
            engine.submit(reply(TOKENIZER.encode("Hi"), GREEDY, 5, collector))
        engine.start()
        assert all(collector.done.wait(10) and collector.reason == "length" for collector in collectors)
    finally:
        engine.stop()
        torch.set_num_threads(saved)
    assert seen == {expected}


def test_a_failed_step_ends_the_batch_with_error_and_the_engine_serves_on(engine_for, monkeypatch):
    model = chat_model(6, end_bias=-30.0).double()
    engine = engine_for(model)
    step = model.step
    failures = iter([RuntimeError("out of memory (simulated)")])

    def failing_once(ids, state):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return step(ids, state)
    monkeypatch.setattr(model, "step", failing_once)
    failed, served = Collector(), Collector()
    engine.submit(reply(TOKENIZER.encode("Hi there"), GREEDY, 10, failed))
    assert failed.done.wait(10) and failed.reason == "error" and failed.state is None
    engine.submit(reply(TOKENIZER.encode("Hi there"), GREEDY, 10, served))
    assert served.done.wait(10) and served.reason == "length"
    assert served.tokens == one_at_a_time(model, TOKENIZER.encode("Hi there"), GREEDY, 10)[0]
    assert engine.in_flight == 0

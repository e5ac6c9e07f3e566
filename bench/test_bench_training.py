"""Benchmark: the real training step against a bare training loop of the same model and batch shape.

The training step is `train_step` on the streams' next batch, as the training loop runs it: everything
a training step does (stream batching, state carry and resets, masked loss, gradient clipping, the
chat model's optimizer step); the bare loop is forward + backward + the same optimizer's step on a fixed
batch and nothing else. Each benchmark records its chars/s in extra_info. The bare-loop benchmark also
records the ratio training step / bare loop (the goal: at most 1.15), from rounds of the two taken in
turn, so both see the same load on a shared machine, comparing each one's fastest round, since other
processes only ever add time. Nothing here asserts a time.

    pytest bench/test_bench_training.py -s
"""

import time

import pytest
import torch
import torch.nn.functional as F

from nanochat_fast.batching import TrainStreams
from nanochat_fast.model import CharLSTM, ModelConfig, embedding_size_for
from nanochat_fast.precision import autocast
from nanochat_fast.optimizer import make_optimizer
from nanochat_fast.training import (ADAM_BETAS, ADAMW_BATCH_SIZE, DEFAULT_LR, SMALL_DATA_NUM_LAYERS,
                                    SMALL_DATA_WEIGHT_DROP, WIDE_SMALL_DATA_DROPOUT, TrainConfig, synchronize,
                                    train_step)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEFAULTS = TrainConfig()
BATCH_SIZE, SEQ_LEN = ADAMW_BATCH_SIZE, DEFAULTS.seq_len  # the chat model's: AdamW, on 32 streams
# The default chat model where a machine trains it 512 wide (training.py's _model_config)
MODEL = ModelConfig(vocab_size=80, hidden_size=512, num_layers=SMALL_DATA_NUM_LAYERS, dropout=WIDE_SMALL_DATA_DROPOUT,
                    weight_drop=SMALL_DATA_WEIGHT_DROP, embedding_size=embedding_size_for(80, 512))
STEPS_PER_ROUND = 5
ROUNDS = 5
CHARS_PER_ROUND = STEPS_PER_ROUND * BATCH_SIZE * SEQ_LEN


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = CharLSTM(MODEL).to(DEVICE).train()
    return model, make_optimizer(model, "adamw", DEFAULT_LR, DEFAULTS.weight_decay, ADAM_BETAS)


def training_steps():
    """A round of train_step on chat-like data: about half the characters are targets."""
    model, optimizer = make_model_and_optimizer()
    ids = torch.randint(0, MODEL.vocab_size, (200_000,))
    mask = torch.rand(len(ids)) < 0.5
    streams = TrainStreams(ids, mask, BATCH_SIZE, SEQ_LEN)
    state = model.initial_state(BATCH_SIZE, DEVICE)

    def steps():
        nonlocal state
        for _ in range(STEPS_PER_ROUND):
            batch = streams.next_batch().to(DEVICE)
            _, state = train_step(model, optimizer, batch, state, DEFAULT_LR, DEFAULTS.grad_clip)
        synchronize(DEVICE)

    return steps


def bare_steps():
    """A round of the least a training step can be: forward, loss, backward, the optimizer's step."""
    model, optimizer = make_model_and_optimizer()
    inputs = torch.randint(0, MODEL.vocab_size, (BATCH_SIZE, SEQ_LEN), device=DEVICE)
    targets = torch.randint(0, MODEL.vocab_size, (BATCH_SIZE, SEQ_LEN), device=DEVICE)
    state = model.initial_state(BATCH_SIZE, DEVICE)

    def steps():
        nonlocal state
        for _ in range(STEPS_PER_ROUND):
            with autocast(DEVICE):
                logits, new_state = model(inputs, state)
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = tuple(part.detach() for part in new_state)
        synchronize(DEVICE)

    return steps


@pytest.fixture(scope="module")
def loops():
    loops = {"training_step": training_steps(), "bare_loop": bare_steps()}
    for steps in loops.values():
        steps()  # warm-up: allocator, kernel compilation
    return loops


def round_seconds(steps) -> float:
    start = time.perf_counter()
    steps()
    return time.perf_counter() - start


def run_benchmark(benchmark, steps):
    benchmark.pedantic(steps, rounds=ROUNDS)
    benchmark.extra_info["device"] = str(DEVICE)
    if benchmark.stats is not None:  # None under --benchmark-disable: ran once, nothing measured
        benchmark.extra_info["chars_per_second"] = CHARS_PER_ROUND / benchmark.stats.stats.min


def test_training_step(benchmark, loops):
    run_benchmark(benchmark, loops["training_step"])


def test_bare_loop(benchmark, loops):
    run_benchmark(benchmark, loops["bare_loop"])
    rounds = {name: [] for name in loops}
    for _ in range(ROUNDS):  # in turn, so that both see the same load
        for name, steps in loops.items():
            rounds[name].append(round_seconds(steps))
    fastest = {name: min(seconds) for name, seconds in rounds.items()}
    ratio = fastest["training_step"] / fastest["bare_loop"]
    benchmark.extra_info["training_step_over_bare_loop"] = ratio
    print(f"\ntraining step / bare loop: {ratio:.3f} (goal: at most 1.15); chars/s: "
          + ", ".join(f"{name} {CHARS_PER_ROUND / seconds:,.0f}" for name, seconds in fastest.items()))

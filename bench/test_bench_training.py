"""Benchmark: the real training step against a bare training loop of the same model and batch shape.

`Trainer.step` does everything a training step does (stream batching, state carry and resets, masked
loss, gradient clipping, AdamW); the bare loop is forward + backward + AdamW on a fixed batch and
nothing else. Both record chars/s in extra_info; the second to run also records the ratio of their
fastest rounds (the goal: the training step within 1.15x of the bare loop). The fastest round, not the
median, because other processes on a shared CPU only ever add time. Nothing here asserts a time.

    pytest bench/test_bench_training.py
"""

import torch
import torch.nn.functional as F

from nanochat_fast.batching import TrainStreams
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.training import Trainer, TrainConfig, autocast

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEFAULTS = TrainConfig()
BATCH_SIZE, SEQ_LEN = DEFAULTS.batch_size, DEFAULTS.seq_len
MODEL = ModelConfig(vocab_size=80, hidden_size=256, num_layers=2, dropout=0.2)  # the default chat model
STEPS_PER_ROUND = 5
ROUNDS = 5
fastest_round_seconds = {}  # per benchmark, for the ratio


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = CharLSTM(MODEL).to(DEVICE).train()
    return model, torch.optim.AdamW(model.parameters(), lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay,
                                    fused=DEVICE.type == "cuda")


def run_benchmark(benchmark, name, steps):
    steps()  # warm-up: allocator, kernel compilation
    benchmark.pedantic(steps, rounds=ROUNDS)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    fastest = fastest_round_seconds[name] = benchmark.stats.stats.min
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.extra_info["chars_per_second"] = STEPS_PER_ROUND * BATCH_SIZE * SEQ_LEN / fastest
    if len(fastest_round_seconds) == 2:
        ratio = fastest_round_seconds["training_step"] / fastest_round_seconds["bare_loop"]
        benchmark.extra_info["training_step_over_bare_loop"] = ratio
        print(f"\ntraining step / bare loop: {ratio:.3f} (goal: at most 1.15)")


def test_training_step(benchmark):
    model, optimizer = make_model_and_optimizer()
    ids = torch.randint(0, MODEL.vocab_size, (200_000,))
    mask = torch.rand(len(ids)) < 0.5  # like chat data: about half the characters are targets
    trainer = Trainer(model, optimizer, TrainStreams(ids, mask, BATCH_SIZE, SEQ_LEN), DEFAULTS.grad_clip, DEVICE)

    def steps():
        for _ in range(STEPS_PER_ROUND):
            trainer.step(DEFAULTS.lr)

    run_benchmark(benchmark, "training_step", steps)


def test_bare_loop(benchmark):
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state = tuple(part.detach() for part in new_state)

    run_benchmark(benchmark, "bare_loop", steps)

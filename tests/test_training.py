"""Training: batching of the parallel streams, the loss mask, the schedule, stateful evaluation, a tiny
end-to-end run, Ctrl-C plus resume giving exactly the unbroken run, a run of an older version refusing
to resume, fine-tuning, and the train.py CLI: its "train one first" hints run as given, and what a second
Ctrl-C says was kept."""

import base64
import itertools
import json
import math
import random
import re
import runpy
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from corpus_files import write_chat, write_text
from nanochat_fast.batching import TrainStreams, validation_batches
from nanochat_fast.checkpoint import CheckpointError, load_checkpoint, load_training_state, save_checkpoint
from nanochat_fast.data import load_corpus
from nanochat_fast.model import CharLSTM, ModelConfig, dropout, embedding_size_for
from nanochat_fast.precision import can_compute_bfloat16, computes_in_bfloat16
from nanochat_fast import report, sample, time_budget, training
from nanochat_fast.time_budget import TIMED_STEPS, plan_steps
from nanochat_fast.training import (TrainConfig, TrainConfigError, evaluate_bits_per_char, learning_rate,
                                    resume, target_loss_sum, train)
from nanochat_fast.weight_average import WeightAverage

REPO = Path(__file__).resolve().parents[1]
# float32 on every machine, bfloat16 CPUs too: the tests compare numbers across runs and processes.
# One model, whatever the machine's threads (an ensemble's tests say members=2).
TINY = TrainConfig(hidden_size=16, batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-3, device="cpu", precision="float32",
                   members=1)


def test_streams_read_consecutive_chunks_and_restart_at_the_start():
    length, batch_size, seq_len = random.randint(40, 60), 3, 7
    ids = torch.arange(length)  # each id is its own position, so a chunk shows where it was read
    mask = torch.rand(length) < 0.5
    streams = TrainStreams(ids, mask, batch_size, seq_len)
    assert streams.offsets == [b * length // batch_size for b in range(batch_size)]
    next_start = list(streams.offsets)
    restarts = 0
    for _ in range(20):
        batch = streams.next_batch()
        assert batch.inputs.shape == batch.targets.shape == batch.target_mask.shape == (batch_size, seq_len)
        assert torch.equal(batch.targets, batch.inputs + 1)
        assert torch.equal(batch.target_mask, mask[batch.targets])  # position k counts if token k+1 does
        assert torch.equal(batch.inputs - batch.inputs[:, :1], torch.arange(seq_len).expand(batch_size, -1))
        assert int(batch.targets.max()) < length
        restarted = batch.restarted if batch.restarted is not None else torch.zeros(batch_size, dtype=torch.bool)
        for b in range(batch_size):
            if restarted[b]:
                assert batch.inputs[b, 0] == 0
                restarts += 1
            else:
                assert batch.inputs[b, 0] == next_start[b]
        next_start = streams.offsets
    assert restarts > 0


def test_validation_batches_cover_every_target_once():
    length, seq_len = random.randint(30, 80), random.randint(3, 9)
    ids = torch.arange(length)
    mask = torch.rand(length) < 0.6
    pairs = []
    for batch in validation_batches(ids, mask, num_streams=4, seq_len=seq_len):
        counted = batch.target_mask
        pairs += [(int(i), int(t)) for i, t in zip(batch.inputs[counted], batch.targets[counted], strict=True)]
    assert sorted(pairs) == [(k, k + 1) for k in range(length - 1) if mask[k + 1]]
    plain_pairs = sum(int(batch.target_mask.sum()) for batch in validation_batches(ids, None, 4, seq_len))
    assert plain_pairs == length - 1


def test_loss_counts_only_target_positions():
    vocab_size = 11
    logits = torch.randn(3, 8, vocab_size)
    targets = torch.randint(0, vocab_size, (3, 8))
    mask = torch.rand(3, 8) < 0.5
    mask[0, 0], mask[0, 1] = True, False
    loss_sum, count = target_loss_sum(logits, targets, mask)
    expected = -F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0][mask].sum()
    assert torch.allclose(loss_sum, expected) and count == mask.sum()

    changed = targets.clone()
    changed[~mask] = (changed[~mask] + 1) % vocab_size
    assert torch.equal(target_loss_sum(logits, changed, mask)[0], loss_sum)
    changed[0, 0] = (changed[0, 0] + 1) % vocab_size
    assert not torch.allclose(target_loss_sum(logits, changed, mask)[0], loss_sum)


def test_schedule_warms_up_then_decays_to_min_lr_at_the_end():
    lr, min_lr, warmup, planned = 3e-3, 3e-4, 10, 100
    rates = [learning_rate(step, planned, lr, min_lr, warmup) for step in range(planned)]
    assert rates[:warmup] == pytest.approx([lr * (step + 1) / warmup for step in range(warmup)])
    assert rates[warmup] == pytest.approx(lr)
    assert rates[-1] == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:], strict=False))
    middle = warmup + (planned - 1 - warmup) // 2
    assert rates[middle] == pytest.approx((lr + min_lr) / 2, rel=0.05)
    assert learning_rate(40, None, lr, min_lr, warmup) == lr  # the plan is not known yet


def test_evaluation_carries_state_across_chunks():
    model = CharLSTM(ModelConfig(vocab_size=9, hidden_size=8, num_layers=2, dropout=0.5)).train()
    ids = torch.randint(0, 9, (57,))
    with torch.no_grad():
        logits = model.eval()(ids[None, :-1])[0][0]
    model.train()
    whole_sequence = F.cross_entropy(logits, ids[1:]).item() / math.log(2)
    chunked = evaluate_bits_per_char(model, ids, None, seq_len=5, device=torch.device("cpu"), num_streams=1,
                                     precision="float32")
    assert chunked == pytest.approx(whole_sequence, rel=1e-5)
    assert model.training


@pytest.mark.parametrize("length, num_streams, seq_len", [(203, 4, 7), (57, 3, 5)])
def test_a_checks_sample_is_the_first_quarter_of_every_validation_stream(length, num_streams, seq_len):
    torch.manual_seed(3)
    model = CharLSTM(ModelConfig(vocab_size=9, hidden_size=8, num_layers=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # far from a uniform guess, so that the sample's figure differs from the whole's
    ids = torch.randint(0, 9, (length,))
    stream_length = -(-(length - 1) // num_streams)  # the last stream is shorter: ragged
    chunks = -(-stream_length // seq_len)
    sample_length = math.ceil(training.VAL_SAMPLE_SHARE * chunks) * seq_len
    losses = []
    with torch.no_grad():
        for start in range(0, length - 1, stream_length):  # each stream as one sequence
            stop = min(start + stream_length, length - 1)
            logits = model(ids[None, start:stop])[0][0]
            losses.append(F.cross_entropy(logits, ids[start + 1:stop + 1], reduction="none"))
    sample = torch.cat([loss[:sample_length] for loss in losses]).mean().item() / math.log(2)
    whole = torch.cat(losses).mean().item() / math.log(2)
    read = training.validate(model, ids, None, seq_len, torch.device("cpu"), num_streams=num_streams,
                             precision="float32")
    assert read.sample == pytest.approx(sample, rel=1e-5) and read.whole == pytest.approx(whole, rel=1e-5)
    assert read.sample != pytest.approx(read.whole, rel=1e-3)
    sample_only = training.validate(model, ids, None, seq_len, torch.device("cpu"), whole=False,
                                    num_streams=num_streams, precision="float32")
    assert sample_only.sample == pytest.approx(sample, rel=1e-5) and sample_only.whole is None


@pytest.mark.parametrize("reads, deadline, best_step, best_val", [
    ([(1.95, 2.1)], math.inf, 8, 2.1),  # the last step reads the sample best: it is best/
    ([(2.2, 2.1), (2.3, 1.9)], math.inf, 4, 1.9),  # an earlier best/ reads the whole text better: it stays
    ([(2.2, 2.1), (2.3, 2.2)], math.inf, 8, 2.1),  # the last step reads the whole text better: it replaces best/
    # Each read takes 10 s from 0: a second one would end at 20, past the deadline (the last step replaces best/)
    ([(2.2, 2.1)], 15.0, 8, 2.1)], ids=["sample", "best-stays", "whole", "no-time"])
def test_the_last_check_keeps_as_best_whichever_reads_the_whole_text_better(tmp_path, monkeypatch, reads,
                                                                           deadline, best_step, best_val):
    # best/ is step 4's, the best sample so far (2.0); the run's last check is at step 8.
    data = write_text(tmp_path / "words.txt", 3000)
    corpus = load_corpus(data)
    model = CharLSTM(ModelConfig(vocab_size=corpus.tokenizer.vocab_size, hidden_size=8, num_layers=1, dropout=0.0))
    save_checkpoint(tmp_path / "out" / "best", model, corpus.tokenizer)
    scripted = iter([training.Validation(sample, whole) for sample, whole in reads])
    now = [0.0]

    def timed_read(*args, **kwargs):
        now[0] += 10.0
        return next(scripted)
    monkeypatch.setattr(training, "clock", lambda: now[0])
    monkeypatch.setattr(training, "validate", timed_read)
    state = training.TrainState(step=8, best_step=4, best_sample_bits_per_char=2.0, val_bits_per_char=[[4, 2.0]])
    improved, line = training._validation_check(model, corpus, replace(TINY, data=data, out=str(tmp_path / "out")),
                                                torch.device("cpu"), state, True, deadline)
    assert next(scripted, None) is None  # best/ read whole only where needed and there is time
    assert improved == (best_step == 8) and (state.best_step, state.best_val_bits_per_char) == (best_step, best_val)
    assert state.final_val_bits_per_char == 2.1 and state.val_bits_per_char[-1] == [8, reads[0][0]]
    assert line.startswith("step 8: validation 2.1000 bits/char") and ("1.9000" in line) == (best_step == 4)


@pytest.mark.parametrize("backend, cell", [("torch", "lstm"), ("torch", "gru"), ("triton", "lstm")])
def test_weight_drop_zeroes_a_share_of_the_recurrent_weights_in_training_only(backend, cell):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=9, hidden_size=32, num_layers=2, dropout=0.0, cell=cell, weight_drop=0.25),
                     lstm_backend=backend)
    seen = []  # the weights the recurrent layers ran with, call by call
    model.recurrent.register_forward_hook(
        lambda module, args, output: seen.append({name: w.detach().clone() for name, w in module.named_parameters()}))
    originals = dict(model.recurrent.named_parameters())
    ids = torch.randint(0, 9, (3, 7))
    model(ids)[0].square().sum().backward()
    model(ids)
    model.eval()(ids)
    first, second, evaluated = seen
    for name, weight in originals.items():
        assert model.recurrent.get_parameter(name) is weight  # the module's own parameters once the call is done
        assert torch.equal(evaluated[name], weight)
        if not name.startswith("weight_hh"):
            assert torch.equal(first[name], weight)
            continue
        kept = first[name] != 0
        assert (~kept).float().mean().item() == pytest.approx(0.25, abs=0.03)
        torch.testing.assert_close(first[name][kept], weight[kept] / 0.75)  # the kept entries scaled up
        assert weight.grad[~kept].count_nonzero() == 0  # no gradient through a dropped entry
        assert weight.grad[kept].count_nonzero() > 0.9 * kept.sum()
        assert not torch.equal(second[name] != 0, kept)  # a fresh mask every step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_models_dropout_zeroes_a_share_p_and_scales_the_rest_as_f_dropout_does(dtype):
    torch.manual_seed(0)
    x = (torch.rand(64, 32, 48) + 0.5).to(dtype).requires_grad_()  # no zeros of its own
    y = dropout(x, 0.4, True)
    kept = y != 0
    assert y.dtype == dtype
    assert (~kept).float().mean().item() == pytest.approx(0.4, abs=0.01)  # 98,304 entries: a spread of 0.0016
    torch.testing.assert_close(y[kept], x[kept] / 0.6)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.to(dtype) / 0.6)
    assert torch.equal(dropout(x, 0.4, False), x) and torch.equal(dropout(x, 0.0, True), x)
    assert not torch.equal(dropout(x, 0.4, True) != 0, kept)  # a fresh mask every call


@pytest.mark.parametrize("kind, hidden_size, passes, dropout", [
    ("chat", 256, 30, training.SMALL_DATA_DROPOUT), ("chat", 256, 5, training.SMALL_DATA_DROPOUT),
    ("chat", 384, training.FEW_PASSES, training.WIDE_SMALL_DATA_DROPOUT),
    ("chat", 384, training.FEW_PASSES - 1, training.FEW_PASSES_DROPOUT),
    ("chat", 512, training.FEW_PASSES - 1, training.WIDE_SMALL_DATA_DROPOUT),  # wider: by heart in fewer passes
    ("chat", 512, training.FEW_PASSES * (384 / 512) ** 2 - 0.1, training.FEW_PASSES_DROPOUT),
    ("chat", 384, None, training.WIDE_SMALL_DATA_DROPOUT), ("text", 512, 5, 0.0)])
def test_dropout_grows_with_the_width_and_the_passes_over_data_learned_by_heart(kind, hidden_size, passes, dropout):
    corpus = SimpleNamespace(kind=kind, train_ids=range(training.SMALL_DATA_CHARS))
    assert training._dropout(TrainConfig(), corpus, hidden_size, passes) == dropout
    assert training._dropout(TrainConfig(dropout=0.3), corpus, hidden_size, passes) == 0.3


@pytest.mark.parametrize("kind, size, hidden_size, passes, weight_drop", [
    ("chat", 10_000, 512, None, training.SMALL_DATA_WEIGHT_DROP),
    ("chat", 10_000, 384, training.MANY_PASSES - 1, training.SMALL_DATA_WEIGHT_DROP),
    ("chat", 10_000, 384, training.MANY_PASSES, training.MANY_PASSES_WEIGHT_DROP),
    ("chat", 10_000, 512, training.MANY_PASSES * (384 / 512) ** 2 + 0.1, training.MANY_PASSES_WEIGHT_DROP),  # wider
    ("text", training.SMALL_DATA_CHARS - 1, 512, None, training.SMALL_DATA_WEIGHT_DROP),
    ("text", training.SMALL_DATA_CHARS, 512, 500, 0.0)])
def test_weight_drop_is_for_data_learned_by_heart_and_grows_with_the_passes(kind, size, hidden_size, passes,
                                                                           weight_drop):
    corpus = SimpleNamespace(kind=kind, train_ids=range(size))
    assert training._weight_drop(TrainConfig(), corpus, hidden_size, passes) == weight_drop
    assert training._weight_drop(TrainConfig(weight_drop=0.2), corpus, hidden_size, passes) == 0.2


@pytest.mark.parametrize("vocab_size, hidden_size, embedding_size", [(107, 512, 128), (65, 512, 96), (96, 512, 96),
                                                                     (107, 64, 64), (300, 256, 256)])
def test_the_embedding_is_the_vocabulary_rounded_up_to_32_at_most_the_width(vocab_size, hidden_size, embedding_size):
    assert embedding_size_for(vocab_size, hidden_size) == embedding_size


def test_a_new_model_has_the_embedding_size_of_its_vocabulary_or_the_flag(tmp_path):
    data = write_text(tmp_path / "words.txt", 3000)  # 22 characters
    for width, flag, expected in ((64, None, 32), (16, None, 16), (64, 8, 8)):
        run = train(replace(TINY, hidden_size=width, embedding_size=flag, data=data, max_steps=1,
                            out=str(tmp_path / f"{width}-{flag}")))
        model = load_checkpoint(run.out / "latest").model
        assert model.config.embedding_size == expected and model.embedding.weight.shape == (22, expected)
        assert model.lstm.weight_ih_l0.shape == (4 * width, expected)


def test_one_layer_drops_out_before_the_head_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nn.LSTM warns of dropout with one layer, where it does nothing
        model = CharLSTM(ModelConfig(vocab_size=9, hidden_size=16, num_layers=1, dropout=0.5))
    ids = torch.randint(0, 9, (2, 7))
    assert not torch.equal(model.train()(ids)[0], model(ids)[0])
    assert torch.equal(model.eval()(ids)[0], model(ids)[0])


@pytest.mark.parametrize("kind, size, num_layers", [
    ("chat", 10_000, training.SMALL_DATA_NUM_LAYERS),
    ("text", training.SMALL_DATA_CHARS - 1, training.SMALL_DATA_NUM_LAYERS),
    ("text", training.SMALL_DATA_CHARS, training.LARGE_DATA_NUM_LAYERS)])
def test_data_learned_by_heart_within_minutes_gets_fewer_layers(kind, size, num_layers):
    corpus = SimpleNamespace(kind=kind, train_ids=range(size), tokenizer=SimpleNamespace(vocab_size=50))
    for flag, expected in ((None, num_layers), (3, 3)):
        config = replace(TINY, max_steps=10, num_layers=flag)
        model_config = training._model_config(config, corpus, torch.device("cpu"), None, training.Ranks())
        assert model_config.num_layers == expected


def test_tiny_run_lowers_validation_loss_and_saves_checkpoints(tmp_path):
    data = write_text(tmp_path / "words.txt", 6000)
    result = train(replace(TINY, data=data, out=str(tmp_path / "out"), max_steps=120, eval_every=30))
    state = result.state
    assert not result.interrupted and state.step == 120 and len(state.train_bits_per_char) == 120
    val = [bits for _, bits in state.val_bits_per_char]
    assert [step for step, _ in state.val_bits_per_char] == [30, 60, 90, 120]
    assert val[-1] < val[0] - 0.5
    assert state.best_sample_bits_per_char == min(val) or state.best_step == 120  # see test_the_last_check_...
    best = load_checkpoint(tmp_path / "out")  # what chat loads
    assert best.config["train_state"]["step"] == state.best_step
    latest = load_checkpoint(tmp_path / "out" / "latest")
    assert latest.config["train_state"]["step"] == 120
    # best/ holds the weights' average, which the validation read, not the trained weights latest/ goes on with
    corpus = load_corpus(data)
    best_read = evaluate_bits_per_char(best.model, corpus.val_ids, corpus.val_mask, TINY.seq_len, torch.device("cpu"),
                                       precision=TINY.precision)
    assert best_read == pytest.approx(state.best_val_bits_per_char, rel=1e-6)  # the whole text's
    average = WeightAverage.saved_in(load_training_state(tmp_path / "out" / "latest")[1])
    trained = latest.model.state_dict()
    assert average.keys() == trained.keys() and any(not torch.equal(average[k], trained[k]) for k in trained)
    if state.best_step == 120:
        assert all(torch.equal(average[name], weight) for name, weight in best.model.state_dict().items())


def test_time_budget_becomes_a_saved_step_count(tmp_path):
    data = write_text(tmp_path / "words.txt", 3000)
    result = train(replace(TINY, data=data, out=str(tmp_path / "out"), max_minutes=0.005))
    planned = result.state.planned_steps
    assert planned is not None and not result.interrupted and result.state.step == planned
    assert planned > TIMED_STEPS and result.state.chars_per_second > 0
    saved = load_checkpoint(tmp_path / "out" / "latest").config["train_state"]
    assert saved["planned_steps"] == planned and saved["step"] == planned


@pytest.mark.parametrize("device, precision, onednn_bfloat16, instructions, expected", [
    ("cpu", "auto", True, "avx512_bf16", True), ("cpu", "auto", True, "amx_tile", True),
    ("cpu", "auto", True, None, False),  # AVX-512 alone: oneDNN converts, 3 times slower than float32
    ("cpu", "auto", False, None, False), ("cuda", "auto", False, None, True),
    ("cpu", "float32", True, "avx512_bf16", False), ("cpu", "bfloat16", False, None, True)])
def test_bfloat16_where_the_cpu_has_its_instructions_or_when_asked(monkeypatch, device, precision, onednn_bfloat16,
                                                                   instructions, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: instructions == "avx512_bf16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: instructions == "amx_tile")
    assert computes_in_bfloat16(torch.device(device), precision) is expected


@pytest.mark.parametrize("budget", [{"max_steps": 2}, {"hidden_size": None, "max_minutes": 0.02}],
                         ids=["steps", "time-budget-measuring-its-width"])
def test_bfloat16_on_a_cpu_without_it_is_a_clear_error(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(TrainConfigError, match="--precision bfloat16 needs .* use --precision float32"):
        train(replace(TINY, data=write_text(tmp_path / "a.txt", 3000), out=str(tmp_path / "out"),
                      precision="bfloat16", **budget))


@pytest.mark.skipif(not can_compute_bfloat16(torch.device("cpu")), reason="oneDNN computes no bfloat16 here")
def test_a_bfloat16_run_learns_like_a_float32_one(tmp_path):
    data = write_text(tmp_path / "words.txt", 3000)
    finals = [train(replace(TINY, data=data, out=str(tmp_path / precision), max_steps=150, eval_every=150,
                            precision=precision)).state.val_bits_per_char[-1][1]
              for precision in ("float32", "bfloat16")]
    # Learned: over 1.5 bits a character below a uniform guess (the random text's final lands near 2.5).
    uniform = math.log2(load_checkpoint(tmp_path / "float32").tokenizer.vocab_size)
    assert finals[0] < uniform - 1.5 and finals[1] == pytest.approx(finals[0], abs=0.1)


@pytest.mark.parametrize("seconds_at_256, seconds_at, expected, measured", [
    (0.05, {384: 0.08, 512: 0.10}, 512, [256, 512]),  # a fast machine: 512 wide fits
    (0.05, {384: 0.08, 512: 0.40}, 384, [256, 512, 384]),  # 512 could have fitted, measured it does not
    (0.20, {384: 0.30, 512: 0.40}, 256, [256]),  # a slow machine: no wider width could fit, none is measured
])
def test_a_time_budget_takes_the_widest_model_this_machine_trains_enough_steps_of(seconds_at_256, seconds_at,
                                                                                  expected, measured):
    asked = []

    def seconds_per_step(width):
        asked.append(width)
        return seconds_at_256 if width == 256 else seconds_at[width]
    # Training time for the steps a width needs at 0.1 s a step of 1,000 characters, and 5% more.
    budget = ((time_budget.CHARACTERS_FOR_A_WIDER_MODEL / 1000 * 0.1 * 1.05 + time_budget.FINISH_SECONDS)
              / (1 - time_budget.EVALUATION_SHARE))
    assert time_budget.widest_affordable(budget, seconds_per_step, 1000) == expected and asked == measured


def test_a_budgeted_run_measures_its_width_and_a_counted_one_does_not(tmp_path, monkeypatch, capsys):
    measured, dropouts = [], {}
    probe = training._seconds_per_step

    def recording(model_config, *args):
        measured.append(model_config.hidden_size)
        dropouts[model_config.hidden_size] = model_config.dropout
        return probe(model_config, *args)
    monkeypatch.setattr(training, "_seconds_per_step", recording)
    data = write_chat(tmp_path / "chat.jsonl", 60)
    budgeted = train(replace(TINY, hidden_size=None, data=data, out=str(tmp_path / "budget"), max_minutes=0.02,
                             dropout=None))
    assert measured and measured[0] == 256 and budgeted.state.step > 0
    chosen = load_checkpoint(tmp_path / "budget").model.config
    width = chosen.hidden_size
    assert dropouts[width] > 0 and chosen.dropout > 0  # each width measured with dropout, as its run has
    assert width in time_budget.BUDGET_WIDTHS
    assert f"width: {width}, the widest this machine trains on" in capsys.readouterr().out
    measured.clear()
    counted = train(replace(TINY, hidden_size=None, data=data, out=str(tmp_path / "steps"), max_steps=2))
    assert not measured and load_checkpoint(counted.out).model.config.hidden_size == training.SMALL_HIDDEN_SIZE


def test_a_width_measurement_takes_the_median_step_after_a_warm_up(tmp_path, monkeypatch):
    # A slow first step, then steady steps with one stall among them, on a clock each step moves.
    seconds = iter([1.0, *random.sample([0.10, 0.11, 0.12, 0.13, 5.0], time_budget.PROBE_STEPS)])
    now, real_step = [0.0], training.train_step

    def timed_step(*args, **kwargs):
        now[0] += next(seconds)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(training, "clock", lambda: now[0])
    monkeypatch.setattr(training, "train_step", timed_step)
    corpus = load_corpus(write_text(tmp_path / "words.txt", 3000))
    config = replace(TINY, optimizer="adamw")
    measured = training._seconds_per_step(ModelConfig(corpus.tokenizer.vocab_size, 16, 1, 0.0), config, corpus,
                                          torch.device("cpu"), None, training.Ranks())
    assert measured == pytest.approx(0.12) and next(seconds, None) is None


def test_the_default_learning_rate_falls_as_the_model_widens_and_is_saved(tmp_path):
    data = write_text(tmp_path / "words.txt", 3000)
    for width in (16, 32):
        run = train(replace(TINY, lr=None, hidden_size=width, data=data, out=str(tmp_path / str(width)), max_steps=1))
        saved = load_checkpoint(run.out / "latest").config["extra"]["run_config"]["lr"]
        assert saved == pytest.approx(training.default_lr(width))
    assert training.default_lr(4 * 256) == pytest.approx(training.default_lr(256) / 2)  # the square root of the width
    with pytest.raises(TrainConfigError, match="--min-lr"):  # above the rate of so wide a model
        train(replace(TINY, lr=None, hidden_size=16, min_lr=1.0, data=data, out=str(tmp_path / "x"), max_steps=1))


def test_a_plan_fills_the_budget_after_the_evaluations_still_to_come():
    # 1,000 s left after FINISH_SECONDS; steps of 1 s; evaluations of 4 s: 10 of them fit in 5% of 1,000 s.
    budget = 1000 + time_budget.FINISH_SECONDS
    planned, every = plan_steps(budget, elapsed_seconds=0, step=0, seconds_per_step=1.0,
                                         evaluation_seconds=4.0, eval_every=None)
    assert (planned, every) == (960, 96)
    # Halfway, half the evaluations are still to come, spread over the steps still to come.
    # Halfway, the first and 5 of the 10 done, the last at step 390: the other 5 from there to the end.
    evaluated = [10, 100, 200, 290, 340, 390]
    assert plan_steps(budget, 500, 400, 1.0, 4.0, None, evaluated) == (880, 98)
    # On a machine twice as fast from here on: more steps between them, not more evaluations.
    assert plan_steps(budget, 500, 400, 0.5, 4.0, None, evaluated) == (1360, 194)
    # Dear evaluations, 40 s each: one fits in 5% of the budget, and the steps fill the rest.
    assert plan_steps(budget, 0, 0, 1.0, 40.0, None) == (960, 960)
    # A given spacing stays: the last evaluation whole, and each step its time plus a share of the
    # evaluations before it.
    assert plan_steps(budget, 500, 400, 1.0, 4.0, eval_every=96) == (400 + int(496 / (1 + 4 / 96)), 96)
    # A dearer last evaluation (training's reads the whole validation text): the steps give way to it.
    assert plan_steps(budget, 0, 0, 1.0, 4.0, None, last_evaluation_seconds=16.0) == (948, 95)
    assert plan_steps(budget, 500, 400, 1.0, 4.0, eval_every=96, last_evaluation_seconds=16.0) == (
        400 + int(484 / (1 + 4 / 96)), 96)
    # However late, a plan goes on by at least a step.
    assert plan_steps(budget, 2000, 400, 1.0, 4.0, eval_every=96)[0] == 401


@pytest.mark.parametrize("evaluation_seconds, step_seconds, late_seconds",
                         [(0.5, lambda step: 1.0, 0), (20.0, lambda step: 1.0, 0),
                          (0.5, lambda step: 1.0 + (step >= 200), 0), (0.5, lambda step: 1.0 + step / 300, 1.0),
                          (0.5, lambda step: 1.0 + (step < 100), 0), (0.5, lambda step: max(1.0, 3.0 - step / 100), 0)],
                         ids=["cheap-evaluations", "dear-evaluations", "the-machine-slows-down",
                              "the-machine-slows-step-by-step", "the-machine-speeds-up",
                              "the-machine-speeds-up-step-by-step"])
def test_a_time_budget_is_the_whole_runs_wall_time(tmp_path, monkeypatch, evaluation_seconds, step_seconds,
                                                   late_seconds):
    """On a clock that moves step_seconds(step) per training step and a fixed time per evaluation, a
    10-minute run ends within 3% of 10 minutes, evaluations included (at most late_seconds after them when
    every step is slower than the last, which no plan from past steps foresees), and however the plan
    changes, the periodic evaluations are never suddenly closer: each gap is at least half the one before."""
    now = [0.0]
    monkeypatch.setattr(training, "clock", lambda: now[0])
    step, validate = training.train_step, training.validate

    def timed_step(*args, **kwargs):
        now[0] += step_seconds(len(losses))
        losses.append(None)
        return step(*args, **kwargs)

    def timed_validation(*args, whole=True, **kwargs):  # the sample costs evaluation_seconds, the whole text more
        now[0] += evaluation_seconds / (training.VAL_SAMPLE_SHARE if whole else 1)
        return validate(*args, whole=whole, **kwargs)
    losses = []
    monkeypatch.setattr(training, "train_step", timed_step)
    monkeypatch.setattr(training, "validate", timed_validation)
    result = train(replace(TINY, data=write_text(tmp_path / "words.txt", 3000), out=str(tmp_path / "out"),
                           max_minutes=10))
    run_seconds = now[0] + time_budget.FINISH_SECONDS
    assert 0.97 * 600 <= run_seconds <= 600 + late_seconds and not result.interrupted
    evaluated_steps = [step for step, _ in result.state.val_bits_per_char]
    # The first evaluation measures what one costs, then the plan's, up to EVALS_PER_RUN.
    assert len(evaluated_steps) <= (1 + time_budget.EVALS_PER_RUN if evaluation_seconds < 1 else 2)
    if step_seconds(10 ** 6) == 1.0:  # at an even speed, all of them
        assert len(evaluated_steps) == (1 + time_budget.EVALS_PER_RUN if evaluation_seconds < 1 else 2)
    gaps = [after - before for before, after in itertools.pairwise(evaluated_steps[1:-1])]
    assert all(gap >= previous / 2 for previous, gap in itertools.pairwise(gaps)), evaluated_steps
    assert evaluated_steps[0] == TIMED_STEPS + 1 and evaluated_steps[-1] == len(losses)


@pytest.mark.parametrize("cell, optimizer, members, dropout", [
    ("lstm", "adamw", 1, 0.3), ("gru", "adamw", 1, 0.3), ("lstm", "muon", 1, 0.3),
    ("lstm", "adamw", 2, 0.3), ("lstm", "muon", 2, 0.0)])
def test_ctrl_c_then_resume_equals_an_unbroken_run(tmp_path, monkeypatch, cell, optimizer, members, dropout):
    # Short chat data: streams wrap around (state resets) before and after the interruption. The carried
    # state is (h, c) for an LSTM, h for a GRU: both are saved and read back, and each optimizer's state.
    # An ensemble's members step one after the other with dropout, side by side in threads without it.
    monkeypatch.setattr(training, "can_compute_bfloat16", lambda device: True)  # Muon's check, on any CPU
    config = replace(TINY, data=write_chat(tmp_path / "chat.jsonl", 60), max_steps=12, eval_every=4,
                     dropout=dropout, weight_drop=dropout, cell=cell, optimizer=optimizer, members=members)
    unbroken = train(replace(config, out=str(tmp_path / "unbroken"))).state

    real_step, calls = training.train_step, []

    def step_with_ctrl_c(*args):
        calls.append(args)
        if len(calls) == 7:
            signal.raise_signal(signal.SIGINT)  # lands mid-step, as a real Ctrl-C would
        return real_step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(training, "train_step", step_with_ctrl_c)
        first = train(replace(config, out=str(tmp_path / "split")))
    assert first.interrupted and first.state.step == 7
    resumed = resume(tmp_path / "split", device="cpu").state
    assert first.state.train_bits_per_char == unbroken.train_bits_per_char[:7]
    assert resumed.train_bits_per_char == unbroken.train_bits_per_char
    assert resumed.val_bits_per_char == unbroken.val_bits_per_char
    unbroken_weights = load_checkpoint(tmp_path / "unbroken" / "latest").model.state_dict()
    assert ("members.1." if members > 1 else "") + f"{cell}.weight_hh_l0" in unbroken_weights
    for folder in ("latest", "best"):  # the trained weights, and their average
        unbroken_weights = load_checkpoint(tmp_path / "unbroken" / folder).model.state_dict()
        for name, weight in unbroken_weights.items():
            assert torch.equal(load_checkpoint(tmp_path / "split" / folder).model.state_dict()[name], weight)


@pytest.mark.parametrize("kind, native_bfloat16, optimizer, batch_size", [
    ("text", True, "muon", training.MUON_BATCH_SIZE), ("chat", True, "adamw", training.ADAMW_BATCH_SIZE),
    ("small text", True, "adamw", training.ADAMW_BATCH_SIZE), ("text", False, "adamw", training.ADAMW_BATCH_SIZE)])
def test_the_optimizer_and_batch_size_follow_the_data_and_the_device(monkeypatch, kind, native_bfloat16, optimizer,
                                                                     batch_size):
    monkeypatch.setattr(training, "has_native_bfloat16", lambda device: native_bfloat16)
    size = training.SMALL_DATA_CHARS // (10 if kind == "small text" else 1)
    corpus = SimpleNamespace(kind=kind.split()[-1], train_ids=range(size))
    chosen = training._data_defaults(TrainConfig(), corpus, torch.device("cpu"))
    assert (chosen.optimizer, chosen.batch_size) == (optimizer, batch_size)
    given = training._data_defaults(TrainConfig(optimizer="adamw", batch_size=5), corpus, torch.device("cpu"))
    assert (given.optimizer, given.batch_size) == ("adamw", 5)


def test_muon_on_a_cpu_without_bfloat16_is_a_clear_error_for_a_new_run_and_a_resumed_one(tmp_path, monkeypatch):
    config = replace(TINY, data=write_text(tmp_path / "a.txt", 3000), out=str(tmp_path / "out"), max_steps=4,
                     optimizer="muon")
    with monkeypatch.context() as patch:  # a Muon run saved on a machine with bfloat16...
        patch.setattr(training, "can_compute_bfloat16", lambda device: True)
        train(replace(config, max_steps=2, out=str(tmp_path / "moved")))
    monkeypatch.setattr(training, "can_compute_bfloat16", lambda device: False)
    with pytest.raises(TrainConfigError, match="--optimizer muon needs bfloat16 .* use --optimizer adamw"):
        train(config)
    with pytest.raises(TrainConfigError, match="--optimizer muon needs bfloat16"):  # ...resumed on one without
        resume(tmp_path / "moved", device="cpu")


def test_a_run_saved_before_the_optimizer_flag_resumes_with_adamw(tmp_path):
    run = train(replace(TINY, data=write_text(tmp_path / "words.txt", 3000), out=str(tmp_path / "old"),
                        max_steps=6, eval_every=3)).out
    config = json.loads((run / "latest" / "config.json").read_text())
    assert config["extra"]["run_config"].pop("optimizer") == "adamw"
    (run / "latest" / "config.json").write_text(json.dumps(config))
    resumed = resume(run, device="cpu")
    assert resumed.state.step == 6 and not resumed.interrupted


def write_the_older_format(latest: Path):
    """Rewrite a latest/ checkpoint the way earlier versions (up to 1432c29) wrote it: the random states
    as base64 text in config.json's train_state.rng, none in train_state.safetensors."""
    config = json.loads((latest / "config.json").read_text())
    tensors = load_file(latest / "train_state.safetensors")
    rng_cpu = tensors.pop("rng_cpu").numpy().tobytes()
    config["train_state"]["rng"] = {"torch_cpu": base64.b64encode(rng_cpu).decode("ascii")}
    (latest / "config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, latest / "train_state.safetensors")


def test_a_run_of_an_older_version_refuses_to_resume_but_still_loads(tmp_path, capsys):
    run = train(replace(TINY, data=write_text(tmp_path / "words.txt", 3000), out=str(tmp_path / "old"),
                        max_steps=6, eval_every=3)).out
    write_the_older_format(run / "latest")
    with pytest.raises(CheckpointError, match="was written by an older version of nanochat_fast; start a new run"):
        resume(run, device="cpu")
    capsys.readouterr()  # the run's own output
    code, _, err = run_cli(["--resume", "--out", run], capsys)
    assert code == 2 and err.startswith("error: cannot resume") and "older version" in err and err.count("\n") == 1
    for folder in (run, run / "latest"):  # what chat and sample load
        assert load_checkpoint(folder).config["train_state"]["step"] == 6


@pytest.mark.parametrize("loss_on", ["all", "replies"])
def test_chat_training_counts_every_character_or_the_replies_alone(tmp_path, monkeypatch, loss_on):
    masks = []
    streams = training.TrainStreams

    def recording(ids, mask, *args):
        masks.append(mask)
        return streams(ids, mask, *args)
    monkeypatch.setattr(training, "TrainStreams", recording)
    train(replace(TINY, data=write_chat(tmp_path / "chat.jsonl", 40), out=str(tmp_path / "out"), max_steps=20,
                  loss_on=loss_on))
    corpus = load_corpus(str(tmp_path / "chat.jsonl"))
    if loss_on == "all":
        assert masks == [None]  # every position a target
    else:
        assert torch.equal(masks[0], corpus.train_mask) and not corpus.train_mask.all()


def test_init_from_starts_from_the_checkpoint_weights_and_vocabulary(tmp_path):
    base = train(replace(TINY, data=write_text(tmp_path / "a.txt", 3000), out=str(tmp_path / "base"), max_steps=5))
    source = load_checkpoint(base.out)
    new_data = tmp_path / "b.txt"
    write_text(new_data, 3000)
    new_data.write_text(new_data.read_text().replace("o", "\u00f8"))
    # A vanishing learning rate: the fine-tuned weights must be the checkpoint's, not a fresh init.
    tuned = train(replace(TINY, hidden_size=None, members=None, data=str(new_data), out=str(tmp_path / "tuned"),
                          max_steps=1, warmup_steps=0, lr=1e-9, min_lr=0.0, weight_decay=0.0, init_from=str(base.out)))
    result = load_checkpoint(tuned.out)
    assert result.tokenizer.to_dict() == source.tokenizer.to_dict()  # "ø" stays unknown
    for name, weight in source.model.state_dict().items():
        assert torch.allclose(result.model.state_dict()[name], weight, atol=1e-6)


def run_cli(argv, capsys):
    main = runpy.run_path(str(REPO / "train.py"))["main"]
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--weight-drop", "1"], "--weight-drop must be in [0, 1)"),
    (["--embedding-size", "0"], "--embedding-size must be at least 1"),
    (["--init-from", "out", "--embedding-size", "8"], "--cell and --members come from the checkpoint"),
    (["--data", "no/such/file.txt"], "no such file"),
    (["--resume", "--out", "nowhere"], "cannot resume"),
    (["--init-from", "nowhere"], "does not exist"),
    (["--max-steps", "5", "--warmup-steps", "5"], "--warmup-steps must be less than --max-steps"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


TINY_RUN_FLAGS = ["--max-steps", "4", "--hidden-size", "8", "--batch-size", "2", "--seq-len", "8", "--device", "cpu"]


def hinted_train_flags(message: str) -> list[str]:
    """The flags of the `python train.py ...` command an error message tells the user to run."""
    words = shlex.split(re.search(r"train one first: (python train\.py [^)]*)\)", message).group(1))
    assert words[:2] == ["python", "train.py"]
    return words[2:]


def run_sample(argv, capsys):
    threads = torch.get_num_threads()
    try:  # sample sets torch's thread count for the whole process: give the other tests theirs back
        return sample.main(argv), "", capsys.readouterr().err
    except SystemExit as exit_info:
        return exit_info.code, "", capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("command", [
    lambda capsys: run_cli(["--resume", "--out", "out"], capsys),
    lambda capsys: (report.main(["--ckpt", "out"]), "", capsys.readouterr().err),
    lambda capsys: run_sample(["--ckpt", "out/latest", "--max-chars", "5"], capsys),
], ids=["train-resume", "report", "sample"])
def test_every_train_one_first_hint_is_a_command_that_works(tmp_path, monkeypatch, capsys, command):
    # As a new user would: the command fails, the hint is run as given (tiny and quick here), the command works.
    monkeypatch.chdir(tmp_path)
    code, _, err = command(capsys)
    assert code == 2 and err.count("\n") == 1
    flags = hinted_train_flags(err)
    assert flags == ["--out", "out"]
    assert run_cli([*flags, "--data", write_text(tmp_path / "words.txt", 2000), *TINY_RUN_FLAGS], capsys)[0] == 0
    assert command(capsys)[0] == 0


def interrupt_twice_at_step(monkeypatch, step: int):
    """Make the training step number `step` get two Ctrl-Cs: train.py quits at once, saving nothing more."""
    real_step, calls = training.train_step, []

    def step_with_two_ctrl_c(*args):
        calls.append(args)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)  # stop after this step...
            signal.raise_signal(signal.SIGINT)  # ...no: at once (KeyboardInterrupt)
        return real_step(*args)

    monkeypatch.setattr(training, "train_step", step_with_two_ctrl_c)


def test_a_second_ctrl_c_before_any_checkpoint_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", write_text(tmp_path / "words.txt", 2000), "--out", "out", *TINY_RUN_FLAGS, "--eval-every", "3"]
    interrupt_twice_at_step(monkeypatch, 2)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and not (tmp_path / "out").exists()
    assert err.splitlines()[-1] == ("interrupted before the first checkpoint: nothing was saved in out; start again "
                                    f"with: python train.py {shlex.join(argv)}")


def test_a_second_ctrl_c_names_the_checkpoint_kept_and_the_resume_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_text(tmp_path / "words.txt", 2000)
    interrupt_twice_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    code, _, err = run_cli(["--data", data, "--out", "out", *TINY_RUN_FLAGS, "--eval-every", "2"], capsys)
    assert code == 130
    message = err.splitlines()[-1]
    assert message == "interrupted; kept out/latest from step 2; resume with: python train.py --resume --out out"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(shlex.split(message.partition("resume with: python train.py ")[2]), capsys)
    assert code == 0 and "from step 2," in out
    assert load_checkpoint(tmp_path / "out" / "latest").config["train_state"]["step"] == 4


def test_cli_resume_refuses_other_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--resume", "--out", tmp_path, "--lr", "0.1"], capsys)
    assert exit_info.value.code == 2 and "drop --lr" in capsys.readouterr().err


def test_cli_as_a_program_reports_bad_data_without_traceback(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    run = subprocess.run([sys.executable, REPO / "train.py", "--data", bad, "--out", tmp_path / "out"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "UTF-8" in run.stderr and "Traceback" not in run.stderr


def test_cli_trains_and_prints_the_chat_command(tmp_path, capsys):
    data = write_text(tmp_path / "words.txt", 2000)
    code, out, _ = run_cli(["--data", data, "--out", tmp_path / "run", "--max-steps", 6, "--hidden-size", 8,
                            "--batch-size", 2, "--seq-len", 8, "--device", "cpu"], capsys)
    assert code == 0
    assert f"python -m nanochat_fast.chat --ckpt {tmp_path / 'run'}/" in out
    assert load_checkpoint(tmp_path / "run").config["extra"]["run_config"]["max_steps"] == 6

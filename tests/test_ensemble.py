"""The ensemble (ensemble.py): its predictions are the average of its members' probabilities, its state the
members' stacked, its step its forward; a training step steps each member on its own loss as that member
alone would step; it saves, loads and generates like one model (and resumes: test_training.py); and the
default takes it where Muon trains on a CPU with a thread for each member."""

import math
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from corpus_files import write_text
from nanochat_fast import training
from nanochat_fast.batching import TrainStreams
from nanochat_fast.checkpoint import load_checkpoint, save_checkpoint
from nanochat_fast.distributed import Ranks
from nanochat_fast.engine import Engine, Sequence
from nanochat_fast.ensemble import CharEnsemble, build_model, side_by_side
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.optimizer import make_optimizer
from nanochat_fast.tokenizer import CharTokenizer
from nanochat_fast.training import TrainConfig, TrainConfigError, train, train_step

VOCAB = 13
TINY = TrainConfig(hidden_size=16, batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-3, device="cpu", precision="float32",
                   members=2)


def ensemble_of(cell="lstm", members=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return CharEnsemble(ModelConfig(VOCAB, hidden_size=12, num_layers=2, dropout=0.0, cell=cell,
                                    members=members)).to(dtype).eval()


def random_state(model, batch):
    return tuple(torch.randn_like(part) for part in model.initial_state(batch, dtype=torch.float64))


@pytest.mark.parametrize("cell, members", [("lstm", 2), ("gru", 3)])
def test_logits_are_the_log_of_the_members_average_probability_and_the_state_theirs_stacked(cell, members):
    model = ensemble_of(cell, members)
    ids = torch.randint(0, VOCAB, (3, 7))
    state = random_state(model, 3)
    logits, new_state = model(ids, state)
    layers = model.config.num_layers
    expected_probabilities, expected_states = 0, []
    for index, member in enumerate(model.members):
        member_state = tuple(part[index * layers:(index + 1) * layers] for part in state)
        member_logits, member_new_state = member(ids, member_state)
        expected_probabilities = expected_probabilities + F.softmax(member_logits, dim=-1) / members
        expected_states.append(member_new_state)
    torch.testing.assert_close(logits.exp(), expected_probabilities)
    for part, *member_parts in zip(new_state, *expected_states, strict=True):
        assert part.shape == (members * layers, 3, 12)
        torch.testing.assert_close(part, torch.cat(member_parts))


def test_members_start_from_their_own_weights():
    first, second = ensemble_of().members
    assert not torch.equal(first.lstm.weight_hh_l0, second.lstm.weight_hh_l0)


def test_a_step_is_the_forward_of_one_token():
    model = ensemble_of()
    ids = torch.randint(0, VOCAB, (4,))
    state = random_state(model, 4)
    step_logits, step_state = model.step(ids, state)
    forward_logits, forward_state = model(ids[:, None], state)
    torch.testing.assert_close(step_logits, forward_logits[:, 0])
    for step_part, forward_part in zip(step_state, forward_state, strict=True):
        torch.testing.assert_close(step_part, forward_part)


def test_one_member_is_a_charlstm_and_a_charlstm_is_one_member():
    config = ModelConfig(VOCAB, hidden_size=8)
    assert type(build_model(config)) is CharLSTM
    assert type(build_model(replace(config, members=2))) is CharEnsemble
    with pytest.raises(ValueError, match="ensemble.build_model"):
        CharLSTM(replace(config, members=2))


def test_a_training_step_steps_each_member_as_it_would_alone():
    torch.manual_seed(1)
    config = ModelConfig(VOCAB, hidden_size=12, num_layers=2, dropout=0.0, members=2)
    ensemble = CharEnsemble(config).train()
    alone = [CharLSTM(replace(config, members=1)).train() for _ in range(2)]
    for member, copy in zip(ensemble.members, alone, strict=True):
        copy.load_state_dict(member.state_dict())
    ensemble_optimizer = make_optimizer(ensemble, "adamw", 1e-2, 0.1, (0.9, 0.99))
    alone_optimizers = [make_optimizer(copy, "adamw", 1e-2, 0.1, (0.9, 0.99)) for copy in alone]
    batch = TrainStreams(torch.randint(0, VOCAB, (500,)), None, 3, 9).next_batch()
    state = tuple(torch.randn(4, 3, 12) for _ in range(2))
    for _ in range(3):
        loss, new_state = train_step(ensemble, ensemble_optimizer, batch, state, 1e-2, 0.5, precision="float32")
        alone_results = [train_step(copy, optimizer, batch, tuple(part[2 * index:2 * index + 2] for part in state),
                                    1e-2, 0.5, precision="float32")
                         for index, (copy, optimizer) in enumerate(zip(alone, alone_optimizers, strict=True))]
        torch.testing.assert_close(loss, torch.stack([member_loss for member_loss, _ in alone_results]).mean())
        for part, *member_parts in zip(new_state, *(member_state for _, member_state in alone_results), strict=True):
            torch.testing.assert_close(part, torch.cat(member_parts))
        state = new_state
    for member, copy in zip(ensemble.members, alone, strict=True):
        for (name, weight), copy_weight in zip(member.named_parameters(), copy.parameters(), strict=True):
            torch.testing.assert_close(weight, copy_weight, msg=name)


def test_a_saved_ensemble_loads_as_it_was(tmp_path):
    tokenizer = CharTokenizer("abcdefghi")  # and the chat markers: VOCAB tokens
    assert tokenizer.vocab_size == VOCAB
    model = ensemble_of(dtype=torch.float32)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert isinstance(loaded, CharEnsemble) and loaded.config == model.config
    ids = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_greedy_generation_follows_the_average_of_the_members():
    model = ensemble_of()
    prompt = torch.randint(0, VOCAB, (5,))
    sequence = Sequence(prompt, max_new_tokens=12)
    engine = Engine(model)
    engine.add([sequence])
    written = []
    while sequence.finish_reason is None:
        written += [token for _, token in engine.step()]
    ids = prompt.tolist()
    for _ in range(12):  # the reference: the whole sequence read again for every token
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert written == ids[len(prompt):]


@pytest.mark.parametrize("kind, optimizer, device, threads, distributed, members", [
    ("text", "muon", "cpu", 2, False, training.CPU_TEXT_MEMBERS), ("text", "muon", "cpu", 1, False, 1),
    ("text", "adamw", "cpu", 2, False, training.CPU_TEXT_MEMBERS), ("chat", "adamw", "cpu", 2, False, 1),
    ("text", "muon", "cuda", 2, False, 1), ("text", "muon", "cpu", 2, True, 1)])
def test_the_default_takes_an_ensemble_where_text_trains_on_a_cpu_with_a_thread_for_each_member(
        monkeypatch, kind, optimizer, device, threads, distributed, members):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    corpus = SimpleNamespace(kind=kind, train_ids=range(training.SMALL_DATA_CHARS))
    ranks = Ranks(0, 2, 0, distributed=True) if distributed else Ranks()
    chosen = training._data_defaults(TrainConfig(optimizer=optimizer), corpus, torch.device(device), ranks)
    assert chosen.members == members
    given = training._data_defaults(TrainConfig(optimizer=optimizer, members=3), corpus, torch.device(device), ranks)
    assert given.members == 3


def test_fine_tuning_an_ensemble_starts_from_all_its_members(tmp_path):
    base = train(replace(TINY, data=write_text(tmp_path / "a.txt", 3000), out=str(tmp_path / "base"), max_steps=3))
    tuned = train(replace(TINY, hidden_size=None, members=None, data=write_text(tmp_path / "b.txt", 3000),
                          out=str(tmp_path / "tuned"), max_steps=1, warmup_steps=0, lr=1e-9, min_lr=0.0,
                          weight_decay=0.0, init_from=str(base.out)))
    source, result = load_checkpoint(base.out).model, load_checkpoint(tuned.out).model
    assert isinstance(result, CharEnsemble) and result.config.members == 2
    for name, weight in source.state_dict().items():
        torch.testing.assert_close(result.state_dict()[name], weight, atol=1e-6, rtol=0)


def test_an_ensemble_under_torchrun_and_members_with_init_from_are_clear_errors(tmp_path):
    data = write_text(tmp_path / "words.txt", 3000)
    with pytest.raises(TrainConfigError, match="--members 2: an ensemble trains in one process"):
        train(replace(TINY, data=data, out=str(tmp_path / "out"), max_steps=2), Ranks(0, 2, 0, distributed=True))
    with pytest.raises(TrainConfigError, match="--members come from the checkpoint"):
        train(replace(TINY, data=data, init_from=str(tmp_path / "any"), hidden_size=None, max_steps=2))


def test_the_mixture_is_a_distribution():
    logits, _ = ensemble_of(members=3)(torch.randint(0, VOCAB, (2, 5)))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert math.isfinite(logits.min().item())


@pytest.mark.parametrize("device, draws_random_numbers, in_threads", [
    ("cpu", False, True), ("cpu", True, False), ("cuda", False, False)])
def test_members_step_in_threads_of_their_own_on_cpu_unless_they_draw_random_numbers(device, draws_random_numbers,
                                                                                     in_threads):
    def where(member, offset):  # runs nothing on the device: only the thread and its torch threads are read
        return threading.current_thread() is not threading.main_thread(), torch.get_num_threads(), member + offset
    results = side_by_side(where, [10, 20], [1, 2], device=torch.device(device),
                           draws_random_numbers=draws_random_numbers)
    assert [value for _, _, value in results] == [11, 22]  # in the members' order
    assert all(threaded == in_threads for threaded, _, _ in results)
    if in_threads:
        assert all(threads == max(1, torch.get_num_threads() // 2) for _, threads, _ in results)


def test_an_ensembles_optimizer_state_loads_into_as_many_members_only():
    two, three = ensemble_of(), ensemble_of(members=3)
    saved = make_optimizer(two, "adamw", 1e-2, 0.1, (0.9, 0.99)).state_dict()
    make_optimizer(ensemble_of(seed=1), "adamw", 1e-2, 0.1, (0.9, 0.99)).load_state_dict(saved)
    with pytest.raises(ValueError, match="not of an ensemble of 3"):
        make_optimizer(three, "adamw", 1e-2, 0.1, (0.9, 0.99)).load_state_dict(saved)
    single = make_optimizer(two.members[0], "adamw", 1e-2, 0.1, (0.9, 0.99)).state_dict()
    with pytest.raises(ValueError, match="not of an ensemble of 2"):
        make_optimizer(two, "adamw", 1e-2, 0.1, (0.9, 0.99)).load_state_dict(single)


def test_an_ensembles_width_is_measured_on_the_ensemble_and_each_member_must_read_the_text_members_times(
        tmp_path, monkeypatch):
    corpus = SimpleNamespace(kind="text", train_ids=range(training.SMALL_DATA_CHARS),
                             tokenizer=SimpleNamespace(vocab_size=VOCAB))
    probed, asked = [], []

    def probe(model_config, *args):
        probed.append(model_config.members)
        return 0.1 * (model_config.hidden_size / 256) ** 2
    monkeypatch.setattr(training, "_seconds_per_step", probe)

    def widest(budget_seconds, seconds_per_step, characters_per_step):
        asked.append(characters_per_step)
        seconds_per_step(256)
        return 256
    monkeypatch.setattr(training, "widest_affordable", widest)
    for members in (1, 2):
        config = replace(TINY, hidden_size=None, members=members, batch_size=8, seq_len=10)
        model_config = training._model_config(config, corpus, torch.device("cpu"), None, Ranks())
        assert model_config.members == members and probed[-1] == members
    assert asked == [80, 40]

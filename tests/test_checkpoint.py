"""Checkpoints: a round trip keeps the model exactly, a write killed midway leaves the previous checkpoint
loadable, and every kind of bad folder is a CheckpointError that names the problem."""

import json
import random
import string

import pytest
import torch

from nanochat_fast import checkpoint as checkpoint_module
from nanochat_fast.checkpoint import (CheckpointError, load_checkpoint, load_training_state, read_config,
                                      resolve_checkpoint_dir, save_checkpoint)
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.tokenizer import CharTokenizer


def make_model(hidden_size=12, num_layers=2, cell="lstm", embedding_size=None):
    tokenizer = CharTokenizer("".join(random.sample(string.ascii_letters + string.punctuation, 20)))
    model = CharLSTM(ModelConfig(tokenizer.vocab_size, hidden_size, num_layers, dropout=0.1, cell=cell,
                                 embedding_size=embedding_size))
    return model, tokenizer


def random_ids(vocab_size, batch=3, length=9):
    return torch.randint(0, vocab_size, (batch, length))


@pytest.mark.parametrize("cell, embedding_size", [("lstm", None), ("gru", None), ("lstm", 5), ("gru", 7)])
def test_round_trip_gives_identical_logits(tmp_path, cell, embedding_size):
    model, tokenizer = make_model(cell=cell, embedding_size=embedding_size)
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, train_state={"step": 7}, extra={"note": "hello"})
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = random_ids(tokenizer.vocab_size)
    assert torch.equal(loaded.model(ids)[0], model(ids)[0])
    assert not loaded.model.training
    assert loaded.model.config == model.config
    assert loaded.tokenizer.to_dict() == tokenizer.to_dict()
    assert loaded.config["train_state"] == {"step": 7} and loaded.config["extra"] == {"note": "hello"}


def test_a_checkpoint_from_before_the_gru_loads_as_an_lstm(tmp_path):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["model"]["cell"]  # what earlier versions wrote
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model.config.cell == "lstm"
    ids = random_ids(tokenizer.vocab_size)
    assert torch.equal(loaded.model.eval()(ids)[0], model.eval()(ids)[0])


def test_a_checkpoint_from_before_the_embedding_size_has_an_embedding_as_wide_as_the_model(tmp_path):
    model, tokenizer = make_model(hidden_size=12)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["model"]["embedding_size"]  # what earlier versions wrote
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.config.input_size == 12 and loaded.embedding.weight.shape == (tokenizer.vocab_size, 12)
    ids = random_ids(tokenizer.vocab_size)
    assert torch.equal(loaded.eval()(ids)[0], model.eval()(ids)[0])


def test_training_state_round_trip(tmp_path):
    model, tokenizer = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(random_ids(tokenizer.vocab_size))[0].sum().backward()
    optimizer.step()
    lstm_h = torch.randn(2, 3, 12)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, optimizer, train_tensors={"lstm_h": lstm_h})
    optimizer_state, tensors = load_training_state(tmp_path / "ckpt")
    assert torch.equal(tensors["lstm_h"], lstm_h)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(optimizer_state)
    for saved, restored in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(saved[key], restored[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_run_folder_resolves_to_best(tmp_path):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "out" / "best", model, tokenizer, train_state={"step": 1})
    save_checkpoint(tmp_path / "out" / "latest", model, tokenizer, train_state={"step": 2})
    assert resolve_checkpoint_dir(tmp_path / "out") == tmp_path / "out" / "best"
    assert resolve_checkpoint_dir(tmp_path / "out" / "latest") == tmp_path / "out" / "latest"
    assert load_checkpoint(tmp_path / "out").config["train_state"] == {"step": 1}
    assert load_checkpoint(tmp_path / "out").note is None  # best/ is there: no fallback, no note


def test_a_run_folder_without_best_falls_back_to_latest_with_a_note(tmp_path):
    # A run stopped before its first validation has saved latest/ only.
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "out" / "latest", model, tokenizer, train_state={"step": 7})
    assert resolve_checkpoint_dir(tmp_path / "out") == tmp_path / "out" / "latest"
    loaded = load_checkpoint(tmp_path / "out")
    assert loaded.directory == tmp_path / "out" / "latest" and loaded.config["train_state"] == {"step": 7}
    assert loaded.note == f"(note: {tmp_path / 'out'} has no best/ checkpoint yet, using latest/ from step 7)"
    assert load_checkpoint(tmp_path / "out" / "latest").note is None  # asked for by name: nothing to note


def test_overwriting_keeps_one_folder_and_the_new_content(tmp_path):
    model, tokenizer = make_model()
    for step in range(3):
        save_checkpoint(tmp_path / "latest", model, tokenizer, train_state={"step": step})
    assert read_config(tmp_path / "latest")["train_state"] == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "latest", model, tokenizer, train_state={"step": 1})
    original_save = torch.save

    def save_then_die(obj, path, *args, **kwargs):  # part of the new checkpoint is written by now
        original_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "latest", model, tokenizer, torch.optim.SGD(model.parameters(), lr=0.1),
                        train_state={"step": 2})
    assert load_checkpoint(tmp_path / "latest").config["train_state"] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_kill_between_the_two_renames_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "out" / "best", model, tokenizer, train_state={"step": 1})
    original_rename = checkpoint_module.Path.rename

    def rename_once_then_die(self, target):  # the old folder moves away, the new one never arrives
        if self.name == "best":
            return original_rename(self, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.Path, "rename", rename_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "out" / "best", model, tokenizer, train_state={"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / "out" / "best").exists()
    assert load_checkpoint(tmp_path / "out").config["train_state"] == {"step": 1}
    assert load_checkpoint(tmp_path / "out" / "best").config["train_state"] == {"step": 1}
    save_checkpoint(tmp_path / "out" / "best", model, tokenizer, train_state={"step": 3})
    assert read_config(tmp_path / "out")["train_state"] == {"step": 3}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["best"]


def corrupt_config(folder):
    (folder / "config.json").write_text("{not json")


def config_without_model(folder):
    (folder / "config.json").write_text(json.dumps({"tokenizer": {}}))


def truncated_weights(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])


def weights_of_another_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model"]["hidden_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))


def missing_weights(folder):
    (folder / "model.safetensors").unlink()


def foreign_tokenizer(folder):
    config = json.loads((folder / "config.json").read_text())
    config["tokenizer"]["type"] = "bpe"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, named", [
    (corrupt_config, "config.json"), (config_without_model, "config.json"), (truncated_weights, "model.safetensors"),
    (weights_of_another_shape, "model.safetensors"), (missing_weights, "model.safetensors"),
    (foreign_tokenizer, "config.json")])
def test_damaged_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, damage, named):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    damage(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(tmp_path / "ckpt")


def test_corrupt_optimizer_state_is_a_checkpoint_error(tmp_path):
    model, tokenizer = make_model()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, torch.optim.SGD(model.parameters(), lr=0.1))
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_training_state(tmp_path / "ckpt")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint: it holds none of config.json, best/config.json, "
                                              "latest/config.json"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "file").write_text("hello")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(tmp_path / "file")


@pytest.mark.parametrize("named, run_folder", [("out", "out"), ("out/best", "out"), ("out/latest", "out"),
                                               ("my run/best", "'my run'")])
def test_a_missing_checkpoint_hints_at_training_into_its_run_folder(tmp_path, monkeypatch, named, run_folder):
    # The hint trains into the run folder, which holds best/ and latest/; tests/test_training.py runs it.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(named)
    assert str(error.value).endswith(f"(train one first: python train.py --out {run_folder})")

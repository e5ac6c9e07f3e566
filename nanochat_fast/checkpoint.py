"""Checkpoints: a folder holding the weights (safetensors) and everything else as JSON.

Files in a checkpoint folder:
- `model.safetensors`: the model's weights.
- `config.json`: {"model": model config, "tokenizer": vocabulary, "train_state": ..., "extra": ...}.
- `optimizer.pt` (optional): the optimizer's state_dict, read back with `torch.load(weights_only=True)`.
- `train_state.safetensors` (optional): tensors a resumed run needs. Training's latest/ holds the carried
  recurrent state (`lstm_h`, `lstm_c`; `gru_h` for a GRU) and the random generators' states (`rng_cpu`,
  `rng_cuda` on CUDA), which older versions kept in config.json as base64 text: such a run still loads,
  but does not resume.

A checkpoint is written into a temporary folder beside its destination and switched in by renames,
so killing the process at any moment leaves either the old or the new checkpoint complete. Replacing
an existing folder takes two renames (old away, new in); a kill between them leaves only the old one,
under a hidden name that `resolve_checkpoint_dir` and `load_checkpoint` fall back to.
A run folder (`out/`) holds `latest/` (to resume) and `best/` (best validation so far, to chat with);
a run stopped before its first validation has only `latest/`, which then stands in for `best/`.
"""

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save

from nanochat_fast.ensemble import build_model
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.tokenizer import CharTokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_TENSORS_FILE = "train_state.safetensors"
BEST, LATEST = "best", "latest"


class CheckpointError(Exception):
    """A checkpoint folder is missing or unreadable; the message says which folder or file and why."""


@dataclass
class Checkpoint:
    model: CharLSTM  # in eval mode
    tokenizer: CharTokenizer
    config: dict  # everything from config.json
    directory: Path
    note: str | None = None  # one line for the user when a run folder's latest/ stands in for its best/

    @property
    def data_kind(self) -> str | None:
        """"chat" or "text": the data the checkpoint was trained on, where its training run saved it."""
        corpus = (self.config.get("extra") or {}).get("corpus")
        return corpus.get("kind") if isinstance(corpus, dict) else None


def _previous_name(directory: Path) -> Path:
    """Where the old checkpoint waits while a new one is switched in."""
    return directory.with_name(f".{directory.name}.previous")


def _existing(directory: Path) -> Path:
    """The folder itself, or the previous one when a save was killed between its two renames."""
    if not directory.exists() and _previous_name(directory).is_dir():
        return _previous_name(directory)
    return directory


def _write_json(path: Path, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    # Bytes written by us, not safetensors' save_file, so the file gets the usual permissions (not 0600).
    return save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()})


def _fsync_folder(folder: Path):
    # Renames only publish what the disk holds; without this a power cut could expose empty files.
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(directory, model: CharLSTM, tokenizer: CharTokenizer, optimizer=None,
                    train_state: dict | None = None, extra: dict | None = None,
                    train_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder atomically and return its path. `train_state` and `extra` must be
    JSON-able; `train_tensors` (e.g. the carried LSTM state) go to train_state.safetensors."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    previous = _previous_name(directory)
    if not directory.exists() and previous.is_dir():
        previous.rename(directory)  # finish the switch a killed save left half done
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # what killed saves left behind

    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    temporary.mkdir()
    try:
        (temporary / MODEL_FILE).write_bytes(_safetensors_bytes(model.state_dict()))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), temporary / OPTIMIZER_FILE)
        if train_tensors:
            (temporary / TRAIN_TENSORS_FILE).write_bytes(_safetensors_bytes(train_tensors))
        _write_json(temporary / CONFIG_FILE, {"model": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                                              "train_state": train_state, "extra": extra})
        _fsync_folder(temporary)
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
            directory.rename(previous)
        temporary.rename(directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return directory


def _run_folder(path: Path) -> Path:
    """The training run folder a path names: itself, or the run holding it when it is a best/ or latest/."""
    return path.parent if path.name in (BEST, LATEST) else path


def resolve_checkpoint_dir(path) -> Path:
    """The folder holding the checkpoint files: `path` itself if it is a checkpoint, else the `best/`
    checkpoint inside a run folder like `out/`, or its `latest/` while the run has no `best/` yet (a run
    stopped before its first validation; the loaded Checkpoint's `note` says so)."""
    path = Path(path)
    for candidate in (_existing(path), _existing(path / BEST), _existing(path / LATEST)):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist (train one first: "
                              f"python train.py --out {shlex.quote(str(_run_folder(path)))})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: give a checkpoint folder or a training run's output folder")
    raise CheckpointError(f"{path} is not a checkpoint: it holds none of {CONFIG_FILE}, {BEST}/{CONFIG_FILE}, "
                          f"{LATEST}/{CONFIG_FILE}")


def _fallback_note(path: Path, directory: Path, config: dict) -> str | None:
    """The note that `directory`, resolved from `path`, is a run folder's latest/ standing in for its best/."""
    if directory != _existing(path / LATEST):
        return None
    train_state = config.get("train_state")
    step = train_state.get("step") if isinstance(train_state, dict) else None
    from_step = "" if step is None else f" from step {step}"
    return f"(note: {path} has no {BEST}/ checkpoint yet, using {LATEST}/{from_step})"


def read_config(directory) -> dict:
    """config.json of a checkpoint folder (or of the checkpoint a run folder stands for), as a dict."""
    directory = resolve_checkpoint_dir(directory)
    try:
        with open(directory / CONFIG_FILE, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE} is unreadable: {error}") from None
    missing = [key for key in ("model", "tokenizer") if not isinstance(config, dict) or key not in config]
    if missing:
        raise CheckpointError(f"{directory / CONFIG_FILE} lacks {', '.join(missing)}: not a nanochat_fast checkpoint")
    return config


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(device))
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{path} is unreadable: {error}") from None


def load_checkpoint(directory, device="cpu", lstm_backend=None) -> Checkpoint:
    """Load the model (in eval mode, on `device`) and tokenizer of a checkpoint or run folder."""
    requested = Path(directory)
    directory = resolve_checkpoint_dir(requested)
    config = read_config(directory)
    try:
        model_config = ModelConfig(**config["model"])
        tokenizer = CharTokenizer.from_dict(config["tokenizer"])
        model = build_model(model_config, lstm_backend=lstm_backend)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE} holds a bad model or tokenizer description: "
                              f"{error}") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(f"{directory / CONFIG_FILE}: the tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the model expects {model_config.vocab_size}")
    weights = _load_tensors(directory / MODEL_FILE, "cpu")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{directory / MODEL_FILE} does not fit the model in {CONFIG_FILE}: {error}") from None
    return Checkpoint(model=model.to(device).eval(), tokenizer=tokenizer, config=config, directory=directory,
                      note=_fallback_note(requested, directory, config))


def load_training_state(directory, device="cpu") -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(optimizer state_dict or None, train tensors) saved beside a checkpoint's weights, for resuming."""
    directory = resolve_checkpoint_dir(directory)
    optimizer_state = None
    if (directory / OPTIMIZER_FILE).is_file():
        try:
            optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True)
        except Exception as error:  # torch.load raises many kinds for a corrupt or foreign file
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{directory / OPTIMIZER_FILE} is unreadable: {first_line}") from None
    train_tensors = {}
    if (directory / TRAIN_TENSORS_FILE).is_file():
        train_tensors = _load_tensors(directory / TRAIN_TENSORS_FILE, device)
    return optimizer_state, train_tensors

"""Training data: read a source, split it into train/validation, and encode both splits as token ids.

Sources (see load_corpus): the English dialogues of chatterbot-corpus (the default), a .jsonl file of
conversations, a plain UTF-8 text file or a folder of .txt files, or "tinyshakespeare" (downloaded once
into a cache folder). Every problem with the input is a DataError whose message names the file and says
what is wrong, so command-line tools can print it without a traceback.
"""

import hashlib
import http.client
import importlib.resources
import json
import os
import random
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from nanochat_fast.chat_format import ROLES, check_messages, encode_conversation
from nanochat_fast.tokenizer import CharTokenizer

DEFAULT_CORPUS_NAME = "chatterbot-corpus english"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
VAL_FRACTION = 0.1
SPLIT_SEED = 1337  # fixed, so a run and its resumption or fine-tuning see the same validation set
# libyaml's loader parses the corpus about 15x faster; PyYAML built without libyaml lacks it.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DataError(Exception):
    """Unusable training data; the message names the file and the problem."""


@dataclass
class Corpus:
    name: str
    kind: str  # "chat" or "text"
    tokenizer: CharTokenizer
    train_ids: torch.Tensor
    train_mask: torch.Tensor | None  # None: every position is a target (plain text)
    val_ids: torch.Tensor
    val_mask: torch.Tensor | None
    stats: dict


def load_corpus(data=None, tokenizer: CharTokenizer | None = None, cache_dir=None) -> Corpus:
    """data: None (the chatterbot-corpus default), "tinyshakespeare", a .jsonl file of conversations, another
    text file, or a folder of .txt files. A given tokenizer is reused (characters outside it become unk);
    otherwise one is built from the training split. "tinyshakespeare" means the download, even if a file of
    that name exists (pass "./tinyshakespeare" for the file)."""
    if data is None:
        return _chat_corpus(DEFAULT_CORPUS_NAME, _chatterbot_conversations(), tokenizer)
    if str(data) == "tinyshakespeare":
        return _text_corpus("tinyshakespeare", _read_utf8(download_tinyshakespeare(cache_dir)), tokenizer)
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _text_corpus(str(path), _read_text_folder(path), tokenizer)
    if path.suffix.lower() == ".jsonl":
        return _chat_corpus(str(path), _read_jsonl(path), tokenizer)
    return _text_corpus(str(path), _read_utf8(path), tokenizer)


def check_length(corpus: Corpus, sequence_length: int) -> None:
    """Raise DataError unless each split holds one whole sequence: sequence_length inputs plus the
    next token as the last target. The trainer calls this once it knows its sequence length."""
    for split, ids in (("training", corpus.train_ids), ("validation", corpus.val_ids)):
        if len(ids) < sequence_length + 1:
            raise DataError(f"{corpus.name}: text too short for one training sequence: the {split} split has "
                            f"{len(ids)} tokens, a sequence of {sequence_length} needs {sequence_length + 1}; "
                            f"use more text or a shorter sequence length")


def download_tinyshakespeare(cache_dir=None, url: str | None = None) -> Path:
    """The cached tinyshakespeare file, downloaded (and checked against its sha256) on first use.
    cache_dir defaults to $NANOCHAT_CACHE_DIR, else ~/.cache/nanochat_fast."""
    url = url or TINYSHAKESPEARE_URL
    directory = Path(cache_dir or os.environ.get("NANOCHAT_CACHE_DIR") or Path.home() / ".cache" / "nanochat_fast")
    target = directory / "tinyshakespeare.txt"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256:
        return target
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            content = response.read()
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError and timeouts are OSErrors
        raise DataError(f"could not download tinyshakespeare from {url} ({error}); download it yourself and "
                        f"pass the local file instead: --data path/to/input.txt") from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise DataError(f"tinyshakespeare from {url} has sha256 {digest}, expected {TINYSHAKESPEARE_SHA256}; "
                        f"the download was not kept")
    directory.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: an interrupted download never leaves a half file in the cache.
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".tinyshakespeare-", delete=False) as temp:
        temp.write(content)
    os.replace(temp.name, target)
    return target


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: not UTF-8 text: invalid byte 0x{raw[error.start]:02x} at byte offset "
                        f"{error.start} (line {line}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors add is not part of the text


def _read_text_folder(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise DataError(f"{folder}: folder has no .txt files")
    return "\n".join(_read_utf8(p) for p in files)


def _read_jsonl(path: Path) -> list[list[dict]]:
    conversations = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and similar line separators.
    for line_number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError('expected an object with a "messages" list')
            check_messages(record["messages"])
            if not any(message["role"] in ROLES for message in record["messages"]):
                raise ValueError("no user or assistant message")
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            raise DataError(f"{path}, line {line_number}: {error}") from None
        conversations.append(record["messages"])
    return conversations


def _chatterbot_conversations() -> list[list[dict]]:
    try:
        folder = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError:
        raise DataError(f"{DEFAULT_CORPUS_NAME}: the default chat data needs the chatterbot-corpus package "
                        f"(pip install chatterbot-corpus), or pass --data") from None
    conversations = []
    for file in sorted((f for f in folder.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name):
        for turns in yaml.load(file.read_text(encoding="utf-8"), Loader=_YAML_LOADER).get("conversations") or []:
            messages = _alternating_messages(turns)
            if len(messages) >= 2:  # a lone question has no reply to learn
                conversations.append(messages)
    return conversations


def _alternating_messages(turns) -> list[dict]:
    """Corpus turns alternate user, assistant, user, ... A few entries are not lists, and a turn that is not
    text ends the conversation there, so that every later turn keeps its speaker."""
    messages = []
    for index, turn in enumerate(turns if isinstance(turns, list) else []):
        if not isinstance(turn, str) or not turn.strip():
            break
        # Stripped: some turns end in spaces or no-break spaces the model should not learn to type.
        messages.append({"role": ROLES[index % 2], "content": turn.strip()})
    return messages


def _text_corpus(name: str, text: str, tokenizer: CharTokenizer | None) -> Corpus:
    if not text.strip():
        raise DataError(f"{name}: empty, no text to train on")
    split_at = int(len(text) * (1 - VAL_FRACTION))  # the last 10% validates, as nanoGPT splits tinyshakespeare
    train_text, val_text = text[:split_at], text[split_at:]
    tokenizer = tokenizer or CharTokenizer.from_text(train_text)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    return Corpus(name, "text", tokenizer, train_ids, None, val_ids, None,
                  _stats(name, "text", tokenizer, train_text, val_text, train_ids, val_ids))


def _chat_corpus(name: str, conversations: list[list[dict]], tokenizer: CharTokenizer | None) -> Corpus:
    if len(conversations) < 2:
        raise DataError(f"{name}: {len(conversations)} conversation(s); need at least 2, "
                        f"since one is held out for validation")
    order = list(range(len(conversations)))
    random.Random(SPLIT_SEED).shuffle(order)
    val_count = max(1, int(len(conversations) * VAL_FRACTION))
    val = [conversations[i] for i in order[:val_count]]
    train = [conversations[i] for i in order[val_count:]]
    train_text, val_text = _conversation_text(train), _conversation_text(val)
    tokenizer = tokenizer or CharTokenizer.from_text(train_text)
    (train_ids, train_mask), (val_ids, val_mask) = _encode_all(tokenizer, train), _encode_all(tokenizer, val)
    for split, mask in (("training", train_mask), ("validation", val_mask)):
        if not mask.any():
            raise DataError(f"{name}: the {split} conversations have no assistant reply to learn from")
    stats = _stats(name, "chat", tokenizer, train_text, val_text, train_ids, val_ids,
                   train_conversations=len(train), val_conversations=len(val))
    return Corpus(name, "chat", tokenizer, train_ids, train_mask, val_ids, val_mask, stats)


def _conversation_text(conversations) -> str:
    return "".join(m["content"] for messages in conversations for m in messages if m["role"] in ROLES)


def _encode_all(tokenizer, conversations) -> tuple[torch.Tensor, torch.Tensor]:
    ids, masks = zip(*(encode_conversation(tokenizer, messages) for messages in conversations), strict=True)
    return torch.cat(ids), torch.cat(masks)


def _stats(name, kind, tokenizer, train_text, val_text, train_ids, val_ids, **extra) -> dict:
    return {"source": name, "kind": kind, "vocab_size": tokenizer.vocab_size,
            "train_characters": len(train_text), "val_characters": len(val_text),
            "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            # Characters the tokenizer lacks (validation-only ones, or new ones when fine-tuning) read as unk.
            "unknown_chars": tokenizer.unknown_chars(train_text + val_text), **extra}

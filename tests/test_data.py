"""Corpus loading: every source, the deterministic split, the tinyshakespeare download and clear errors."""

import functools
import hashlib
import http.server
import json
import random
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

import nanochat_fast.data as data
from nanochat_fast.data import DataError, check_length, download_tinyshakespeare, load_corpus
from nanochat_fast.tokenizer import ASSISTANT, END, USER, CharTokenizer

# In CI and in local worktrees the shared folder sits beside the checkout.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz ,.?!"


def random_words(rng, length):
    return "".join(rng.choices(LETTERS, k=length))


def write_jsonl(path, conversations):
    path.write_text("\n".join(json.dumps({"messages": messages}) for messages in conversations) + "\n")
    return path


def random_conversations(rng, count):
    """Conversations that each start with a unique tag, so the test can tell them apart after the split
    (every digit appears in every conversation, so any split's vocabulary can spell every tag)."""
    return [[{"role": "user", "content": f"#{index}# 0123456789 " + random_words(rng, 10)},
             {"role": "assistant", "content": random_words(rng, rng.randrange(1, 30))}]
            for index in range(count)]


def conversation_tags(corpus, ids):
    text = corpus.tokenizer.decode(ids)
    return [int(piece.split("#")[1]) for piece in text.split(USER)[1:]]


# ---- the default: chatterbot-corpus English ----

@pytest.fixture(scope="module")
def default_corpus():
    return load_corpus()


def test_default_corpus_is_alternating_chat(default_corpus):
    corpus = default_corpus
    assert corpus.kind == "chat" and corpus.name == data.DEFAULT_CORPUS_NAME
    stats = corpus.stats
    assert stats["train_conversations"] + stats["val_conversations"] > 1900
    assert stats["val_conversations"] == (stats["train_conversations"] + stats["val_conversations"]) // 10
    assert stats["train_characters"] + stats["val_characters"] > 150_000
    assert json.loads(json.dumps(stats)) == stats
    for ids, mask, split in ((corpus.train_ids, corpus.train_mask, "train"), (corpus.val_ids, corpus.val_mask, "val")):
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        assert stats[f"{split}_tokens"] == len(ids)
        assert int((ids == corpus.tokenizer.user_id).sum()) >= stats[f"{split}_conversations"]
        text = corpus.tokenizer.decode(ids)
        assert text.startswith(USER)
        # Turns are stripped: no reply or question ends in whitespace before its end marker.
        assert not any(f"{space}{END}" in text for space in " \n\t\xa0")


def test_default_corpus_holds_a_greetings_dialogue_as_user_then_assistant(default_corpus):
    folder = data.importlib.resources.files("chatterbot_corpus") / "data" / "english"
    turns = yaml.safe_load((folder / "greetings.yml").read_text(encoding="utf-8"))["conversations"][0]
    roles = [(USER, ASSISTANT)[index % 2] for index in range(len(turns))]
    expected = "".join(marker + turn.strip() + END for marker, turn in zip(roles, turns, strict=True))
    tok = default_corpus.tokenizer
    assert expected in tok.decode(default_corpus.train_ids) + tok.decode(default_corpus.val_ids)


def test_alternating_messages_stop_at_the_first_turn_that_is_not_text():
    assert data._alternating_messages("not a list") == []
    messages = data._alternating_messages([" hi ", "hello\xa0", "how?", None, "lost speaker"])
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "how?"}]
    assert data._alternating_messages(["q", "  ", "a"]) == [{"role": "user", "content": "q"}]


# ---- JSONL chat ----

@pytest.mark.parametrize("count", [2, 9, 10, 57])
def test_chat_split_is_deterministic_disjoint_and_holds_out_a_tenth(tmp_path, count):
    rng = random.Random(count)
    path = write_jsonl(tmp_path / "chat.jsonl", random_conversations(rng, count))
    corpus = load_corpus(path)
    train_tags, val_tags = conversation_tags(corpus, corpus.train_ids), conversation_tags(corpus, corpus.val_ids)
    assert len(val_tags) == max(1, count // 10)
    if count > 10:  # shuffled: not simply the first or the last conversations of the file
        assert sorted(val_tags) not in (list(range(len(val_tags))), list(range(count - len(val_tags), count)))
    assert sorted(train_tags + val_tags) == list(range(count))
    again = load_corpus(path)
    for name in ("train_ids", "train_mask", "val_ids", "val_mask"):
        assert torch.equal(getattr(corpus, name), getattr(again, name))
    assert corpus.stats["train_conversations"] == len(train_tags)


def test_chat_ids_and_masks_are_the_encoded_conversations_concatenated(tmp_path):
    rng = random.Random(5)
    conversations = random_conversations(rng, 20)
    conversations[3].insert(0, {"role": "system", "content": "ignored"})
    corpus = load_corpus(write_jsonl(tmp_path / "chat.jsonl", conversations))
    tok = corpus.tokenizer
    replies = tok.decode(corpus.train_ids[corpus.train_mask]) + tok.decode(corpus.val_ids[corpus.val_mask])
    assert sorted(replies.split(END)[:-1]) == sorted(c[-1]["content"] for c in conversations)
    assert "ignored" not in tok.decode(corpus.train_ids) + tok.decode(corpus.val_ids)
    assert corpus.stats["train_characters"] == sum(
        len(m["content"]) for i in conversation_tags(corpus, corpus.train_ids) for m in conversations[i]
        if m["role"] != "system")


def test_chat_tokenizer_comes_from_training_conversations_only(tmp_path):
    conversations = random_conversations(random.Random(11), 30)
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    val_tag = conversation_tags(load_corpus(path), load_corpus(path).val_ids)[0]
    conversations[val_tag][1]["content"] += "Ω"  # a character only the validation split has
    corpus = load_corpus(write_jsonl(path, conversations))
    assert "Ω" not in corpus.tokenizer.chars and corpus.stats["unknown_chars"] == "Ω"
    assert int((corpus.val_ids == corpus.tokenizer.unk_id).sum()) == 1


@pytest.mark.parametrize("bad_line, problem", [
    ('{"messages": [', "Expecting"),
    ('{"turns": []}', '"messages"'),
    ('["hi"]', '"messages"'),
    ('{"messages": "hi"}', "must be a list"),
    ('{"messages": [{"role": "user", "content": 7}]}', "content must be a string"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": [{"role": "system", "content": "hi"}]}', "no user or assistant"),
])
def test_a_bad_jsonl_line_names_the_file_and_its_line_number(tmp_path, bad_line, problem):
    good = [json.dumps({"messages": c}) for c in random_conversations(random.Random(2), 4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(good[:2] + ["", bad_line] + good[2:]) + "\n")  # the blank line still counts
    with pytest.raises(DataError, match=rf"chat\.jsonl, line 4: .*{problem}"):
        load_corpus(path)


def test_blank_lines_are_skipped_and_a_lone_conversation_is_refused(tmp_path):
    conversation = random_conversations(random.Random(3), 1)[0]
    path = tmp_path / "one.jsonl"
    path.write_text("\n\n" + json.dumps({"messages": conversation}) + "\n  \n")
    with pytest.raises(DataError, match=r"one\.jsonl: 1 conversation\(s\); need at least 2"):
        load_corpus(path)


def test_chat_without_replies_is_refused(tmp_path):
    users_only = [[m for m in c if m["role"] == "user"] for c in random_conversations(random.Random(4), 12)]
    with pytest.raises(DataError, match="no assistant reply"):
        load_corpus(write_jsonl(tmp_path / "questions.jsonl", users_only))


# ---- plain text ----

def test_text_file_splits_off_the_last_tenth_and_builds_the_vocabulary_from_training(tmp_path):
    rng = random.Random(6)
    text = random_words(rng, 5000) + "Z" + random_words(rng, 10)  # Z only in the validation tenth
    (tmp_path / "book.md").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "book.md"))
    split_at = int(len(text) * 0.9)
    assert corpus.kind == "text" and corpus.train_mask is None and corpus.val_mask is None
    assert corpus.tokenizer.chars == "".join(sorted(set(text[:split_at])))
    assert corpus.tokenizer.decode(corpus.train_ids) == text[:split_at]
    val_text = corpus.tokenizer.decode(corpus.val_ids)
    assert val_text == text[split_at:].replace("Z", "<|unk|>")
    assert corpus.stats["unknown_chars"] == "Z"
    assert (corpus.stats["train_characters"], corpus.stats["val_characters"]) == (split_at, len(text) - split_at)


def test_a_given_tokenizer_is_reused_and_foreign_characters_become_unk(tmp_path):
    (tmp_path / "t.txt").write_text("abc" * 100 + "xyz")
    tokenizer = CharTokenizer.from_text("abcx")
    corpus = load_corpus(tmp_path / "t.txt", tokenizer=tokenizer)
    assert corpus.tokenizer is tokenizer
    assert corpus.stats["unknown_chars"] == "yz"
    assert corpus.val_ids[-3:].tolist() == [tokenizer.encode("x").item(), tokenizer.unk_id, tokenizer.unk_id]


def test_a_folder_of_txt_files_is_read_sorted_and_joined_by_newlines(tmp_path):
    rng = random.Random(8)
    parts = {name: random_words(rng, 200) for name in ("b.txt", "a.txt", "c.txt")}
    for name, text in parts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.md").write_text("not read")
    corpus = load_corpus(tmp_path)
    text = corpus.tokenizer.decode(corpus.train_ids) + corpus.tokenizer.decode(corpus.val_ids)
    assert text == "\n".join(parts[name] for name in sorted(parts))


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + b"hello there " * 20)
    corpus = load_corpus(tmp_path / "bom.txt")
    assert "\ufeff" not in corpus.tokenizer.chars


# ---- bad input ----

def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or folder"):
        load_corpus(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(DataError, match=r"empty\.txt: empty"):
        load_corpus(tmp_path / "empty.txt")


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="folder has no .txt files"):
        load_corpus(tmp_path)


def test_non_utf8_bytes_say_where(tmp_path):
    good = "first line\nsecond line\n".encode()
    (tmp_path / "latin1.txt").write_bytes(good + "caf\u00e9".encode("latin-1"))
    with pytest.raises(DataError, match=rf"latin1\.txt: not UTF-8 .*0xe9 at byte offset {len(good) + 3} \(line 3\)"):
        load_corpus(tmp_path / "latin1.txt")


def test_check_length_needs_one_whole_sequence_in_each_split(tmp_path):
    (tmp_path / "short.txt").write_text(random_words(random.Random(10), 1000))
    corpus = load_corpus(tmp_path / "short.txt")  # 900 training characters, 100 validation
    check_length(corpus, 99)
    with pytest.raises(DataError, match=r"short\.txt: text too short for one training sequence: the validation"):
        check_length(corpus, 100)
    with pytest.raises(DataError, match="the training split has 900 tokens, a sequence of 900 needs 901"):
        check_length(corpus, 900)


# ---- tinyshakespeare download ----

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests_served = 0

    def do_GET(self):
        QuietHandler.requests_served += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(content) -> the URL of a local HTTP server answering with those bytes."""
    servers = []

    def start(content: bytes) -> str:
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        (root / "input.txt").write_bytes(content)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(QuietHandler, directory=str(root)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/input.txt"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def shakespeare_bytes():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (the shared data folder sits beside the checkout)")
    return SHAKESPEARE.read_bytes()


def test_download_is_checked_cached_and_loaded_as_text(tmp_path, serve, shakespeare_bytes, monkeypatch):
    monkeypatch.setattr(data, "TINYSHAKESPEARE_URL", serve(shakespeare_bytes))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_bytes(shakespeare_bytes[:1000])  # a damaged cache is fetched again
    before = QuietHandler.requests_served
    corpus = load_corpus("tinyshakespeare", cache_dir=cache)
    assert (cache / "tinyshakespeare.txt").read_bytes() == shakespeare_bytes
    assert [p.name for p in cache.iterdir()] == ["tinyshakespeare.txt"]  # no temp file left behind
    text = shakespeare_bytes.decode()
    assert corpus.name == "tinyshakespeare" and corpus.kind == "text"
    assert corpus.stats["train_characters"] == int(len(text) * 0.9)
    assert corpus.tokenizer.decode(corpus.val_ids) == text[int(len(text) * 0.9):]
    load_corpus("tinyshakespeare", cache_dir=cache)
    assert QuietHandler.requests_served == before + 1  # the second load reads the cache


def test_download_cache_dir_comes_from_the_environment(tmp_path, serve, shakespeare_bytes, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE_DIR", str(tmp_path / "env-cache"))
    path = download_tinyshakespeare(url=serve(shakespeare_bytes))
    assert path == tmp_path / "env-cache" / "tinyshakespeare.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.TINYSHAKESPEARE_SHA256


def test_download_with_a_wrong_checksum_is_not_kept(tmp_path, serve, shakespeare_bytes):
    tampered = shakespeare_bytes.replace(b"ROMEO", b"ROMEX", 1)
    with pytest.raises(DataError, match="sha256 .* expected 86c4e6aa.*not kept"):
        download_tinyshakespeare(tmp_path / "cache", url=serve(tampered))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unreachable_server_explains_how_to_pass_a_local_file(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=r"could not download tinyshakespeare .*--data path/to/input\.txt"):
        download_tinyshakespeare(tmp_path / "cache", url=f"http://127.0.0.1:{port}/input.txt")

"""Chat sessions and the two CLIs: state kept across turns (equal to reading the whole conversation from
scratch), /reset, streaming, unknown characters, loading (a run's latest/ while it has no best/), `sample`
showing a chat model's turns readably, and `sample`/`chat` run as real programs."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_fast import chat, sample
from nanochat_fast.chat_format import encode_conversation, prompt_for_reply, readable_turns
from generation_reference import read, reference_reply
from nanochat_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanochat_fast.generation import Chatbot, generate, unknown_chars_notice
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.sampling import CHAT_SAMPLING, SamplingConfig
from nanochat_fast.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.!?'")
GREEDY = SamplingConfig(temperature=0)
MAX_REPLY_CHARS = 30


def chat_model(seed, end_bias=0.0, dtype=torch.float64):
    """A random model whose replies hold no role markers or <|unk|>, so a transcript re-encodes to the
    very ids the model wrote. float64 so that steps and whole-sequence forwards agree on every argmax."""
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=2))
    with torch.no_grad():
        model.head.bias[[TOKENIZER.unk_id, TOKENIZER.user_id, TOKENIZER.assistant_id]] = -30.0
        model.head.bias[TOKENIZER.end_id] += end_bias
    return model.to(dtype)


def transcript(user_texts, replies):
    return [message for user_text, reply in zip(user_texts, replies, strict=True)
            for message in ({"role": "user", "content": user_text}, {"role": "assistant", "content": reply})]


def state_from_scratch(model, ids):
    return read(model, ids)[1]


@pytest.fixture
def in_process_cli():
    """The CLIs set torch's thread count for the whole process: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run folder holding best/, as the CLIs expect."""
    directory = tmp_path_factory.mktemp("run")
    save_checkpoint(directory / "best", chat_model(0, dtype=torch.float32), TOKENIZER)
    return directory


@pytest.mark.parametrize("end_bias, sampling", [(-30.0, GREEDY), (1.5, SamplingConfig(1.0))],
                         ids=["replies-cut-at-max-length", "replies-end-with-end-token"])
def test_session_state_equals_reading_the_transcript_from_scratch(end_bias, sampling):
    model = chat_model(1, end_bias)
    bot = Chatbot(model, TOKENIZER, sampling, MAX_REPLY_CHARS, seed=3)
    user_texts = ["Hello there", "How are you?", "Tell me a story."]
    replies = [bot.reply(text) for text in user_texts]
    if end_bias < 0:
        assert all(len(reply) == MAX_REPLY_CHARS for reply in replies)
    else:
        assert any(len(reply) < MAX_REPLY_CHARS for reply in replies)
    ids, _ = encode_conversation(TOKENIZER, transcript(user_texts, replies))
    torch.testing.assert_close(bot.state, state_from_scratch(model, ids))


def test_second_reply_equals_the_reply_to_the_whole_conversation():
    model = chat_model(2)
    bot = Chatbot(model, TOKENIZER, GREEDY, MAX_REPLY_CHARS)
    first = bot.reply("Hello there")
    second = bot.reply("What is your name?")
    history, _ = encode_conversation(TOKENIZER, transcript(["Hello there"], [first]))
    tokens, _, _ = reference_reply(model, torch.cat([history, prompt_for_reply(TOKENIZER, "What is your name?")]),
                                   GREEDY, MAX_REPLY_CHARS, stop_id=TOKENIZER.end_id)
    assert second == TOKENIZER.decode(tokens)


def test_a_turn_feeds_only_its_new_characters(monkeypatch):
    model = chat_model(3, dtype=torch.float32)
    bot = Chatbot(model, TOKENIZER, GREEDY, MAX_REPLY_CHARS)
    bot.read(encode_conversation(TOKENIZER, transcript(["a" * 300] * 2, ["b" * 300] * 2))[0])
    forward_lengths, steps = [], []
    forward, step = model.forward, model.step
    monkeypatch.setattr(model, "forward",
                        lambda ids, state: forward_lengths.append(ids.shape[1]) or forward(ids, state))
    monkeypatch.setattr(model, "step", lambda ids, state: steps.append(ids.shape) or step(ids, state))
    reply = bot.reply("hi")
    assert forward_lengths == [len(prompt_for_reply(TOKENIZER, "hi"))]  # not the 1,200-character history
    assert len(steps) == len(reply) + 1  # every reply character, then <|end|>


def test_reset_gives_the_fresh_reply():
    model = chat_model(4)
    fresh = Chatbot(model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=5)
    fresh_reply = fresh.reply("Hello")
    bot = Chatbot(model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=5)
    assert bot.reply("Hello") == fresh_reply
    continued = bot.reply("Hello")  # the same words, later in the conversation
    bot.reset()
    assert bot.reply("Hello") == fresh_reply
    torch.testing.assert_close(bot.state, fresh.state)
    assert continued != fresh_reply  # the state (and random stream) carried over before the reset


def test_streamed_pieces_are_characters_that_make_the_reply():
    model = chat_model(5, end_bias=-30.0)
    pieces = list(Chatbot(model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=6).stream("Hi"))
    assert len(pieces) == MAX_REPLY_CHARS and all(len(piece) == 1 for piece in pieces)
    assert "".join(pieces) == Chatbot(model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=6).reply("Hi")


def test_a_reply_stopped_early_is_closed_in_the_state():
    model = chat_model(6)
    bot = Chatbot(model, TOKENIZER, GREEDY, MAX_REPLY_CHARS)
    stream = bot.stream("Hi")
    taken = "".join(next(stream) for _ in range(3))
    stream.close()  # as when Ctrl-C cuts a reply
    ids, _ = encode_conversation(TOKENIZER, transcript(["Hi"], [taken]))
    torch.testing.assert_close(bot.state, state_from_scratch(model, ids))


def test_unknown_characters_give_a_notice_and_read_as_unknown():
    assert unknown_chars_notice(TOKENIZER, "Hello") is None
    assert (unknown_chars_notice(TOKENIZER, "héllo") ==
            "(note: 'é' is not in the model's vocabulary; treated as unknown)")
    assert (unknown_chars_notice(TOKENIZER, "ü\tü") ==
            "(note: 'ü', '\\t' are not in the model's vocabulary; treated as unknown)")
    model = chat_model(7)
    bot = Chatbot(model, TOKENIZER, GREEDY, MAX_REPLY_CHARS)
    reply = bot.reply("héllo")
    by_hand = [TOKENIZER.user_id, *TOKENIZER.encode("h").tolist(), TOKENIZER.unk_id,  # <|unk|> in place of 'é'
               *TOKENIZER.encode("llo").tolist(), TOKENIZER.end_id, TOKENIZER.assistant_id]
    tokens, _, _ = reference_reply(model, by_hand, GREEDY, MAX_REPLY_CHARS, stop_id=TOKENIZER.end_id)
    assert reply == TOKENIZER.decode(tokens)


def test_sampling_overrides_apply_to_one_reply():
    model = chat_model(8)
    bot = Chatbot(model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=1)
    assert bot.reply("Hi", temperature=0) == Chatbot(model, TOKENIZER, GREEDY, MAX_REPLY_CHARS).reply("Hi")
    assert bot.sampling == CHAT_SAMPLING
    with pytest.raises(ValueError):
        bot.reply("Hi", top_p=2.0)


def test_load_reads_the_best_checkpoint_of_a_run_folder(run_dir):
    bot = Chatbot.load(run_dir, device="cpu", sampling=GREEDY, max_reply_chars=MAX_REPLY_CHARS)
    in_memory = Chatbot(chat_model(0, dtype=torch.float32), TOKENIZER, GREEDY, MAX_REPLY_CHARS)
    assert bot.reply("Hello") == in_memory.reply("Hello")
    with pytest.raises(CheckpointError):
        Chatbot.load(run_dir / "missing")


def run_cli(module, *args, stdin=""):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", f"nanochat_fast.{module}", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=120)


def test_sample_cli_streams_the_seeded_text(run_dir):
    args = ["--max-chars", "60", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "4"]
    result = run_cli("sample", "--ckpt", str(run_dir), "--device", "cpu", "--prompt", "Héllo", *args)
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(run_dir)
    expected = "".join(generate(checkpoint.model, TOKENIZER, TOKENIZER.encode("Héllo"), 60,
                                SamplingConfig(0.9, top_k=20, top_p=0.95), seed=4, stop_at_end=False))
    assert result.stdout == "Héllo" + expected + "\n"
    assert "'é' is not in the model's vocabulary" in result.stderr


def test_sample_cli_greedy_in_process(run_dir, capsys, in_process_cli):
    assert sample.main(["--ckpt", str(run_dir), "--greedy", "--temperature", "5", "--max-chars", "40",
                        "--prompt", "Hi", "--stop-at-end"]) == 0
    checkpoint = load_checkpoint(run_dir)
    expected = "".join(generate(checkpoint.model, TOKENIZER, TOKENIZER.encode("Hi"), 40, GREEDY))
    assert capsys.readouterr().out == "Hi" + expected + "\n"


def test_chat_cli_session(run_dir):
    lines = ["Hello", "/temperature 0", "Hello", "How are you?", "/temperature abc", "/help", "/reset",
             "Hello", "Héllo", "/quit", "Hello"]
    result = run_cli("chat", "--ckpt", str(run_dir), "--device", "cpu", "--seed", "1",
                     "--max-reply-chars", str(MAX_REPLY_CHARS), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(run_dir)
    reference = Chatbot(checkpoint.model, TOKENIZER, CHAT_SAMPLING, MAX_REPLY_CHARS, seed=1)
    expected = [reference.reply("Hello")]
    reference.sampling = GREEDY
    expected += [reference.reply("Hello"), reference.reply("How are you?")]
    reference.reset()
    expected += [reference.reply("Hello"), reference.reply("Héllo")]  # nothing after /quit
    assert re.findall(r"bot> (.*)", result.stdout) == expected
    assert "(temperature 0.0)" in result.stdout and "usage: /temperature" in result.stdout
    assert "/reset" in result.stdout and "(conversation reset)" in result.stdout
    assert "(note: 'é' is not in the model's vocabulary; treated as unknown)" in result.stdout
    assert result.stderr == ""


def test_chat_cli_ends_cleanly_at_end_of_input(run_dir, monkeypatch, capsys, in_process_cli):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert chat.main(["--ckpt", str(run_dir), "--max-reply-chars", "5"]) == 0
    assert len(re.findall(r"bot> ", capsys.readouterr().out)) == 1


def test_chat_cli_bad_checkpoint_exits_2_without_traceback(tmp_path):
    result = run_cli("chat", "--ckpt", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "missing" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["--ckpt", "{empty}"], ["--top-p", "2"], ["--temperature", "-1"],
                                  ["--max-chars", "-5"]])
def test_sample_cli_rejects_bad_input_with_exit_2(argv, tmp_path, capsys, in_process_cli):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([arg.format(empty=tmp_path) for arg in argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("cli", [sample, chat])
def test_every_flag_has_help(cli):
    actions = cli.make_parser()._actions
    assert {"--ckpt", "--device", "--seed", "--temperature"} <= {flag for a in actions for flag in a.option_strings}
    assert all(action.help for action in actions)
    greedy = next(action for action in actions if "--greedy" in action.option_strings)
    assert "repeating one phrase" in greedy.help  # greedy decoding loops: the help says so


@pytest.mark.parametrize("cli, argv", [(chat, []), (sample, ["--max-chars", "5"])], ids=["chat", "sample"])
def test_a_run_without_best_falls_back_to_latest_with_a_note(cli, argv, tmp_path, monkeypatch, capsys,
                                                             in_process_cli):
    # A run stopped before its first validation has only latest/.
    save_checkpoint(tmp_path / "run" / "latest", chat_model(0, dtype=torch.float32), TOKENIZER, train_state={"step": 3})
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["--ckpt", str(tmp_path / "run"), "--device", "cpu", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == f"(note: {tmp_path / 'run'} has no best/ checkpoint yet, using latest/ from step 3)\n"
    if cli is chat:
        assert out.startswith(f"chatting with {tmp_path / 'run' / 'latest'} ")


def test_readable_turns_labels_roles_and_breaks_lines_at_end():
    pieces = ["<|user|>", *"hi", "<|end|>", "<|assistant|>", *"HI", "<|end|>", "<|user|>", *"yo", "<|unk|>",
              "<|assistant|>", *"OK"]
    assert "".join(readable_turns(pieces)) == "User: hi\nAssistant: HI\n\nUser: yo<|unk|>\nAssistant: OK"
    assert "".join(readable_turns(["<|user|>", *"a"], printed="Hi")) == "\n\nUser: a"  # a prompt's line ends first
    assert "".join(readable_turns([*"ab", "<|end|>", *"cd", "<|end|>"])) == "ab\ncd\n"  # replies, line by line


def marker_model() -> CharLSTM:
    """A random model that writes every chat marker often."""
    model = chat_model(9, dtype=torch.float32)
    with torch.no_grad():
        model.head.bias[[TOKENIZER.user_id, TOKENIZER.assistant_id, TOKENIZER.end_id]] = 2.0
    return model


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_sample_shows_a_chat_models_turns_readably_and_raw_prints_the_markers(kind, tmp_path, capsys,
                                                                               in_process_cli):
    save_checkpoint(tmp_path / "ckpt", marker_model(), TOKENIZER, extra={"corpus": {"kind": kind}})
    flags = ["--ckpt", str(tmp_path / "ckpt"), "--device", "cpu", "--prompt", "Hi", "--max-chars", "80",
             "--seed", "2", "--temperature", "1"]
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    raw = list(generate(checkpoint.model, TOKENIZER, TOKENIZER.encode("Hi"), 80, SamplingConfig(1.0), seed=2,
                        stop_at_end=False))
    assert {"<|user|>", "<|assistant|>", "<|end|>"} <= set(raw)
    assert sample.main([*flags, "--raw"]) == 0
    assert capsys.readouterr().out == "Hi" + "".join(raw) + "\n"
    assert sample.main(flags) == 0
    readable = "".join(readable_turns(raw, printed="Hi")) if kind == "chat" else "".join(raw)  # text: as it was
    assert capsys.readouterr().out == "Hi" + readable + "\n"

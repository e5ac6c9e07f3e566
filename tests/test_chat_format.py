"""Conversation encoding: markers, end tokens and which positions are training targets."""

import random

import pytest
import torch

from nanochat_fast.chat_format import encode_conversation, prompt_for_reply
from nanochat_fast.tokenizer import ASSISTANT, END, USER, CharTokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz ?!.'"


def random_conversation(rng, turns):
    roles = ["user", "assistant"] * turns
    return [{"role": role, "content": "".join(rng.choices(LETTERS, k=rng.randrange(0, 20)))}
            for role in roles[:turns]]


@pytest.mark.parametrize("seed", range(5))
def test_messages_become_marker_content_end_and_only_replies_are_targets(seed):
    rng = random.Random(seed)
    tok = CharTokenizer.from_text(LETTERS)
    messages = random_conversation(rng, rng.randrange(1, 7))
    ids, mask = encode_conversation(tok, messages)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    marker = {"user": USER, "assistant": ASSISTANT}
    assert tok.decode(ids) == "".join(marker[m["role"]] + m["content"] + END for m in messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode(ids[mask]) == "".join(reply + END for reply in replies)
    # Every role marker is context, never a target.
    is_marker = (ids == tok.user_id) | (ids == tok.assistant_id)
    assert not bool(mask[is_marker].any())
    assert int(is_marker.sum()) == len(messages)


def test_system_messages_are_skipped():
    tok = CharTokenizer.from_text(LETTERS)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with_system = [{"role": "system", "content": "be nice"}] + chat
    for got, want in zip(encode_conversation(tok, with_system), encode_conversation(tok, chat), strict=True):
        assert torch.equal(got, want)


def test_empty_conversation_gives_empty_tensors():
    ids, mask = encode_conversation(CharTokenizer.from_text("a"), [])
    assert ids.shape == mask.shape == (0,)
    assert ids.dtype == torch.long and mask.dtype == torch.bool


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    (["hi"], "must be an object"),
    ({"role": "user", "content": "hi"}, "must be a list"),
])
def test_malformed_messages_raise_value_error(messages, problem):
    with pytest.raises(ValueError, match=problem):
        encode_conversation(CharTokenizer.from_text("hi"), messages)


def test_prompt_for_reply_ends_with_the_assistant_marker():
    tok = CharTokenizer.from_text(LETTERS)
    text = "".join(random.Random(9).choices(LETTERS, k=30))
    prompt = prompt_for_reply(tok, text)
    assert prompt.dtype == torch.long
    assert tok.decode(prompt) == USER + text + END + ASSISTANT
    # The prompt is exactly how a user turn plus the reply's marker appear inside a training conversation.
    ids, _ = encode_conversation(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": ""}])
    assert torch.equal(prompt, ids[:-1])

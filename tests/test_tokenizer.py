"""CharTokenizer: reserved specials, exact round trips, unknown characters, serialisation, speed."""

import json
import random
import time

import pytest
import torch

from nanochat_fast.tokenizer import ASSISTANT, END, UNK, USER, CharTokenizer

# Printable ASCII, accents, CJK, an emoji outside the Basic Multilingual Plane, whitespace.
ALPHABET = [chr(c) for c in range(32, 127)] + list("éüñßЖж中文🙂\n\t")


def random_text(rng, length, alphabet=ALPHABET):
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_specials_take_the_first_ids_and_chars_follow_sorted():
    rng = random.Random(1)
    text = random_text(rng, 500)
    tok = CharTokenizer.from_text(text)
    assert (tok.unk_id, tok.user_id, tok.assistant_id, tok.end_id) == (0, 1, 2, 3)
    assert tok.decode([0, 1, 2, 3]) == UNK + USER + ASSISTANT + END
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.vocab_size == 4 + len(set(text))
    assert tok.decode(range(4, tok.vocab_size)) == tok.chars


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_is_exact_for_in_vocabulary_text(seed):
    rng = random.Random(seed)
    tok = CharTokenizer.from_text(random_text(rng, 2000))
    text = random_text(rng, rng.randrange(0, 300), alphabet=list(tok.chars))
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert bool((ids >= 4).all())  # ordinary text never produces a special id
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_marker_strings_in_text_stay_plain_characters():
    tok = CharTokenizer.from_text("<|> abcdefghijklmnopqrstuvwxyz")
    text = "hi " + END + USER + " bye"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert not bool((ids < 4).any())
    assert tok.decode(ids) == text


def test_unknown_characters_map_to_unk_and_are_listed_in_order_seen():
    tok = CharTokenizer.from_text("abc ")
    text = "a🙂b zéc🙂é"
    ids = tok.encode(text)
    expected = [tok.unk_id if ch not in "abc " else 4 + sorted("abc ").index(ch) for ch in text]
    assert ids.tolist() == expected
    assert tok.unknown_chars(text) == "🙂zé"
    assert tok.unknown_chars("cab") == ""


def test_empty_vocabulary_and_empty_text():
    tok = CharTokenizer.from_text("")
    assert tok.vocab_size == 4 and tok.chars == ""
    assert tok.encode("xy").tolist() == [tok.unk_id, tok.unk_id]
    assert tok.encode("").shape == (0,)
    assert tok.decode([]) == ""


def test_decode_rejects_ids_outside_the_vocabulary():
    tok = CharTokenizer.from_text("ab")
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([4, bad])


def test_dict_round_trip_through_json_keeps_every_id():
    rng = random.Random(7)
    text = random_text(rng, 1000)
    tok = CharTokenizer.from_text(text)
    again = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.chars == tok.chars and again.vocab_size == tok.vocab_size
    assert torch.equal(again.encode(text), tok.encode(text))


def test_from_dict_refuses_a_different_special_layout():
    d = CharTokenizer.from_text("ab").to_dict()
    d["special_tokens"] = [USER, UNK, ASSISTANT, END]
    with pytest.raises(ValueError, match="special"):
        CharTokenizer.from_dict(d)


def test_encoding_a_megabyte_is_fast_and_matches_a_per_char_reference():
    rng = random.Random(3)
    alphabet = ALPHABET[:60]
    tok = CharTokenizer.from_text("".join(alphabet[:-5]))  # the last five characters are unknown
    text = "".join(rng.choices(alphabet, k=1_100_000))
    start = time.perf_counter()
    ids = tok.encode(text)
    encode_seconds = time.perf_counter() - start
    index = {ch: i + 4 for i, ch in enumerate(tok.chars)}
    assert ids.tolist() == [index.get(ch, tok.unk_id) for ch in text]
    assert encode_seconds < 0.5

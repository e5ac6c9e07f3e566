"""Character-level tokenizer: one id per character, plus four chat special tokens.

The specials take ids 0..3 in every vocabulary, so a model pretrained on plain text keeps the same ids
when it is fine-tuned on chat. Encoding goes through a numpy table indexed by Unicode code point, so
a megabyte of text encodes in milliseconds instead of a Python loop per character.
"""

import numpy as np
import torch

UNK = "<|unk|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = (UNK, USER, ASSISTANT, END)


def _code_points(text: str) -> np.ndarray:
    # UTF-32 is one fixed-width unit per character; surrogatepass keeps lone surrogates encodable.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    unk_id, user_id, assistant_id, end_id = range(len(SPECIAL_TOKENS))

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._id_to_token = list(SPECIAL_TOKENS) + list(self.chars)
        codes = _code_points(self.chars).astype(np.int64)
        # Table from code point to id; code points beyond the table or absent from it are unknown.
        self._id_of_code = np.full(int(codes.max()) + 1 if len(codes) else 0, self.unk_id, dtype=np.int64)
        self._id_of_code[codes] = np.arange(len(SPECIAL_TOKENS), self.vocab_size)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _ids_of(self, text: str) -> np.ndarray:
        codes = _code_points(text)
        known = codes < len(self._id_of_code)
        ids = np.full(len(codes), self.unk_id, dtype=np.int64)
        ids[known] = self._id_of_code[codes[known]]
        return ids

    def encode(self, text: str) -> torch.Tensor:
        """Text to a 1-D long tensor. Marker strings in the text stay plain characters: text is text."""
        return torch.from_numpy(self._ids_of(text))

    def unknown_chars(self, text: str) -> str:
        """The distinct characters of text outside the vocabulary, in the order they first appear."""
        codes = _code_points(text)[self._ids_of(text) == self.unk_id]
        distinct, first_seen = np.unique(codes, return_index=True)
        return "".join(chr(code) for code in distinct[np.argsort(first_seen)])

    def decode(self, ids) -> str:
        """Ids (a tensor or iterable of ints) to text; specials appear as their marker strings."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return "".join(self._id_to_token[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "special_tokens": list(SPECIAL_TOKENS), "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        # A vocabulary saved with other specials would silently shift every id: refuse it.
        if d.get("type") != "char" or d.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"not a character tokenizer with specials {list(SPECIAL_TOKENS)}: {d!r:.200}")
        return cls(d["chars"])

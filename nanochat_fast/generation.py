"""Text from a model, one sequence at a time, on the engine: `generate` continues a prompt, and a
`Chatbot` holds a conversation.

A `Chatbot` keeps the LSTM state between turns and feeds only a turn's new characters, so a turn
costs the same however long the conversation already is:

    from nanochat_fast import Chatbot
    bot = Chatbot.load("out/")
    print(bot.reply("Hello"))
"""

from collections.abc import Iterator
from dataclasses import replace

import torch

from nanochat_fast.chat_format import prompt_for_reply
from nanochat_fast.checkpoint import load_checkpoint
from nanochat_fast.device import resolve_device
from nanochat_fast.engine import Engine, Sequence, read_prompts
from nanochat_fast.sampling import CHAT_SAMPLING, SamplingConfig, new_generator
from nanochat_fast.tokenizer import CharTokenizer


def token_texts(tokenizer: CharTokenizer) -> list[str]:
    """The text of every token id (specials as their markers), so writing a token is a list lookup."""
    return [tokenizer.decode([token]) for token in range(tokenizer.vocab_size)]


def written_tokens(engine: Engine, sequence: Sequence) -> Iterator[int]:
    """Step the engine until `sequence` has finished, yielding each token it writes."""
    while sequence.finish_reason is None:
        for written, token in engine.step():
            if written is sequence:
                yield token


def generate(model, tokenizer: CharTokenizer, prompt_ids, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None, state=None,
             stop_at_end: bool = True) -> Iterator[str]:
    """Stream the text the model writes after prompt_ids, one character (token) per piece.

    An empty prompt starts from <|end|>, the boundary between messages. With stop_at_end the text
    ends before the first <|end|>; otherwise specials appear as their marker strings."""
    if max_new_tokens == 0:
        return
    engine = Engine(model)
    prompt_ids = torch.as_tensor(prompt_ids if len(prompt_ids) else [tokenizer.end_id], dtype=torch.long)
    sequence = Sequence(prompt_ids, sampling, max_new_tokens, stop_id=tokenizer.end_id if stop_at_end else None,
                        state=state, generator=new_generator(engine.device, seed))
    engine.add([sequence])
    texts = token_texts(tokenizer)
    for token in written_tokens(engine, sequence):
        yield texts[token]


def unknown_chars_notice(tokenizer: CharTokenizer, text: str) -> str | None:
    """A one-line note naming the characters of text the model cannot read, or None if there are none."""
    unknown = tokenizer.unknown_chars(text)
    if not unknown:
        return None
    names = ", ".join(repr(char) for char in unknown)
    verb = "is" if len(unknown) == 1 else "are"
    return f"(note: {names} {verb} not in the model's vocabulary; treated as unknown)"


class Chatbot:
    """A conversation with a model. The LSTM state persists between turns: each turn feeds only the
    user's new message, and the reply is already in the state because every written token was fed.
    `seed` fixes the conversation's random stream (None: a fresh one)."""

    def __init__(self, model, tokenizer: CharTokenizer, sampling: SamplingConfig = CHAT_SAMPLING,
                 max_reply_chars: int = 300, seed: int | None = None):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.max_reply_chars = max_reply_chars
        self.seed = seed
        self.engine = Engine(model)
        self._texts = token_texts(tokenizer)
        self.reset()

    @classmethod
    def load(cls, path="out/", device="auto", **kwargs) -> "Chatbot":
        """A chatbot on the checkpoint at path (a run folder means its best/); kwargs go to Chatbot()."""
        checkpoint = load_checkpoint(path, device=resolve_device(device))
        return cls(checkpoint.model, checkpoint.tokenizer, **kwargs)

    def reset(self):
        """Start a new conversation, exactly as a freshly made chatbot would."""
        self.state = None  # the model's state tuple after everything said so far
        self.generator = new_generator(self.engine.device, self.seed)

    def read(self, ids: torch.Tensor):
        """Read token ids (1-D, maybe none) into the conversation without replying: a transcript, say."""
        if len(ids):
            _, self.state = read_prompts(self.engine.model, [ids.to(self.engine.device)], [self.state])

    def stream(self, user_text: str, **sampling_overrides) -> Iterator[str]:
        """Stream the reply to user_text one character at a time. sampling_overrides (temperature,
        top_k, top_p) apply to this reply only. Characters outside the vocabulary read as unknown.
        A reply left early (the reader stopped, or Ctrl-C) is closed in the state as a cut one."""
        sampling = replace(self.sampling, **sampling_overrides)
        sequence = Sequence(prompt_for_reply(self.tokenizer, user_text), sampling, self.max_reply_chars,
                            stop_id=self.tokenizer.end_id, state=self.state, generator=self.generator)
        self.engine.add([sequence])
        try:
            for token in written_tokens(self.engine, sequence):
                yield self._texts[token]
        finally:
            if sequence.finish_reason is None:
                self.engine.cancel([sequence])
            self.state = sequence.state

    def reply(self, user_text: str, **sampling_overrides) -> str:
        """The whole reply to user_text (see `stream`)."""
        return "".join(self.stream(user_text, **sampling_overrides))

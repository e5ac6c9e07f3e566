"""Text generation from a CharLSTM: the sampling rules, a streaming generator, and chat sessions.

Generation reads a prompt with one whole-sequence forward, then writes one character per
`CharLSTM.step` (the LSTM's lean step on CPU, the fused kernel on CUDA), feeding each written
token back in. A `Chatbot` keeps the LSTM state between turns and feeds only a turn's new
characters, so a turn costs the same however long the conversation already is:

    from nanochat_fast import Chatbot
    bot = Chatbot.load("out/")
    print(bot.reply("Hello"))
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from nanochat_fast.chat_format import prompt_for_reply
from nanochat_fast.checkpoint import Checkpoint, load_checkpoint
from nanochat_fast.device import resolve_device
from nanochat_fast.tokenizer import CharTokenizer


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits: temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens (ties broken arbitrarily); top_p then keeps the
    smallest set of most likely tokens whose probability, renormalised after top-k, reaches top_p.
    None switches a filter off."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


CHAT_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9)  # greedy replies tend to stop or loop early


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None):
    """Next token ids (B,) drawn from logits (B, vocab_size) by the rules in `sampling`."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1 else None  # 1 keeps all
    if sampling.top_k is None and top_p is None:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    # Filter in order of likelihood: the candidates, most likely first, and their token ids.
    if sampling.top_k is not None:
        candidate_logits, candidate_ids = logits.topk(min(sampling.top_k, logits.size(-1)), dim=-1)
    else:
        candidate_logits, candidate_ids = logits.sort(dim=-1, descending=True)
    probs = candidate_logits.softmax(dim=-1)
    if top_p is not None:
        # Drop a candidate when the more likely ones already reach top_p; the most likely one always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # weights need not sum to 1
    return candidate_ids.gather(-1, choice).squeeze(-1)


def read_tokens(model, ids: torch.Tensor, state=None):
    """Feed one stream's token ids (1-D, at least one) from state: (logits for the next token
    (1, vocab_size), new state). One step for a single token, one whole-sequence forward for more."""
    with torch.inference_mode():
        if ids.numel() == 1:
            return model.step(ids, state)
        logits, state = model(ids[None], state)
        return logits[:, -1], state


def read_streams(model, streams: list[torch.Tensor], states: list):
    """Feed several streams' token ids (each 1-D, at least one) at once, each from its own state
    ((h, c) of shape (num_layers, 1, hidden), or None for a fresh stream). Returns the logits for
    each stream's next token (n, vocab_size) and the new states stacked (num_layers, n, hidden),
    row i for stream i.

    Streams of unequal length share each forward while they last: sorted longest first, the batch
    runs to the end of the shortest stream still reading, which leaves with its logits and state, and
    the rest go on from there: as many forwards as distinct lengths, however many streams."""
    lengths = [len(ids) for ids in streams]
    order = sorted(range(len(streams)), key=lambda index: -lengths[index])
    device = next(model.parameters()).device
    fresh = model.initial_state(1, device=device, dtype=next(model.parameters()).dtype)
    h, c = (torch.cat([(states[index] or fresh)[part] for index in order], dim=1) for part in (0, 1))
    ids = torch.zeros(len(streams), max(lengths), dtype=torch.long, device=device)
    for row, index in enumerate(order):
        ids[row, :lengths[index]] = streams[index]
    logits = torch.empty(len(streams), model.config.vocab_size, dtype=h.dtype, device=device)
    new_h, new_c = torch.empty_like(h), torch.empty_like(c)
    start, reading = 0, len(streams)
    with torch.inference_mode():
        for end in sorted(set(lengths)):
            chunk = ids[:reading, start:end]
            chunk_logits, (h, c) = model(chunk, (h, c))
            chunk_logits = chunk_logits[:, -1]
            done = sum(lengths[index] == end for index in order[:reading])  # the last rows of the prefix
            finished = slice(reading - done, reading)
            logits[finished] = chunk_logits[finished]
            new_h[:, finished], new_c[:, finished] = h[:, finished], c[:, finished]
            reading -= done
            h, c = h[:, :reading], c[:, :reading]
            start = end
    back = torch.tensor(order, device=device).argsort()  # sorted rows back to the streams' order
    return logits[back], (new_h[:, back], new_c[:, back])


class Decoder:
    """One stream of text through a model: the LSTM state after everything read and written so far,
    the logits for the next token, and its own random generator (reproducible with a seed, and
    independent of torch's global RNG). Puts the model in eval mode: generation never uses dropout."""

    def __init__(self, model, seed: int | None = None, state=None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.reset(state)

    def reset(self, state=None):
        """Forget everything read (or start from `state`) and restart the random stream from the seed."""
        self.state = state
        self.next_logits = None  # (1, vocab_size) once a token has been fed
        if self.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.seed)

    def feed(self, ids):
        """Read token ids (a 1-D tensor or list): one step for a single token, one forward for more."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            return
        self.next_logits, self.state = read_tokens(self.model, ids, self.state)

    def write(self, max_new_tokens: int, sampling: SamplingConfig, stop_id: int | None = None) -> Iterator[int]:
        """Sample up to max_new_tokens token ids, stopping after stop_id. Each token is fed back before it
        is yielded, so the state always includes everything yielded, even if the caller stops early."""
        if self.next_logits is None:
            raise ValueError("nothing to continue from: feed at least one token before writing")
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                token = sample_next(self.next_logits, sampling, self.generator)
            self.feed(token)
            token = token.item()
            yield token
            if token == stop_id:
                return


def token_texts(tokenizer: CharTokenizer) -> list[str]:
    """The text of every token id (specials as their markers), so writing a token is a list lookup."""
    return [tokenizer.decode([token]) for token in range(tokenizer.vocab_size)]


def generate(model, tokenizer: CharTokenizer, prompt_ids, max_new_chars: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None, state=None,
             stop_at_end: bool = True) -> Iterator[str]:
    """Stream the text the model writes after prompt_ids, one character (token) per piece.

    An empty prompt starts from <|end|>, the boundary between messages. With stop_at_end the text
    ends before the first <|end|>; otherwise specials appear as their marker strings."""
    decoder = Decoder(model, seed=seed, state=state)
    decoder.feed(prompt_ids if len(prompt_ids) else [tokenizer.end_id])
    texts = token_texts(tokenizer)
    stop_id = tokenizer.end_id if stop_at_end else None
    for token in decoder.write(max_new_chars, sampling, stop_id):
        if token != stop_id:
            yield texts[token]


def unknown_chars_notice(tokenizer: CharTokenizer, text: str) -> str | None:
    """A one-line note naming the characters of text the model cannot read, or None if there are none."""
    unknown = tokenizer.unknown_chars(text)
    if not unknown:
        return None
    names = ", ".join(repr(char) for char in unknown)
    verb = "is" if len(unknown) == 1 else "are"
    return f"(note: {names} {verb} not in the model's vocabulary; treated as unknown)"


def load_model(path="out/", device="auto") -> Checkpoint:
    """The checkpoint to talk to: given a run folder, its best/ checkpoint. Raises CheckpointError."""
    return load_checkpoint(path, device=resolve_device(device))


class Chatbot:
    """A conversation with a model. The LSTM state persists between turns: each turn feeds only the
    user's new message, and the reply is already in the state because every written token was fed."""

    def __init__(self, model, tokenizer: CharTokenizer, sampling: SamplingConfig = CHAT_SAMPLING,
                 max_reply_chars: int = 300, seed: int | None = None):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.max_reply_chars = max_reply_chars
        self.decoder = Decoder(model, seed=seed)
        self._texts = token_texts(tokenizer)

    @classmethod
    def load(cls, path="out/", device="auto", **kwargs) -> "Chatbot":
        """A chatbot on the checkpoint at path (a run folder means its best/); kwargs go to Chatbot()."""
        checkpoint = load_model(path, device)
        return cls(checkpoint.model, checkpoint.tokenizer, **kwargs)

    def reset(self):
        """Start a new conversation, exactly as a freshly loaded chatbot would."""
        self.decoder.reset()

    def stream(self, user_text: str, **sampling_overrides) -> Iterator[str]:
        """Stream the reply to user_text one character at a time. sampling_overrides (temperature,
        top_k, top_p) apply to this reply only. Characters outside the vocabulary read as unknown."""
        sampling = replace(self.sampling, **sampling_overrides)
        end_id = self.tokenizer.end_id
        self.decoder.feed(prompt_for_reply(self.tokenizer, user_text))
        ended = False
        try:
            for token in self.decoder.write(self.max_reply_chars, sampling, stop_id=end_id):
                ended = token == end_id
                if not ended:
                    yield self._texts[token]
        finally:
            if not ended:
                # Cut at max length or interrupted: close the reply as the training data does, so the
                # next turn continues a well-formed conversation.
                self.decoder.feed([end_id])

    def reply(self, user_text: str, **sampling_overrides) -> str:
        """The whole reply to user_text (see `stream`)."""
        return "".join(self.stream(user_text, **sampling_overrides))

"""The generation engine: token ids in, token ids out, for any number of sequences at once.

A `Sequence` joins with its prompt, its sampling rules, its random generator and optionally the
state to continue from; every `Engine.step` writes the next token of every active sequence and
feeds them all back in one model step. A sequence leaves when it writes its stop token, reaches its
length cap, or is cancelled. An LSTM's state has a fixed size whatever it has read, so the states of
the active sequences stack into one (num_layers, B, hidden) batch. Each sequence keeps its own rules
and generator, so a seeded sequence writes the same tokens whoever shares the batch, and a greedy
one equals the same sequence alone.

Every front end drives this engine: `generation.Chatbot` and `generation.generate` with one sequence
(the terminal chat, sample, the report), the web server with many (through `engine_thread.py`).

The end-of-reply rule: a sequence with a stop token that leaves without having written it (cut at its
cap, or cancelled) gets it fed, so its final state reads as if the model had ended it there, and a
conversation's next message follows a well-formed transcript.

    engine = Engine(model)
    sequence = Sequence(prompt_ids, SamplingConfig(0), max_new_tokens=300, stop_id=tokenizer.end_id)
    engine.add([sequence])
    while sequence.finish_reason is None:
        for sequence, token in engine.step():
            ...
"""

from dataclasses import dataclass, field

import torch

from nanochat_fast.device_decode import DeviceBatch, graphs_enabled
from nanochat_fast.sampling import GREEDY, SamplingConfig, new_generator, sample_next


@dataclass(eq=False)  # identity equality: two sequences with equal fields are still two sequences
class Sequence:
    """One sequence to write. Set by the caller: the prompt (1-D token ids, at least one) read before
    the first token; the sampling rules; the cap on tokens written; the stop token that ends it (None:
    only the cap does); the state to continue from (the model's tuple, (h, c) or (h,), each
    (num_layers, 1, hidden), or None for a fresh stream); the random generator (None: a fresh one).
    Set by the engine: `new_tokens` written so far; once it has left, `finish_reason` ("stop": it
    wrote stop_id; "length": cut at the cap; "cancelled") and `state`, the state after everything it
    read and wrote."""
    prompt_ids: torch.Tensor
    sampling: SamplingConfig = GREEDY
    max_new_tokens: int = 300
    stop_id: int | None = None
    state: tuple | None = None
    generator: torch.Generator | None = None
    new_tokens: int = field(default=0, init=False)
    finish_reason: str | None = field(default=None, init=False)


def read_prompts(model, prompts: list[torch.Tensor], states: list):
    """Feed several streams' token ids (each 1-D, at least one) at once, each from its own state
    (the model's tuple of (num_layers, 1, hidden) tensors, or None for a fresh stream). Returns the
    logits for each stream's next token (n, vocab_size) and the new states stacked (num_layers, n,
    hidden), row i for stream i.

    Streams of unequal length share each forward while they last: sorted longest first, the batch
    runs to the end of the shortest stream still reading, which leaves with its logits and state, and
    the rest go on from there: as many forwards as distinct lengths, however many streams. A stretch
    of one token is a `step`, which costs less than a whole-sequence forward."""
    lengths = [len(ids) for ids in prompts]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    parameter = next(model.parameters())
    fresh = model.initial_state(1, device=parameter.device, dtype=parameter.dtype)
    state = tuple(torch.cat([(states[index] or fresh)[part] for index in order], dim=1) for part in range(len(fresh)))
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=parameter.device)
    for row, index in enumerate(order):
        ids[row, :lengths[index]] = prompts[index]
    logits = torch.empty(len(prompts), model.config.vocab_size, dtype=state[0].dtype, device=parameter.device)
    new_state = tuple(torch.empty_like(part) for part in state)
    start, reading = 0, len(prompts)
    with torch.inference_mode():
        for end in sorted(set(lengths)):
            if end - start == 1:
                chunk_logits, state = model.step(ids[:reading, start], state)
            else:
                chunk_logits, state = model(ids[:reading, start:end], state)
                chunk_logits = chunk_logits[:, -1]
            done = sum(lengths[index] == end for index in order[:reading])  # the last rows of the prefix
            finished = slice(reading - done, reading)
            logits[finished] = chunk_logits[finished]
            for new, part in zip(new_state, state, strict=True):
                new[:, finished] = part[:, finished]
            reading -= done
            state = tuple(part[:, :reading] for part in state)
            start = end
    back = torch.tensor(order, device=parameter.device).argsort()  # sorted rows back to the prompts' order
    return logits[back], tuple(new[:, back] for new in new_state)


DECODE_MODES = ("host", "eager", "graph")


class HostBatch:
    """The engine's active rows as the host steps them (on CPU, the fastest way): the model's state
    and next logits, each row's token drawn by `sample_next` with its sequence's own generator (greedy
    rows in one argmax, sampled ones one by one), then one model step; row i is the engine's sequence i."""

    def __init__(self, model):
        self.model = model
        self.clear()

    def add(self, logits, state, sequences):
        """Append rows: their next logits (n, vocab_size), state (each (num_layers, n, hidden)), sequences."""
        if self.rules:
            state = tuple(torch.cat((batch, rows), dim=1) for batch, rows in zip(self.state, state, strict=True))
            logits = torch.cat((self.next_logits, logits))
        self.state, self.next_logits = state, logits
        self.rules += [(sequence.sampling, sequence.generator) for sequence in sequences]

    def step(self) -> list[int]:
        """Write every row's next token and feed it back; returns the rows' tokens."""
        tokens = self._sample()
        next_logits, state = self.model.step(tokens, self.state)
        self.next_logits, self.state = next_logits, state  # only now: an interrupted step changes nothing
        return tokens.tolist()

    def rows_state(self, rows: list[int]) -> tuple:
        """The state of the given rows, (num_layers, len(rows), hidden) each, a copy."""
        return tuple(part[:, rows] for part in self.state)

    def keep(self, rows: list[int]):
        """Keep only the given rows, in this order, as rows 0, 1, ...; the rest leave."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.next_logits.device)
        self.state = tuple(part[:, index] for part in self.state)
        self.next_logits = self.next_logits[index]
        self.rules = [self.rules[row] for row in rows]

    def clear(self):
        """Forget every row."""
        self.state = self.next_logits = None  # the model's tuple, each (num_layers, B, hidden); (B, vocab_size)
        self.rules = []  # each row's (SamplingConfig, torch.Generator)

    def _sample(self) -> torch.Tensor:
        greedy = [row for row, (sampling, _) in enumerate(self.rules) if sampling.greedy]
        if len(greedy) == len(self.rules):
            return sample_next(self.next_logits, GREEDY)
        tokens = torch.empty(len(self.rules), dtype=torch.long, device=self.next_logits.device)
        if greedy:
            tokens[greedy] = sample_next(self.next_logits[greedy], GREEDY)
        for row, (sampling, generator) in enumerate(self.rules):
            if not sampling.greedy:
                tokens[row] = sample_next(self.next_logits[row:row + 1], sampling, generator)[0]
        return tokens


class Engine:
    """The active sequences of one model, stepped together. Puts the model in eval mode: generation
    never uses dropout. Not thread-safe: one thread drives it (see engine_thread.py for a server's).

    `decode` says how a step runs: "host" samples on the host's side with each sequence's own
    torch.Generator (`HostBatch`); "eager" and "graph" sample on the device, in tensors, with noise
    keyed by each sequence's seed and step (`device_decode.DeviceBatch`: the same distribution as
    "host", not the same sampled tokens; greedy tokens are the same), "graph" replaying each step from
    a CUDA graph. None: "graph" on CUDA (unless NANOCHAT_LSTM_CUDA_GRAPH=0: "eager"), else "host"."""

    def __init__(self, model, decode: str | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if decode is None:
            decode = ("graph" if graphs_enabled(self.device) else "eager") if self.device.type == "cuda" else "host"
        if decode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
        if decode == "graph" and self.device.type != "cuda":
            raise ValueError(f"decode='graph' replays CUDA graphs: the model is on {self.device}; use 'eager'")
        self.decode = decode
        self.sequences: list[Sequence] = []  # the active ones; sequence i is row i of the batch
        self._batch = HostBatch(model) if decode == "host" else DeviceBatch(model, use_graphs=decode == "graph")

    def add(self, sequences: list[Sequence]):
        """Read the sequences' prompts, together, each from its own state, and make them active."""
        for sequence in sequences:
            if sequence.prompt_ids.numel() == 0:
                raise ValueError("a sequence needs at least one prompt token to continue from")
            if sequence.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {sequence.max_new_tokens}")
            if sequence.generator is None:
                sequence.generator = new_generator(self.device)
        prompts = [sequence.prompt_ids.to(self.device, torch.long).reshape(-1) for sequence in sequences]
        logits, state = read_prompts(self.model, prompts, [sequence.state for sequence in sequences])
        self._batch.add(logits, state, sequences)
        self.sequences += sequences

    def step(self) -> list[tuple[Sequence, int]]:
        """Write one token for every active sequence and feed them all back in one model step (the
        stop token too, so a sequence leaves with a state that holds all it wrote). Returns each
        (sequence, token) written, a sequence's stop token left out; finished sequences leave."""
        if not self.sequences:
            return []
        with torch.inference_mode():
            tokens = self._batch.step()
        written, leaving = [], {}
        for row, (sequence, token) in enumerate(zip(self.sequences, tokens, strict=True)):
            sequence.new_tokens += 1
            if token == sequence.stop_id:
                leaving[row] = "stop"
                continue
            written.append((sequence, token))
            if sequence.new_tokens == sequence.max_new_tokens:
                leaving[row] = "length"
        if leaving:
            self._leave(leaving)
        return written

    def cancel(self, sequences: list[Sequence]):
        """Take active sequences out before they end (their reader stopped): finish reason "cancelled"."""
        self._leave({self.sequences.index(sequence): "cancelled" for sequence in sequences})

    def clear(self) -> list[Sequence]:
        """Forget every active sequence, with no state: after a failed step, whose batch is not to be
        trusted. Returns them, for their callers to hear of the failure."""
        dropped, self.sequences = self.sequences, []
        self._batch.clear()
        return dropped

    def _leave(self, leaving: dict[int, str]):
        """Take the rows in leaving (row -> finish reason) out of the batch, each with its final state."""
        closed = {}
        unclosed = [row for row, reason in leaving.items()
                    if reason != "stop" and self.sequences[row].stop_id is not None]
        if unclosed:  # the end-of-reply rule, for all of them in one step
            stop_ids = torch.tensor([self.sequences[row].stop_id for row in unclosed], device=self.device)
            with torch.inference_mode():
                _, closed_state = self.model.step(stop_ids, self._batch.rows_state(unclosed))
            closed = {row: tuple(part[:, index:index + 1] for part in closed_state)
                      for index, row in enumerate(unclosed)}
        for row, reason in leaving.items():
            sequence = self.sequences[row]
            sequence.finish_reason = reason
            sequence.state = closed.get(row) or self._batch.rows_state([row])
        keep = [row for row in range(len(self.sequences)) if row not in leaving]
        self._batch.keep(keep)
        self.sequences = [self.sequences[row] for row in keep]

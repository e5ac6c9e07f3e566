"""Continuous batching: one loop writes the next character of every active reply in one LSTM step.

An LSTM's state has a fixed size whatever the conversation's length, so the replies of any number of
conversations stack into one (num_layers, B, hidden) state. A reply joins the batch between steps
(the prompts of the replies joining at once read together first) and leaves it when the model ends
it, at its length cap, or when it is cancelled. Each reply keeps its own sampling rules and random generator, so
a seeded reply does not depend on who else is in the batch, and a greedy batched reply equals the
one-at-a-time reply.

Knows nothing about HTTP: a reply reports each written token id to `on_token` and its end to
`on_finish(finish_reason, state)`, both called from the engine's thread.

    engine = BatchingEngine(model, stop_id=tokenizer.end_id, max_batch=32, max_queue=64)
    engine.start()
    engine.submit(Reply(prompt_ids, SamplingConfig(0), 300, on_token, on_finish))
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat_fast.generation import SamplingConfig, read_streams, sample_next

GREEDY = SamplingConfig(temperature=0)
# From this many rows on, the engine's work runs on all its CPU threads; below, on one. Splitting a
# small batch's matmuls costs more in hand-offs than it saves (serve bench, 2 cores: one reply on 2
# threads ran 0.65x-0.96x of one thread, 8 replies 1.1x-1.35x faster, 32 replies 1.3x-1.5x).
ROWS_FOR_ALL_THREADS = 8
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every batch slot is taken and the waiting queue is full: try again later."""


@dataclass(eq=False)  # identity equality: two replies with equal fields are still two replies
class Reply:
    """One reply to write. `state` is the LSTM state to continue from ((h, c), each (num_layers, 1,
    hidden), or None for a fresh stream); `generator` the reply's random stream (None: a fresh,
    randomly seeded one). on_finish gets "stop" (the model wrote the stop token), "length" (cut at
    max_new_tokens), "cancelled" or "error", and the state after the reply: every written token and
    the stop token are in it (a cut reply is closed with the stop token, as the chat does); None
    when cancelled or failed."""
    prompt_ids: torch.Tensor
    sampling: SamplingConfig
    max_new_tokens: int
    on_token: Callable[[int], None]
    on_finish: Callable[[str, tuple | None], None]
    state: tuple | None = None
    generator: torch.Generator | None = None
    cancelled: bool = field(default=False, init=False)


class BatchingEngine:
    """Runs replies up to max_batch at a time, with up to max_queue more waiting for a slot, on up to
    `threads` CPU threads (see ROWS_FOR_ALL_THREADS)."""

    def __init__(self, model, stop_id: int, max_batch: int = 32, max_queue: int = 64, threads: int = 1):
        if max_batch < 1 or max_queue < 0 or threads < 1:
            raise ValueError(f"max_batch and threads must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{threads} and {max_queue}")
        self.threads = threads
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.stop_id = stop_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self._lock = threading.Condition()
        self._waiting: deque[Reply] = deque()
        self._in_flight = 0  # submitted and not finished: in the batch, joining it, or waiting
        self._running = False
        self._thread = None
        # The batch, touched only by the engine's thread: one row per reply.
        self._rows: list[Reply] = []
        self._written: list[int] = []  # tokens written so far, per row
        self._state = None  # (h, c), each (num_layers, B, hidden)
        self._next_logits = None  # (B, vocab_size)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def start(self):
        with self._lock:
            self._running = True
        self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._thread.start()

    def stop(self):
        """End the loop; replies still running or waiting finish as "cancelled"."""
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        self._finish_all("cancelled", list(self._waiting))  # the loop has ended: its rows are ours to end

    def submit(self, reply: Reply):
        """Queue a reply; raises QueueFull when max_batch replies run and max_queue more wait."""
        if reply.prompt_ids.numel() == 0:
            raise ValueError("a reply needs at least one prompt token to continue from")
        if reply.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {reply.max_new_tokens}")
        if reply.generator is None:
            reply.generator = torch.Generator(device=self.device)
            reply.generator.seed()
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"all {self.max_batch} generation slots are busy and {self.max_queue} "
                                "more requests are already waiting")
            self._in_flight += 1
            self._waiting.append(reply)
            self._lock.notify()

    def cancel(self, reply: Reply):
        """Stop a reply (e.g. its client went away): a waiting one leaves the queue now, a running one
        before the next step. Either way its slot frees and on_finish gets "cancelled"."""
        with self._lock:
            reply.cancelled = True
            if reply not in self._waiting:
                return  # running: the loop drops it
            self._waiting.remove(reply)
            self._in_flight -= 1
        reply.on_finish("cancelled", None)

    def _run(self):
        while True:
            with self._lock:
                while self._running and not self._rows and not self._waiting:
                    self._lock.wait()
                if not self._running:
                    break
                free_slots = self.max_batch - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(free_slots, len(self._waiting)))]
            try:
                self._use_threads(len(self._rows) + len(joining))
                if joining:
                    self._join(joining)
                if self._rows:
                    self._step()
            except Exception:  # e.g. out of memory: fail the replies at hand, keep serving the next ones
                log.exception("generation step failed; ending the replies in the batch")
                self._finish_all("error", [reply for reply in joining if reply not in self._rows])

    def _use_threads(self, rows: int):
        """All the engine's threads for a batch of ROWS_FOR_ALL_THREADS rows or more, else one. Set
        here, in the engine's thread: torch's thread count is kept per thread."""
        wanted = self.threads if rows >= ROWS_FOR_ALL_THREADS else 1
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _join(self, replies: list[Reply]):
        """Read the replies' prompts, each from its own state, and add them to the batch as new rows."""
        prompts = [reply.prompt_ids.to(self.device, torch.long).reshape(-1) for reply in replies]
        logits, state = read_streams(self.model, prompts, [reply.state for reply in replies])
        self._rows += replies
        self._written += [0] * len(replies)
        if self._state is None:
            self._state, self._next_logits = state, logits
        else:
            self._state = tuple(torch.cat((batch, rows), dim=1) for batch, rows in zip(self._state, state))
            self._next_logits = torch.cat((self._next_logits, logits))

    def _sample(self) -> torch.Tensor:
        """The next token of every row, each by its reply's rules and generator. Greedy rows go in
        one argmax; sampled rows one by one, since each has its own random stream."""
        greedy = [row for row, reply in enumerate(self._rows) if reply.sampling.temperature == 0]
        if len(greedy) == len(self._rows):
            return sample_next(self._next_logits, GREEDY)
        tokens = torch.empty(len(self._rows), dtype=torch.long, device=self.device)
        if greedy:
            tokens[greedy] = sample_next(self._next_logits[greedy], GREEDY)
        for row, reply in enumerate(self._rows):
            if reply.sampling.temperature != 0:
                tokens[row] = sample_next(self._next_logits[row:row + 1], reply.sampling, reply.generator)[0]
        return tokens

    def _step(self):
        """Write one token for every row, feed them all back in one LSTM step, let finished rows leave."""
        with torch.inference_mode():
            tokens = self._sample()
            # Every written token is fed back, the stop token too: the state a reply leaves with
            # holds the whole reply, ready for the conversation's next message.
            self._next_logits, self._state = self.model.step(tokens, self._state)
        leaving = {}
        for row, (reply, token) in enumerate(zip(self._rows, tokens.tolist())):
            if reply.cancelled:
                leaving[row] = "cancelled"
                continue
            self._written[row] += 1
            if token == self.stop_id:
                leaving[row] = "stop"
                continue
            reply.on_token(token)
            if self._written[row] == reply.max_new_tokens:
                leaving[row] = "length"
        if leaving:
            self._leave(leaving)

    def _leave(self, leaving: dict[int, str]):
        """Take the rows in leaving (row -> finish reason) out of the batch and report their end."""
        h, c = self._state
        states = {row: (h[:, row:row + 1].clone(), c[:, row:row + 1].clone())
                  for row, reason in leaving.items() if reason != "cancelled"}
        cut = [row for row, reason in leaving.items() if reason == "length"]
        if cut:
            # A reply cut at its cap gets the stop token fed, as if the model had ended it there.
            stop_ids = torch.full((len(cut),), self.stop_id, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                _, (cut_h, cut_c) = self.model.step(stop_ids, (h[:, cut], c[:, cut]))
            for index, row in enumerate(cut):
                states[row] = (cut_h[:, index:index + 1], cut_c[:, index:index + 1])
        finished = [(self._rows[row], reason, states.get(row)) for row, reason in leaving.items()]
        keep = [row for row in range(len(self._rows)) if row not in leaving]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self._state = (h[:, index], c[:, index])
            self._next_logits = self._next_logits[index]
        else:
            self._state = self._next_logits = None
        self._rows = [self._rows[row] for row in keep]
        self._written = [self._written[row] for row in keep]
        with self._lock:
            self._in_flight -= len(finished)
        for reply, reason, state in finished:
            reply.on_finish(reason, state)

    def _finish_all(self, reason: str, extra: list[Reply]):
        """End every row of the batch and the replies in extra with reason (no state)."""
        replies = self._rows + extra
        self._rows, self._written, self._state, self._next_logits = [], [], None, None
        with self._lock:
            for reply in extra:
                if reply in self._waiting:
                    self._waiting.remove(reply)
            self._in_flight -= len(replies)
        for reply in replies:
            reply.on_finish(reason, None)

"""The engine on a thread of its own, for a server: requests queue up, join the batch between steps
as slots free, and hear of each written token and of their end through callbacks.

One loop runs the engine: it takes waiting requests into the batch (their prompts read together),
drops the cancelled ones, and steps. With max_batch sequences running and max_queue more waiting, a
further request is refused (QueueFull). Knows nothing about HTTP: callbacks are called from the
engine's thread.

    engine = EngineThread(model, max_batch=32, max_queue=64)
    engine.start()
    engine.submit(Request(Sequence(prompt_ids, GREEDY, 300, stop_id=end_id), on_token, on_finish))
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat_fast.engine import Engine, Sequence

# From this many rows on, the engine's work runs on all its CPU threads; below, on one: splitting a
# small batch's matmuls costs more in hand-offs than it saves (bench/RESULTS.md, serving).
ROWS_FOR_ALL_THREADS = 8
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every batch slot is taken and the waiting queue is full: try again later."""


@dataclass(eq=False)  # identity equality: two requests with equal fields are still two requests
class Request:
    """A sequence to write, and who hears of it: on_token(token) for each token written, then
    on_finish(finish_reason, state) once: "stop", "length" or "cancelled" with the sequence's final
    state (a reply cut at its cap or cancelled is closed with the stop token: see engine.py), or with
    None a request cancelled while still waiting (its prompt never read) or "error" (a step failed)."""
    sequence: Sequence
    on_token: Callable[[int], None]
    on_finish: Callable[[str, tuple | None], None]
    cancelled: bool = field(default=False, init=False)


class EngineThread:
    """Runs requests up to max_batch at a time, with up to max_queue more waiting for a slot, on up to
    `threads` CPU threads (see ROWS_FOR_ALL_THREADS)."""

    def __init__(self, model, max_batch: int = 32, max_queue: int = 64, threads: int = 1):
        if max_batch < 1 or max_queue < 0 or threads < 1:
            raise ValueError(f"max_batch and threads must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{threads} and {max_queue}")
        self.engine = Engine(model)
        self.device = self.engine.device
        self.max_batch, self.max_queue, self.threads = max_batch, max_queue, threads
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._in_flight = 0  # submitted and not finished: running, joining, or waiting
        self._running = False
        self._thread = None
        self._requests: dict[Sequence, Request] = {}  # the running ones; touched by the engine's thread only

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def start(self):
        with self._lock:
            self._running = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self):
        """End the loop; requests still running or waiting finish as "cancelled", with no state (the
        server is going away: nothing will continue them)."""
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        self.engine.clear()  # the loop has ended: its requests are ours to end
        with self._lock:
            ended = [*self._requests.values(), *self._waiting]
            self._waiting.clear()
        self._requests = {}
        self._end(ended, "cancelled")

    def submit(self, request: Request):
        """Queue a request; raises QueueFull when max_batch run and max_queue more wait."""
        if request.sequence.prompt_ids.numel() == 0:
            raise ValueError("a sequence needs at least one prompt token to continue from")
        if request.sequence.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.sequence.max_new_tokens}")
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"all {self.max_batch} generation slots are busy and {self.max_queue} "
                                "more requests are already waiting")
            self._in_flight += 1
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request):
        """Stop a request (its client went away, say): a waiting one leaves the queue now, a running one
        before the next step. Either way its slot frees and on_finish gets "cancelled": with no state for
        a waiting one, with its closed state for a running one."""
        with self._lock:
            request.cancelled = True
            if request not in self._waiting:
                return  # running: the loop removes it
            self._waiting.remove(request)
            self._in_flight -= 1
        request.on_finish("cancelled", None)

    def _run(self):
        while True:
            with self._lock:
                while self._running and not self._requests and not self._waiting:
                    self._lock.wait()
                if not self._running:
                    break
                free_slots = self.max_batch - len(self._requests)
                joining = [self._waiting.popleft() for _ in range(min(free_slots, len(self._waiting)))]
            try:
                self._use_threads(len(self._requests) + len(joining))
                if joining:
                    self.engine.add([request.sequence for request in joining])
                    self._requests.update((request.sequence, request) for request in joining)
                cancelled = [request.sequence for request in self._requests.values() if request.cancelled]
                if cancelled:
                    self.engine.cancel(cancelled)
                for sequence, token in self.engine.step():
                    self._requests[sequence].on_token(token)
                self._finish([sequence for sequence in self._requests if sequence.finish_reason is not None])
            except Exception:  # e.g. out of memory: fail the requests at hand, keep serving the next ones
                log.exception("generation step failed; ending the requests in the batch")
                self.engine.clear()
                failed = {**self._requests, **{request.sequence: request for request in joining}}
                self._requests = {}
                self._end(list(failed.values()), "error")

    def _use_threads(self, rows: int):
        """All the engine's threads for a batch of ROWS_FOR_ALL_THREADS rows or more, else one. Set
        here, in the engine's thread: torch's thread count is kept per thread."""
        wanted = self.threads if rows >= ROWS_FOR_ALL_THREADS else 1
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def _finish(self, sequences: list[Sequence]):
        """Report the end of sequences that left the engine, each with its finish reason."""
        requests = [self._requests.pop(sequence) for sequence in sequences]
        with self._lock:
            self._in_flight -= len(requests)
        for request in requests:
            request.on_finish(request.sequence.finish_reason, request.sequence.state)

    def _end(self, requests: list[Request], reason: str):
        """Report the end of requests that never finished in the engine (failed, or the loop stopped)."""
        with self._lock:
            self._in_flight -= len(requests)
        for request in requests:
            request.on_finish(reason, None)

"""The engine's batch decoded on the device: on CUDA, every generation step is one CUDA-graph replay.

The active rows live in static buffers sized to a bucket of rows (the next power of two; the rows
past the active ones are padding): the model's state, the next logits, each row's sampling rules
(`sampling_batch.RowRules`), noise key and step counter, and the tokens written. A step samples every
row's token from the logits (`sampling_batch.sample_rows`), advances the step counters, runs
`model.step` on the tokens and writes the new state and logits back into the buffers. On CUDA those
launches are captured once per bucket and weights and replayed; only the tokens come back to the host,
one small copy a step. Elsewhere, and with NANOCHAT_LSTM_CUDA_GRAPH=0, the same step runs eagerly:
what the CPU tests check, under the Triton interpreter and with the torch backend.

Rows are independent in every op of the step (each matmul row, each row's sampling), so padding rows
never change a real row's tokens, and a seeded row writes the same tokens whoever shares its bucket.
A row's noise key is drawn from its sequence's generator when it joins (sampled rows only: greedy
ones draw nothing, as on the host path), so a seed still fixes the text; its counter starts at 0.
"""

import os
from dataclasses import dataclass, field

import torch

from nanochat_fast.kernels.cuda_graph import GRAPH_ENV_VAR, capture
from nanochat_fast.sampling_batch import NO_TOP_P, NOISE_KEYS, RowRules, sample_rows


def bucket_size(rows: int) -> int:
    """The rows a bucket holds for `rows` active ones: the next power of two."""
    return 1 << (rows - 1).bit_length()


def graphs_enabled(device) -> bool:
    """Whether decoding on device replays CUDA graphs: on CUDA unless NANOCHAT_LSTM_CUDA_GRAPH=0."""
    return device.type == "cuda" and os.environ.get(GRAPH_ENV_VAR, "1") != "0"


@dataclass(eq=False)
class DecodeBuffers:
    """One bucket's static buffers; row i of each is row i of the batch. `graphs` replay a step on them,
    by whether every row is greedy (then the step skips the sampling rules' ops for an argmax)."""
    state: tuple  # the model's tuple, each (num_layers, rows, hidden)
    logits: torch.Tensor  # (rows, vocab_size): the logits each row's next token is drawn from
    tokens: torch.Tensor  # (rows,) int64: the tokens the last step wrote
    rules: RowRules
    noise_keys: torch.Tensor  # (rows,) int64, in [0, NOISE_KEYS)
    counters: torch.Tensor  # (rows,) int64: the steps each row has taken since it joined
    graphs: dict = field(default_factory=dict)  # greedy only (bool) -> torch.cuda.CUDAGraph

    def per_row(self):
        """(tensor, its batch dimension) for every buffer that holds one entry per row."""
        rules = self.rules
        return [*((part, 1) for part in self.state), (self.logits, 0), (self.tokens, 0), (rules.temperature, 0),
                (rules.top_k, 0), (rules.top_p, 0), (self.noise_keys, 0), (self.counters, 0)]

    def pad_from(self, row: int):
        """Make the rows from `row` on padding: zero state and logits, greedy, every filter off."""
        for tensor, dim in self.per_row():
            tensor.narrow(dim, row, tensor.size(dim) - row).zero_()
        self.rules.top_k[row:] = self.logits.size(1)
        self.rules.top_p[row:] = NO_TOP_P


def empty_buffers(rows, state, logits) -> DecodeBuffers:
    """Padding buffers for a bucket of `rows`, with the dtypes and devices of state and logits."""
    device = logits.device
    buffers = DecodeBuffers(
        tuple(part.new_empty(part.size(0), rows, part.size(2)) for part in state),
        logits.new_empty(rows, logits.size(1)),
        torch.empty(rows, dtype=torch.long, device=device),
        RowRules(torch.empty(rows, device=device), torch.empty(rows, dtype=torch.long, device=device),
                 torch.empty(rows, device=device)),
        torch.empty(rows, dtype=torch.long, device=device), torch.empty(rows, dtype=torch.long, device=device))
    buffers.pad_from(0)
    return buffers


def weights_key(model):
    """What a captured step depends on besides its buffers: where each parameter is and its version (a
    graph keeps reading the addresses it was captured with, and tables derived from old weights)."""
    return tuple((parameter.data_ptr(), parameter._version) for parameter in model.parameters())


class DeviceBatch:
    """The engine's active rows, decoded on the device (see the module docstring); row i is the
    engine's sequence i."""

    def __init__(self, model, use_graphs: bool):
        self.model = model
        self.use_graphs = use_graphs
        self.rows = 0
        self._greedy: list[bool] = []  # per row, on the host: whether the step may skip the sampling
        self._buckets: dict[int, DecodeBuffers] = {}  # by bucket size, kept: each graph holds its addresses
        self.buffers: DecodeBuffers | None = None  # the current bucket's
        self._weights_key = None

    @torch.inference_mode()  # the buffers are inference tensors: updated in place only there
    def add(self, logits, state, sequences):
        """Append rows: their next logits (n, vocab_size), state (each (num_layers, n, hidden)) and
        sequences (their rules, and generators for the noise keys)."""
        start, rows = self.rows, self.rows + len(sequences)
        self._move_to_bucket(rows, state, logits)
        buffers, new = self.buffers, slice(start, rows)
        for tensor, given in zip(buffers.state, state, strict=True):
            tensor[:, new] = given
        buffers.logits[new] = logits
        rules = RowRules.of([sequence.sampling for sequence in sequences], logits.size(1), logits.device)
        buffers.rules.temperature[new] = rules.temperature
        buffers.rules.top_k[new] = rules.top_k
        buffers.rules.top_p[new] = rules.top_p
        for row, sequence in enumerate(sequences, start):
            if not sequence.sampling.greedy:
                generator = sequence.generator
                buffers.noise_keys[row:row + 1] = torch.randint(NOISE_KEYS, (1,), generator=generator,
                                                                device=generator.device)
        buffers.counters[new] = 0
        self.rows = rows
        self._greedy += [sequence.sampling.greedy for sequence in sequences]

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Write every row's next token and feed it back; returns the rows' tokens."""
        buffers, greedy_only = self.buffers, all(self._greedy)
        if self.use_graphs:
            self._replay(buffers, greedy_only)
        else:
            self._decode(buffers, greedy_only)
        return buffers.tokens[:self.rows].tolist()

    def rows_state(self, rows: list[int]) -> tuple:
        """The state of the given rows, (num_layers, len(rows), hidden) each, a copy."""
        index = torch.tensor(rows, device=self.buffers.logits.device)
        return tuple(part.index_select(1, index) for part in self.buffers.state)

    @torch.inference_mode()
    def keep(self, rows: list[int]):
        """Keep only the given rows, in this order, as rows 0, 1, ...; the rest leave."""
        if not rows:
            self.clear()
            return
        old = self.buffers
        index = torch.tensor(rows, device=old.logits.device)
        kept = [tensor.index_select(dim, index) for tensor, dim in old.per_row()]
        self._move_to_bucket(len(rows), old.state, old.logits)
        for (tensor, dim), values in zip(self.buffers.per_row(), kept, strict=True):
            tensor.narrow(dim, 0, len(rows)).copy_(values)
        self.buffers.pad_from(len(rows))
        self.rows = len(rows)
        self._greedy = [self._greedy[row] for row in rows]

    def clear(self):
        """Forget every row."""
        self.rows, self.buffers, self._greedy = 0, None, []

    def _move_to_bucket(self, rows, state, logits):
        """Make the bucket for `rows` current, its first self.rows rows those of the current bucket."""
        size = bucket_size(rows)
        old = self.buffers
        if old is not None and old.logits.size(0) == size:
            return
        if size not in self._buckets:
            self._buckets[size] = empty_buffers(size, state, logits)
        new = self.buffers = self._buckets[size]
        moved = min(self.rows, size)
        if old is not None and moved:
            for (tensor, dim), (source, _) in zip(new.per_row(), old.per_row(), strict=True):
                tensor.narrow(dim, 0, moved).copy_(source.narrow(dim, 0, moved))
        new.pad_from(moved)

    def _decode(self, buffers: DecodeBuffers, greedy_only: bool):
        """One step on the buffers, in launches only: sample, count, run the model, write back."""
        if greedy_only:  # what sample_rows gives greedy rows, without its ~35 ops
            tokens = buffers.logits.argmax(dim=-1)
        else:
            tokens = sample_rows(buffers.logits, buffers.rules, buffers.noise_keys, buffers.counters)
        buffers.counters.add_(1)
        logits, state = self.model.step(tokens, buffers.state)
        buffers.tokens.copy_(tokens)
        buffers.logits.copy_(logits)
        for tensor, new in zip(buffers.state, state, strict=True):
            tensor.copy_(new)

    def _replay(self, buffers: DecodeBuffers, greedy_only: bool):
        key = weights_key(self.model)
        if key != self._weights_key:  # new weights: every graph would read the old ones
            for bucket in self._buckets.values():
                bucket.graphs.clear()
            self._weights_key = key
        if greedy_only in buffers.graphs:
            buffers.graphs[greedy_only].replay()
            return
        graph = capture(lambda: self._decode(buffers, greedy_only))  # its first run is this step
        if graph is None:  # refused (say, inside another capture): stay correct, eagerly
            self.use_graphs = False
            return
        buffers.graphs[greedy_only] = graph

"""The character language model: embedding -> multi-layer LSTM (or GRU) -> linear head over the vocabulary.

Knows nothing about characters, files or HTTP: token ids in, next-token logits and recurrent state out.
The state is a tuple: (h, c) for an LSTM, (h,) for a GRU, each (num_layers, B, hidden).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat_fast.gru import GRU
from nanochat_fast.lstm import LSTM
from nanochat_fast.parameter_cache import derived


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2  # between recurrent layers and before the head, in training only
    cell: str = "lstm"  # "lstm" or "gru"; checkpoints from before the GRU have no cell: the LSTM
    weight_drop: float = 0.0  # of the recurrent weights' entries, in training only (see CharLSTM.run_recurrent)
    embedding_size: int | None = None  # None: hidden_size (as in checkpoints from before it); see embedding_size_for
    members: int = 1  # copies of this model averaged as an ensemble (ensemble.py; checkpoints from before it: 1)

    @property
    def input_size(self) -> int:
        """The embedding's width: the first recurrent layer's input size."""
        return self.embedding_size or self.hidden_size

    @property
    def shape(self) -> str:
        """"2 x 384 LSTM", or "2 averaged 2 x 384 LSTMs" for an ensemble."""
        one = f"{self.num_layers} x {self.hidden_size} {self.cell.upper()}"
        return one if self.members == 1 else f"{self.members} averaged {one}s"

    def to_dict(self):
        return asdict(self)


CELLS = {"lstm": LSTM, "gru": GRU}


class CharLSTM(nn.Module):
    def __init__(self, config: ModelConfig, lstm_backend=None):
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"unknown cell {config.cell!r}: choose one of {', '.join(CELLS)}")
        if config.members != 1:
            raise ValueError(f"a CharLSTM is one model, not {config.members}: ensemble.build_model builds an ensemble")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.input_size)
        # The module's dropout acts between its layers only; forward applies config.dropout after the last.
        between_layers = config.dropout if config.num_layers > 1 else 0.0
        # Named after the cell (model.lstm or model.gru): the state dict says which weights it holds.
        setattr(self, config.cell, CELLS[config.cell](config.input_size, config.hidden_size, config.num_layers,
                                                      batch_first=True, dropout=between_layers, backend=lstm_backend))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    @property
    def recurrent(self):
        """The model's LSTM or GRU."""
        return getattr(self, self.config.cell)

    def forward(self, ids, state=None):
        """ids: (B, T) token ids; state: the tuple of states (see the module's docstring) or None.
        Returns logits (B, T, vocab_size) and the final state."""
        x = self.embedding(ids)
        if self.config.cell == "gru":  # nn.GRU's call takes and returns h itself
            hidden, h_n = self.run_recurrent(x, None if state is None else state[0])
            state = (h_n,)
        else:
            hidden, state = self.run_recurrent(x, state)
        hidden = dropout(hidden, self.config.dropout, self.training)
        return self.head(hidden), state

    def run_recurrent(self, x, state):
        """The recurrent layers on x; in training with weight_drop, on recurrent weights W_hh with that share
        of their entries zeroed (DropConnect, as in AWD-LSTM): one mask per step, the same at every timestep,
        so it regularises the recurrence itself, which dropout between layers leaves alone. On the chat
        corpus it delays overfitting (bench/RESULTS.md)."""
        if not (self.training and self.config.weight_drop):
            return self.recurrent(x, state)
        dropped = {name: dropout(weight, self.config.weight_drop, True)
                   for name, weight in self.recurrent.named_parameters() if name.startswith("weight_hh")}
        return torch.func.functional_call(self.recurrent, dropped, (x, state))

    def step(self, ids, state=None):
        """One token per stream, for generation: ids (B,) -> logits (B, vocab_size), new state.

        Layer 0's input projection of token t, embedding[t] @ W_ih^T + biases, is row t of a table
        computed once per weight update: a lookup instead of a matmul per step (a quarter of a 2-layer
        model's step FLOPs)."""
        recurrent = self.recurrent
        weights = [self.embedding.weight, *recurrent.parameters()]
        table = derived(self, weights, lambda: recurrent.step_input_gates(self.embedding.weight))
        # index_select, not table[ids]: advanced indexing costs several times more for a few rows on CPU.
        hidden, state = recurrent.step_from_input_gates(table.index_select(0, ids), state)
        return self.head(hidden), state

    def initial_state(self, batch_size, device=None, dtype=torch.float32):
        """Zeros: (h, c) for an LSTM, (h,) for a GRU."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in STATE_NAMES[self.config.cell])


STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",)}  # the parts of a cell's state, in order


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), but on CPU from a mask drawn with torch.rand: the bernoulli_ F.dropout draws
    with takes about 4 times as long there, 13% of the default chat model's training step (bench/RESULTS.md).
    The mask is float32 uniforms compared with p whatever x's dtype, so p is exact under bfloat16 autocast."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * (torch.rand(x.shape) >= p) / (1 - p)


def embedding_size_for(vocab_size: int, hidden_size: int) -> int:
    """The embedding width a new model gets: the vocabulary's size rounded up to a multiple of 32, at most
    hidden_size. The first layer sees a character only through embedding @ W_ih^T, a (vocab_size, gates)
    table whose rank is at most the embedding's width: from vocab_size on, a wider embedding adds nothing
    the model can express, and costs W_ih's matmul at every character (half of a 1-layer step's FLOPs at
    the hidden size; bench/RESULTS.md)."""
    return min(hidden_size, -(-vocab_size // 32) * 32)

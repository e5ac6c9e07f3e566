"""The character language model: embedding -> multi-layer LSTM -> linear head over the vocabulary.

Knows nothing about characters, files or HTTP: token ids in, next-token logits and LSTM state out.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanochat_fast.lstm import LSTM
from nanochat_fast.parameter_cache import derived


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2  # between LSTM layers and before the head, in training only

    def to_dict(self):
        return asdict(self)


class CharLSTM(nn.Module):
    def __init__(self, config: ModelConfig, lstm_backend=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lstm = LSTM(config.hidden_size, config.hidden_size, config.num_layers,
                         batch_first=True, dropout=config.dropout, backend=lstm_backend)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, ids, state=None):
        """ids: (B, T) token ids; state: (h, c) each (num_layers, B, hidden) or None.
        Returns logits (B, T, vocab_size) and the final state."""
        hidden, state = self.lstm(self.embedding(ids), state)
        hidden = F.dropout(hidden, self.config.dropout, self.training)
        return self.head(hidden), state

    def step(self, ids, state=None):
        """One token per stream, for generation: ids (B,) -> logits (B, vocab_size), new state.

        Layer 0's input projection of token t, embedding[t] @ W_ih^T + biases, is row t of a table
        computed once per weight update: a lookup instead of a matmul per step (a quarter of a 2-layer
        model's step FLOPs)."""
        weights = [self.embedding.weight, *self.lstm.parameters()]
        table = derived(self, weights, lambda: self.lstm.step_input_gates(self.embedding.weight))
        # index_select, not table[ids]: advanced indexing costs several times more for a few rows on CPU.
        hidden, state = self.lstm.step_from_input_gates(table.index_select(0, ids), state)
        return self.head(hidden), state

    def initial_state(self, batch_size, device=None, dtype=torch.float32):
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        return (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

"""A drop-in `torch.nn.GRU` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.GRU` (every option: bidirectional, PackedSequence input, batch_first, unbatched input), so a
`state_dict` moves freely between the two. The backend is picked per call as the LSTM's is (`backend.py`).
"""

import torch
import torch.nn.functional as F

from nanochat_fast.recurrent import RecurrentLayers


class GRU(RecurrentLayers):
    """Multi-layer GRU, parameter-for-parameter compatible with `torch.nn.GRU`. PyTorch's gates and formula:
    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr), z = sigmoid(x W_iz + b_iz + h W_hz + b_hz),
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn)), h' = (1 - z) * n + z * h.

    `backend` is "auto" (default, or the env var NANOCHAT_LSTM_BACKEND), "triton" or "torch".
    """

    GATES = 3  # reset, update, new

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, backend=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, backend=backend)

    def forward(self, input, hx=None):
        """input: (T, B, input_size), (B, T, input_size) if batch_first, unbatched (T, input_size), or a
        PackedSequence. hx: optional h_0 (num_layers * num_directions, B, hidden_size), without B for
        unbatched input. Returns output, h_n exactly as torch.nn.GRU does."""
        if hx is not None and not isinstance(hx, torch.Tensor):
            raise ValueError("GRU: hx must be a tensor h_0")
        output, (h_n,) = self.run(input, None if hx is None else (hx,))
        return output, h_n

    def state_shapes(self, rows):
        return ((self.num_layers * self.num_directions, rows, self.hidden_size),)

    def input_bias(self, layer, direction):
        """b_ih + (b_hr, b_hz, 0): b_hn stays apart, inside r * (h W_hn + b_hn)."""
        _, _, b_ih, b_hh = self.layer_parameters(layer, direction)
        return b_ih + F.pad(b_hh[:2 * self.hidden_size], (0, self.hidden_size)) if self.bias else None

    def torch_layers(self, x, batch_sizes, states):
        args = (self._flat_weights(), self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            output, h_n = torch.gru(x, states[0], *args, False)
        else:
            output, h_n = torch.gru(x, batch_sizes, states[0], *args)
        return output, (h_n,)

    def layer_recurrence(self, layer, gates_x, states, lengths):
        from nanochat_fast.kernels.gru_recurrence import gru_recurrence  # imports triton: only when used

        b_hn = None
        if self.bias:
            b_hn = torch.stack([self.layer_parameters(layer, d)[3][2 * self.hidden_size:]
                                for d in range(self.num_directions)])
        return gru_recurrence(gates_x, states[0], self.stacked_weights_hh(layer), b_hn, lengths), []

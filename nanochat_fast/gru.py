"""A drop-in `torch.nn.GRU` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.GRU` (every option: bidirectional, PackedSequence input, batch_first, unbatched input), so a
`state_dict` moves freely between the two. The backend is picked per call as the LSTM's is (`backend.py`).
`step` advances one timestep for generation, as the LSTM's does.
"""

import torch
import torch.nn.functional as F

from nanochat_fast.backend import resolve_backend
from nanochat_fast.lstm import affine
from nanochat_fast.parameter_cache import derived
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

    def step(self, x, state=None):
        """Advance one timestep, for generation: no dropout. x: (B, input_size); state: (h,) with h
        (num_layers, B, hidden_size), or None for zeros. Returns (h_top, (h,)), as LSTM.step does."""
        if self.bidirectional:
            raise ValueError("GRU.step runs a unidirectional GRU: the reverse direction needs the whole "
                             "sequence; call the GRU on it")
        return self.step_from_input_gates(self.step_input_gates(x), state)

    def step_input_gates(self, x):
        """Layer 0's input term of a step, x W_ih^T + b_ih + (b_hr, b_hz, 0) (B, 3 hidden_size): inputs
        drawn from a fixed set (an embedding's rows) can have it computed once for the whole set."""
        weights = self._step_weights()
        return affine(x, weights.input_t[0], weights.input_biases[0])

    def step_from_input_gates(self, input_gates, state=None):
        """`step` from layer 0's input term (`step_input_gates`) instead of x."""
        h = state[0] if state is not None else torch.zeros(
            self.num_layers, input_gates.size(0), self.hidden_size, dtype=input_gates.dtype,
            device=input_gates.device)
        if resolve_backend(self.backend, input_gates) == "triton":
            was_training = self.training
            self.train(False)  # the sequence path with T=1 runs the fused step kernels, minus dropout
            try:
                output, new_state = self.forward_layers(None, (h,), None, input_gates.unsqueeze(0))
            finally:
                self.train(was_training)
            return output[0], new_state
        # PyTorch's GRU pays its per-call overhead for one character; the cell is a few small ops.
        weights = self._step_weights()
        hidden = self.hidden_size
        new_h = []
        for layer in range(self.num_layers):
            gates_x = input_gates if layer == 0 else affine(new_h[-1], weights.input_t[layer],
                                                            weights.input_biases[layer])
            gates_h = affine(h[layer], weights.hidden_t[layer], weights.hidden_biases[layer])
            reset, update = (gates_x[:, :2 * hidden] + gates_h[:, :2 * hidden]).sigmoid().chunk(2, dim=1)
            new = torch.tanh(gates_x[:, 2 * hidden:] + reset * gates_h[:, 2 * hidden:])
            new_h.append(torch.lerp(new, h[layer], update))  # (1 - z) n + z h
        return new_h[-1], (torch.stack(new_h),)

    def _step_weights(self) -> "GRUStepWeights":
        """The weights and biases in the layouts a step uses, kept while the parameters are unchanged."""
        return derived(self, list(self._parameters.values()), lambda: GRUStepWeights(self))


class GRUStepWeights:
    """Per layer, what a lean step multiplies by and adds: W_ih^T and W_hh^T (contiguous, for addmm), the
    input term's bias b_ih + (b_hr, b_hz, 0) and the recurrent term's (0, 0, b_hn), which r multiplies
    (None without bias)."""

    def __init__(self, gru: GRU):
        hidden = gru.hidden_size
        layers = [gru.layer_parameters(layer) for layer in range(gru.num_layers)]
        self.input_t = [w_ih.t().contiguous() for w_ih, _, _, _ in layers]
        self.hidden_t = [w_hh.t().contiguous() for _, w_hh, _, _ in layers]
        self.input_biases = [gru.input_bias(layer, 0) for layer in range(gru.num_layers)]
        self.hidden_biases = [None if b_hh is None else F.pad(b_hh[2 * hidden:], (2 * hidden, 0))
                              for _, _, _, b_hh in layers]

"""A drop-in `torch.nn.LSTM` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.LSTM`, so a `state_dict` moves freely between the two. The backend is picked per call:
Triton for CUDA tensors, PyTorch's own LSTM on CPU (see `backend.py`). `step` advances one timestep
for generation without the per-call overhead of a whole-sequence call.
"""

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from nanochat_fast import packed_matmul
from nanochat_fast.backend import resolve_backend
from nanochat_fast.parameter_cache import derived


class LSTM(nn.Module):
    """Multi-layer unidirectional LSTM, parameter-for-parameter compatible with `torch.nn.LSTM`.

    `backend` is "auto" (default, or the env var NANOCHAT_LSTM_BACKEND), "triton" or "torch".
    Not supported yet: bidirectional=True, proj_size > 0 and PackedSequence input.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 backend=None):
        super().__init__()
        if bidirectional:
            raise NotImplementedError("nanochat_fast.LSTM: bidirectional=True is not supported yet")
        if proj_size:
            raise NotImplementedError("nanochat_fast.LSTM: proj_size > 0 is not supported yet")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"dropout should be a number in [0, 1], got {dropout!r}")
        if hidden_size <= 0 or input_size <= 0 or num_layers <= 0:
            raise ValueError("input_size, hidden_size and num_layers must be positive")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = False
        self.proj_size = 0
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        gate_rows = 4 * hidden_size  # gates stacked in PyTorch's order: input, forget, cell, output
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}",
                                    nn.Parameter(torch.empty(gate_rows, layer_input_size, **factory)))
            self.register_parameter(f"weight_hh_l{layer}",
                                    nn.Parameter(torch.empty(gate_rows, hidden_size, **factory)))
            if bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(gate_rows, **factory)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(gate_rows, **factory)))
        self.reset_parameters()

    def reset_parameters(self):
        # Same distribution and the same order of draws as nn.LSTM: equal seeds give equal weights.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_parameters(self, layer):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer; the biases are None without bias."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return tuple(getattr(self, f"{name}_l{layer}", None) for name in names)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        return text

    def forward(self, input, hx=None):
        """input: (T, B, input_size), (B, T, input_size) if batch_first, or unbatched (T, input_size).
        hx: optional (h_0, c_0), each (num_layers, B, hidden_size) or (num_layers, hidden_size).
        Returns output, (h_n, c_n) exactly as torch.nn.LSTM does."""
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError("nanochat_fast.LSTM: PackedSequence input is not supported yet; "
                                      "pad the batch and pass a tensor")
        batched = input.dim() == 3
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: expected input of 2 (unbatched) or 3 (batched) dimensions, "
                             f"got shape {tuple(input.shape)}")
        if input.size(-1) != self.input_size:
            raise ValueError(f"LSTM: input.size(-1) must be input_size={self.input_size}, "
                             f"got {input.size(-1)}")
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        x = input.transpose(0, 1) if self.batch_first else input  # time-major (T, B, input_size)
        h0, c0 = self._initial_state(hx, x, batched)

        if resolve_backend(self.backend, x) == "triton":
            # The input projection of all timesteps is one large matmul; only the recurrence is sequential.
            output, (h_n, c_n) = self._forward_triton(F.linear(x, self.weight_ih_l0, self._bias(0)), h0, c0)
        else:
            output, h_n, c_n = torch.lstm(x, (h0, c0), self._flat_weights(), self.bias, self.num_layers,
                                          self.dropout, self.training, False, False)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _flat_weights(self):
        return [p for layer in range(self.num_layers) for p in self.layer_parameters(layer) if p is not None]

    def _initial_state(self, hx, x, batched):
        batch = x.size(1)
        expected = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(expected, dtype=x.dtype, device=x.device)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        if not batched:
            if h0.dim() != 2 or c0.dim() != 2:
                raise ValueError("LSTM: for unbatched input, h_0 and c_0 must be 2-D (num_layers, hidden_size)")
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, state in (("h_0", h0), ("c_0", c0)):
            if tuple(state.shape) != expected:
                raise ValueError(f"LSTM: expected {name} of shape {expected}, got {tuple(state.shape)}")
        return h0, c0

    def _bias(self, layer):
        """b_ih + b_hh of a layer (both are added to every gate pre-activation), or None without bias."""
        _, _, b_ih, b_hh = self.layer_parameters(layer)
        return b_ih + b_hh if self.bias else None

    def _forward_triton(self, input_gates, h0, c0):
        """input_gates: layer 0's x W_ih^T + b_ih + b_hh for every timestep (T, B, 4 hidden)."""
        from nanochat_fast.kernels.lstm_recurrence import lstm_recurrence  # imports triton: only when used

        h_n, c_n = [], []
        for layer in range(self.num_layers):
            output, c_last = lstm_recurrence(input_gates, h0[layer], c0[layer], self.layer_parameters(layer)[1])
            h_n.append(output[-1])
            c_n.append(c_last)
            if layer + 1 < self.num_layers:  # the next layer's input term, from this layer's output
                next_w_ih = self.layer_parameters(layer + 1)[0]
                input_gates = F.linear(F.dropout(output, self.dropout, self.training), next_w_ih,
                                       self._bias(layer + 1))
        return output, (torch.stack(h_n), torch.stack(c_n))

    def step(self, x, state=None):
        """Advance one timestep, for generation: no dropout, no sequence bookkeeping.

        x: (B, input_size); state: (h, c), each (num_layers, B, hidden_size), or None for zeros.
        Returns (h_top, (h, c)) where h_top is the top layer's new hidden state (B, hidden_size).
        """
        return self.step_from_input_gates(self.step_input_gates(x), state)

    def step_input_gates(self, x):
        """Layer 0's input term of a step: x (B, input_size) -> x W_ih^T + b_ih + b_hh (B, 4 hidden_size),
        the gates' pre-activations before the recurrent term. Inputs drawn from a fixed set (the rows
        of an embedding) can have it computed once for the whole set, then looked up for
        `step_from_input_gates`: one matmul fewer per step."""
        weights = self.step_weights()
        return affine(x, weights.transposed[0][:self.input_size], weights.biases[0])

    def step_from_input_gates(self, input_gates, state=None):
        """`step` from layer 0's input term (`step_input_gates`) instead of x."""
        if state is None:
            zeros = torch.zeros(self.num_layers, input_gates.size(0), self.hidden_size,
                                dtype=input_gates.dtype, device=input_gates.device)
            state = (zeros, zeros)
        if resolve_backend(self.backend, input_gates) == "triton":
            was_training = self.training
            self.train(False)  # the sequence path with T=1 runs the fused step kernel, minus dropout
            try:
                output, new_state = self._forward_triton(input_gates.unsqueeze(0), *state)
            finally:
                self.train(was_training)
            return output[0], new_state
        return self._lean_step(input_gates, state)

    def _lean_step(self, input_gates, state):
        # nn.LSTM pays ~1 ms of per-call overhead; one addmm per layer on pre-transposed weights plus
        # the pointwise cell costs a fraction of that for one character. Layers above the first multiply
        # [their input, their h] by [W_ih | W_hh]^T: one matmul instead of two and an add. From 2 rows
        # on the matmuls run on weights prepacked for oneDNN: see packed_matmul.py.
        h, c = state
        hidden = self.hidden_size
        weights = self.step_weights()
        packed = weights.packed if packed_matmul.packing_pays(input_gates) else None
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            if layer == 0:
                gates = (packed_matmul.linear_add(h[0], packed[0], input_gates) if packed
                         else torch.addmm(input_gates, h[0], weights.transposed[0][self.input_size:]))
            else:
                input_and_h = torch.cat((new_h[-1], h[layer]), dim=1)
                gates = (packed_matmul.linear(input_and_h, packed[layer], weights.biases[layer]) if packed
                         else affine(input_and_h, weights.transposed[layer], weights.biases[layer]))
            in_gate, forget_gate, _, out_gate = gates.sigmoid().chunk(4, dim=1)
            c_layer = torch.addcmul(forget_gate * c[layer], in_gate, gates[:, 2 * hidden:3 * hidden].tanh())
            new_h.append(out_gate * torch.tanh(c_layer))
            new_c.append(c_layer)
        return new_h[-1], (torch.stack(new_h), torch.stack(new_c))

    def step_weights(self) -> "StepWeights":
        """The weights in the layouts a step multiplies by, kept while the parameters are unchanged."""
        return derived(self, list(self._parameters.values()), lambda: StepWeights(self))


class StepWeights:
    """An LSTM's weights in the layouts a single step multiplies by, all derived from one: per layer
    `fused` = [W_ih | W_hh] (4 hidden, layer input + hidden), so that [x, h] goes through one matmul,
    and `biases` = b_ih + b_hh (None without bias). The other layouts are built on first use."""

    def __init__(self, lstm: LSTM):
        self.input_size = lstm.input_size
        self.fused, self.biases = [], []
        for layer in range(lstm.num_layers):
            w_ih, w_hh, _, _ = lstm.layer_parameters(layer)
            self.fused.append(torch.cat((w_ih, w_hh), dim=1))
            self.biases.append(lstm._bias(layer))

    @cached_property
    def transposed(self) -> list[torch.Tensor]:
        """[W_ih | W_hh]^T per layer, contiguous, for addmm: its first input-size rows multiply x."""
        return [weight.t().contiguous() for weight in self.fused]

    @cached_property
    def packed(self) -> list[torch.Tensor]:
        """Per layer, in oneDNN's blocked layout (packed_matmul.py), the matrix that multiplies [x, h];
        for layer 0, whose input term comes in computed, only W_hh."""
        return [packed_matmul.pack(weight[:, self.input_size:] if layer == 0 else weight)
                for layer, weight in enumerate(self.fused)]

    @cached_property
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer in one tensor: (num_layers, 4 hidden, 2 hidden) weights and (num_layers, 4 hidden)
        biases. Needs input size == hidden size and biases."""
        return torch.stack(self.fused), torch.stack(self.biases)


def affine(x, weight_t, bias):
    """x @ weight_t + bias, one addmm (bias may be None)."""
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)

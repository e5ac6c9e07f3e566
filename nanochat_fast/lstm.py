"""A drop-in `torch.nn.LSTM` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.LSTM`, so a `state_dict` moves freely between the two. The backend is picked per call:
Triton for CUDA tensors, PyTorch's own LSTM on CPU (see `backend.py`). `step` advances one timestep
for generation without the per-call overhead of a whole-sequence call.
"""

import math
import warnings
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.utils.rnn import PackedSequence

from nanochat_fast import packed_matmul
from nanochat_fast.backend import resolve_backend
from nanochat_fast.parameter_cache import derived
from nanochat_fast.recurrent import as_input_form, last_outputs, reverse_time, sequence_batch


class LSTM(nn.Module):
    """Multi-layer LSTM, parameter-for-parameter compatible with `torch.nn.LSTM`: every option
    (bidirectional, proj_size, PackedSequence input, batch_first, unbatched input).

    `backend` is "auto" (default, or the env var NANOCHAT_LSTM_BACKEND), "triton" or "torch".
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 backend=None):
        super().__init__()
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"dropout should be a number in [0, 1], got {dropout!r}")
        if hidden_size <= 0 or input_size <= 0 or num_layers <= 0:
            raise ValueError("input_size, hidden_size and num_layers must be positive")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers=1",
                          stacklevel=2)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        gate_rows = 4 * hidden_size  # gates stacked in PyTorch's order: input, forget, cell, output
        output_size = proj_size or hidden_size  # the size of h
        # Registered in nn.LSTM's order (layer, then direction, then these names): the same parameters()
        # order, hence the same initial draws and state_dict.
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else output_size * self.num_directions
            for suffix in self._direction_suffixes():
                shapes = {"weight_ih": (gate_rows, layer_input_size), "weight_hh": (gate_rows, output_size)}
                if bias:
                    shapes.update(bias_ih=(gate_rows,), bias_hh=(gate_rows,))
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(f"{name}_l{layer}{suffix}", nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def _direction_suffixes(self):
        return ("", "_reverse")[:self.num_directions]

    def reset_parameters(self):
        # Same distribution and the same order of draws as nn.LSTM: equal seeds give equal weights.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_parameters(self, layer, direction=0):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction (1: the reverse one); the
        biases are None without bias."""
        suffix = self._direction_suffixes()[direction]
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return tuple(getattr(self, f"{name}_l{layer}{suffix}", None) for name in names)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        return text

    def forward(self, input, hx=None):
        """input: (T, B, input_size), (B, T, input_size) if batch_first, unbatched (T, input_size), or a
        PackedSequence. hx: optional (h_0, c_0) of shapes (num_layers * num_directions, B, proj_size or
        hidden_size) and (num_layers * num_directions, B, hidden_size), without B for unbatched input.
        Returns output, (h_n, c_n) exactly as torch.nn.LSTM does."""
        batch = sequence_batch("LSTM", input, self.input_size, self.batch_first)
        h0, c0 = self._initial_state(hx, batch)
        if resolve_backend(self.backend, batch.x) == "triton":
            output, (h_n, c_n) = self._forward_triton(batch.x, h0, c0, batch.lengths)
        elif batch.packed is not None:
            packed = batch.packed
            if packed.sorted_indices is not None:  # torch.lstm takes the state in the packed (sorted) order
                h0, c0 = h0.index_select(1, packed.sorted_indices), c0.index_select(1, packed.sorted_indices)
            data, h_n, c_n = torch.lstm(packed.data, packed.batch_sizes, (h0, c0), self._flat_weights(), self.bias,
                                        self.num_layers, self.dropout, self.training, self.bidirectional)
            if packed.unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, packed.unsorted_indices), c_n.index_select(1, packed.unsorted_indices)
            return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), (h_n, c_n)
        else:
            output, h_n, c_n = torch.lstm(batch.x, (h0, c0), self._flat_weights(), self.bias, self.num_layers,
                                          self.dropout, self.training, self.bidirectional, False)
        if not batch.batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return as_input_form(batch, output, self.batch_first), (h_n, c_n)

    def _flat_weights(self):
        # torch.lstm's order: per layer and direction w_ih, w_hh[, b_ih, b_hh][, w_hr] = parameters() order.
        return list(self.parameters())

    def _initial_state(self, hx, batch):
        states = self.num_layers * self.num_directions
        rows = batch.x.size(1)
        expected_h = (states, rows, self.proj_size or self.hidden_size)
        expected_c = (states, rows, self.hidden_size)
        if hx is None:
            zeros = partial(torch.zeros, dtype=batch.x.dtype, device=batch.x.device)
            return zeros(expected_h), zeros(expected_c)
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        if not batch.batched:
            if h0.dim() != 2 or c0.dim() != 2:
                raise ValueError("LSTM: for unbatched input, h_0 and c_0 must be 2-D (num_layers * num_directions, "
                                 "hidden_size)")
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, state, expected in (("h_0", h0, expected_h), ("c_0", c0, expected_c)):
            if tuple(state.shape) != expected:
                raise ValueError(f"LSTM: expected {name} of shape {expected}, got {tuple(state.shape)}")
        return h0, c0

    def _bias(self, layer, direction=0):
        """b_ih + b_hh of a layer (both are added to every gate pre-activation), or None without bias."""
        _, _, b_ih, b_hh = self.layer_parameters(layer, direction)
        return b_ih + b_hh if self.bias else None

    def _forward_triton(self, x, h0, c0, lengths, input_gates=None):
        """x (T, B, input_size) -> output (T, B, num_directions * output size), (h_n, c_n); each layer's
        directions run in the same launches, the reverse one on time-reversed input. `input_gates`, for a
        unidirectional LSTM: layer 0's input term (T, B, 4 hidden), computed already (x is then unused)."""
        from nanochat_fast.kernels.lstm_recurrence import lstm_recurrence  # imports triton: only when used

        directions = self.num_directions
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            # The input projection of all timesteps is one large matmul; only the recurrence is sequential.
            if layer == 0 and input_gates is not None:
                gates_x = input_gates.unsqueeze(1)
            else:
                inputs = [layer_input] if directions == 1 else [layer_input, reverse_time(layer_input, lengths)]
                gates_x = torch.stack([F.linear(inputs[d], self.layer_parameters(layer, d)[0], self._bias(layer, d))
                                       for d in range(directions)], dim=1)  # (T, D, B, 4 hidden)
            states = slice(layer * directions, (layer + 1) * directions)
            w_hh = torch.stack([self.layer_parameters(layer, d)[1] for d in range(directions)])
            if self.proj_size:
                output, c_last = self._projected_recurrence(gates_x, h0[states], c0[states], w_hh, layer, lengths)
            else:
                output, c_last = lstm_recurrence(gates_x, h0[states], c0[states], w_hh, lengths)
            h_n.append(last_outputs(output, lengths))
            c_n.append(c_last)
            if directions == 2:  # the reverse direction's output back in the input's time, beside the forward's
                layer_input = torch.cat((output[:, 0], reverse_time(output[:, 1], lengths)), dim=-1)
            else:
                layer_input = output[:, 0]
            if layer + 1 < self.num_layers:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
        return layer_input, (torch.cat(h_n), torch.cat(c_n))

    def _projected_recurrence(self, gates_x, h0, c0, w_hh, layer, lengths):
        """The recurrence with h_t = W_hr (o_t * tanh(c_t)), on the same kernels: with r_t = o_t tanh(c_t),
        the recurrent term h_{t-1} W_hh^T is r_{t-1} (W_hh W_hr)^T, so the kernels run over r with the
        (4 hidden, hidden) matrix W_hh W_hr, h_0's term joins step 0's input term, and h = r W_hr^T for
        every step is one matmul after the loop. One h exchange per step instead of two (the projection
        needs all of r_t); the recurrent matmul is hidden wide rather than proj_size (DESIGN.md)."""
        from nanochat_fast.kernels.lstm_recurrence import lstm_recurrence

        w_hr = torch.stack([getattr(self, f"weight_hr_l{layer}{suffix}") for suffix in self._direction_suffixes()])
        first_step = gates_x[:1] + (h0 @ w_hh.transpose(1, 2)).unsqueeze(0)
        gates_x = torch.cat((first_step, gates_x[1:]))
        r0 = c0.new_zeros(c0.shape).to(gates_x.dtype)
        r, c_last = lstm_recurrence(gates_x, r0, c0, w_hh @ w_hr, lengths)
        return r @ w_hr.transpose(1, 2), c_last  # zero past each row's length, as r is

    def step(self, x, state=None):
        """Advance one timestep, for generation: no dropout, no sequence bookkeeping.

        x: (B, input_size); state: (h, c), each (num_layers, B, hidden_size), or None for zeros.
        Returns (h_top, (h, c)) where h_top is the top layer's new hidden state (B, hidden_size).
        """
        if self.bidirectional or self.proj_size:
            raise ValueError("LSTM.step runs a unidirectional LSTM without proj_size: the reverse direction "
                             "needs the whole sequence; call the LSTM on it")
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
                output, new_state = self._forward_triton(None, *state, None, input_gates.unsqueeze(0))
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

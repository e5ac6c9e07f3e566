"""A drop-in `torch.nn.LSTM` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.LSTM`, so a `state_dict` moves freely between the two. The backend is picked per call:
Triton for CUDA tensors, PyTorch's own LSTM on CPU (see `backend.py`). `step` advances one timestep
for generation without the per-call overhead of a whole-sequence call.
"""

from functools import cached_property

import torch

from nanochat_fast import packed_matmul
from nanochat_fast.backend import resolve_backend
from nanochat_fast.parameter_cache import derived
from nanochat_fast.recurrent import RecurrentLayers


class LSTM(RecurrentLayers):
    """Multi-layer LSTM, parameter-for-parameter compatible with `torch.nn.LSTM`: every option
    (bidirectional, proj_size, PackedSequence input, batch_first, unbatched input).

    `backend` is "auto" (default, or the env var NANOCHAT_LSTM_BACKEND), "triton" or "torch".
    """

    GATES = 4  # input, forget, cell, output

    def forward(self, input, hx=None):
        """input: (T, B, input_size), (B, T, input_size) if batch_first, unbatched (T, input_size), or a
        PackedSequence. hx: optional (h_0, c_0) of shapes (num_layers * num_directions, B, proj_size or
        hidden_size) and (num_layers * num_directions, B, hidden_size), without B for unbatched input.
        Returns output, (h_n, c_n) exactly as torch.nn.LSTM does."""
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTM: hx must be a tuple (h_0, c_0)")
        output, (h_n, c_n) = self.run(input, None if hx is None else tuple(hx))
        return output, (h_n, c_n)

    def state_shapes(self, rows):
        states = self.num_layers * self.num_directions
        return (states, rows, self.output_size), (states, rows, self.hidden_size)

    def input_bias(self, layer, direction):
        """b_ih + b_hh of a layer (both are added to every gate pre-activation), or None without bias."""
        _, _, b_ih, b_hh = self.layer_parameters(layer, direction)
        return b_ih + b_hh if self.bias else None

    def torch_layers(self, x, batch_sizes, states):
        args = (self._flat_weights(), self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            output, h_n, c_n = torch.lstm(x, states, *args, False)
        else:
            output, h_n, c_n = torch.lstm(x, batch_sizes, states, *args)
        return output, (h_n, c_n)

    def layer_recurrence(self, layer, gates_x, states, lengths):
        from nanochat_fast.kernels.lstm_recurrence import lstm_recurrence  # imports triton: only when used

        h0, c0 = states
        w_hh = self.stacked_weights_hh(layer)
        if self.proj_size:
            output, c_last = self._projected_recurrence(gates_x, h0, c0, w_hh, layer, lengths)
        else:
            output, c_last = lstm_recurrence(gates_x, h0, c0, w_hh, lengths)
        return output, [c_last]

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
                output, new_state = self.forward_layers(None, state, None, input_gates.unsqueeze(0))
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
            self.biases.append(lstm.input_bias(layer, 0))

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

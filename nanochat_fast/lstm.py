"""A drop-in `torch.nn.LSTM` whose recurrence runs on our fused Triton kernels.

Same constructor, parameter names, shapes, initialisation, call signature and return value as
`torch.nn.LSTM`, so a `state_dict` moves freely between the two. The backend is picked per call:
Triton for CUDA tensors, PyTorch's own LSTM on CPU (see `backend.py`). `step` advances one timestep
for generation without the per-call overhead of a whole-sequence call.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanochat_fast import packed_matmul
from nanochat_fast.backend import resolve_backend
from nanochat_fast.parameter_cache import ParameterCache


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
        self._step_weights_cache = ParameterCache()
        self._packed_step_weights_cache = ParameterCache()
        self.reset_parameters()

    def reset_parameters(self):
        # Same distribution and the same order of draws as nn.LSTM: equal seeds give equal weights.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def layer_parameters(self, layer):
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer; the biases are None without bias."""
        get = lambda name: getattr(self, f"{name}_l{layer}", None)
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

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
            w_ih, w_hh, _, _ = self.layer_parameters(layer)
            if layer > 0:
                layer_input = F.dropout(output, self.dropout, self.training)
                input_gates = F.linear(layer_input, w_ih, self._bias(layer))
            output, c_last = lstm_recurrence(input_gates, h0[layer], c0[layer], w_hh)
            h_n.append(output[-1])
            c_n.append(c_last)
        return output, (torch.stack(h_n), torch.stack(c_n))

    def step(self, x, state=None):
        """Advance one timestep, for generation: no dropout, no sequence bookkeeping.

        x: (B, input_size); state: (h, c), each (num_layers, B, hidden_size), or None for zeros.
        Returns (h_top, (h, c)) where h_top is the top layer's new hidden state (B, hidden_size).
        """
        return self.step_from_input_gates(self.step_input_gates(x), state)

    def step_input_gates(self, x):
        """Layer 0's input term as `step_from_input_gates` takes it: x (B, input_size) -> x W_ih^T +
        b_ih + b_hh (B, 4 hidden_size), with the cell gate's quarter doubled (see `_lean_step`). When
        the inputs are embedded tokens, compute it once for the whole embedding table and look rows up
        (`CharLSTM.step`): one matmul fewer per step."""
        weights, biases, _ = self._step_weights()
        return affine(x, weights[0][:self.input_size], biases[0])

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
                gate_scale = self._step_weights()[2]
                output, new_state = self._forward_triton((input_gates / gate_scale).unsqueeze(0), *state)
            finally:
                self.train(was_training)
            return output[0], new_state
        return self._lean_step(input_gates, state)

    def _lean_step(self, input_gates, state):
        # nn.LSTM pays ~1 ms of per-call overhead; one addmm per layer on pre-transposed weights plus
        # the pointwise cell costs a fraction of that for one character. Layers above the first multiply
        # [their input, their h] by [W_ih; W_hh]^T: one matmul instead of two and an add. The cell
        # gate's pre-activation g arrives doubled (its weights and bias are), so that one sigmoid covers
        # all four gates: tanh(g) = 2 sigmoid(2g) - 1, folded into the cell update. torch.tanh is several
        # times slower than torch.sigmoid on CPU; the identity's ~1e-7 absolute error is below the
        # matmuls' rounding. (The same trick for tanh(c) saved ~2% at batch 32 but cost ~10% at batch 1,
        # where its two extra ops outweigh tanh's per-element cost.)
        # From 2 rows on (batched serving) the matmuls run on weights prepacked for oneDNN: see
        # packed_matmul.py.
        h, c = state
        new_h, new_c = [], []
        weights, biases, _ = self._step_weights()
        packed = self._packed_step_weights() if packed_matmul.packing_pays(input_gates) else None
        for layer in range(self.num_layers):
            if layer == 0:
                gates = (packed_matmul.linear_add(h[0], packed[0], input_gates) if packed
                         else torch.addmm(input_gates, h[0], weights[0][self.input_size:]))
            else:
                input_and_h = torch.cat((new_h[-1], h[layer]), dim=1)
                gates = (packed_matmul.linear(input_and_h, packed[layer], biases[layer]) if packed
                         else affine(input_and_h, weights[layer], biases[layer]))
            in_gate, forget_gate, cell_gate, out_gate = gates.sigmoid().chunk(4, dim=1)
            c_layer = torch.addcmul(forget_gate * c[layer] - in_gate, in_gate, cell_gate, value=2)
            new_h.append(out_gate * torch.tanh(c_layer))
            new_c.append(c_layer)
        return new_h[-1], (torch.stack(new_h), torch.stack(new_c))

    def _step_weights(self):
        """([W_ih; W_hh]^T per layer, b_ih + b_hh per layer or None, gate_scale): contiguous for addmm
        (the first input_size rows multiply the layer's input, the rest its h), the cell gate's
        columns multiplied by gate_scale's 2 (the others by 1); kept while the parameters are
        unchanged (see parameter_cache.py)."""
        def build():
            H = self.hidden_size
            gate_scale = torch.ones(4 * H, dtype=self.weight_hh_l0.dtype, device=self.weight_hh_l0.device)
            gate_scale[2 * H:3 * H] = 2
            weights, biases = [], []
            for layer in range(self.num_layers):
                w_ih, w_hh, _, _ = self.layer_parameters(layer)
                weights.append((torch.cat((w_ih, w_hh), dim=1).t() * gate_scale).contiguous())
                biases.append(self._bias(layer) * gate_scale if self.bias else None)
            return weights, biases, gate_scale
        return self._step_weights_cache.get(self._flat_weights(), build)

    def _packed_step_weights(self):
        """`_step_weights`' matrices packed for oneDNN (layer 0's W_hh part only), kept likewise."""
        def build():
            weights = self._step_weights()[0]
            return [packed_matmul.pack(w[self.input_size:].t() if layer == 0 else w.t())
                    for layer, w in enumerate(weights)]
        return self._packed_step_weights_cache.get(self._flat_weights(), build)


def affine(x, weight_t, bias):
    """x @ weight_t + bias, one addmm (bias may be None)."""
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)

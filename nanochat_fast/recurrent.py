"""What `nanochat_fast.LSTM` and `nanochat_fast.GRU` share around their kernels: the inputs `nn.LSTM` and
`nn.GRU` accept (padded tensors, batch-first or not, unbatched, PackedSequence) brought to one time-major
padded batch with optional per-row lengths, the time reversal of a bidirectional layer's second
direction, and the outputs laid out as PyTorch lays them.

A batch of variable lengths runs padded: rows stop updating after their length inside the kernels, so
nothing is sorted and a mixed batch costs what the padded batch costs.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from nanochat_fast.backend import resolve_backend


@dataclass
class SequenceBatch:
    """An input brought to (T, B, features), with what it takes to return outputs in the input's form."""
    x: torch.Tensor  # (T, B, features), time-major
    lengths: torch.Tensor | None  # (B,) int32 on x's device for packed input; None: every row has T steps
    batched: bool
    packed: PackedSequence | None  # the input itself when it was packed


def sequence_batch(module_name, input, input_size, batch_first):
    """`input` as nn.LSTM / nn.GRU accept it -> a SequenceBatch; bad shapes give one clear ValueError."""
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)  # batch in the caller's order, as hx and h_n are
        _check_features(module_name, padded, input_size)
        return SequenceBatch(padded, lengths.to(padded.device, torch.int32), True, input)
    if input.dim() not in (2, 3):
        raise ValueError(f"{module_name}: expected input of 2 (unbatched) or 3 (batched) dimensions, "
                         f"got shape {tuple(input.shape)}")
    _check_features(module_name, input, input_size)
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if batch_first else 1)
    x = input.transpose(0, 1) if batch_first else input
    return SequenceBatch(x, None, batched, None)


def _check_features(module_name, x, input_size):
    if x.size(-1) != input_size:
        raise ValueError(f"{module_name}: input.size(-1) must be input_size={input_size}, got {x.size(-1)}")


def reverse_time(x, lengths):
    """(T, B, ...) with each row's first `length` steps in reverse order (all T without lengths); steps past
    a row's length stay where they are. Its own inverse: it maps the reverse direction's input to its
    time and its output back."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.size(0), device=x.device)[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (T, B)
    return x.gather(0, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def last_outputs(output, lengths):
    """(D, B, H) h_n of a layer from its output (T, D, B, H) in each direction's own time: each row's output
    at its own last step (the last step without lengths)."""
    if lengths is None:
        return output[-1]
    index = (lengths.long() - 1).view(1, 1, -1, 1).expand(1, *output.shape[1:])
    return output.gather(0, index)[0]


def as_input_form(batch: SequenceBatch, output, batch_first):
    """The layers' output (T, B, features) in the form of the input: packed, batch-first or unbatched."""
    if batch.packed is not None:
        packed = batch.packed
        lengths = batch.lengths.cpu()
        if packed.sorted_indices is not None:  # pack in the input's order, longest first, as it was
            output, lengths = output.index_select(1, packed.sorted_indices), lengths[packed.sorted_indices.cpu()]
        data = pack_padded_sequence(output, lengths).data
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    if batch_first:
        output = output.transpose(0, 1)
    return output if batch.batched else output.squeeze(0 if batch_first else 1)


class RecurrentLayers(nn.Module):
    """The part nn.LSTM and nn.GRU share (PyTorch's nn.RNNBase): the constructor's options, the
    parameters (names, shapes, order, initialisation), the inputs and outputs, and the stack of layers on
    our kernels, each layer's directions in the same launches, the reverse one on time-reversed input.
    A cell supplies its gate count, its recurrence on the kernels and its PyTorch call."""

    GATES = 0  # gate rows per unit of W_ih and W_hh (4 for the LSTM, 3 for the GRU)

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, backend=None):
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
                          stacklevel=3)
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
        gate_rows = self.GATES * hidden_size  # gates stacked in PyTorch's order
        # Registered in PyTorch's order (layer, then direction, then these names): the same parameters()
        # order, hence the same initial draws and state_dict.
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else self.output_size * self.num_directions
            for suffix in self._direction_suffixes():
                shapes = {"weight_ih": (gate_rows, layer_input_size), "weight_hh": (gate_rows, self.output_size)}
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

    @property
    def output_size(self):
        """The size of h: proj_size when there is a projection, hidden_size otherwise."""
        return self.proj_size or self.hidden_size

    def _direction_suffixes(self):
        return ("", "_reverse")[:self.num_directions]

    def reset_parameters(self):
        # Same distribution and the same order of draws as PyTorch's: equal seeds give equal weights.
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
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False),
                              ("proj_size", 0)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text

    def _flat_weights(self):
        # PyTorch's order: per layer and direction w_ih, w_hh[, b_ih, b_hh][, w_hr] = parameters() order.
        return list(self.parameters())

    def run(self, input, states):
        """input as the module accepts it, states a tuple of initial states (h_0[, c_0]) or None ->
        (output in the input's form, tuple of final states), by the backend picked for this call."""
        name = type(self).__name__
        if isinstance(input, PackedSequence) and resolve_backend(self.backend, input.data) != "triton":
            return self._torch_packed(name, input, states)  # PyTorch reads the packed data itself: no padding
        batch = sequence_batch(name, input, self.input_size, self.batch_first)
        states = self._initial_states(name, states, batch.x.size(1), batch.x, batch.batched)
        if resolve_backend(self.backend, batch.x) == "triton":
            output, states = self.forward_layers(batch.x, states, batch.lengths)
        else:
            output, states = self.torch_layers(batch.x, None, states)
        if not batch.batched:
            states = tuple(state.squeeze(1) for state in states)
        return as_input_form(batch, output, self.batch_first), states

    def _initial_states(self, name, states, rows, like, batched):
        """The given initial states for a batch of `rows` at their batched shapes (or one clear ValueError),
        or zeros of like's dtype and device."""
        shapes = self.state_shapes(rows)
        if states is None:
            return tuple(torch.zeros(shape, dtype=like.dtype, device=like.device) for shape in shapes)
        return check_states(name, states, shapes, batched)

    def _torch_packed(self, name, packed, states):
        """A PackedSequence through PyTorch's own implementation, which takes the states in the packed
        (sorted) order."""
        _check_features(name, packed.data, self.input_size)
        states = self._initial_states(name, states, int(packed.batch_sizes[0]), packed.data, batched=True)
        if packed.sorted_indices is not None:
            states = tuple(state.index_select(1, packed.sorted_indices) for state in states)
        data, states = self.torch_layers(packed.data, packed.batch_sizes, states)
        if packed.unsorted_indices is not None:
            states = tuple(state.index_select(1, packed.unsorted_indices) for state in states)
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), states

    def forward_layers(self, x, states, lengths, input_gates=None):
        """x (T, B, input_size) -> output (T, B, num_directions * output_size) and the final states, on our
        kernels. `input_gates`, for a unidirectional module: layer 0's input term (T, B, GATES hidden),
        computed already (x is then unused)."""
        directions = self.num_directions
        finals = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            # The input projection of all timesteps is one large matmul; only the recurrence is sequential.
            if layer == 0 and input_gates is not None:
                gates_x = input_gates.unsqueeze(1)
            else:
                inputs = [layer_input] if directions == 1 else [layer_input, reverse_time(layer_input, lengths)]
                gates_x = torch.stack([F.linear(inputs[d], self.layer_parameters(layer, d)[0],
                                                self.input_bias(layer, d)) for d in range(directions)], dim=1)
            layer_states = [state[layer * directions:(layer + 1) * directions] for state in states]
            output, other_finals = self.layer_recurrence(layer, gates_x, layer_states, lengths)
            for final, value in zip(finals, (last_outputs(output, lengths), *other_finals), strict=True):
                final.append(value)
            if directions == 2:  # the reverse direction's output back in the input's time, beside the forward's
                layer_input = torch.cat((output[:, 0], reverse_time(output[:, 1], lengths)), dim=-1)
            else:
                layer_input = output[:, 0]
            if layer + 1 < self.num_layers:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
        return layer_input, tuple(torch.cat(final) for final in finals)

    def stacked_weights_hh(self, layer):
        """(D, GATES hidden, output_size): every direction's W_hh of a layer; one direction's a view (a copy
        of W_hh every call, and inside every replay of a decode graph, otherwise)."""
        weights = [self.layer_parameters(layer, d)[1] for d in range(self.num_directions)]
        return weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)

    def state_shapes(self, rows):
        """The shapes of the initial states (h_0[, c_0]) for a batch of `rows`."""
        raise NotImplementedError

    def input_bias(self, layer, direction):
        """The bias added to x W_ih^T before the recurrence, or None."""
        raise NotImplementedError

    def layer_recurrence(self, layer, gates_x, states, lengths):
        """One layer's recurrence on the kernels: gates_x (T, D, B, GATES hidden), states the layer's slices
        (D, B, ...) of the initial states -> output (T, D, B, output_size), zero past each row's length,
        and the final states other than h_n (which is read off the output)."""
        raise NotImplementedError

    def torch_layers(self, x, batch_sizes, states):
        """PyTorch's own implementation: (T, B, input_size) or packed data with batch_sizes -> output and
        the tuple of final states."""
        raise NotImplementedError


def check_states(name, states, shapes, batched):
    """The initial states at their batched shapes, or one clear ValueError."""
    state_names = ("h_0", "c_0")[:len(states)]
    if not batched:
        if any(state.dim() != 2 for state in states):
            raise ValueError(f"{name}: for unbatched input, {' and '.join(state_names)} must be 2-D "
                             "(num_layers * num_directions, size)")
        states = tuple(state.unsqueeze(1) for state in states)
    for state_name, state, expected in zip(state_names, states, shapes, strict=True):
        if tuple(state.shape) != expected:
            raise ValueError(f"{name}: expected {state_name} of shape {expected}, got {tuple(state.shape)}")
    return states

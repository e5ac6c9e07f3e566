"""One layer's recurrence on the Triton kernels, host side: the launches of the path and tiles
`launch.launch_config` picks (per step, replayed from a CUDA graph, or persistent), then the custom ops
and the autograd Function over them, and `lstm_recurrence`, what `nanochat_fast.LSTM` calls per layer.

Buffers hold the initial state in front of the sequence, so every step reads "the slab before":
h_all = [h_0, h_1..h_T] and cells_all = [c_0, c_1..c_T] (T+1 slabs); the output is h_all[1:], and
backward finds h_{t-1} and c_{t-1} without copies. grad_gates_all has one zero slab past the end.

Only the sequential part is a custom Function: the input projection gates_x = x W_ih^T + b is a plain
matmul before it, so autograd already turns its backward into large matmuls (dx, dW_ih, the biases).
Backward here runs the kernels back through time, then dW_hh and dh_0 as one matmul each. The
kernel launches are registered as PyTorch custom ops, so `torch.compile(..., fullgraph=True)` traces
through the Function (it refuses `nn.LSTM` itself).
"""

import torch
from torch import Tensor

from nanochat_fast.kernels import lstm_persistent, lstm_step
from nanochat_fast.kernels.launch import cell_dtype, launch_recurrence
from nanochat_fast.kernels.path_choice import Recurrence

def run_forward(config, gates_x, h0, c0, w_hh, lengths, h_all, cells_all, gates):
    """h_all, cells_all (from h0, c0 in their slab 0) and gates, by the launches of config's path."""
    h_all[0].copy_(h0)
    cells_all[0].copy_(c0)
    path = lstm_persistent if config.path == "persistent" else lstm_step
    path.forward_loop(config, gates_x, w_hh, lengths, h_all, cells_all, gates)


def run_backward(config, grad_output, grad_c_last, gates, cells_all, w_hh, lengths, grad_gates_all, grad_c):
    """grad_gates_all (its last slab zeroed here) and grad_c (from grad_c_last to dL/dc_0), by the launches
    of config's path."""
    grad_gates_all[-1].zero_()
    grad_c.copy_(grad_c_last)
    path = lstm_persistent if config.path == "persistent" else lstm_step
    path.backward_loop(config, grad_output, gates, cells_all, w_hh, lengths, grad_gates_all, grad_c)


def lstm_forward(gates_x, h0, c0, w_hh, lengths=None):
    """The recurrence of one layer over a sequence, each of its D directions (1, or 2 for a bidirectional
    layer, the reverse one on time-reversed input) with its own weights, in the same launches.

    gates_x (T, D, B, 4H): x_t W_ih^T + b_ih + b_hh for every step; h0 (D, B, H); c0 (D, B, H) in the
    cell dtype; w_hh (D, 4H, H); lengths: None, or (B,) int32 sequence lengths on the same device
    (rows stop updating after theirs). Returns h_all (T+1, D, B, H) = [h_0, h_1..h_T], cells_all
    (T+1, D, B, H) = [c_0..c_T] in the cell dtype (both zero past a row's length), and the activated
    gates (T, D, B, 4H)."""
    steps, directions, batch, four_hidden = gates_x.shape
    hidden = four_hidden // 4
    recurrence = Recurrence(gates=4, batch=batch, hidden=hidden, directions=directions, lengths=lengths is not None,
                            dtype=gates_x.dtype, steps=steps, backward=False)
    gates_x, h0, c0, w_hh = (t.contiguous() for t in (gates_x, h0, c0, w_hh))

    def new_outputs():
        return [gates_x.new_empty(steps + 1, directions, batch, hidden),
                gates_x.new_empty(steps + 1, directions, batch, hidden, dtype=cell_dtype(gates_x.dtype)),
                torch.empty_like(gates_x)]

    h_all, cells_all, gates = launch_recurrence(run_forward, recurrence, [gates_x, h0, c0, w_hh, lengths], new_outputs)
    return h_all, cells_all, gates


def lstm_backward(grad_output, grad_c_last, gates, cells_all, w_hh, lengths=None):
    """Backward of `lstm_forward` through the recurrence.

    grad_output (T, D, B, H): dL/dh_t for every step (ignored past a row's length); grad_c_last
    (D, B, H): dL/dc of each row's last step. Returns grad_gates (T, D, B, 4H), the gradient of the
    gate pre-activations (= of gates_x), and dL/dc_0. The matmuls that need all steps (dW_hh, dh_0,
    and everything through gates_x) are left to the caller."""
    steps, directions, batch, hidden = grad_output.shape
    # Its own path, whatever the forward's: both paths save the same gates and cell states.
    recurrence = Recurrence(gates=4, batch=batch, hidden=hidden, directions=directions, lengths=lengths is not None,
                            dtype=gates.dtype, steps=steps, backward=True)
    grad_output, gates, cells_all, w_hh = (t.contiguous() for t in (grad_output, gates, cells_all, w_hh))
    grad_c_last = grad_c_last.to(cells_all.dtype).contiguous()

    def new_outputs():
        return [gates.new_empty(steps + 1, *gates.shape[1:]), torch.empty_like(grad_c_last)]

    inputs = [grad_output, grad_c_last, gates, cells_all, w_hh, lengths]
    grad_gates_all, grad_c = launch_recurrence(run_backward, recurrence, inputs, new_outputs)
    return grad_gates_all[:steps], grad_c


@torch.library.custom_op("nanochat_fast::lstm_recurrence_forward", mutates_args=())
def recurrence_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                       lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """h_all (T+1, D, B, H), cells_all (T+1, D, B, H), activated gates (T, D, B, 4H): see `lstm_forward`."""
    return lstm_forward(gates_x, h0, c0, w_hh, lengths)


@recurrence_forward.register_fake
def _(gates_x, h0, c0, w_hh, lengths):
    steps, directions, batch, four_hidden = gates_x.shape
    state_shape = (steps + 1, directions, batch, four_hidden // 4)
    return (gates_x.new_empty(state_shape), gates_x.new_empty(state_shape, dtype=cell_dtype(gates_x.dtype)),
            torch.empty_like(gates_x))


@torch.library.custom_op("nanochat_fast::lstm_recurrence_backward", mutates_args=())
def recurrence_backward(grad_output: Tensor, grad_c_last: Tensor, gates: Tensor, cells_all: Tensor,
                        w_hh: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """grad_gates (T, D, B, 4H) and dL/dc_0 (D, B, H)."""
    grad_gates, grad_c0 = lstm_backward(grad_output, grad_c_last, gates, cells_all, w_hh, lengths)
    return grad_gates, grad_c0


@recurrence_backward.register_fake
def _(grad_output, grad_c_last, gates, cells_all, w_hh, lengths):
    return torch.empty_like(gates), torch.empty_like(cells_all[0])


def last_steps(all_steps, lengths):
    """(D, B, H): each row's slab at its own length from a (T+1, D, B, H) tensor of [state_0..state_T]
    (slab T without lengths)."""
    if lengths is None:
        return all_steps[-1]
    index = lengths.long().view(1, 1, -1, 1).expand(1, *all_steps.shape[1:])
    return all_steps.gather(0, index)[0]


class LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, c0, w_hh, lengths):
        h_all, cells_all, gates = recurrence_forward(gates_x, h0, c0, w_hh, lengths)
        ctx.save_for_backward(w_hh, h_all, cells_all, gates, lengths)
        return h_all[1:], last_steps(cells_all, lengths)

    @staticmethod
    def backward(ctx, grad_output, grad_c_last):
        w_hh, h_all, cells_all, gates, lengths = ctx.saved_tensors
        # dL/dc_n enters at T and passes unchanged through each row's finished steps to its last one.
        grad_gates, grad_c0 = recurrence_backward(grad_output, grad_c_last, gates, cells_all, w_hh, lengths)
        steps, directions, batch, four_hidden = grad_gates.shape
        # Per direction, sum_t dG_t^T h_{t-1}: (D, 4H, T B) @ (D, T B, H).
        grad_by_direction = grad_gates.transpose(0, 1).reshape(directions, steps * batch, four_hidden)
        h_prev = h_all[:-1].transpose(0, 1).reshape(directions, steps * batch, -1)
        grad_w_hh = grad_by_direction.transpose(1, 2) @ h_prev
        grad_h0 = grad_gates[0] @ w_hh
        return grad_gates, grad_h0, grad_c0, grad_w_hh, None


def lstm_recurrence(gates_x, h0, c0, w_hh, lengths=None):
    """output (T, D, B, H) and c_n (D, B, H) of one layer's D directions, differentiable: see
    `lstm_forward` for the shapes. Past a row's length its output is zero; c_n is each row's cell state
    at its own last step, and h_n is output at that step (output[-1] without lengths).

    Under autocast the projection comes out in half precision: the recurrence follows gates_x's dtype,
    with a float32 cell state whose final value is returned in that dtype, as nn.LSTM returns c_n."""
    dtype = gates_x.dtype
    output, c_last = LSTMRecurrence.apply(gates_x, h0.to(dtype), c0.to(cell_dtype(dtype)), w_hh.to(dtype), lengths)
    return output, c_last.to(dtype)

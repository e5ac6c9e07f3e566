"""The autograd Function over the Triton recurrence kernels of one LSTM layer.

Only the sequential part is a custom Function: the input projection gates_x = x W_ih^T + b is a plain
matmul before it, so autograd already turns its backward into large matmuls (dx, dW_ih, the biases).
Backward here runs the kernels back through time, then dW_hh and dh_0 as one matmul each.

The kernel launches are registered as PyTorch custom ops, so `torch.compile(..., fullgraph=True)`
traces through the Function (it refuses `nn.LSTM` itself).
"""

import torch
from torch import Tensor

from nanochat_fast.kernels.lstm_recurrence import cell_dtype, lstm_backward, lstm_forward


@torch.library.custom_op("nanochat_fast::lstm_recurrence_forward", mutates_args=())
def recurrence_forward(gates_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h_all (T+1, B, H), cells_all (T+1, B, H), activated gates (T, B, 4H): see lstm_recurrence.py."""
    return lstm_forward(gates_x, h0, c0, w_hh)


@recurrence_forward.register_fake
def _(gates_x, h0, c0, w_hh):
    steps, batch, four_hidden = gates_x.shape
    state_shape = (steps + 1, batch, four_hidden // 4)
    return (gates_x.new_empty(state_shape), gates_x.new_empty(state_shape, dtype=cell_dtype(gates_x.dtype)),
            torch.empty_like(gates_x))


@torch.library.custom_op("nanochat_fast::lstm_recurrence_backward", mutates_args=())
def recurrence_backward(grad_output: Tensor, grad_c_last: Tensor, gates: Tensor, cells_all: Tensor,
                        w_hh: Tensor) -> tuple[Tensor, Tensor]:
    """grad_gates (T, B, 4H) and dL/dc_0 (B, H)."""
    grad_gates, grad_c0 = lstm_backward(grad_output, grad_c_last, gates, cells_all, w_hh)
    return grad_gates, grad_c0


@recurrence_backward.register_fake
def _(grad_output, grad_c_last, gates, cells_all, w_hh):
    return torch.empty_like(gates), torch.empty_like(cells_all[0])


class LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, c0, w_hh):
        h_all, cells_all, gates = recurrence_forward(gates_x, h0, c0, w_hh)
        ctx.save_for_backward(w_hh, h_all, cells_all, gates)
        return h_all[1:], cells_all[-1]

    @staticmethod
    def backward(ctx, grad_output, grad_c_last):
        w_hh, h_all, cells_all, gates = ctx.saved_tensors
        grad_gates, grad_c0 = recurrence_backward(grad_output, grad_c_last, gates, cells_all, w_hh)
        steps, batch, four_hidden = grad_gates.shape
        h_prev = h_all[:-1].reshape(steps * batch, -1)
        grad_w_hh = grad_gates.reshape(steps * batch, four_hidden).t() @ h_prev  # sum_t dG_t^T h_{t-1}
        grad_h0 = grad_gates[0] @ w_hh
        return grad_gates, grad_h0, grad_c0, grad_w_hh


def lstm_recurrence(gates_x, h0, c0, w_hh):
    """output (T, B, H) and c_T (B, H) of one layer, differentiable; h_T is output[-1].

    Under autocast the projection comes out in half precision: the recurrence follows gates_x's dtype,
    with a float32 cell state whose final value is returned in that dtype, as nn.LSTM returns c_n."""
    dtype = gates_x.dtype
    output, c_last = LSTMRecurrence.apply(gates_x, h0.to(dtype), c0.to(cell_dtype(dtype)), w_hh.to(dtype))
    return output, c_last.to(dtype)

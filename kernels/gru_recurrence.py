"""One GRU layer's recurrence, one or both directions, on the Triton kernels, host side: the launches of
the path and tiles `launch.launch_config` picks (per step, replayed from a CUDA graph, or persistent:
NANOCHAT_LSTM_PATH applies to both cells), then the custom ops and the autograd Function over them, and
`gru_recurrence`, the entry a GRU module calls per layer.

Buffers hold the initial state in front of the sequence, h_all = [h_0, h_1..h_T] (T+1 slabs of
(D, B, H)); the output is h_all[1:], and backward finds h_{t-1} without copies. The gradient buffers
have one zero slab past the end. The forward carries h in the cell dtype from step to step (the step
path in place in a (D, B, H) buffer, the persistent path in registers): stored in bfloat16 between
steps, a unit whose z is near 1 would lose every update smaller than half its rounding step.

Only the sequential part is a custom Function: autograd turns the input projection's backward into
large matmuls. Backward runs the kernels back through time, then dW_hh, db_hn and dh_0 as matmuls
and a sum. The launches are registered as PyTorch custom ops, so torch.compile traces the Function.
"""

import torch
from torch import Tensor

from nanochat_fast.kernels import gru_persistent, gru_step
from nanochat_fast.kernels.launch import cell_dtype, launch_recurrence
from nanochat_fast.kernels.path_choice import Recurrence


def run_forward(config, gates_x, h0, w_hh, b_hn, lengths, h_all, saved):
    """h_all (from h0, in the cell dtype, in its slab 0) and saved, by the launches of config's path."""
    h_all[0].copy_(h0)
    path = gru_persistent if config.path == "persistent" else gru_step
    path.forward_loop(config, gates_x, w_hh, b_hn, lengths, h_all, saved, h0.clone())


def run_backward(config, grad_output, saved, h_all, w_hh, lengths, grad_gates_all, grad_hn_all, grad_carry):
    """grad_gates_all, grad_hn_all (their last slabs zeroed here) and grad_carry (from zero to the direct
    part of dL/dh_0), by the launches of config's path."""
    grad_gates_all[-1].zero_()
    grad_hn_all[-1].zero_()
    grad_carry.zero_()
    path = gru_persistent if config.path == "persistent" else gru_step
    path.backward_loop(config, grad_output, saved, h_all, w_hh, lengths, grad_gates_all, grad_hn_all, grad_carry)


def gru_forward(gates_x, h0, w_hh, b_hn, lengths):
    """The recurrence of one layer, every direction, over a sequence.

    gates_x (T, D, B, 3H); h0 (D, B, H) in the cell dtype; w_hh (D, 3H, H); b_hn (D, H); lengths None
    or int32 (B,). Returns h_all (T+1, D, B, H) = [h_0, h_1..h_T], rows zero past their length, and the
    saved tiles (T, D, B, 4H): r, z, n and W_hn h_{t-1} + b_hn."""
    steps, directions, batch, three_hidden = gates_x.shape
    hidden = three_hidden // 3
    recurrence = Recurrence(gates=3, batch=batch, hidden=hidden, directions=directions, lengths=lengths is not None,
                            dtype=gates_x.dtype, steps=steps, backward=False)
    gates_x, h0, w_hh, b_hn = (t.contiguous() for t in (gates_x, h0, w_hh, b_hn))

    def new_outputs():
        return [gates_x.new_empty(steps + 1, directions, batch, hidden),
                gates_x.new_empty(steps, directions, batch, 4 * hidden)]

    h_all, saved = launch_recurrence(run_forward, recurrence, [gates_x, h0, w_hh, b_hn, lengths], new_outputs)
    return h_all, saved


def gru_backward(grad_output, saved, h_all, w_hh, lengths):
    """Backward of `gru_forward` through the recurrence.

    grad_output (T, D, B, H): dL/dh_t for every step. Returns the gradient of gates_x (T, D, B, 3H), that
    of W_hn h_{t-1} + b_hn (T, D, B, H), and the direct part z dL/dh_1 of dL/dh_0 (D, B, H), in the cell
    dtype. The matmuls that need every step (dW_hh, dh_0's recurrent part, db_hn) are left to the caller."""
    steps, directions, batch, hidden = grad_output.shape
    # Its own path, whatever the forward's: both paths save the same tiles and h.
    recurrence = Recurrence(gates=3, batch=batch, hidden=hidden, directions=directions, lengths=lengths is not None,
                            dtype=saved.dtype, steps=steps, backward=True)
    grad_output, saved, h_all, w_hh = (t.contiguous() for t in (grad_output, saved, h_all, w_hh))

    def new_outputs():
        return [saved.new_empty(steps + 1, directions, batch, 3 * hidden),
                saved.new_empty(steps + 1, directions, batch, hidden),
                saved.new_empty(directions, batch, hidden, dtype=cell_dtype(saved.dtype))]

    inputs = [grad_output, saved, h_all, w_hh, lengths]
    grad_gates_all, grad_hn_all, grad_carry = launch_recurrence(run_backward, recurrence, inputs, new_outputs)
    return grad_gates_all[:steps], grad_hn_all[:steps], grad_carry


@torch.library.custom_op("nanochat_fast::gru_recurrence_forward", mutates_args=())
def recurrence_forward(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor,
                       lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """h_all (T+1, D, B, H) and the saved tiles (T, D, B, 4H): see `gru_forward`."""
    return gru_forward(gates_x, h0, w_hh, b_hn, lengths)


@recurrence_forward.register_fake
def _(gates_x, h0, w_hh, b_hn, lengths):
    steps, directions, batch, three_hidden = gates_x.shape
    hidden = three_hidden // 3
    return (gates_x.new_empty(steps + 1, directions, batch, hidden),
            gates_x.new_empty(steps, directions, batch, 4 * hidden))


@torch.library.custom_op("nanochat_fast::gru_recurrence_backward", mutates_args=())
def recurrence_backward(grad_output: Tensor, saved: Tensor, h_all: Tensor, w_hh: Tensor,
                        lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of gates_x (T, D, B, 3H) and of W_hn h_{t-1} + b_hn (T, D, B, H), and the direct part
    of dL/dh_0 (D, B, H): see `gru_backward`."""
    grad_gates, grad_hn, grad_carry = gru_backward(grad_output, saved, h_all, w_hh, lengths)
    return grad_gates, grad_hn, grad_carry


@recurrence_backward.register_fake
def _(grad_output, saved, h_all, w_hh, lengths):
    steps, directions, batch, hidden = grad_output.shape
    return (saved.new_empty(steps, directions, batch, 3 * hidden), saved.new_empty(steps, directions, batch, hidden),
            saved.new_empty(directions, batch, hidden, dtype=cell_dtype(saved.dtype)))


class GRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_x, h0, w_hh, b_hn, lengths):
        h_all, saved = recurrence_forward(gates_x, h0, w_hh, b_hn, lengths)
        ctx.save_for_backward(w_hh, h_all, saved, lengths)
        return h_all[1:]

    @staticmethod
    def backward(ctx, grad_output):
        w_hh, h_all, saved, lengths = ctx.saved_tensors
        grad_gates, grad_hn, grad_carry = recurrence_backward(grad_output, saved, h_all, w_hh, lengths)
        two_hidden = 2 * grad_hn.size(-1)
        grad_rz = grad_gates[..., :two_hidden]  # the r and z rows of W_hh meet gates_x's gradient, its n rows hn's
        h_prev = h_all[:-1]
        grad_w_hh = torch.cat([torch.einsum("tdbg,tdbk->dgk", grad_rz, h_prev),
                               torch.einsum("tdbg,tdbk->dgk", grad_hn, h_prev)], dim=1)  # sum_t dG_t^T h_{t-1}
        grad_b_hn = grad_hn.sum((0, 2))
        grad_h0 = grad_carry + grad_rz[0] @ w_hh[:, :two_hidden] + grad_hn[0] @ w_hh[:, two_hidden:]
        return grad_gates, grad_h0, grad_w_hh, grad_b_hn, None


def gru_recurrence(gates_x, h0, w_hh, b_hn, lengths=None):
    """output (T, D, B, H) of one layer, every direction, differentiable in gates_x, h0, w_hh and b_hn.

    gates_x (T, D, B, 3H): x_t W_ih^T + b_ih + (b_hr, b_hz, 0) of each direction d (a reverse direction's
    time already reversed by the caller: every direction runs the same forward recurrence with its own
    weights); h0 (D, B, H); w_hh (D, 3H, H), rows r, z, n; b_hn (D, H), or None (bias=False); lengths
    None (every row runs T steps) or int32 (B,) on gates_x's device, each in [1, T] (not checked: that
    would wait for the device). output[t, d, b] is h_{t+1} of row b while t < lengths[b], exactly zero
    after; h_n is output[lengths[b] - 1, d, b] (output[-1] without lengths).

    Under autocast the projection comes out in half precision: the recurrence follows gates_x's dtype,
    with h carried between steps in float32."""
    steps, directions, batch, three_hidden = gates_x.shape
    dtype = gates_x.dtype
    if lengths is not None and (lengths.dtype != torch.int32 or lengths.shape != (batch,)
                                or lengths.device != gates_x.device):
        raise ValueError(f"lengths must be int32 of shape ({batch},) on {gates_x.device}, got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device}")
    if b_hn is None:
        b_hn = gates_x.new_zeros(directions, three_hidden // 3)
    return GRURecurrence.apply(gates_x, h0.to(cell_dtype(dtype)), w_hh.to(dtype), b_hn.to(dtype), lengths)

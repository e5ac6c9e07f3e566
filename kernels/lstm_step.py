"""The launch-per-step path: one fused Triton launch per timestep, forward and backward.

Each launch runs every tile of one step (grid: batch tiles x hidden tiles); consecutive launches
order the steps, so h_t is exchanged through memory between them. On CUDA the T launches are
replayed from a CUDA graph (see `lstm_recurrence.py`). Works anywhere, the interpreter included.
"""

import triton
import triton.language as tl

from nanochat_fast.kernels.lstm_cell import backward_tile, forward_tile
from nanochat_fast.kernels.tiles import tile_indices


@triton.jit
def lstm_forward_step_kernel(
    gates_x_ptr, h_prev_ptr, c_prev_ptr, w_hh_ptr, h_ptr, c_ptr, gates_ptr, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one (BLOCK_B x BLOCK_H) tile of step t, all four gates (`forward_tile`)."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    c_prev = tl.load(c_prev_ptr + state_offs, mask=tile_ok, other=0.0)
    forward_tile(gates_x_ptr, h_prev_ptr, c_prev, w_hh_ptr, h_ptr, c_ptr, gates_ptr, rows, units, B, H,
                 BLOCK_K, CELL_DTYPE, DOT_PRECISION)


@triton.jit
def lstm_backward_step_kernel(
    grad_h_ptr, grad_gates_next_ptr, w_hh_ptr, gates_ptr, c_ptr, c_prev_ptr,
    grad_c_ptr,  # in: dL/dc_t; out: dL/dc_{t-1}. Each program reads then writes only its own tile.
    grad_gates_ptr, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: the gradients of one (BLOCK_B x BLOCK_H) tile of step t, all four gates (`backward_tile`)."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    grad_c = tl.load(grad_c_ptr + state_offs, mask=tile_ok, other=0.0)
    grad_c_prev = backward_tile(grad_h_ptr, grad_gates_next_ptr, w_hh_ptr, gates_ptr, c_ptr, c_prev_ptr, grad_c,
                                grad_gates_ptr, rows, units, B, H, BLOCK_K, CELL_DTYPE, DOT_PRECISION)
    tl.store(grad_c_ptr + state_offs, grad_c_prev, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, h_all, cells_all, gates):
    """h_all[t + 1], cells_all[t + 1], gates[t] for t = 0..T-1, from h_all[0] and cells_all[0]."""
    steps, batch, hidden = gates_x.size(0), h_all.size(1), h_all.size(2)
    for t in range(steps):
        lstm_forward_step_kernel[config.grid](
            gates_x[t], h_all[t], cells_all[t], w_hh, h_all[t + 1], cells_all[t + 1], gates[t], batch, hidden,
            **config.meta)


def backward_loop(config, grad_output, gates, cells_all, w_hh, grad_gates_all, grad_c):
    """grad_gates_all[t] for t = T-1..0 (grad_gates_all[T] is zero); grad_c goes from dL/dc_T to dL/dc_0."""
    steps, batch, hidden = grad_output.shape
    for t in reversed(range(steps)):
        lstm_backward_step_kernel[config.grid](
            grad_output[t], grad_gates_all[t + 1], w_hh, gates[t], cells_all[t + 1], cells_all[t], grad_c,
            grad_gates_all[t], batch, hidden, **config.meta)

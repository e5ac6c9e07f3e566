"""The launch-per-step path: one fused Triton launch per timestep, forward and backward.

Each launch runs every tile of one step (grid: batch tiles x hidden tiles x directions); consecutive
launches order the steps, so h_t is exchanged through memory between them. On CUDA the T launches are
replayed from a CUDA graph (see `lstm_recurrence.py`). Works anywhere, the interpreter included.
"""

import triton
import triton.language as tl

from nanochat_fast.kernels.lstm_cell import backward_tile, forward_tile
from nanochat_fast.kernels.tiles import direction_offset, running_rows, tile_indices


# t only feeds the length masks: not specialized (Triton would compile apart the steps equal to 1 and those
# divisible by 16), so every step runs one binary.
@triton.jit(do_not_specialize=["t"])
def lstm_forward_step_kernel(
    gates_x_ptr, h_prev_ptr, c_prev_ptr, w_hh_ptr, h_ptr, c_ptr, gates_ptr,  # direction 0's slabs of step t
    lengths_ptr,  # (B,) int32 sequence lengths, or None: every row runs all steps
    t, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one (BLOCK_B x BLOCK_H) tile of step t of one direction, all four gates (`forward_tile`)."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    state_slab, gates_slab = direction_offset(B * H), direction_offset(B * 4 * H)
    c_prev = tl.load(c_prev_ptr + state_slab + state_offs, mask=tile_ok, other=0.0)
    forward_tile(gates_x_ptr + gates_slab, h_prev_ptr + state_slab, c_prev, w_hh_ptr + direction_offset(4 * H * H),
                 h_ptr + state_slab, c_ptr + state_slab, gates_ptr + gates_slab, rows, units, B, H,
                 running_rows(lengths_ptr, rows, B, t), BLOCK_K, CELL_DTYPE, DOT_PRECISION)


@triton.jit(do_not_specialize=["t"])
def lstm_backward_step_kernel(
    grad_h_ptr, grad_gates_next_ptr, w_hh_ptr, gates_ptr, c_ptr, c_prev_ptr,  # direction 0's slabs of step t
    grad_c_ptr,  # in: dL/dc_t; out: dL/dc_{t-1}. Each program reads then writes only its own tile.
    grad_gates_ptr, lengths_ptr, t, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: the gradients of one (BLOCK_B x BLOCK_H) tile of step t of one direction, all four
    gates (`backward_tile`)."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    state_slab, gates_slab = direction_offset(B * H), direction_offset(B * 4 * H)
    grad_c_ptr += state_slab
    grad_c = tl.load(grad_c_ptr + state_offs, mask=tile_ok, other=0.0)
    grad_c_prev = backward_tile(grad_h_ptr + state_slab, grad_gates_next_ptr + gates_slab,
                                w_hh_ptr + direction_offset(4 * H * H), gates_ptr + gates_slab, c_ptr + state_slab,
                                c_prev_ptr + state_slab, grad_c, grad_gates_ptr + gates_slab, rows, units, B, H,
                                running_rows(lengths_ptr, rows, B, t), BLOCK_K, CELL_DTYPE, DOT_PRECISION)
    tl.store(grad_c_ptr + state_offs, grad_c_prev, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, lengths, h_all, cells_all, gates):
    """h_all[t + 1], cells_all[t + 1], gates[t] for t = 0..T-1, from h_all[0] and cells_all[0]; every
    tensor direction-major within a step: gates_x (T, D, B, 4H), w_hh (D, 4H, H), h_all (T+1, D, B, H)."""
    steps, batch, hidden = gates_x.size(0), h_all.size(2), h_all.size(3)
    for t in range(steps):
        lstm_forward_step_kernel[config.grid](
            gates_x[t], h_all[t], cells_all[t], w_hh, h_all[t + 1], cells_all[t + 1], gates[t], lengths, t, batch,
            hidden, **config.meta)


def backward_loop(config, grad_output, gates, cells_all, w_hh, lengths, grad_gates_all, grad_c):
    """grad_gates_all[t] for t = T-1..0 (grad_gates_all[T] is zero); grad_c (D, B, H) goes from dL/dc_T
    to dL/dc_0."""
    steps, _, batch, hidden = grad_output.shape
    for t in reversed(range(steps)):
        lstm_backward_step_kernel[config.grid](
            grad_output[t], grad_gates_all[t + 1], w_hh, gates[t], cells_all[t + 1], cells_all[t], grad_c,
            grad_gates_all[t], lengths, t, batch, hidden, **config.meta)

"""The GRU's launch-per-step kernels, forward and backward, and their loops.

Each launch runs every tile of one step, of every direction (grid: batch tiles x hidden tiles x
directions); consecutive launches order the steps, so h_t is exchanged through memory between them.
A launch gets the pointers of direction 0 of the step's (D, B, ...) slabs (and of the (D, 3H, H)
weights, the (D, H) biases); a program adds its direction's offset. lengths_ptr None compiles the
kernels without the masks of variable lengths. On CUDA the T launches are replayed from a CUDA graph
(`gru_recurrence.py`). Works anywhere, the interpreter included.
"""

import triton
import triton.language as tl

from nanochat_fast.kernels.gru_cell import backward_tile, forward_tile
from nanochat_fast.kernels.tiles import direction_offset, running_rows, tile_indices


# t only feeds the length masks: not specialized (Triton would compile apart the steps equal to 1 and those
# divisible by 16), so every step of both kernels runs one binary.
@triton.jit(do_not_specialize=["t"])
def gru_forward_step_kernel(
    gates_x_ptr, h_prev_ptr,
    h_state_ptr,  # in: h_{t-1}; out: h_t, in the cell dtype. Each program reads then writes only its own tile.
    w_hh_ptr, b_hn_ptr, lengths_ptr, t, h_ptr, saved_ptr, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one (BLOCK_B x BLOCK_H) tile of step t and one direction, all three gates (`forward_tile`)."""
    rows, units, _, _ = tile_indices(B, H, BLOCK_B, BLOCK_H)
    running = running_rows(lengths_ptr, rows, B, t)
    forward_tile(gates_x_ptr + direction_offset(B * 3 * H), h_prev_ptr + direction_offset(B * H),
                 h_state_ptr + direction_offset(B * H), w_hh_ptr + direction_offset(3 * H * H),
                 b_hn_ptr + direction_offset(H), running, h_ptr + direction_offset(B * H),
                 saved_ptr + direction_offset(B * 4 * H), rows, units, B, H, BLOCK_K, CELL_DTYPE, DOT_PRECISION)


@triton.jit(do_not_specialize=["t"])
def gru_backward_step_kernel(
    grad_h_ptr, grad_gates_next_ptr, grad_hn_next_ptr, w_hh_ptr, saved_ptr, h_prev_ptr, lengths_ptr, t,
    grad_carry_ptr,  # in: z_{t+1} dL/dh_{t+1}; out: z_t dL/dh_t, in the cell dtype. Each program: its own tile.
    grad_gates_ptr, grad_hn_ptr, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: the gradients of one (BLOCK_B x BLOCK_H) tile of step t and one direction (`backward_tile`)."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    state_offs += direction_offset(B * H)
    running = running_rows(lengths_ptr, rows, B, t)
    grad_h = (tl.load(grad_h_ptr + state_offs, mask=tile_ok, other=0.0).to(CELL_DTYPE)
              + tl.load(grad_carry_ptr + state_offs, mask=tile_ok, other=0.0))
    grad_carry = backward_tile(grad_h, grad_gates_next_ptr + direction_offset(B * 3 * H),
                               grad_hn_next_ptr + direction_offset(B * H), w_hh_ptr + direction_offset(3 * H * H),
                               saved_ptr + direction_offset(B * 4 * H), h_prev_ptr + direction_offset(B * H), running,
                               grad_gates_ptr + direction_offset(B * 3 * H), grad_hn_ptr + direction_offset(B * H),
                               rows, units, B, H, BLOCK_K, CELL_DTYPE, DOT_PRECISION)
    tl.store(grad_carry_ptr + state_offs, grad_carry, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, b_hn, lengths, h_all, saved, h_state):
    """h_all[t + 1] and saved[t] for t = 0..T-1, from h_all[0] and h_state (h_0 in the cell dtype, then h_T)."""
    steps, batch, hidden = gates_x.size(0), h_all.size(2), h_all.size(3)
    for t in range(steps):
        gru_forward_step_kernel[config.grid](
            gates_x[t], h_all[t], h_state, w_hh, b_hn, lengths, t, h_all[t + 1], saved[t], batch, hidden,
            **config.meta)


def backward_loop(config, grad_output, saved, h_all, w_hh, lengths, grad_gates_all, grad_hn_all, grad_carry):
    """grad_gates_all[t], grad_hn_all[t] for t = T-1..0 (their slabs T are zero); grad_carry goes from zero to
    the direct part (z dL/dh_1) of dL/dh_0."""
    steps, _, batch, hidden = grad_output.shape
    for t in reversed(range(steps)):
        gru_backward_step_kernel[config.grid](
            grad_output[t], grad_gates_all[t + 1], grad_hn_all[t + 1], w_hh, saved[t], h_all[t], lengths, t,
            grad_carry, grad_gates_all[t], grad_hn_all[t], batch, hidden, **config.meta)

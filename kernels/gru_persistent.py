"""The GRU's persistent path: the whole recurrence of a layer in one launch, looping over time inside.

The LSTM's persistent path (`lstm_persistent.py`; DESIGN.md, "The persistent path") for the GRU cell
(`gru_cell.py`): every program owns one tile (BLOCK_B rows x BLOCK_H units, all three gates r, z, n)
for the whole sequence and reads its slice of W_hh (forward: the rows of its units' three gates, four
rows a unit in one dot, the fourth zeros; backward: its units' columns of all 3H rows) from global
memory once, before the time loop, so that it stays in shared memory. What the step path carries from
step to step in a (D, B, H) buffer stays in registers: h_t in the cell dtype (forward), the direct part
z dL/dh of dL/dh_{t-1} (backward); the buffer gets it once, after the last step. The programs exchange
h_t (forward) or the gradients of gates_x and hn (backward) through global memory, in L2, with a grid
barrier per step (`tiles.grid_barrier`), so the grid is never larger than the GPU's number of SMs, and
launched cooperatively; under the interpreter, whose programs run one after another, it is a single
program that owns every unit, and no barrier runs.
"""

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.gru_cell import finish_backward_tile, finish_forward_tile, load_saved
from nanochat_fast.kernels.launch import backward_k_split, launch_cooperative
from nanochat_fast.kernels.tiles import (barrier_after_step, direction_offset, gate_preactivations, gradient_pieces,
                                         load_gate, load_gate_columns, load_gate_rows, load_state, running_rows,
                                         split_gates, tile_indices, tile_offsets)


@triton.jit
def gru_forward_persistent_kernel(
    gates_x_ptr,  # (T, D, B, 3H) x_t W_ih^T + b_ih + (b_hr, b_hz, 0)
    h_all_ptr,  # (T+1, D, B, H): [0] is h_0, the kernel writes [1..T]
    h_state_ptr,  # (D, B, H) in: h_0; out: h_T, in the cell dtype (carried in registers in between)
    w_hh_ptr, b_hn_ptr,  # (D, 3H, H), (D, H)
    saved_ptr,  # out (T, D, B, 4H): r, z, n, hn of every step
    counter_ptr,  # int32, zero at launch
    lengths_ptr,  # (B,) int32 sequence lengths, or None: every row runs all T steps
    T, B, H, D,  # D: the directions the tensors hold; grid axis 2 runs all of them or one
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K >= H
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one tile of one direction (grid axis 2) through all T steps, its W_hh slice resident
    and its h in registers."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    # Every step holds the D directions' slabs one after the other: start at this direction's, advance by D.
    gates_x_ptr += direction_offset(B * 3 * H)
    h_all_ptr += direction_offset(B * H)
    h_state_ptr += direction_offset(B * H)
    w_hh_ptr += direction_offset(3 * H * H)
    b_hn_ptr += direction_offset(H)
    saved_ptr += direction_offset(B * 4 * H)
    # One tl.dot for the three gates, four rows a unit (4j + q: gate q of unit j; the fourth zeros), as
    # the LSTM's: a dot of 2 BLOCK_H gates for r, z and one of BLOCK_H for n read h_{t-1} from shared
    # memory on twice as many warps (1117 KiB a step against 584 at B 64, H 1024, as mma.sync: DESIGN.md).
    w = load_gate_rows(w_hh_ptr, H, 3, BLOCK_H, BLOCK_K)
    b_hn = tl.load(b_hn_ptr + units, mask=units < H, other=0.0).to(CELL_DTYPE)
    h_offs, h_mask = tile_offsets(rows, tl.arange(0, BLOCK_K), B, H, H)
    h = tl.load(h_state_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    # num_stages=1: Triton's pipeliner would otherwise prefetch the next step's h before the barrier.
    for t in tl.range(T, num_stages=1):
        # gates_x first: from HBM, needing nothing from the other programs, so its latency overlaps the matmul.
        gx_r = load_gate(gates_x_ptr, rows, units, B, H, 0, 3, CELL_DTYPE)
        gx_z = load_gate(gates_x_ptr, rows, units, B, H, 1, 3, CELL_DTYPE)
        gx_n = load_gate(gates_x_ptr, rows, units, B, H, 2, 3, CELL_DTYPE)
        # .cg: from L2, never a stale L1 line (the other programs wrote h_{t-1} during this launch).
        h_prev = tl.load(h_all_ptr + h_offs, mask=h_mask, other=0.0, cache_modifier=".cg")
        acc = gate_preactivations(w, h_prev, CELL_DTYPE, DOT_PRECISION)
        acc_r, acc_z, acc_n, _ = split_gates(acc, BLOCK_B, BLOCK_H)
        # Advance the pointers rather than multiply t by a stride: no int32 overflow on long sequences.
        h_all_ptr += D * B * H
        h = finish_forward_tile(gx_r + acc_r, gx_z + acc_z, gx_n, acc_n + b_hn[None, :], h,
                                running_rows(lengths_ptr, rows, B, t), None, h_all_ptr, saved_ptr, rows, units, B, H)
        gates_x_ptr += D * B * 3 * H
        saved_ptr += D * B * 4 * H
        barrier_after_step(counter_ptr, t, T, num_programs)
    tl.store(h_state_ptr + state_offs, h, mask=tile_ok)


@triton.jit
def gru_backward_persistent_kernel(
    grad_output_ptr,  # (D, B, H) slab T-1 of the (T, D, B, H) output gradient
    grad_gates_ptr,  # (D, B, 3H) slab T-1 of grad_gates_all (T+1, D, B, 3H), whose [T] is zero
    grad_hn_ptr,  # (D, B, H) slab T-1 of grad_hn_all (T+1, D, B, H), whose [T] is zero
    w_hh_ptr,  # (D, 3H, H)
    saved_ptr,  # (D, B, 4H) slab T-1 of the saved r, z, n, hn
    h_prev_ptr,  # (D, B, H) slab T-1 of h_all (T+1, D, B, H): h_{T-1}
    grad_carry_ptr,  # (D, B, H) in: the direct part of dL/dh_T (zero); out: that of dL/dh_0, in the cell dtype
    counter_ptr, lengths_ptr, T, B, H, D,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K >= H
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """One program: one tile of one direction back through all T steps, its W_hh slice resident, the direct
    part of dL/dh in registers."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    state_step, gates_step, saved_step = D * B * H, D * B * 3 * H, D * B * 4 * H
    grad_output_ptr += direction_offset(B * H)
    grad_gates_ptr += direction_offset(B * 3 * H)
    grad_hn_ptr += direction_offset(B * H)
    w_hh_ptr += direction_offset(3 * H * H)
    saved_ptr += direction_offset(B * 4 * H)
    h_prev_ptr += direction_offset(B * H)
    grad_carry_ptr += direction_offset(B * H)
    # dh_t += dr_{t+1} W_hr[:, units] + dz_{t+1} W_hz[:, units] + dhn_{t+1} W_hn[:, units]: one resident
    # (H, BLOCK_H) tile per gate, each gate's sum over k in K_SPLIT pieces, a batched tl.dot whose pieces
    # Triton gives to different warps, summed after (as the LSTM's backward: DESIGN.md).
    w_r, w_z, w_n = load_gate_columns(w_hh_ptr, units, H, 3, BLOCK_K, K_SPLIT)
    grad_next_offs, grad_next_mask = gradient_pieces(rows, B, H, 3 * H, BLOCK_K, K_SPLIT)
    grad_hn_next_offs, _ = gradient_pieces(rows, B, H, H, BLOCK_K, K_SPLIT)
    grad_carry = tl.load(grad_carry_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    for step in tl.range(T, num_stages=1):  # not pipelined: the gradients of step t+1 are ready only after the barrier
        # This step's saved tensors first: from HBM, needing nothing from the other programs, so their
        # latency overlaps the matmul.
        reset, update, new, hn = load_saved(saved_ptr, rows, units, B, H, CELL_DTYPE)
        h_prev = load_state(h_prev_ptr, rows, units, B, H, CELL_DTYPE)
        grad_h = load_state(grad_output_ptr, rows, units, B, H, CELL_DTYPE)
        # dr, dz and dhn of step t+1: every program wrote them.
        grad_next_ptrs = grad_gates_ptr + gates_step + grad_next_offs
        pieces = tl.dot(tl.load(grad_next_ptrs, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_r,
                        input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        pieces = tl.dot(tl.load(grad_next_ptrs + H, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_z,
                        pieces, input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        pieces = tl.dot(tl.load(grad_hn_ptr + state_step + grad_hn_next_offs, mask=grad_next_mask, other=0.0,
                                cache_modifier=".cg"), w_n, pieces, input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        grad_carry = finish_backward_tile(grad_h + grad_carry + tl.sum(pieces, 0), reset, update, new, hn, h_prev,
                                          running_rows(lengths_ptr, rows, B, T - 1 - step), grad_gates_ptr,
                                          grad_hn_ptr, rows, units, B, H)
        grad_output_ptr -= state_step
        grad_gates_ptr -= gates_step
        grad_hn_ptr -= state_step
        saved_ptr -= saved_step
        h_prev_ptr -= state_step
        barrier_after_step(counter_ptr, step, T, num_programs)
    tl.store(grad_carry_ptr + state_offs, grad_carry, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, b_hn, lengths, h_all, saved, h_state):
    """Same contract as gru_step.forward_loop, in one launch per config.grid[2] directions (all of them on a
    GPU; under the interpreter, whose programs run one after another, one direction a launch)."""
    steps, directions, batch, hidden = gates_x.size(0), *h_all.shape[1:]
    for first in range(0, directions, config.grid[2]):
        counter = h_all.new_zeros(1, dtype=torch.int32)
        launch_cooperative(
            gru_forward_persistent_kernel, config.grid,
            gates_x[:, first], h_all[:, first], h_state[first], w_hh[first], b_hn[first], saved[:, first], counter,
            lengths, steps, batch, hidden, directions, **config.meta)


def backward_loop(config, grad_output, saved, h_all, w_hh, lengths, grad_gates_all, grad_hn_all, grad_carry):
    """Same contract as gru_step.backward_loop, launched as `forward_loop` is."""
    steps, directions, batch, hidden = grad_output.shape
    last = steps - 1
    for first in range(0, directions, config.grid[2]):
        counter = grad_carry.new_zeros(1, dtype=torch.int32)
        launch_cooperative(
            gru_backward_persistent_kernel, config.grid,
            grad_output[last, first], grad_gates_all[last, first], grad_hn_all[last, first], w_hh[first],
            saved[last, first], h_all[last, first], grad_carry[first], counter, lengths, steps, batch, hidden,
            directions, K_SPLIT=backward_k_split(config.meta), **config.meta)

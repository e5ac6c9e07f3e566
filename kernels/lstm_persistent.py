"""The persistent path: the whole recurrence of a layer in one launch, looping over time inside.

Every program owns one tile (BLOCK_B rows x BLOCK_H hidden units, all four gates) for the whole
sequence. It reads its slice of W_hh (forward: the 4 BLOCK_H rows of its units' gates; backward: its
units' columns of all 4H rows) from global memory once, before the time loop: Triton keeps a
loop-invariant `tl.dot` operand in shared memory (one `local_alloc` before the loop, only
`local_load`s inside: see DESIGN.md), so a step reads W_hh from the SM's own shared memory, not
from L2. The cell state (forward) or cell gradient (backward) stays in registers.
BLOCK_K covers the whole hidden size (h_{t-1} is read in one load per step), so the slice must fit
in shared memory next to the tile of h: the host picks the tiles, or falls back to the step path.

The programs exchange h_t (or dG_t) through global memory, which lives in L2, with a grid-wide barrier
per step: an atomic counter that every program increments and then waits on. The barrier is only
safe when every program of the grid is resident at once, so the grid is never larger than the GPU's
number of SMs, and the launch is cooperative (`launch.launch_cooperative`: the driver guarantees it).
Under the interpreter, programs run one after another: there the grid is a single program that owns
every unit, and no barrier runs.
"""

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.launch import backward_k_split, launch_cooperative
from nanochat_fast.kernels.lstm_cell import finish_backward_tile, finish_forward_tile, load_gates
from nanochat_fast.kernels.tiles import (barrier_after_step, direction_offset, gate_preactivations, gradient_pieces,
                                        load_gate_columns, load_gate_rows, load_state, running_rows, split_gates,
                                        tile_indices, tile_offsets)


@triton.jit
def lstm_forward_persistent_kernel(
    gates_x_ptr,  # (T, D, B, 4H)
    h_all_ptr,  # (T+1, D, B, H): [0] is h_0, the kernel writes [1..T]
    cells_all_ptr,  # (T+1, D, B, H): [0] is c_0, the kernel writes [1..T]
    w_hh_ptr, gates_ptr,  # (D, 4H, H); out (T, D, B, 4H)
    counter_ptr,  # int32, zero at launch
    lengths_ptr,  # (B,) int32 sequence lengths, or None: every row runs all T steps
    T, B, H, D,  # D: the directions the tensors hold; grid axis 2 runs all of them or one
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K >= H
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one tile of one direction (grid axis 2) through all T steps, its W_hh slice resident."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    # Every step holds the D directions' slabs one after the other: start at this direction's, advance by D.
    gates_x_ptr += direction_offset(B * 4 * H)
    gates_ptr += direction_offset(B * 4 * H)
    h_all_ptr += direction_offset(B * H)
    cells_all_ptr += direction_offset(B * H)
    w_hh_ptr += direction_offset(4 * H * H)
    # Row 4j + q is gate q of unit j, so one tl.dot of the 4 BLOCK_H rows computes every gate of the tile: a
    # dot wide enough for the warps to share without each repeating it, and M of 64 or more for wgmma.
    w = load_gate_rows(w_hh_ptr, H, 4, BLOCK_H, BLOCK_K)
    h_offs, h_mask = tile_offsets(rows, tl.arange(0, BLOCK_K), B, H, H)
    c = tl.load(cells_all_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    # num_stages=1: Triton's pipeliner would otherwise prefetch the next step's h before the barrier.
    for t in tl.range(T, num_stages=1):
        # gates_x first: it comes from HBM and needs nothing from the other programs, so its latency
        # overlaps the load of h and the matmul (loaded after them, it sat on every step's critical path).
        x_i, x_f, x_g, x_o = load_gates(gates_x_ptr, rows, units, B, H, CELL_DTYPE)
        # .cg: from L2, never a stale L1 line (the other programs wrote h_{t-1} during this launch).
        h_prev = tl.load(h_all_ptr + h_offs, mask=h_mask, other=0.0, cache_modifier=".cg")
        acc = gate_preactivations(w, h_prev, CELL_DTYPE, DOT_PRECISION)
        acc_i, acc_f, acc_g, acc_o = split_gates(acc, BLOCK_B, BLOCK_H)
        # Advance the pointers rather than multiply t by a stride: no int32 overflow on long sequences.
        h_all_ptr += D * B * H
        cells_all_ptr += D * B * H
        c = finish_forward_tile(x_i + acc_i, x_f + acc_f, x_g + acc_g, x_o + acc_o, c, h_all_ptr, cells_all_ptr,
                                gates_ptr, rows, units, B, H, running_rows(lengths_ptr, rows, B, t))
        gates_x_ptr += D * B * 4 * H
        gates_ptr += D * B * 4 * H
        barrier_after_step(counter_ptr, t, T, num_programs)


@triton.jit
def lstm_backward_persistent_kernel(
    grad_output_ptr,  # (D, B, H) slab of step T-1 of the (T, D, B, H) output gradient
    grad_gates_ptr,  # (D, B, 4H) slab of step T-1 of grad_gates_all (T+1, D, B, 4H), whose [T] is zero
    w_hh_ptr,  # (D, 4H, H)
    gates_ptr,  # (D, B, 4H) slab of step T-1 of the saved gates
    cells_ptr,  # (D, B, H) slab T-1 of cells_all (T+1, D, B, H): c_{T-1}; the next slab is c_T
    grad_c_ptr,  # (D, B, H) in: dL/dc_T; out: dL/dc_0
    counter_ptr, lengths_ptr, T, B, H, D,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K >= H
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """One program: one tile of one direction back through all T steps, its W_hh slice resident, its dL/dc
    in registers."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    state_step, gates_step = D * B * H, D * B * 4 * H
    grad_output_ptr += direction_offset(B * H)
    grad_gates_ptr += direction_offset(B * 4 * H)
    w_hh_ptr += direction_offset(4 * H * H)
    gates_ptr += direction_offset(B * 4 * H)
    cells_ptr += direction_offset(B * H)
    grad_c_ptr += direction_offset(B * H)
    # dh_t = dL/dh_t + sum over gates q of dG_{t+1}[:, qH + k] W_hh[qH + k, units]: one resident
    # (H, BLOCK_H) tile per gate (the (B, 4H) dG slab would not fit in shared memory in one piece).
    # Each gate's sum over k is split in K_SPLIT pieces, a batched tl.dot whose pieces Triton gives to
    # different warps, summed after: a (BLOCK_B x BLOCK_H) output alone is too narrow to share among
    # the warps, which then all computed the same tile.
    w_i, w_f, w_g, w_o = load_gate_columns(w_hh_ptr, units, H, 4, BLOCK_K, K_SPLIT)
    grad_next_offs, grad_next_mask = gradient_pieces(rows, B, H, 4 * H, BLOCK_K, K_SPLIT)
    grad_c = tl.load(grad_c_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    for step in tl.range(T, num_stages=1):  # not pipelined: dG_{t+1} is ready only after the barrier
        # This step's saved tensors first: from HBM, needing nothing from the other programs, so their
        # latency overlaps the matmul.
        in_gate, forget_gate, cell_gate, out_gate = load_gates(gates_ptr, rows, units, B, H, CELL_DTYPE)
        c = load_state(cells_ptr + state_step, rows, units, B, H, CELL_DTYPE)
        c_prev = load_state(cells_ptr, rows, units, B, H, CELL_DTYPE)
        grad_h = load_state(grad_output_ptr, rows, units, B, H, CELL_DTYPE)
        grad_next_ptrs = grad_gates_ptr + gates_step + grad_next_offs  # dG_{t+1}: every program wrote it
        pieces = tl.dot(tl.load(grad_next_ptrs, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_i,
                        input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        pieces = tl.dot(tl.load(grad_next_ptrs + H, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_f,
                        pieces, input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        pieces = tl.dot(tl.load(grad_next_ptrs + 2 * H, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_g,
                        pieces, input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        pieces = tl.dot(tl.load(grad_next_ptrs + 3 * H, mask=grad_next_mask, other=0.0, cache_modifier=".cg"), w_o,
                        pieces, input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE)
        grad_c = finish_backward_tile(grad_h + tl.sum(pieces, 0), in_gate, forget_gate, cell_gate, out_gate, c, c_prev,
                                      grad_c, grad_gates_ptr, rows, units, B, H,
                                      running_rows(lengths_ptr, rows, B, T - 1 - step))
        grad_output_ptr -= state_step
        grad_gates_ptr -= gates_step
        gates_ptr -= gates_step
        cells_ptr -= state_step
        barrier_after_step(counter_ptr, step, T, num_programs)
    tl.store(grad_c_ptr + state_offs, grad_c, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, lengths, h_all, cells_all, gates):
    """Same contract as lstm_step.forward_loop, in one launch per config.grid[2] directions (all of them on
    a GPU; under the interpreter, whose programs run one after another, one direction a launch)."""
    steps, directions, batch, hidden = gates_x.size(0), *h_all.shape[1:]
    for first in range(0, directions, config.grid[2]):
        counter = h_all.new_zeros(1, dtype=torch.int32)
        launch_cooperative(
            lstm_forward_persistent_kernel, config.grid,
            gates_x[:, first], h_all[:, first], cells_all[:, first], w_hh[first], gates[:, first], counter, lengths,
            steps, batch, hidden, directions, **config.meta)


def backward_loop(config, grad_output, gates, cells_all, w_hh, lengths, grad_gates_all, grad_c):
    """Same contract as lstm_step.backward_loop, launched as `forward_loop` is."""
    steps, directions, batch, hidden = grad_output.shape
    last = steps - 1
    for first in range(0, directions, config.grid[2]):
        counter = grad_c.new_zeros(1, dtype=torch.int32)
        launch_cooperative(
            lstm_backward_persistent_kernel, config.grid,
            grad_output[last, first], grad_gates_all[last, first], w_hh[first], gates[last, first],
            cells_all[last, first], grad_c[first], counter, lengths, steps, batch, hidden, directions,
            K_SPLIT=backward_k_split(config.meta), **config.meta)

"""The persistent path: the whole recurrence of a layer in one launch, looping over time inside.

Every program owns one tile (BLOCK_B rows x BLOCK_H hidden units, all four gates) for the whole
sequence and keeps its cell state (forward) or cell gradient (backward) in registers. The programs
exchange h_t (or dG_t) through global memory, which lives in L2, with a grid-wide barrier per step:
an atomic counter that every program increments and then waits on. The barrier is only safe when
every program of the grid is resident at once, so the grid is never larger than the GPU's number of
SMs. Under the interpreter, programs run one after another: there the grid is a single program
that owns every unit, and the barrier passes at once.
"""

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.lstm_cell import backward_tile, forward_tile, tile_indices


@triton.jit
def grid_barrier(counter_ptr, target):
    """Wait until all programs have arrived: the counter reaches `target` = steps so far x programs.
    Release orders this program's stores before its arrival; acquire orders the later loads after."""
    tl.atomic_add(counter_ptr, 1, sem="release")
    while tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
        pass


@triton.jit
def lstm_forward_persistent_kernel(
    gates_x_ptr,  # (T, B, 4H)
    h_all_ptr,  # (T+1, B, H): [0] is h_0, the kernel writes [1..T]
    cells_all_ptr,  # (T+1, B, H): [0] is c_0, the kernel writes [1..T]
    w_hh_ptr, gates_ptr,  # (4H, H); out (T, B, 4H)
    counter_ptr,  # int32, zero at launch
    T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one tile through all T steps."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    c = tl.load(cells_all_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    for t in range(T):
        c = forward_tile(gates_x_ptr, h_all_ptr, c, w_hh_ptr, h_all_ptr + B * H, cells_all_ptr + B * H, gates_ptr,
                         rows, units, B, H, BLOCK_B, BLOCK_H, BLOCK_K, CELL_DTYPE, DOT_PRECISION)
        # Advance the pointers rather than multiply t by a stride: no int32 overflow on long sequences.
        gates_x_ptr += B * 4 * H
        gates_ptr += B * 4 * H
        h_all_ptr += B * H
        cells_all_ptr += B * H
        grid_barrier(counter_ptr, (t + 1) * num_programs)


@triton.jit
def lstm_backward_persistent_kernel(
    grad_output_ptr,  # (B, H) slab of step T-1 of the (T, B, H) output gradient
    grad_gates_ptr,  # (B, 4H) slab of step T-1 of grad_gates_all (T+1, B, 4H), whose [T] is zero
    w_hh_ptr,
    gates_ptr,  # (B, 4H) slab of step T-1 of the saved gates
    cells_ptr,  # (B, H) slab T-1 of cells_all (T+1, B, H): c_{T-1}; the next slab is c_T
    grad_c_ptr,  # (B, H) in: dL/dc_T; out: dL/dc_0
    counter_ptr, T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one tile back through all T steps, its dL/dc carried in registers."""
    rows, units, tile_ok, state_offs = tile_indices(B, H, BLOCK_B, BLOCK_H)
    grad_c = tl.load(grad_c_ptr + state_offs, mask=tile_ok, other=0.0)
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    for step in range(T):
        grad_c = backward_tile(grad_output_ptr, grad_gates_ptr + B * 4 * H, w_hh_ptr, gates_ptr, cells_ptr + B * H,
                               cells_ptr, grad_c, grad_gates_ptr, rows, units, B, H, BLOCK_B, BLOCK_H, BLOCK_K,
                               CELL_DTYPE, DOT_PRECISION)
        grad_output_ptr -= B * H
        grad_gates_ptr -= B * 4 * H
        gates_ptr -= B * 4 * H
        cells_ptr -= B * H
        grid_barrier(counter_ptr, (step + 1) * num_programs)
    tl.store(grad_c_ptr + state_offs, grad_c, mask=tile_ok)


def forward_loop(config, gates_x, w_hh, h_all, cells_all, gates):
    """Same contract as lstm_step.forward_loop, in one launch."""
    counter = h_all.new_zeros(1, dtype=torch.int32)
    steps, batch, hidden = gates_x.size(0), h_all.size(1), h_all.size(2)
    lstm_forward_persistent_kernel[config.grid](gates_x, h_all, cells_all, w_hh, gates, counter, steps, batch,
                                                hidden, **config.meta)


def backward_loop(config, grad_output, gates, cells_all, w_hh, grad_gates_all, grad_c):
    """Same contract as lstm_step.backward_loop, in one launch."""
    counter = grad_c.new_zeros(1, dtype=torch.int32)
    steps, batch, hidden = grad_output.shape
    last = steps - 1
    lstm_backward_persistent_kernel[config.grid](grad_output[last], grad_gates_all[last], w_hh, gates[last],
                                                 cells_all[last], grad_c, counter, steps, batch, hidden,
                                                 **config.meta)

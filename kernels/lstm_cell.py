"""The LSTM cell of one tile, forward and backward, as Triton device functions.

Shared by the launch-per-step kernels (`lstm_step.py`) and the persistent kernels
(`lstm_persistent.py`): a tile is BLOCK_B batch
rows x BLOCK_H hidden units with all four gates of those units (PyTorch's order i, f, g, o: rows
q*H + j of W_hh), so the cell update is local and h is exchanged once per step. Every pointer
points at one timestep's (B, H) or (B, 4H) slab.
"""

import triton
import triton.language as tl

from nanochat_fast.kernels.tiles import load_state, sigmoid, store_state, tanh, tile_offsets


@triton.jit
def load_gates(ptr, rows, units, B, H, CELL_DTYPE: tl.constexpr):
    """The four (BLOCK_B, BLOCK_H) gate tiles i, f, g, o of the tile's units from a (B, 4H) slab."""
    offs, tile_ok = tile_offsets(rows, units, B, H, 4 * H)
    return (tl.load(ptr + offs, mask=tile_ok, other=0.0).to(CELL_DTYPE),
            tl.load(ptr + offs + H, mask=tile_ok, other=0.0).to(CELL_DTYPE),
            tl.load(ptr + offs + 2 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE),
            tl.load(ptr + offs + 3 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE))


@triton.jit
def store_gates(ptr, rows, units, B, H, gate_i, gate_f, gate_g, gate_o):
    """Stores the four (BLOCK_B, BLOCK_H) gate tiles of the tile's units into a (B, 4H) slab."""
    offs, tile_ok = tile_offsets(rows, units, B, H, 4 * H)
    dtype = ptr.dtype.element_ty
    tl.store(ptr + offs, gate_i.to(dtype), mask=tile_ok)
    tl.store(ptr + offs + H, gate_f.to(dtype), mask=tile_ok)
    tl.store(ptr + offs + 2 * H, gate_g.to(dtype), mask=tile_ok)
    tl.store(ptr + offs + 3 * H, gate_o.to(dtype), mask=tile_ok)


@triton.jit
def accumulate_gates(
    acc_i, acc_f, acc_g, acc_o,  # (BLOCK_B, BLOCK_H) accumulators of the four gates
    x_row_ptrs,  # (BLOCK_B,) pointers to the first element of each batch row of the (B, K) input
    row_ok, w_ptr, w_row_stride,  # w: rows q*H + j hold gate q of unit j, K inputs each, w_row_stride apart
    units, unit_ok, H, K,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc_q += x[rows, :K] @ w[q*H + units, :K]^T for the gates q = i, f, g, o; one load of x per chunk."""
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        # .cg: read x from L2, never a stale L1 line (persistent kernels rewrite it while running).
        x = tl.load(x_row_ptrs[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                    cache_modifier=".cg")
        # Tile [k, j] of w^T for gate q is w[q*H + j, k].
        w_ptrs = w_ptr + units[None, :] * w_row_stride + ks[:, None]
        w_mask = k_ok[:, None] & unit_ok[None, :]
        gate_stride = H * w_row_stride
        # out_dtype named: not every Triton version defaults it to the accumulator's dtype, and float64
        # does not compile without it (DESIGN.md, numerics).
        acc_i = tl.dot(x, tl.load(w_ptrs, mask=w_mask, other=0.0), acc_i, input_precision=DOT_PRECISION,
                       out_dtype=acc_i.dtype)
        acc_f = tl.dot(x, tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0), acc_f,
                       input_precision=DOT_PRECISION, out_dtype=acc_f.dtype)
        acc_g = tl.dot(x, tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0), acc_g,
                       input_precision=DOT_PRECISION, out_dtype=acc_g.dtype)
        acc_o = tl.dot(x, tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0), acc_o,
                       input_precision=DOT_PRECISION, out_dtype=acc_o.dtype)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def cell_update(pre_i, pre_f, pre_g, pre_o, c_prev):
    """The activated gates from their pre-activations, then c_t = f c_{t-1} + i g and h_t = o tanh(c_t)."""
    in_gate = sigmoid(pre_i)
    forget_gate = sigmoid(pre_f)
    cell_gate = tanh(pre_g)
    out_gate = sigmoid(pre_o)
    c = forget_gate * c_prev + in_gate * cell_gate
    h = out_gate * tanh(c)
    return in_gate, forget_gate, cell_gate, out_gate, c, h


@triton.jit
def finish_forward_tile(
    pre_i, pre_f, pre_g, pre_o,  # (BLOCK_B, BLOCK_H) pre-activations: gates_x + h_{t-1} W_hh^T
    c_prev,  # (BLOCK_B, BLOCK_H) tile of c_{t-1}, in the cell dtype
    h_ptr, c_ptr, gates_ptr,  # out: h_t (B, H), c_t (B, H), activated gates (B, 4H)
    rows, units, B, H,
    running,  # (BLOCK_B,) rows still inside their sequence (`running_rows`), or None: every row
):
    """The step after the matmul: cell update; stores h_t, c_t and the activated gates; returns c_t.
    Rows past their sequence's end store h_t = c_t = 0: their output is zero, as padding is in
    nn.LSTM's padded output, and nothing of a finished row is read again (h_n and c_n are each row's
    state at its own last step)."""
    in_gate, forget_gate, cell_gate, out_gate, c, h = cell_update(pre_i, pre_f, pre_g, pre_o, c_prev)
    if running is not None:
        c = tl.where(running[:, None], c, 0.0)
        h = tl.where(running[:, None], h, 0.0)
    store_state(c_ptr, rows, units, B, H, c)
    store_state(h_ptr, rows, units, B, H, h)
    store_gates(gates_ptr, rows, units, B, H, in_gate, forget_gate, cell_gate, out_gate)
    return c


@triton.jit
def forward_tile(
    gates_x_ptr,  # (B, 4H) input projection plus both biases at step t
    h_prev_ptr,  # (B, H) h_{t-1}, written by every program at the previous step
    c_prev,  # (BLOCK_B, BLOCK_H) tile of c_{t-1}, in the cell dtype
    w_hh_ptr,  # (4H, H)
    h_ptr, c_ptr, gates_ptr,  # out: h_t (B, H), c_t (B, H), activated gates (B, 4H)
    rows, units, B, H, running,
    BLOCK_K: tl.constexpr, CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of the tile: recurrent matmul, gates, cell update; stores h_t, c_t, gates; returns c_t."""
    x_i, x_f, x_g, x_o = load_gates(gates_x_ptr, rows, units, B, H, CELL_DTYPE)
    acc_i, acc_f, acc_g, acc_o = accumulate_gates(x_i, x_f, x_g, x_o, h_prev_ptr + rows * H, rows < B, w_hh_ptr, H,
                                                  units, units < H, H, H, BLOCK_K, DOT_PRECISION)
    return finish_forward_tile(acc_i, acc_f, acc_g, acc_o, c_prev, h_ptr, c_ptr, gates_ptr, rows, units, B, H,
                               running)


@triton.jit
def finish_backward_tile(
    grad_h,  # (BLOCK_B, BLOCK_H) dL/dh_t, the recurrent part dG_{t+1} W_hh included
    in_gate, forget_gate, cell_gate, out_gate,  # the tile's activated gates of step t
    c, c_prev,  # the tiles of c_t and c_{t-1}
    grad_c,  # (BLOCK_B, BLOCK_H) tile of dL/dc_t coming from step t+1
    grad_gates_ptr,  # out (B, 4H) dG_t, the gradient of the gate pre-activations
    rows, units, B, H,
    running,  # (BLOCK_B,) rows still inside their sequence at step t, or None: every row
):
    """The step back after the recurrent matmul: stores the gate gradients dG_t, returns dL/dc_{t-1}.
    A row past its sequence's end has no gate gradients and passes dL/dc on unchanged, so that
    dL/dc_n reaches the row's own last step (its forward stored zeros: nothing else depends on it)."""
    tanh_c = tanh(c)  # recomputed: cheaper than storing it
    grad_c_in = grad_c
    grad_c = grad_c + grad_h * out_gate * (1.0 - tanh_c * tanh_c)
    grad_in = grad_c * cell_gate * in_gate * (1.0 - in_gate)
    grad_forget = grad_c * c_prev * forget_gate * (1.0 - forget_gate)
    grad_cell = grad_c * in_gate * (1.0 - cell_gate * cell_gate)
    grad_out = grad_h * tanh_c * out_gate * (1.0 - out_gate)
    grad_c_prev = grad_c * forget_gate
    if running is not None:
        keep = running[:, None]
        grad_in = tl.where(keep, grad_in, 0.0)
        grad_forget = tl.where(keep, grad_forget, 0.0)
        grad_cell = tl.where(keep, grad_cell, 0.0)
        grad_out = tl.where(keep, grad_out, 0.0)
        grad_c_prev = tl.where(keep, grad_c_prev, grad_c_in)
    store_gates(grad_gates_ptr, rows, units, B, H, grad_in, grad_forget, grad_cell, grad_out)
    return grad_c_prev


@triton.jit
def backward_tile(
    grad_h_ptr,  # (B, H) dL/dh_t from the layer's output (h_n's gradient included)
    grad_gates_next_ptr,  # (B, 4H) dG_{t+1} (zeros after the last step), written by every program
    w_hh_ptr,  # (4H, H)
    gates_ptr,  # (B, 4H) activated gates of step t
    c_ptr, c_prev_ptr,  # (B, H) c_t and c_{t-1}
    grad_c,  # (BLOCK_B, BLOCK_H) tile of dL/dc_t coming from step t+1
    grad_gates_ptr,  # out (B, 4H) dG_t, the gradient of the gate pre-activations
    rows, units, B, H, running,
    BLOCK_K: tl.constexpr, CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step back for the tile: dh_t = dL/dh_t + dG_{t+1} W_hh, the gate gradients dG_t (stored),
    and the returned tile of dL/dc_{t-1}."""
    row_ok = rows < B
    unit_ok = units < H
    grad_h = load_state(grad_h_ptr, rows, units, B, H, CELL_DTYPE)
    for k_start in range(0, 4 * H, BLOCK_K):  # over all 4H gate rows
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < 4 * H
        grad_gates_next = tl.load(grad_gates_next_ptr + rows[:, None] * (4 * H) + ks[None, :],
                                  mask=row_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_hh_ptr + ks[:, None] * H + units[None, :], mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
        grad_h = tl.dot(grad_gates_next, w, grad_h, input_precision=DOT_PRECISION, out_dtype=grad_h.dtype)
    # Loaded after the loop, unlike the persistent kernel: held through it, these six tiles would take
    # registers the loop needs and spill (DESIGN.md).
    in_gate, forget_gate, cell_gate, out_gate = load_gates(gates_ptr, rows, units, B, H, CELL_DTYPE)
    c = load_state(c_ptr, rows, units, B, H, CELL_DTYPE)
    c_prev = load_state(c_prev_ptr, rows, units, B, H, CELL_DTYPE)
    return finish_backward_tile(grad_h, in_gate, forget_gate, cell_gate, out_gate, c, c_prev, grad_c, grad_gates_ptr,
                                rows, units, B, H, running)

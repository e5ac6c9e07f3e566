"""The GRU cell of one tile, forward and backward, as Triton device functions.

Shared by the launch-per-step kernels (`gru_step.py`) and the persistent kernels (`gru_persistent.py`):
both end their step with `finish_forward_tile` / `finish_backward_tile`, after their own recurrent matmul.

PyTorch's GRU (nn.GRU), gates in its order r, z, n (rows q*H + j of W_hh hold gate q of unit j):

    r = sigmoid(gx_r + W_hr h + b_hr)          z = sigmoid(gx_z + W_hz h + b_hz)
    n = tanh(gx_n + r * (W_hn h + b_hn))       h' = (1 - z) n + z h

gates_x = x W_ih^T + b_ih with b_hr, b_hz folded in by the caller; b_hn stays apart, because r
multiplies it. A tile is BLOCK_B batch rows x BLOCK_H hidden units with all three gates of those
units, so the cell update is local and h is exchanged once per step. Every pointer points at one
timestep's and direction's slab: (B, H) states, (B, 3H) gates, (B, 4H) saved tensors.
"""

import triton
import triton.language as tl

from nanochat_fast.kernels.tiles import load_gate, load_state, sigmoid, store_gate, store_state, tanh, zero_finished

# The forward saves, per step, the tiles backward needs and cannot get without the recurrent matmul:
# the three activated gates and hn = W_hn h_{t-1} + b_hn (r's gradient is dn_pre * hn). Slab columns
# q*H + j, as for the gates.
SAVED_R, SAVED_Z, SAVED_N, SAVED_HN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def accumulate_recurrent(
    acc_r, acc_z, acc_n,  # (BLOCK_B, BLOCK_H) accumulators of the three gates' recurrent terms
    h_prev_ptr,  # (B, H) h_{t-1}, written by every program at the previous step
    w_hh_ptr,  # (3H, H)
    rows, units, B, H,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc_q += h_{t-1}[rows, :] @ W_hh[q*H + units, :]^T for q = r, z, n; one load of h per chunk."""
    row_ok = rows < B
    unit_ok = units < H
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_prev_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Tile [k, j] of W_hh^T for gate q is W_hh[q*H + j, k].
        w_ptrs = w_hh_ptr + units[None, :] * H + ks[:, None]
        w_mask = k_ok[:, None] & unit_ok[None, :]
        # out_dtype named: float64 does not compile without it on every Triton (DESIGN.md, numerics).
        acc_r = tl.dot(h, tl.load(w_ptrs, mask=w_mask, other=0.0), acc_r, input_precision=DOT_PRECISION,
                       out_dtype=acc_r.dtype)
        acc_z = tl.dot(h, tl.load(w_ptrs + H * H, mask=w_mask, other=0.0), acc_z, input_precision=DOT_PRECISION,
                       out_dtype=acc_z.dtype)
        acc_n = tl.dot(h, tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0), acc_n,
                       input_precision=DOT_PRECISION, out_dtype=acc_n.dtype)
    return acc_r, acc_z, acc_n


@triton.jit
def cell_update(pre_r, pre_z, gx_n, hn, h_prev):
    """The activated gates from their pre-activations (hn = W_hn h_{t-1} + b_hn), and h_t."""
    reset = sigmoid(pre_r)
    update = sigmoid(pre_z)
    new = tanh(gx_n + reset * hn)
    h = (1.0 - update) * new + update * h_prev
    return reset, update, new, h


@triton.jit
def finish_forward_tile(
    pre_r, pre_z,  # (BLOCK_B, BLOCK_H) pre-activations of r and z: gates_x + h_{t-1} W_hh^T
    gx_n, hn,  # the n gate's two terms: gates_x's and hn = W_hn h_{t-1} + b_hn
    h_prev,  # (BLOCK_B, BLOCK_H) h_{t-1}, in the cell dtype
    running,  # (BLOCK_B,) rows still inside their sequence, or None (all)
    h_state_ptr,  # out (B, H) h_t in the cell dtype (the step path's carried state), or None (persistent: registers)
    h_ptr,  # out (B, H) h_t, zero at finished rows
    saved_ptr,  # out (B, 4H) r, z, n, hn for backward
    rows, units, B, H,
):
    """The step after the recurrent matmul: gates, h_t; stores h_t (into the state, if any, and the output)
    and the saved tiles; returns h_t in the cell dtype, zero at finished rows, so that later steps' matmuls
    read zeros. (The state is stored first: after the output, the step kernels took 6 to 8 more registers
    on sm_90 in half precision.)"""
    reset, update, new, h = cell_update(pre_r, pre_z, gx_n, hn, h_prev)
    h = zero_finished(running, h)
    if h_state_ptr is not None:
        store_state(h_state_ptr, rows, units, B, H, h)
    store_state(h_ptr, rows, units, B, H, h)
    store_gate(saved_ptr, rows, units, B, H, SAVED_R, 4, reset)
    store_gate(saved_ptr, rows, units, B, H, SAVED_Z, 4, update)
    store_gate(saved_ptr, rows, units, B, H, SAVED_N, 4, new)
    store_gate(saved_ptr, rows, units, B, H, SAVED_HN, 4, hn)
    return h


@triton.jit
def forward_tile(
    gates_x_ptr,  # (B, 3H) x_t W_ih^T + b_ih + (b_hr, b_hz, 0)
    h_prev_ptr,  # (B, H) h_{t-1}, the matmul's operand
    h_state_ptr,  # (B, H) in: h_{t-1}; out: h_t, in the cell dtype; the program reads and writes only its tile
    w_hh_ptr,  # (3H, H)
    b_hn_ptr,  # (H,)
    running,  # (BLOCK_B,) rows still inside their sequence, or None (all)
    h_ptr,  # out (B, H) h_t, zero at finished rows
    saved_ptr,  # out (B, 4H) r, z, n, hn for backward
    rows, units, B, H,
    BLOCK_K: tl.constexpr, CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of the tile: recurrent matmul, gates, h_t; stores h_t (into the state and the output) and
    the saved tiles."""
    # The accumulators start from gates_x, so that its latency overlaps the matmul. gx_n and h_{t-1} are
    # loaded after it: held through the loop, they made ptxas spill 4.5 KB in float32 on sm_80 (1.1 KB
    # after; DESIGN.md, "The GRU kernels").
    acc_r = load_gate(gates_x_ptr, rows, units, B, H, 0, 3, CELL_DTYPE)
    acc_z = load_gate(gates_x_ptr, rows, units, B, H, 1, 3, CELL_DTYPE)
    b_hn = tl.load(b_hn_ptr + units, mask=units < H, other=0.0).to(CELL_DTYPE)
    acc_n = tl.zeros_like(acc_r) + b_hn[None, :]
    acc_r, acc_z, acc_n = accumulate_recurrent(acc_r, acc_z, acc_n, h_prev_ptr, w_hh_ptr, rows, units, B, H,
                                               BLOCK_K, DOT_PRECISION)
    gx_n = load_gate(gates_x_ptr, rows, units, B, H, 2, 3, CELL_DTYPE)
    h_prev = load_state(h_state_ptr, rows, units, B, H, CELL_DTYPE)
    finish_forward_tile(acc_r, acc_z, gx_n, acc_n, h_prev, running, h_state_ptr, h_ptr, saved_ptr, rows, units, B, H)


@triton.jit
def cell_backward(grad_h, reset, update, new, hn, h_prev, running):
    """The gradients of the pre-activations of r, z, n (= of gates_x), of hn = W_hn h_{t-1} + b_hn, and
    the direct part of dL/dh_{t-1}, z dh_t; all zero at finished rows, whose h_t is a constant 0."""
    grad_new = grad_h * (1.0 - update) * (1.0 - new * new)
    grad_update = grad_h * (h_prev - new) * update * (1.0 - update)
    grad_hn = grad_new * reset
    grad_reset = grad_new * hn * reset * (1.0 - reset)
    # Selects, not a zeroed grad_h: the saved tiles of finished rows come from the caller's padding and
    # need not be finite.
    return (zero_finished(running, grad_reset), zero_finished(running, grad_update), zero_finished(running, grad_new),
            zero_finished(running, grad_hn), zero_finished(running, grad_h * update))


@triton.jit
def load_saved(saved_ptr, rows, units, B, H, CELL_DTYPE: tl.constexpr):
    """The tile's saved r, z, n and hn of one step, from a (B, 4H) slab, in the cell dtype."""
    return (load_gate(saved_ptr, rows, units, B, H, SAVED_R, 4, CELL_DTYPE),
            load_gate(saved_ptr, rows, units, B, H, SAVED_Z, 4, CELL_DTYPE),
            load_gate(saved_ptr, rows, units, B, H, SAVED_N, 4, CELL_DTYPE),
            load_gate(saved_ptr, rows, units, B, H, SAVED_HN, 4, CELL_DTYPE))


@triton.jit
def finish_backward_tile(
    grad_h,  # (BLOCK_B, BLOCK_H) dL/dh_t: from the output, carried from step t+1, and the recurrent part
    reset, update, new, hn,  # the tile's saved tiles of step t
    h_prev,  # (BLOCK_B, BLOCK_H) h_{t-1}
    running,  # (BLOCK_B,) rows still inside their sequence at step t, or None (all)
    grad_gates_ptr,  # out (B, 3H) dG_t
    grad_hn_ptr,  # out (B, H) the gradient of hn at step t
    rows, units, B, H,
):
    """The step back after the recurrent matmul: stores dG_t and the gradient of hn; returns the tile of
    the direct part of dL/dh_{t-1}, z dh_t (zero at finished rows)."""
    grad_reset, grad_update, grad_new, grad_hn, grad_h_prev = cell_backward(grad_h, reset, update, new, hn, h_prev,
                                                                            running)
    store_gate(grad_gates_ptr, rows, units, B, H, 0, 3, grad_reset)
    store_gate(grad_gates_ptr, rows, units, B, H, 1, 3, grad_update)
    store_gate(grad_gates_ptr, rows, units, B, H, 2, 3, grad_new)
    store_state(grad_hn_ptr, rows, units, B, H, grad_hn)
    return grad_h_prev


@triton.jit
def backward_tile(
    grad_h,  # (BLOCK_B, BLOCK_H) dL/dh_t from the output plus the direct part carried from step t+1
    grad_gates_next_ptr,  # (B, 3H) dG_{t+1}, the gradient of gates_x (zeros after the last step)
    grad_hn_next_ptr,  # (B, H) the gradient of hn at step t+1 (zeros after the last step)
    w_hh_ptr,  # (3H, H)
    saved_ptr,  # (B, 4H) r, z, n, hn of step t
    h_prev_ptr,  # (B, H) h_{t-1}
    running,  # (BLOCK_B,) rows still inside their sequence at step t, or None (all)
    grad_gates_ptr,  # out (B, 3H) dG_t
    grad_hn_ptr,  # out (B, H) the gradient of hn at step t
    rows, units, B, H,
    BLOCK_K: tl.constexpr, CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step back for the tile: dh_t += (dr, dz, dhn)_{t+1} @ W_hh[:, units]; stores dG_t and the
    gradient of hn; returns the tile of the direct part of dL/dh_{t-1}."""
    row_ok = rows < B
    unit_ok = units < H
    # W_hh's r and z rows meet the gradient of their pre-activations (gates_x's), its n rows that of hn.
    for k_start in range(0, 2 * H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < 2 * H
        grad_rz = tl.load(grad_gates_next_ptr + rows[:, None] * (3 * H) + ks[None, :],
                          mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_hh_ptr + ks[:, None] * H + units[None, :], mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
        grad_h = tl.dot(grad_rz, w, grad_h, input_precision=DOT_PRECISION, out_dtype=grad_h.dtype)
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        grad_hn = tl.load(grad_hn_next_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                          other=0.0)
        w = tl.load(w_hh_ptr + (2 * H + ks[:, None]) * H + units[None, :], mask=k_ok[:, None] & unit_ok[None, :],
                    other=0.0)
        grad_h = tl.dot(grad_hn, w, grad_h, input_precision=DOT_PRECISION, out_dtype=grad_h.dtype)
    # Loaded after the loops, as the LSTM's step backward: held through them, they would take registers.
    reset, update, new, hn = load_saved(saved_ptr, rows, units, B, H, CELL_DTYPE)
    h_prev = load_state(h_prev_ptr, rows, units, B, H, CELL_DTYPE)
    return finish_backward_tile(grad_h, reset, update, new, hn, h_prev, running, grad_gates_ptr, grad_hn_ptr, rows,
                                units, B, H)

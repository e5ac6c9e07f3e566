"""Launch-per-step Triton kernels for one LSTM layer's recurrence, and their host launchers.

The input projection x @ W_ih^T + b of every timestep is one large matmul done before the loop
(and dx, dW_ih, dW_hh, the biases after it), so only the sequential part lives here:

  forward step t:  gates = act(gates_x[t] + h_{t-1} @ W_hh^T);  c_t = f*c_{t-1} + i*g;  h_t = o*tanh(c_t)
  backward step t: dh_t = dL/dh_t + dG_{t+1} @ W_hh;  then the gate and cell gradients of step t

Each launch is one fused kernel: the recurrent matmul (tl.dot) feeds the gate nonlinearities and
the cell update without the pre-activations going through memory. One program owns a tile of
BLOCK_B batch rows x BLOCK_H hidden units and all four gates (PyTorch's order i, f, g, o) of those
units, so the cell update stays local and h is exchanged only once per step. See DESIGN.md.
"""

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.cuda_graph import run_in_cuda_graph


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x) - 1 stays finite for any x, unlike (1 - e^-2x) / (1 + e^-2x), but near 0 it loses
    # relative precision to cancellation (errors of 1e-7 on values of 1e-2). In float32, below 0.55
    # the Taylor series (converges for |x| < pi/2; the first dropped term is under 5e-8 relative)
    # is exact to rounding. float64 keeps the plain form: its absolute error is already ~1e-16.
    via_sigmoid = 2.0 * _sigmoid(2.0 * x) - 1.0
    if x.dtype == tl.float64:
        return via_sigmoid
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835 + x2 * (
        -1382.0 / 155925 + x2 * (21844.0 / 6081075 + x2 * (-929569.0 / 638512875))))))))
    return tl.where(tl.abs(x) < 0.55, series, via_sigmoid)


@triton.jit
def lstm_forward_step_kernel(
    gates_x_ptr,  # (B, 4H) input projection plus both biases at step t
    h_prev_ptr,  # (B, H) h_{t-1}
    c_prev_ptr,  # (B, H) c_{t-1}, in the cell dtype
    w_hh_ptr,  # (4H, H) recurrent weights
    h_ptr,  # out (B, H) h_t
    c_ptr,  # out (B, H) c_t
    gates_ptr,  # out (B, 4H) activated gates i, f, g, o, saved for backward
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: rows [pid_b*BLOCK_B, +BLOCK_B) x hidden units [pid_h*BLOCK_H, +BLOCK_H) of step t."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    unit_ok = units < H

    acc_i = tl.zeros((BLOCK_B, BLOCK_H), CELL_DTYPE)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), CELL_DTYPE)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), CELL_DTYPE)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), CELL_DTYPE)
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h_prev = tl.load(h_prev_ptr + rows[:, None] * H + ks[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Tile [k, j] of W_hh^T for gate q is W_hh[q*H + j, k].
        w_ptrs = w_hh_ptr + units[None, :] * H + ks[:, None]
        w_mask = k_ok[:, None] & unit_ok[None, :]
        acc_i = tl.dot(h_prev, tl.load(w_ptrs, mask=w_mask, other=0.0), acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(h_prev, tl.load(w_ptrs + H * H, mask=w_mask, other=0.0), acc_f,
                       input_precision=DOT_PRECISION)
        acc_g = tl.dot(h_prev, tl.load(w_ptrs + 2 * H * H, mask=w_mask, other=0.0), acc_g,
                       input_precision=DOT_PRECISION)
        acc_o = tl.dot(h_prev, tl.load(w_ptrs + 3 * H * H, mask=w_mask, other=0.0), acc_o,
                       input_precision=DOT_PRECISION)

    tile_ok = row_ok[:, None] & unit_ok[None, :]
    gate_offs = rows[:, None] * (4 * H) + units[None, :]
    in_gate = _sigmoid(acc_i + tl.load(gates_x_ptr + gate_offs, mask=tile_ok, other=0.0).to(CELL_DTYPE))
    forget_gate = _sigmoid(acc_f + tl.load(gates_x_ptr + gate_offs + H, mask=tile_ok, other=0.0).to(CELL_DTYPE))
    cell_gate = _tanh(acc_g + tl.load(gates_x_ptr + gate_offs + 2 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE))
    out_gate = _sigmoid(acc_o + tl.load(gates_x_ptr + gate_offs + 3 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE))

    state_offs = rows[:, None] * H + units[None, :]
    c_prev = tl.load(c_prev_ptr + state_offs, mask=tile_ok, other=0.0)
    c = forget_gate * c_prev + in_gate * cell_gate
    h = out_gate * _tanh(c)
    tl.store(c_ptr + state_offs, c, mask=tile_ok)
    tl.store(h_ptr + state_offs, h.to(h_ptr.dtype.element_ty), mask=tile_ok)
    gates_dtype = gates_ptr.dtype.element_ty
    tl.store(gates_ptr + gate_offs, in_gate.to(gates_dtype), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + H, forget_gate.to(gates_dtype), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 2 * H, cell_gate.to(gates_dtype), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 3 * H, out_gate.to(gates_dtype), mask=tile_ok)


@triton.jit
def lstm_backward_step_kernel(
    grad_h_ptr,  # (B, H) dL/dh_t from the layer's output (h_n's gradient included)
    grad_gates_next_ptr,  # (B, 4H) dG_{t+1}, read only when HAS_NEXT
    w_hh_ptr,  # (4H, H)
    gates_ptr,  # (B, 4H) activated gates of step t
    c_ptr,  # (B, H) c_t
    c_prev_ptr,  # (B, H) c_{t-1}
    grad_c_ptr,  # in: dL/dc_t from step t+1; out: dL/dc_{t-1}. Each program reads then writes its own tile.
    grad_gates_ptr,  # out (B, 4H) dG_t, gradient of the gate pre-activations
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_NEXT: tl.constexpr,
):
    """One program: the gradients of one (BLOCK_B x BLOCK_H) tile of step t, all four gates."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    unit_ok = units < H
    tile_ok = row_ok[:, None] & unit_ok[None, :]
    state_offs = rows[:, None] * H + units[None, :]
    gate_offs = rows[:, None] * (4 * H) + units[None, :]

    grad_h = tl.load(grad_h_ptr + state_offs, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    if HAS_NEXT:
        # dh_t += dG_{t+1} @ W_hh, over all 4H gate rows.
        for k_start in range(0, 4 * H, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < 4 * H
            grad_gates_next = tl.load(grad_gates_next_ptr + rows[:, None] * (4 * H) + ks[None, :],
                                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_hh_ptr + ks[:, None] * H + units[None, :], mask=k_ok[:, None] & unit_ok[None, :],
                        other=0.0)
            grad_h = tl.dot(grad_gates_next, w, grad_h, input_precision=DOT_PRECISION)

    in_gate = tl.load(gates_ptr + gate_offs, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    forget_gate = tl.load(gates_ptr + gate_offs + H, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    cell_gate = tl.load(gates_ptr + gate_offs + 2 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    out_gate = tl.load(gates_ptr + gate_offs + 3 * H, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    c = tl.load(c_ptr + state_offs, mask=tile_ok, other=0.0)
    c_prev = tl.load(c_prev_ptr + state_offs, mask=tile_ok, other=0.0)

    tanh_c = _tanh(c)
    grad_c = tl.load(grad_c_ptr + state_offs, mask=tile_ok, other=0.0) + grad_h * out_gate * (1.0 - tanh_c * tanh_c)
    grad_in = grad_c * cell_gate * in_gate * (1.0 - in_gate)
    grad_forget = grad_c * c_prev * forget_gate * (1.0 - forget_gate)
    grad_cell = grad_c * in_gate * (1.0 - cell_gate * cell_gate)
    grad_out = grad_h * tanh_c * out_gate * (1.0 - out_gate)

    tl.store(grad_c_ptr + state_offs, grad_c * forget_gate, mask=tile_ok)
    grad_dtype = grad_gates_ptr.dtype.element_ty
    tl.store(grad_gates_ptr + gate_offs, grad_in.to(grad_dtype), mask=tile_ok)
    tl.store(grad_gates_ptr + gate_offs + H, grad_forget.to(grad_dtype), mask=tile_ok)
    tl.store(grad_gates_ptr + gate_offs + 2 * H, grad_cell.to(grad_dtype), mask=tile_ok)
    tl.store(grad_gates_ptr + gate_offs + 3 * H, grad_out.to(grad_dtype), mask=tile_ok)


# ----------------------------------------------------------------------------- host launchers

def cell_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cell state and accumulators stay float32 for half inputs (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch_config(batch, hidden, dtype, on_gpu):
    # tl.dot needs tiles of at least 16 on a GPU; powers of two everywhere. On a GPU, 32 hidden units
    # per program spread H=1024 over 32 programs per batch tile; under the interpreter every program
    # costs a Python loop, so fewer, larger tiles.
    block_b = min(64, max(16, triton.next_power_of_2(batch)))
    block_h = min(32 if on_gpu else 64, max(16, triton.next_power_of_2(hidden)))
    block_k = min(64, max(16, triton.next_power_of_2(hidden)))
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))
    # float32 follows PyTorch's matmul precision flag (IEEE unless TF32 is allowed); half inputs use
    # the tensor cores' native precision.
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
                CELL_DTYPE=_TL_DTYPE[cell_dtype(dtype)], DOT_PRECISION=precision)
    return grid, meta


def _forward_loop(gates_x, h0, c0, w_hh, output, cells, gates):
    steps, batch, hidden = output.shape
    grid, meta = _launch_config(batch, hidden, gates_x.dtype, gates_x.is_cuda)
    for t in range(steps):
        lstm_forward_step_kernel[grid](
            gates_x[t], h0 if t == 0 else output[t - 1], c0 if t == 0 else cells[t - 1], w_hh,
            output[t], cells[t], gates[t], batch, hidden, **meta)


def _backward_loop(grad_output, gates, cells, c0, w_hh, grad_c_last, grad_c, grad_gates):
    steps, batch, hidden = grad_output.shape
    grid, meta = _launch_config(batch, hidden, gates.dtype, gates.is_cuda)
    grad_c.copy_(grad_c_last)  # then updated in place, step by step, down to dL/dc_0
    for t in reversed(range(steps)):
        has_next = t < steps - 1
        lstm_backward_step_kernel[grid](
            grad_output[t], grad_gates[t + 1] if has_next else grad_gates[t], w_hh, gates[t], cells[t],
            c0 if t == 0 else cells[t - 1], grad_c, grad_gates[t], batch, hidden, HAS_NEXT=has_next, **meta)


def _run(loop, inputs, outputs):
    # On CUDA the T launches of a sequence are replayed from a CUDA graph: launch overhead would
    # otherwise dominate the small per-step kernels. A single step gains nothing from a graph.
    if inputs[0].is_cuda and inputs[0].size(0) > 1:
        run_in_cuda_graph(loop, inputs, outputs)
    else:
        loop(*inputs, *outputs)


def lstm_forward(gates_x, h0, c0, w_hh):
    """Runs the recurrence of one layer over a sequence.

    gates_x (T, B, 4H): x_t @ W_ih^T + b_ih + b_hh for every step; h0 (B, H); c0 (B, H) in the cell
    dtype; w_hh (4H, H). Returns output (T, B, H) (the h_t), cells (T, B, H) (the c_t, cell dtype) and
    gates (T, B, 4H) (activated i, f, g, o), the last two saved for backward."""
    steps, batch, four_hidden = gates_x.shape
    hidden = four_hidden // 4
    gates_x, h0, c0, w_hh = (t.contiguous() for t in (gates_x, h0, c0, w_hh))
    output = gates_x.new_empty(steps, batch, hidden)
    cells = gates_x.new_empty(steps, batch, hidden, dtype=cell_dtype(gates_x.dtype))
    gates = torch.empty_like(gates_x)
    _run(_forward_loop, [gates_x, h0, c0, w_hh], [output, cells, gates])
    return output, cells, gates


def lstm_backward(grad_output, grad_c_last, gates, cells, c0, w_hh):
    """Backward of `lstm_forward` through the recurrence.

    grad_output (T, B, H): dL/dh_t for every step; grad_c_last (B, H): dL/dc_T. Returns grad_gates
    (T, B, 4H), the gradient of the gate pre-activations (= of gates_x), and dL/dc_0. The matmuls
    that need all steps (dW_hh, dh_0, and everything through gates_x) are left to the caller."""
    grad_output, gates, cells, c0, w_hh = (t.contiguous() for t in (grad_output, gates, cells, c0, w_hh))
    grad_c_last = grad_c_last.to(cells.dtype).contiguous()
    grad_c = torch.empty_like(grad_c_last)
    grad_gates = torch.empty_like(gates)
    _run(_backward_loop, [grad_output, gates, cells, c0, w_hh, grad_c_last], [grad_c, grad_gates])
    return grad_gates, grad_c

"""Device functions every cell's kernels share: the activations, a tile's indices, offsets and masks,
the loads and stores of (B, H) state tiles, and the grid-wide barrier of the kernels that loop over
steps (or layers) in one launch. A tile is BLOCK_B batch rows x BLOCK_H hidden units; every pointer
points at one timestep's slab.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # 2*sigmoid(2x) - 1 stays finite for any x, unlike (1 - e^-2x) / (1 + e^-2x), but near 0 it loses
    # relative precision to cancellation (errors of 1e-7 on values of 1e-2). In float32, below 0.55
    # the Taylor series (converges for |x| < pi/2; the first dropped term is under 5e-8 relative)
    # is exact to rounding. float64 keeps the plain form: its absolute error is already ~1e-16.
    result = 2.0 * sigmoid(2.0 * x) - 1.0
    if x.dtype != tl.float64:  # decided at compile time
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835 + x2 * (
            -1382.0 / 155925 + x2 * (21844.0 / 6081075 + x2 * (-929569.0 / 638512875))))))))
        result = tl.where(tl.abs(x) < 0.55, series, result)
    return result


@triton.jit
def tile_range(tile, BLOCK: tl.constexpr):
    """The BLOCK indices of tile number `tile` along one axis: rows of a batch tile, units of a hidden tile."""
    return tile * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def tile_offsets(rows, cols, num_rows, num_cols, row_stride):
    """The offsets of tile [rows, cols] in a row-major slab whose rows are row_stride apart, and the
    mask of its in-range elements (row < num_rows, col < num_cols)."""
    in_range = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    return rows[:, None] * row_stride + cols[None, :], in_range


@triton.jit
def tile_indices(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's tile (grid: batch tiles x hidden tiles): its batch rows, hidden units, the mask
    of the tile's in-range elements and their offsets in a (B, H) slab."""
    rows = tile_range(tl.program_id(0), BLOCK_B)
    units = tile_range(tl.program_id(1), BLOCK_H)
    state_offs, tile_ok = tile_offsets(rows, units, B, H, H)
    return rows, units, tile_ok, state_offs


@triton.jit
def load_state(ptr, rows, units, B, H, CELL_DTYPE: tl.constexpr):
    """The (BLOCK_B, BLOCK_H) tile of a (B, H) slab, in the cell dtype."""
    _, tile_ok = tile_offsets(rows, units, B, H, H)
    # Row pointers plus units, not tile_offsets' one offset: the two compile to different registers,
    # and the kernels' figures are those of this form (DESIGN.md, "Tile helpers").
    return tl.load(ptr + rows[:, None] * H + units[None, :], mask=tile_ok, other=0.0).to(CELL_DTYPE)


@triton.jit
def store_state(ptr, rows, units, B, H, tile):
    """Stores a (BLOCK_B, BLOCK_H) tile into a (B, H) slab, in the slab's dtype."""
    offs, tile_ok = tile_offsets(rows, units, B, H, H)
    tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def running_rows(lengths_ptr, rows, B, t):
    """(BLOCK_B,) which of the tile's rows are still inside their sequence at step t (t < length), for a
    batch of variable lengths; every row when lengths_ptr is None (all run all T steps). Launched with None,
    a kernel gets a constant all-true mask, and the compiler folds every select on it away: the
    fixed-length code is unchanged. (Not None itself: Triton 3.6, the GPU image's, cannot pass a None
    returned by one jit function on to another.)"""
    if lengths_ptr is None:
        return tl.full(rows.shape, True, tl.int1)
    else:
        return t < tl.load(lengths_ptr + rows, mask=rows < B, other=0)


@triton.jit
def direction_offset(slab_numel):
    """The offset of this program's direction (grid axis 2: 0 forward, 1 reverse) in a tensor that holds
    one slab of slab_numel elements per direction, direction-major."""
    return tl.program_id(2) * slab_numel


@triton.jit
def load_gate(ptr, rows, units, B, H, gate, NUM_GATES: tl.constexpr, CELL_DTYPE: tl.constexpr):
    """The (BLOCK_B, BLOCK_H) tile of one gate of the tile's units from a (B, NUM_GATES * H) slab, whose
    column q*H + j holds gate q of unit j (PyTorch's layout), in the cell dtype."""
    offs, tile_ok = tile_offsets(rows, units, B, H, NUM_GATES * H)
    return tl.load(ptr + offs + gate * H, mask=tile_ok, other=0.0).to(CELL_DTYPE)


@triton.jit
def store_gate(ptr, rows, units, B, H, gate, NUM_GATES: tl.constexpr, tile):
    """Stores the (BLOCK_B, BLOCK_H) tile of one gate into a (B, NUM_GATES * H) slab, in the slab's dtype."""
    offs, tile_ok = tile_offsets(rows, units, B, H, NUM_GATES * H)
    tl.store(ptr + offs + gate * H, tile.to(ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def zero_finished(running, tile):
    """tile with the rows whose sequence has ended set to zero; running is `running_rows`'s (BLOCK_B,)
    mask, or None (every row runs): then the tile itself, with no select compiled."""
    if running is None:
        return tile
    else:
        return tl.where(running[:, None], tile, 0.0)


# The grid barrier in inline PTX: Triton's scalar atomics run in one thread, their result broadcast through
# shared memory between two block-wide barriers, on every poll (and Triton 3.6 has no atomic load).
# Thread 0 arrives: a release add at gpu scope (as tl.atomic_add's, without the bar.sync Triton 3.9 adds
# before it; the asm's result is a placeholder, inline_asm_elementwise needs one). Braces scope the names.
ARRIVE_PTX = tl.constexpr("""{
    .reg .pred %first;
    .reg .b32 %thread;
    mov.u32 %thread, %tid.x;
    setp.eq.u32 %first, %thread, 0;
    @%first red.release.gpu.global.add.u32 [$1], 1;
    mov.u32 $0, 0;
}""")
# Every thread polls on its own: each one's acquire orders its own later loads of h.
POLL_PTX = tl.constexpr("ld.acquire.gpu.global.b32 $0, [$1];")


@triton.jit
def grid_barrier(counter_ptr, target):
    """Wait until all programs have arrived: the counter reaches `target` = steps so far x programs.
    The block-wide barrier first orders every warp's stores before thread 0's release arrival (the
    release is cumulative over what the barrier made visible to thread 0); without it, a warp could
    arrive while another still stored its part of h_t. Then every thread spins on its acquire load: no
    block-wide barrier per poll (DESIGN.md, "The grid barrier")."""
    tl.debug_barrier()
    tl.inline_asm_elementwise(ARRIVE_PTX, "=r,l", [counter_ptr], dtype=tl.int32, is_pure=False, pack=1)
    while tl.inline_asm_elementwise(POLL_PTX, "=r,l", [counter_ptr], dtype=tl.int32, is_pure=False, pack=1) < target:
        pass


@triton.jit
def barrier_after_step(counter_ptr, step, T, num_programs):
    """A persistent kernel's grid barrier after step `step` (0-based, in loop order) of T: none after the
    last, as no program reads another's tile after it, and none in a one-program grid, which has no one
    to wait for (the interpreter's: it cannot run inline PTX)."""
    if (step + 1 < T) & (num_programs > 1):
        grid_barrier(counter_ptr, (step + 1) * num_programs)


@triton.jit
def load_gate_rows(w_ptr, H, GATES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """A persistent forward's W_hh slice: the rows of this program's hidden tile (grid axis 1) of every
    gate of a (GATES * H, H) matrix, as a (4 * BLOCK_H, BLOCK_K) tile whose row 4j + q is row q * H + unit j,
    zero for q >= GATES. So one tl.dot computes every gate of the tile (`gate_preactivations`), with the
    4 BLOCK_H rows (at least 64) as its M dimension (DESIGN.md, "The persistent path").
    Four rows a unit for the GRU's three gates too: a Triton tensor's dimensions are powers of two."""
    tl.static_assert(GATES == 3 or GATES == 4)
    ks = tl.arange(0, BLOCK_K)
    slice_rows = tl.arange(0, 4 * BLOCK_H)
    row_units = tl.program_id(1) * BLOCK_H + slice_rows // 4
    if GATES == 4:  # decided at compile time; a mask of every row (below) changed the LSTM's compiled code
        return tl.load(w_ptr + ((slice_rows % 4) * H + row_units)[:, None] * H + ks[None, :],
                       mask=(row_units < H)[:, None] & (ks < H)[None, :], other=0.0)
    else:
        return tl.load(w_ptr + ((slice_rows % 4) * H + row_units)[:, None] * H + ks[None, :],
                       mask=((row_units < H) & (slice_rows % 4 < GATES))[:, None] & (ks < H)[None, :], other=0.0)


@triton.jit
def gate_preactivations(w, h_prev, CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h_prev (BLOCK_B, BLOCK_K) @ w^T for `load_gate_rows`' w: the (BLOCK_B, 4 BLOCK_H) recurrent terms,
    column 4j + q gate q of unit j. Computed as w @ h_prev^T, its transpose: with the slice's 4 BLOCK_H rows
    as M (BLOCK_B is under 64), Hopper gets wgmma, which reads w from shared memory itself, where
    h_prev @ w^T got mma.sync, fed by ldmatrix (DESIGN.md, "The persistent path"). The transpose back
    is a layout conversion through shared memory: a thread's accumulator holds two rows of the 64, never
    a unit's four gates, which the cell update needs together."""
    return tl.trans(tl.dot(w, tl.trans(h_prev), input_precision=DOT_PRECISION, out_dtype=CELL_DTYPE))


@triton.jit
def split_gates(acc, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_B, 4 BLOCK_H) pre-activations whose column 4j + q holds gate q of unit j (`gate_preactivations`) ->
    the four (BLOCK_B, BLOCK_H) gate tiles, q = 0..3. tl.split halves the last axis: q = 2 q_hi + q_lo."""
    q_lo_0, q_lo_1 = tl.split(tl.reshape(acc, (BLOCK_B, BLOCK_H, 2, 2)))
    gate_0, gate_2 = tl.split(q_lo_0)
    gate_1, gate_3 = tl.split(q_lo_1)
    return gate_0, gate_1, gate_2, gate_3


@triton.jit
def load_gate_columns(w_ptr, units, H, GATES: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """A persistent backward's W_hh slice: the columns `units` of each gate's (H, H) block of rows of a
    (GATES * H, H) matrix, one (K_SPLIT, BLOCK_K // K_SPLIT, BLOCK_H) tile per gate, the sum over k cut
    in K_SPLIT pieces, the batch axis of a 3-D tl.dot, which Triton lays across the warps."""
    tl.static_assert(GATES == 3 or GATES == 4)
    ks = tl.arange(0, K_SPLIT)[:, None, None] * (BLOCK_K // K_SPLIT) + tl.arange(0, BLOCK_K // K_SPLIT)[None, :, None]
    # Pointers plus each gate's offset, not the offsets summed first: that compiled the LSTM's backward to
    # other registers and spills.
    ptrs = w_ptr + ks * H + units[None, None, :]
    mask = (ks < H) & (units < H)[None, None, :]
    gate_0 = tl.load(ptrs, mask=mask, other=0.0)
    gate_1 = tl.load(ptrs + H * H, mask=mask, other=0.0)
    gate_2 = tl.load(ptrs + 2 * H * H, mask=mask, other=0.0)
    if GATES == 4:
        return gate_0, gate_1, gate_2, tl.load(ptrs + 3 * H * H, mask=mask, other=0.0)
    else:
        return gate_0, gate_1, gate_2


@triton.jit
def gradient_pieces(rows, B, H, row_stride, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """Offsets and mask of the other operand (K_SPLIT, BLOCK_B, BLOCK_K // K_SPLIT) of `load_gate_columns`'
    dots: the first H columns of the tile's rows in a slab whose rows are row_stride apart, cut alike."""
    ks = tl.arange(0, K_SPLIT)[:, None, None] * (BLOCK_K // K_SPLIT) + tl.arange(0, BLOCK_K // K_SPLIT)[None, None, :]
    return rows[None, :, None] * row_stride + ks, (rows < B)[None, :, None] & (ks < H)

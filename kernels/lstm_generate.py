"""The fused generation step: one launch advances a whole multi-layer LSTM language model by one
token for B streams and picks each stream's next token.

Per layer l: gates = x_l W_ih_l^T + h_l W_hh_l^T + b_ih_l + b_hh_l (x_0 = embedding[ids], x_l = the
new h of layer l-1), then the cell update; then logits = h_top W_head^T + b_head and the next token
of every row: greedy where the row's temperature is 0 (the argmax, ties to the lowest id as
torch.argmax), else a draw from softmax(logits / T) by the Gumbel-max trick: argmax(logits / T + G),
G = -log(-log U), U uniform from Philox keyed by the row's seed and counting step * V + token, so
every step draws fresh noise. Gumbel-max needs no softmax and no normalisation: like greedy, it is an
argmax, which reduces across vocabulary tiles. Top-k / top-p are not fused: take the logits and
`nanochat_fast.generation.sample_next` for them.

Phases, separated by a grid-wide barrier (`tiles.grid_barrier`, safe because the grid is
never larger than the SM count, so every program is resident): layer 0, ..., layer L-1, where the
programs share out (batch tile, hidden tile) items, all four gates of a unit in one program as in
`lstm_cell.py`; the head, (batch tile, vocabulary tile) items, each writing its logits and the best
(score, token) of each row in the tile; then one program per batch tile reduces the tiles' bests.
Programs take items in a grid-stride loop, so any grid is correct: under the interpreter (programs
run one after another) the grid is one program that does everything in order.
"""

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.lstm_cell import accumulate_gates, cell_update
from nanochat_fast.kernels.launch import cell_dtype, pow2_block, tile_meta
from nanochat_fast.kernels.tiles import grid_barrier, tile_range


@triton.jit
def layer_tile(
    layer, rows, units, ids_ptr, embedding_ptr, weights_ptr, bias_ptr, h_prev_ptr, c_prev_ptr, h_ptr, c_ptr,
    B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_B x BLOCK_H) tile of one layer: both matmuls, the bias, the cell update; stores h, c."""
    row_ok = rows < B
    unit_ok = units < H
    if layer == 0:
        x_row_ptrs = embedding_ptr + tl.load(ids_ptr + rows, mask=row_ok, other=0) * H
    else:  # the layer below, written by every program before the last barrier
        x_row_ptrs = h_ptr + (layer - 1) * B * H + rows * H
    w_ptr = weights_ptr + layer * (4 * H) * (2 * H)  # [W_ih | W_hh]: row q*H + j is 2H wide
    zeros = tl.zeros((BLOCK_B, BLOCK_H), CELL_DTYPE)
    acc_i, acc_f, acc_g, acc_o = accumulate_gates(zeros, zeros, zeros, zeros, x_row_ptrs, row_ok, w_ptr, 2 * H,
                                                  units, unit_ok, H, H, BLOCK_K, DOT_PRECISION)
    # The layer's rows of the (L, B, H) state, shared by the h_prev reads and the state tiles (the (B, H)
    # slab helpers of lstm_cell.py plus a layer offset compile to more registers: DESIGN.md).
    row_offs = layer * B * H + rows * H
    acc_i, acc_f, acc_g, acc_o = accumulate_gates(acc_i, acc_f, acc_g, acc_o, h_prev_ptr + row_offs, row_ok,
                                                  w_ptr + H, 2 * H, units, unit_ok, H, H, BLOCK_K, DOT_PRECISION)
    bias_ptrs = bias_ptr + layer * 4 * H + units
    tile_ok = row_ok[:, None] & unit_ok[None, :]
    state_offs = row_offs[:, None] + units[None, :]
    c_prev = tl.load(c_prev_ptr + state_offs, mask=tile_ok, other=0.0).to(CELL_DTYPE)
    _, _, _, _, c, h = cell_update(
        acc_i + tl.load(bias_ptrs, mask=unit_ok, other=0.0).to(CELL_DTYPE)[None, :],
        acc_f + tl.load(bias_ptrs + H, mask=unit_ok, other=0.0).to(CELL_DTYPE)[None, :],
        acc_g + tl.load(bias_ptrs + 2 * H, mask=unit_ok, other=0.0).to(CELL_DTYPE)[None, :],
        acc_o + tl.load(bias_ptrs + 3 * H, mask=unit_ok, other=0.0).to(CELL_DTYPE)[None, :],
        c_prev)
    tl.store(c_ptr + state_offs, c.to(c_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(h_ptr + state_offs, h.to(h_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def head_tile(
    vocab_tile, rows, h_top_ptr, head_weight_ptr, head_bias_ptr, temperature_ptr, seeds_ptr, noise_offset,
    logits_ptr, best_score_ptr, best_token_ptr, B, H, V,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_B x BLOCK_V) tile of the logits; stores them and each row's best (score, token) here."""
    tokens = tile_range(vocab_tile, BLOCK_V)
    row_ok = rows < B
    token_ok = tokens < V
    acc = tl.zeros((BLOCK_B, BLOCK_V), CELL_DTYPE)
    for k_start in range(0, H, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h_top = tl.load(h_top_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0, cache_modifier=".cg")  # written by other programs before the barrier
        w = tl.load(head_weight_ptr + tokens[None, :] * H + ks[:, None], mask=k_ok[:, None] & token_ok[None, :],
                    other=0.0)
        acc = tl.dot(h_top, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    logits = acc + tl.load(head_bias_ptr + tokens, mask=token_ok, other=0.0).to(CELL_DTYPE)[None, :]
    logits = logits.to(logits_ptr.dtype.element_ty)
    tile_ok = row_ok[:, None] & token_ok[None, :]
    tl.store(logits_ptr + rows[:, None] * V + tokens[None, :], logits, mask=tile_ok)

    # Scores from the stored (rounded) logits, so greedy is exactly the argmax of the returned logits.
    score = logits.to(CELL_DTYPE)
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=0.0)
    sampled = temperature > 0
    seeds = tl.broadcast_to(tl.load(seeds_ptr + rows, mask=row_ok, other=0)[:, None], (BLOCK_B, BLOCK_V))
    counters = tl.broadcast_to(noise_offset + tokens.to(tl.int64)[None, :], (BLOCK_B, BLOCK_V))
    gumbel = -tl.log(-tl.log(tl.rand(seeds, counters)))  # U = 0 gives -inf: that token is never drawn
    scaled = score / tl.where(sampled, temperature, 1.0).to(CELL_DTYPE)[:, None] + gumbel.to(CELL_DTYPE)
    score = tl.where(sampled[:, None], scaled, score)
    score = tl.where(token_ok[None, :], score, float("-inf"))
    num_vocab_tiles = tl.cdiv(V, BLOCK_V)
    tl.store(best_score_ptr + rows * num_vocab_tiles + vocab_tile, tl.max(score, axis=1), mask=row_ok)
    best_token = vocab_tile * BLOCK_V + tl.argmax(score, axis=1, tie_break_left=True)
    tl.store(best_token_ptr + rows * num_vocab_tiles + vocab_tile, best_token, mask=row_ok)


@triton.jit
def pick_tokens(rows, best_score_ptr, best_token_ptr, next_ids_ptr, B, V,
                BLOCK_V: tl.constexpr, VOCAB_TILES: tl.constexpr):
    """Each row's next token: the best of its vocabulary tiles' bests (ties to the lowest tile, hence id)."""
    num_vocab_tiles = tl.cdiv(V, BLOCK_V)
    vocab_tiles = tl.arange(0, VOCAB_TILES)
    row_ok = rows < B
    offs = rows[:, None] * num_vocab_tiles + vocab_tiles[None, :]
    scores = tl.load(best_score_ptr + offs, mask=row_ok[:, None] & (vocab_tiles < num_vocab_tiles)[None, :],
                     other=float("-inf"), cache_modifier=".cg")
    best_tile = tl.argmax(scores, axis=1, tie_break_left=True)
    token = tl.load(best_token_ptr + rows * num_vocab_tiles + best_tile, mask=row_ok, other=0, cache_modifier=".cg")
    tl.store(next_ids_ptr + rows, token.to(tl.int64), mask=row_ok)


@triton.jit
def lstm_generation_step_kernel(
    ids_ptr,  # (B,) int64 token ids read at this step
    embedding_ptr,  # (V, H)
    weights_ptr,  # (L, 4H, 2H): per layer [W_ih | W_hh]
    bias_ptr,  # (L, 4H): b_ih + b_hh
    h_prev_ptr, c_prev_ptr,  # (L, B, H) the state before the step; c in the cell dtype
    head_weight_ptr, head_bias_ptr,  # (V, H), (V,)
    temperature_ptr,  # (B,) float32, 0 = greedy
    seeds_ptr,  # (B,) int64
    h_ptr, c_ptr,  # out (L, B, H) the state after the step
    logits_ptr,  # out (B, V)
    best_score_ptr, best_token_ptr,  # scratch (B, cdiv(V, BLOCK_V)): cell dtype, int32
    next_ids_ptr,  # out (B,) int64
    counter_ptr,  # int32, zero at launch
    noise_offset,  # step * V: this step's first Philox counter
    B, H, V, L,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    VOCAB_TILES: tl.constexpr,  # a power of two >= cdiv(V, BLOCK_V)
    CELL_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: its share of every phase's items (grid-stride), with a grid barrier after each phase."""
    program = tl.program_id(0)
    num_programs = tl.num_programs(0)
    batch_tiles = tl.cdiv(B, BLOCK_B)
    hidden_tiles = tl.cdiv(H, BLOCK_H)
    vocab_tiles = tl.cdiv(V, BLOCK_V)
    for layer in range(L):
        for item in range(program, batch_tiles * hidden_tiles, num_programs):
            rows = tile_range(item // hidden_tiles, BLOCK_B)
            units = tile_range(item % hidden_tiles, BLOCK_H)
            layer_tile(layer, rows, units, ids_ptr, embedding_ptr, weights_ptr, bias_ptr, h_prev_ptr, c_prev_ptr,
                       h_ptr, c_ptr, B, H, BLOCK_B, BLOCK_H, BLOCK_K, CELL_DTYPE, DOT_PRECISION)
        grid_barrier(counter_ptr, (layer + 1) * num_programs)
    for item in range(program, batch_tiles * vocab_tiles, num_programs):
        rows = tile_range(item // vocab_tiles, BLOCK_B)
        head_tile(item % vocab_tiles, rows, h_ptr + (L - 1) * B * H, head_weight_ptr, head_bias_ptr, temperature_ptr,
                  seeds_ptr, noise_offset, logits_ptr, best_score_ptr, best_token_ptr, B, H, V,
                  BLOCK_B, BLOCK_V, BLOCK_K, CELL_DTYPE, DOT_PRECISION)
    grid_barrier(counter_ptr, (L + 1) * num_programs)
    for batch_tile in range(program, batch_tiles, num_programs):
        rows = tile_range(batch_tile, BLOCK_B)
        pick_tokens(rows, best_score_ptr, best_token_ptr, next_ids_ptr, B, V, BLOCK_V, VOCAB_TILES)


def launch_config(batch, hidden, vocab, dtype, device):
    """(grid, meta) for this shape. GPU: the smallest hidden tiles whose items still fit one per SM (the
    most parallel reads of the weights), and never more programs than SMs. Interpreter: one program,
    with small tiles so that its loops go over several hidden and vocabulary tiles as GPU programs do."""
    block_b, block_k, block_v = pow2_block(batch, high=64), pow2_block(hidden, high=64), 16
    batch_tiles = triton.cdiv(batch, block_b)
    if device.type == "cuda":
        max_programs = torch.cuda.get_device_properties(device).multi_processor_count
        block_h = next((size for size in (16, 32, 64) if batch_tiles * triton.cdiv(hidden, size) <= max_programs), 64)
        programs = min(max_programs, batch_tiles * max(triton.cdiv(hidden, block_h), triton.cdiv(vocab, block_v)))
    else:
        block_h, programs = 16, 1
    meta = tile_meta(dtype, block_b, block_h, block_k)
    meta.update(BLOCK_V=block_v, VOCAB_TILES=triton.next_power_of_2(triton.cdiv(vocab, block_v)))
    return (programs,), meta


def generation_step(ids, h, c, embedding, weights, bias, head_weight, head_bias, temperature, seeds, step):
    """One token for each of B streams through the whole model, in one launch.

    ids (B,) int64; h, c (L, B, H) the state (c in any float dtype); embedding (V, H); weights
    (L, 4H, 2H), [W_ih | W_hh] per layer, and bias (L, 4H), b_ih + b_hh per layer (an LSTM's
    `step_weights().stacked`); head_weight (V, H); head_bias (V,); temperature (B,), 0 = greedy (not
    checked for negatives: that would cost a device sync); seeds (B,) int64; step: the caller's step
    counter (the noise of (seed, step) is the same on every call). Returns next_ids (B,) int64, logits
    (B, V) and (h, c) after the step, c in the cell dtype (float32 for half models)."""
    num_layers, batch, hidden = h.shape
    vocab = head_weight.size(0)
    if embedding.size(1) != hidden or weights.shape != (num_layers, 4 * hidden, 2 * hidden):
        raise ValueError(f"generation_step: embedding {tuple(embedding.shape)} and weights {tuple(weights.shape)} "
                         f"do not fit {num_layers} layers of hidden size {hidden} (input size must equal hidden)")
    h = h.to(embedding.dtype)  # the kernel reads x and h through one pointer type
    grid, meta = launch_config(batch, hidden, vocab, embedding.dtype, h.device)
    state_dtype = cell_dtype(h.dtype)
    h_new = torch.empty_like(h)
    c_new = torch.empty(h.shape, dtype=state_dtype, device=h.device)
    logits = h.new_empty(batch, vocab)
    vocab_tiles = triton.cdiv(vocab, meta["BLOCK_V"])
    best_score = torch.empty(batch, vocab_tiles, dtype=state_dtype, device=h.device)
    best_token = torch.empty(batch, vocab_tiles, dtype=torch.int32, device=h.device)
    next_ids = torch.empty(batch, dtype=torch.int64, device=h.device)
    counter = torch.zeros(1, dtype=torch.int32, device=h.device)
    lstm_generation_step_kernel[grid](
        ids.to(torch.int64).contiguous(), embedding.contiguous(), weights.contiguous(), bias.contiguous(),
        h.contiguous(), c.to(state_dtype).contiguous(), head_weight.contiguous(), head_bias.contiguous(),
        temperature.to(torch.float32).contiguous(), seeds.to(torch.int64).contiguous(), h_new, c_new, logits,
        best_score, best_token, next_ids, counter, step * vocab, batch, hidden, vocab, num_layers, **meta)
    return next_ids, logits, (h_new, c_new)

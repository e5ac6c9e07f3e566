"""Host-side pieces every cell's recurrence shares: the cell dtype, the path (per step or persistent) and
its tiles and meta-parameters, and the launch itself (CUDA-graph replay of a step loop on CUDA).

A cell enters by its gate count (4 for the LSTM, 3 for the GRU): a program owns every gate of its
units, so a persistent program's W_hh slice is the rows of its units' gates (forward) or its units'
columns of every gate's rows (backward).
"""

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.cuda_graph import run_in_cuda_graph

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

PATHS = ("auto", "step", "persistent")
PATH_ENV_VAR = "NANOCHAT_LSTM_PATH"  # the LSTM's and the GRU's
# (gates, batch, hidden, dtype) where the persistent path passed the GPU tests on a real GPU, recorded in
# bench/RESULTS.md; gates names the cell (4 the LSTM, 3 the GRU). Until then "auto" always takes the
# launch-per-step path.
PERSISTENT_VALIDATED_SHAPES = frozenset()

# Shared memory the compiler may take beyond the two dot operands of a persistent kernel (layout
# conversions, the sum of the backward's K pieces; what the compiled kernels take: DESIGN.md).
PERSISTENT_SHARED_SPARE = 8 * 1024


def cell_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cell state and accumulators stay float32 for half inputs (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LaunchConfig:
    """A launch: the path ("step" or "persistent"), the grid and the kernels' meta-parameters."""
    path: str
    grid: tuple
    meta: dict


def cudnn_rnn_uses_tf32():
    """Whether cuDNN's RNN, what nn.LSTM runs on CUDA, computes float32 on TF32 tensor cores (by default it
    does). torch >= 2.9 sets it per operator: `cudnn.rnn.fp32_precision` (after `cudnn.allow_tf32 = False`
    it reads "none"); `cudnn.allow_tf32`, the older torch's flag, raises there once the conv and RNN
    settings differ, so it is read only where the per-operator flag does not exist."""
    rnn = torch.backends.cudnn.rnn
    if hasattr(rnn, "fp32_precision"):
        return rnn.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32


def dot_precision(dtype):
    """tl.dot's input_precision for inputs of `dtype`. float32 runs at nn.LSTM's own precision: TF32 when
    cuDNN's RNN would use it; when TF32 is off, where nn.LSTM runs IEEE FMA, "tf32x3" (three TF32 products
    a multiply-add, about float32's accuracy, still on tensor cores: Triton lowers "ieee" to FMAs, several
    times slower). float64 has no tensor-core path: "ieee". Half inputs ignore it (the same code either way)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if cudnn_rnn_uses_tf32() else "tf32x3"


def tile_meta(dtype, block_b, block_h, block_k):
    # Half inputs use the tensor cores' native precision and float32 accumulation.
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, CELL_DTYPE=_TL_DTYPE[cell_dtype(dtype)],
                DOT_PRECISION=dot_precision(dtype))


def pow2_block(n, high=None):
    # Powers of two, and at least 16: tl.dot's smallest tile on a GPU.
    size = max(16, triton.next_power_of_2(n))
    return size if high is None else min(size, high)


def step_config(batch, hidden, dtype, on_gpu, directions=1):
    """The step path's tiles; grid: batch tiles x hidden tiles x directions (a bidirectional layer runs
    both directions in the same launches)."""
    # GPU: 32 hidden units per program spread H=1024 over 32 programs per batch tile. Interpreter:
    # every program is a Python loop, so fewer, larger tiles.
    block_b, block_k = pow2_block(batch, high=64), pow2_block(hidden, high=64)
    block_h = pow2_block(hidden, high=32 if on_gpu else 64)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h), directions)
    return LaunchConfig("step", grid, tile_meta(dtype, block_b, block_h, block_k))


def persistent_meta(dtype, block_b, block_h, hidden, num_warps=8):
    """The persistent kernels' meta-parameters: BLOCK_K covers the whole hidden size."""
    return {**tile_meta(dtype, block_b, block_h, pow2_block(hidden)), "num_warps": num_warps}


def backward_k_split(meta):
    """K_SPLIT of a persistent backward kernel: its sum over k in pieces, a piece per warp (with fewer
    pieces than warps, several warps computed the same piece), each at least 16 along k (tl.dot's
    smallest tile on a GPU)."""
    return max(1, min(meta["num_warps"], meta["BLOCK_K"] // 16))


def resident_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, directions=1, *, gates, precision=None):
    """(BLOCK_B, BLOCK_H, grid) of every persistent tiling whose programs can all be resident at once,
    each holding its W_hh slice (slice_rows x BLOCK_K) and one (BLOCK_B x BLOCK_K) operand in shared
    memory, the smallest tiles (the most programs) first. BLOCK_K covers the whole hidden size: a
    program reads all of h_{t-1} (or a gate's slab of dG_{t+1}) in one load. Grid: batch tiles x hidden
    tiles x directions (both directions of a bidirectional layer in one launch: twice the programs).
    precision: tl.dot's (None: `dot_precision(dtype)`, the flags'); at tf32x3 a program holds its W_hh slice
    twice, as the two TF32 halves of each float32 (in the compiled kernels: 288 KiB instead of 160 at H 512)."""
    block_k = pow2_block(hidden)
    element_size = torch.empty((), dtype=dtype).element_size()
    slice_copies = 2 if (precision or dot_precision(dtype)) == "tf32x3" else 1
    for block_h in (16, 32, 64):
        # The forward's slice, the larger: one tl.dot over every gate's rows of the tile's units, a power of
        # two of them a unit (`tiles.load_gate_rows`: the GRU's 3 gates take 4, one of zeros); the backward
        # holds gates x BLOCK_H columns.
        slice_rows = triton.next_power_of_2(gates) * block_h
        for block_b in (16, 32, 64):
            grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h), directions)
            shared_bytes = (slice_copies * slice_rows + block_b) * block_k * element_size
            if math.prod(grid) <= max_programs and shared_bytes <= max_shared_bytes - PERSISTENT_SHARED_SPARE:
                yield block_b, block_h, grid
            if block_b >= batch:
                break


def persistent_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, directions=1, *, gates, precision=None):
    """The GPU's persistent configuration, or None: the first of `resident_tiles`, the one with the most
    programs, on 8 warps (with 4, the staging of h_{t-1} through registers into shared memory spilled
    registers in the compiled kernels); at tl.dot's `precision` (None: the flags')."""
    tiles = next(resident_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, directions, gates=gates,
                                precision=precision), None)
    if tiles is None:
        return None
    block_b, block_h, grid = tiles
    meta = persistent_meta(dtype, block_b, block_h, hidden)
    return LaunchConfig("persistent", grid, {**meta, "DOT_PRECISION": precision or meta["DOT_PRECISION"]})


def _persistent_config(batch, hidden, dtype, device, directions, gates):
    if device.type != "cuda":  # the interpreter runs programs one by one: one program, one direction a launch
        meta = persistent_meta(dtype, pow2_block(batch), pow2_block(hidden), hidden)
        return LaunchConfig("persistent", (1, 1, 1), meta)
    properties = torch.cuda.get_device_properties(device)
    return persistent_tiles(batch, hidden, dtype, properties.multi_processor_count,
                            properties.shared_memory_per_block_optin, directions, gates=gates)


def launch_config(batch, hidden, dtype, device, directions=1, *, gates):
    """The path and tiles for this shape of a cell with `gates` gates: NANOCHAT_LSTM_PATH=step|persistent|auto
    picks the path."""
    path = os.environ.get(PATH_ENV_VAR) or "auto"
    if path not in PATHS:
        raise ValueError(f"unknown {PATH_ENV_VAR}={path!r}: choose one of {', '.join(PATHS)}")
    if path == "auto":
        validated = (gates, batch, hidden, dtype) in PERSISTENT_VALIDATED_SHAPES and device.type == "cuda"
        path = "persistent" if validated else "step"
    if path == "persistent":
        config = _persistent_config(batch, hidden, dtype, device, directions, gates)
        if config is None:
            raise ValueError(f"{PATH_ENV_VAR}=persistent: {directions} direction(s) of batch {batch} x hidden "
                             f"{hidden} in {dtype} do not fit "
                             "this GPU: its W_hh slices need more programs, or more shared memory each, than "
                             "can be resident at once; use the step path")
        return config
    return step_config(batch, hidden, dtype, device.type == "cuda", directions)


def launch(run, config, inputs, outputs):
    """run(config, *inputs, *outputs): the launches of one recurrence, forward or backward."""
    # On CUDA the step path's launches of a sequence are replayed from a CUDA graph: launch overhead
    # would otherwise dominate the small per-step kernels. The persistent path is one launch already,
    # and so is a single step: a graph would only add the copies of the whole sequence in and out of
    # its static buffers.
    if inputs[0].is_cuda and config.path == "step" and inputs[0].size(0) > 1:
        run_in_cuda_graph(run, config, inputs, outputs)
    else:
        run(config, *inputs, *outputs)

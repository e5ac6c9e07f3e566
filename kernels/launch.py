"""Host-side pieces every cell's recurrence shares: the cell dtype, the path (per step or persistent: forced,
or measured by `path_choice`) and its tiles and meta-parameters, and the launch itself (CUDA-graph replay of
a step loop on CUDA, the persistent kernels' cooperative launch, the step path when the device refuses one).

A cell enters by its gate count (4 for the LSTM, 3 for the GRU): a program owns every gate of its
units, so a persistent program's W_hh slice is the rows of its units' gates (forward) or its units'
columns of every gate's rows (backward).
"""

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels import path_choice
from nanochat_fast.kernels.cuda_graph import run_in_cuda_graph
from nanochat_fast.kernels.path_choice import PATH_ENV_VAR, PATHS

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

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

    @property
    def label(self):
        """What names it among a shape's candidates (the path choice's cache holds it)."""
        return "step" if self.path == "step" else f"persistent {self.meta['BLOCK_B']}x{self.meta['BLOCK_H']}"


class CooperativeLaunchRefused(RuntimeError):
    """The device would not launch a persistent grid: its programs not resident at once, or one program's
    shared memory over an SM's."""


def launch_cooperative(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta) as a cooperative launch: the driver starts it only with every program
    resident at once, so a grid barrier cannot wait on a program that never runs (it refuses a larger grid:
    CooperativeLaunchRefused, as is a compiled program over `resident_tiles`' estimate of its shared memory).
    The interpreter drops the keyword (not a kernel argument)."""
    try:
        kernel[grid](*args, launch_cooperative_grid=True, **meta)
    except triton.runtime.OutOfResources as error:
        raise CooperativeLaunchRefused(f"{kernel.__name__}: {error}") from error
    except RuntimeError as error:
        if "cooperative launch" not in str(error):  # CUDA's "too many blocks in cooperative launch"
            raise
        raise CooperativeLaunchRefused(f"{kernel.__name__}: grid {grid} refused: {error}") from error


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


def resident_configs(batch, hidden, dtype, max_programs, max_shared_bytes, directions=1, *, gates, precision=None):
    """The persistent configuration of each of `resident_tiles`, the most programs first, on 8 warps (with 4,
    the staging of h_{t-1} through registers into shared memory spilled registers in the compiled kernels);
    at tl.dot's `precision` (None: the flags')."""
    for block_b, block_h, grid in resident_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, directions,
                                                 gates=gates, precision=precision):
        meta = persistent_meta(dtype, block_b, block_h, hidden)
        yield LaunchConfig("persistent", grid, {**meta, "DOT_PRECISION": precision or meta["DOT_PRECISION"]})


def persistent_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, directions=1, *, gates, precision=None):
    """The GPU's persistent configuration with the most programs, or None: the first of `resident_configs`."""
    return next(resident_configs(batch, hidden, dtype, max_programs, max_shared_bytes, directions, gates=gates,
                                 precision=precision), None)


def _step_config(recurrence, device):
    return step_config(recurrence.batch, recurrence.hidden, recurrence.dtype, device.type == "cuda",
                       recurrence.directions)


def persistent_configs(recurrence, device):
    """The persistent configurations `recurrence` can run with on `device`, the most programs first: on a
    GPU every resident tiling; under the interpreter, which runs programs one by one, one program (one
    direction a launch)."""
    batch, hidden, dtype = recurrence.batch, recurrence.hidden, recurrence.dtype
    if device.type != "cuda":
        return [LaunchConfig("persistent", (1, 1, 1), persistent_meta(dtype, pow2_block(batch), pow2_block(hidden),
                                                                      hidden))]
    properties = torch.cuda.get_device_properties(device)
    return list(resident_configs(batch, hidden, dtype, properties.multi_processor_count,
                                 properties.shared_memory_per_block_optin, recurrence.directions,
                                 gates=recurrence.gates))


def launch_config(recurrence, device, run):
    """The path and tiles for `recurrence` (a `path_choice.Recurrence`) on `device`. NANOCHAT_LSTM_PATH=step or
    persistent forces a path; auto (the default) takes the fastest correct candidate `path_choice` measured on
    this device, where run(config) gives a candidate's outputs on the call's inputs (None if the device refused
    its launch), and the step path where nothing is measured (the CPU: `path_choice.MEASURED_DEVICE_TYPES`)."""
    path = os.environ.get(PATH_ENV_VAR) or "auto"
    if path not in PATHS:
        raise ValueError(f"unknown {PATH_ENV_VAR}={path!r}: choose one of {', '.join(PATHS)}")
    step = _step_config(recurrence, device)
    if path == "step" or (path == "auto" and device.type not in path_choice.MEASURED_DEVICE_TYPES):
        return step
    if path == "auto":
        return path_choice.choose(recurrence, step.meta["DOT_PRECISION"], device,
                                  lambda: [step, *persistent_configs(recurrence, device)], run)
    persistent = persistent_configs(recurrence, device)
    if not persistent:
        held_twice = (" (with TF32 off, float32 holds each slice twice, as tf32x3: "
                      "torch.backends.cudnn.rnn.fp32_precision = 'tf32' halves them)"
                      if dot_precision(recurrence.dtype) == "tf32x3" else "")
        raise ValueError(f"{PATH_ENV_VAR}=persistent: {recurrence.directions} direction(s) of batch "
                         f"{recurrence.batch} x hidden {recurrence.hidden} in {recurrence.dtype} do not fit "
                         "this GPU: its W_hh slices need more programs, or more shared memory each, than "
                         f"can be resident at once{held_twice}; use the step path")
    return persistent[0]


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


def launch_recurrence(run, recurrence, inputs, new_outputs):
    """The outputs (a list from new_outputs()) of run(config, *inputs, *outputs) on the path `launch_config`
    picks for `recurrence`; where the device refuses a persistent launch, those of the step path."""
    device = inputs[0].device

    def outputs_of(config):
        outputs = new_outputs()
        launch(run, config, inputs, outputs)
        return outputs

    def candidate_outputs(config):  # a refused candidate is never chosen
        try:
            return outputs_of(config)
        except CooperativeLaunchRefused:
            return None

    config = launch_config(recurrence, device, candidate_outputs)
    try:
        return outputs_of(config)
    except CooperativeLaunchRefused as refused:
        warnings.warn(f"{refused}; running the step path", stacklevel=2)
        return outputs_of(_step_config(recurrence, device))

"""Host-side pieces every cell's recurrence shares: the cell dtype, tile sizes and meta-parameters of
the launch-per-step path, and the launch itself (CUDA-graph replay of a step loop on CUDA)."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanochat_fast.kernels.cuda_graph import run_in_cuda_graph

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def cell_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cell state and accumulators stay float32 for half inputs (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LaunchConfig:
    """A launch: the path ("step" or "persistent"), the grid and the kernels' meta-parameters."""
    path: str
    grid: tuple
    meta: dict


def tile_meta(dtype, block_b, block_h, block_k):
    # float32 follows PyTorch's matmul precision flag (IEEE unless TF32 is allowed); half inputs use
    # the tensor cores' native precision and float32 accumulation.
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, CELL_DTYPE=_TL_DTYPE[cell_dtype(dtype)],
                DOT_PRECISION=precision)


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

"""Compile every LSTM kernel for real NVIDIA GPUs, ahead of time, without a GPU.

Triton lowers to PTX and runs ptxas (shipped in the triton wheel) for a target architecture, so the
kernels are checked against the real compiler (the interpreter forgives illegal tiles and casts).
Must run without TRITON_INTERPRET: under the interpreter the kernels are not compilable objects.
Prints one line per kernel: "<arch> <dtype> <kernel> ok <shared memory bytes>", or exits non-zero.
"""

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanochat_fast.kernels import lstm_generate, lstm_persistent, lstm_step

KERNELS = [lstm_step.lstm_forward_step_kernel, lstm_step.lstm_backward_step_kernel,
           lstm_persistent.lstm_forward_persistent_kernel, lstm_persistent.lstm_backward_persistent_kernel,
           lstm_generate.lstm_generation_step_kernel]
# Pointers whose type does not follow the activations' dtype.
POINTER_TYPES = {
    **dict.fromkeys(("c_prev_ptr", "c_ptr", "grad_c_ptr", "cells_all_ptr", "cells_ptr"), "*fp32"),  # cell state
    **dict.fromkeys(("temperature_ptr", "best_score_ptr"), "*fp32"),
    **dict.fromkeys(("ids_ptr", "seeds_ptr", "next_ids_ptr"), "*i64"),
    **dict.fromkeys(("counter_ptr", "best_token_ptr"), "*i32"),
}
ARCHITECTURES = {"A100": 80, "H100": 90}


def signature(kernel, dtype, constants):
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = POINTER_TYPES.get(name, f"*{dtype}")
        else:
            types[name] = "i32"
    return types


def main():
    for arch_name, capability in ARCHITECTURES.items():
        for dtype in ("fp32", "bf16", "fp16"):
            all_constants = dict(BLOCK_B=64, BLOCK_H=32, BLOCK_K=64, BLOCK_V=16, VOCAB_TILES=8, CELL_DTYPE=tl.float32,
                                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
            for kernel in KERNELS:
                constants = {name: value for name, value in all_constants.items() if name in kernel.arg_names}
                source = ASTSource(fn=kernel, signature=signature(kernel, dtype, constants), constexprs=constants)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
                print(arch_name, dtype, kernel.__name__, "ok", compiled.metadata.shared, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every kernel (the LSTM's and the GRU's) for real NVIDIA GPUs, ahead of time, without a GPU.

Triton lowers to PTX and runs ptxas (shipped in the triton wheel) for a target architecture, so the
kernels are checked against the real compiler (the interpreter forgives illegal tiles and casts).
Must run without TRITON_INTERPRET: under the interpreter the kernels are not compilable objects.
The persistent kernels are compiled with the tiles an H100 gets for the benchmark's shapes (each cell's,
`persistent_tiles(..., gates=)`), and their register spills are read off the binary (cuobjdump, shipped
with triton): spilling inside the time loop would cost every step a round trip to local memory. Every
kernel given a barrier counter must arrive at a grid barrier, and every arrival must follow a
block-wide barrier (bar.sync) after the program's last global store: one thread arrives, and without it
the other warps' stores are not ordered before the arrival.
Prints one line per kernel: "<arch> <dtype> <kernel> ok <shared memory bytes> <spilled bytes> <registers>",
or exits non-zero.
"""

import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanochat_fast.kernels import gru_persistent, gru_step, lstm_persistent, lstm_step
from nanochat_fast.kernels.launch import backward_k_split, persistent_tiles

KERNELS = [lstm_step.lstm_forward_step_kernel, lstm_step.lstm_backward_step_kernel,
           gru_step.gru_forward_step_kernel, gru_step.gru_backward_step_kernel]
PERSISTENT_KERNELS = {  # by the cell's gate count
    4: [lstm_persistent.lstm_forward_persistent_kernel, lstm_persistent.lstm_backward_persistent_kernel],
    3: [gru_persistent.gru_forward_persistent_kernel, gru_persistent.gru_backward_persistent_kernel],
}
PERSISTENT_SHAPES = [(64, 1024), (64, 512), (8, 512)]  # (batch, hidden) of bench/gpu_table.py
H100_SMS, H100_SHARED = 132, 227 * 1024
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Pointers whose type does not follow the activations' dtype.
POINTER_TYPES = {
    **dict.fromkeys(("c_prev_ptr", "c_ptr", "grad_c_ptr", "cells_all_ptr", "cells_ptr"), "*fp32"),  # cell state
    "counter_ptr": "*i32",
    **dict.fromkeys(("h_state_ptr", "grad_carry_ptr"), "*fp32"),  # the GRU's carried state and gradient
    "lengths_ptr": "*i32",
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


def resource_usage(cubin):
    """(bytes of registers spilled to the stack, registers a thread) from cuobjdump's resource usage."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", file.name], capture_output=True,
                               text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1)), int(re.search(r"REG:(\d+)", usage).group(1))


def unordered_arrivals(ptx):
    """Grid-barrier arrivals (a release add) with a global store before them and no bar.sync between.
    Reads the PTX in text order, which is program order for the straight-line ends of our time loops."""
    count, last = 0, None
    for line in ptx.splitlines():
        if "st.global" in line:
            last = "store"
        elif "bar.sync" in line:
            last = "barrier"
        elif ".release.add" in line:
            count += last == "store"
    return count


def check_arrivals(compiled, kernel):
    ptx = compiled.asm["ptx"]
    # A kernel given a barrier counter that never arrives lost its barrier: its programs would read each
    # other's tiles unsynchronised, which no test without a GPU sees (there the grid is one program).
    if "counter_ptr" in kernel.arg_names and ".release.add" not in ptx:
        sys.exit(f"{kernel.__name__}: takes a grid-barrier counter but never arrives at a grid barrier")
    if unordered_arrivals(ptx):
        sys.exit(f"{kernel.__name__}: a grid-barrier arrival is not ordered after the other warps' stores (no bar.sync)")


def compile_kernel(kernel, dtype, all_constants, capability, num_warps=4):
    constants = {name: value for name, value in all_constants.items() if name in kernel.arg_names}
    types = signature(kernel, dtype, constants)
    # Launches specialize integers divisible by 16 and 16-aligned pointers (as the benchmark's shapes
    # are): without that hint the loads are not vectorized.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if types[name] != "constexpr"}
    source = ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps))


def length_variants(kernel, constants):
    """(name suffix, constants) per compiled variant: a kernel that takes sequence lengths is compiled
    without them (lengths_ptr None: the fixed-length code) and with them."""
    if "lengths_ptr" not in kernel.arg_names:
        return [("", constants)]
    return [("", {**constants, "lengths_ptr": None}), ("[lengths]", constants)]


def main():
    for arch_name, capability in ARCHITECTURES.items():
        for dtype in ("fp32", "bf16", "fp16"):
            precision = "ieee" if dtype == "fp32" else "tf32"
            all_constants = dict(BLOCK_B=64, BLOCK_H=32, BLOCK_K=64, CELL_DTYPE=tl.float32,
                                 DOT_PRECISION=precision)
            for kernel in KERNELS:
                for suffix, constants in length_variants(kernel, all_constants):
                    compiled = compile_kernel(kernel, dtype, constants, capability)
                    check_arrivals(compiled, kernel)
                    print(arch_name, dtype, kernel.__name__ + suffix, "ok", compiled.metadata.shared,
                          *resource_usage(compiled.asm["cubin"]), flush=True)
            for (batch, hidden), (gates, kernels) in itertools.product(PERSISTENT_SHAPES, PERSISTENT_KERNELS.items()):
                config = persistent_tiles(batch, hidden, TORCH_DTYPES[dtype], H100_SMS, H100_SHARED, gates=gates)
                if config is None:
                    continue
                meta = dict(config.meta, DOT_PRECISION=precision, K_SPLIT=backward_k_split(config.meta))
                num_warps = meta.pop("num_warps")
                for kernel in kernels:
                    for suffix, constants in length_variants(kernel, meta):
                        compiled = compile_kernel(kernel, dtype, constants, capability, num_warps)
                        check_arrivals(compiled, kernel)
                        print(arch_name, dtype, f"{kernel.__name__}[B={batch},H={hidden}]{suffix}", "ok",
                              compiled.metadata.shared, *resource_usage(compiled.asm["cubin"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every kernel (the LSTM's and the GRU's) for real NVIDIA GPUs, ahead of time, without a GPU.

Triton lowers to PTX and runs ptxas (shipped in the triton wheel) for a target architecture, so the
kernels are checked against the real compiler (the interpreter forgives illegal tiles and casts); the
compiling is `nanochat_fast.kernels.gpu_compile`'s. Must run without TRITON_INTERPRET. float32 kernels are
compiled at both precisions float32 runs at (`launch.dot_precision`: tf32, and tf32x3 with TF32 off).
The persistent kernels are compiled with the tiles an H100 gets for the benchmark's shapes (each cell's,
`persistent_tiles(..., gates=)`), and their register spills are read off the binary (cuobjdump, shipped
with triton): spilling inside the time loop would cost every step a round trip to local memory. Every
kernel given a barrier counter must arrive at a grid barrier, and every arrival must follow a
block-wide barrier (bar.sync) after the program's last global store: one thread arrives, and without it
the other warps' stores are not ordered before the arrival; and its wait must poll with acquire loads at gpu
scope and load nothing else (no h) until its spin ends: each thread's acquire orders its own later loads.
Prints one line per kernel: "<arch> <dtype> <kernel> ok <shared memory bytes> <spilled bytes> <registers>"
(a float32 kernel's name ends in "@<precision>"), or exits non-zero.
"""

import re
import sys

import triton.language as tl

from nanochat_fast.kernels.gpu_compile import (
    DOT_PRECISIONS, PERSISTENT_KERNELS, STEP_KERNELS, compile_kernel, h100_persistent_configs, length_variants,
    resource_usage)

ARCHITECTURES = {"A100": 80, "H100": 90}


def instructions(ptx):
    """(opcode with its qualifiers, the line) per PTX instruction or label ("spin:"), predicates dropped."""
    for line in ptx.splitlines():
        code = re.sub(r"^@!?%\w+\s+", "", line.split("//")[0].strip())
        if code and not code.startswith((".", "{", "}")):
            yield code.split()[0], code


def is_arrival(opcode):
    """A grid-barrier arrival: an atomic add with release semantics at gpu scope (Triton's or inline PTX's
    qualifier order: red.global.gpu.release.add, red.release.gpu.global.add)."""
    qualifiers = opcode.split(".")
    return qualifiers[0] in ("red", "atom") and {"release", "gpu", "add"} <= set(qualifiers)


def is_global_load(opcode):
    qualifiers = opcode.split(".")
    return qualifiers[0] == "ld" and "global" in qualifiers or qualifiers[0] == "atom" and not is_arrival(opcode)


def is_acquire_load(opcode):
    return is_global_load(opcode) and {"acquire", "gpu"} <= set(opcode.split("."))


def unordered_arrivals(ptx):
    """Grid-barrier arrivals with a global store before them and no bar.sync between.
    Reads the PTX in text order, which is program order for the straight-line ends of our time loops."""
    count, last = 0, None
    for opcode, _ in instructions(ptx):
        if opcode.startswith("st.global"):
            last = "store"
        elif opcode.startswith("bar.sync"):
            last = "barrier"
        elif is_arrival(opcode):
            count += last == "store"
    return count


def unordered_waits(ptx):
    """Grid-barrier arrivals whose wait does not order the loads after it: the wait is the code from the
    arrival to its spin's backward branch (to a label after the arrival), and every global load there must be
    an acquire at gpu scope, so that each polling thread's later loads of h come after every program's
    arrival; a load of h inside it could read the step before's. An arrival with no spin after it counts."""
    code = list(instructions(ptx))
    count = 0
    for start, (opcode, _) in enumerate(code):
        if not is_arrival(opcode):
            continue
        labels, spin = set(), None
        for index in range(start + 1, len(code)):
            op, line = code[index]
            if op.endswith(":"):
                labels.add(op[:-1])
            elif op.startswith("bra") and line.split()[-1].rstrip(";") in labels:
                spin = code[start + 1:index]
                break
        loads = [op for op, _ in spin or [] if is_global_load(op)]
        count += not loads or not all(is_acquire_load(op) for op in loads)
    return count


def check_arrivals(compiled, kernel):
    ptx = compiled.asm["ptx"]
    # A kernel given a barrier counter that never arrives lost its barrier: its programs would read each
    # other's tiles unsynchronised, which no test without a GPU sees (there the grid is one program).
    if "counter_ptr" in kernel.arg_names and not any(is_arrival(opcode) for opcode, _ in instructions(ptx)):
        sys.exit(f"{kernel.__name__}: takes a grid-barrier counter but never arrives at a grid barrier")
    if unordered_arrivals(ptx):
        sys.exit(f"{kernel.__name__}: a grid-barrier arrival is not ordered after the other warps' stores "
                 "(no bar.sync)")
    if unordered_waits(ptx):
        sys.exit(f"{kernel.__name__}: a grid barrier's wait is not a spin on acquire loads at gpu scope alone")


def main():
    for arch_name, capability in ARCHITECTURES.items():
        for dtype, precisions in DOT_PRECISIONS.items():
            for precision in precisions:
                # A kernel's name carries the float32 precision it was compiled at: "<kernel>@tf32x3".
                at = f"@{precision}" if dtype == "fp32" else ""
                all_constants = dict(BLOCK_B=64, BLOCK_H=32, BLOCK_K=64,
                                     CELL_DTYPE=tl.float32, DOT_PRECISION=precision)
                for kernel in STEP_KERNELS:
                    for suffix, constants in length_variants(kernel, all_constants):
                        compiled = compile_kernel(kernel, dtype, constants, capability)
                        check_arrivals(compiled, kernel)
                        print(arch_name, dtype, kernel.__name__ + suffix + at, "ok", compiled.metadata.shared,
                              *resource_usage(compiled.asm["cubin"]), flush=True)
                for gates, kernels in PERSISTENT_KERNELS.items():
                    for (batch, hidden), meta, num_warps in h100_persistent_configs(dtype, gates, precision):
                        for kernel in kernels:
                            for suffix, constants in length_variants(kernel, meta):
                                compiled = compile_kernel(kernel, dtype, constants, capability, num_warps)
                                check_arrivals(compiled, kernel)
                                print(arch_name, dtype, f"{kernel.__name__}[B={batch},H={hidden}]{suffix}{at}", "ok",
                                      compiled.metadata.shared, *resource_usage(compiled.asm["cubin"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

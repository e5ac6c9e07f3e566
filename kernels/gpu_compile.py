"""The kernels compiled for real NVIDIA GPUs ahead of time, without a GPU, and what the compiler made of them.

Triton lowers to PTX and runs ptxas (shipped in the triton wheel) for a target architecture; cuobjdump
(shipped too) shows the binary's resources and its SASS. Used by the compile check
(tests/compile_kernels_for_gpu.py) and the kernel report (bench/kernel_report.py). Must run without
TRITON_INTERPRET: under the interpreter the kernels are not compilable objects.
"""

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanochat_fast.kernels import gru_persistent, gru_step, lstm_persistent, lstm_step
from nanochat_fast.kernels.launch import backward_k_split, persistent_tiles, step_config

STEP_KERNELS = [lstm_step.lstm_forward_step_kernel, lstm_step.lstm_backward_step_kernel,
                gru_step.gru_forward_step_kernel, gru_step.gru_backward_step_kernel]
PERSISTENT_KERNELS = {  # by the cell's gate count
    4: [lstm_persistent.lstm_forward_persistent_kernel, lstm_persistent.lstm_backward_persistent_kernel],
    3: [gru_persistent.gru_forward_persistent_kernel, gru_persistent.gru_backward_persistent_kernel],
}
BENCHMARK_SHAPES = [(64, 512), (64, 1024), (8, 512)]  # (batch, hidden) of bench/gpu_table.py's SHAPES
H100_SMS, H100_SHARED = 132, 227 * 1024  # an H200's too
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The input_precision each dtype runs at (launch.dot_precision): float32 with cuDNN's TF32 flag on and off.
DOT_PRECISIONS = {"fp32": ("tf32", "tf32x3"), "bf16": ("ieee",), "fp16": ("ieee",)}
# Pointers whose type does not follow the activations' dtype.
POINTER_TYPES = {
    **dict.fromkeys(("c_prev_ptr", "c_ptr", "grad_c_ptr", "cells_all_ptr", "cells_ptr"), "*fp32"),  # cell state
    "counter_ptr": "*i32",
    **dict.fromkeys(("h_state_ptr", "grad_carry_ptr"), "*fp32"),  # the GRU's carried state and gradient
    "lengths_ptr": "*i32",
}
# SASS opcodes counted: tensor-core MMAs (HGMMA: Hopper's warpgroup wgmma; HMMA: mma.sync), FMAs,
# block-wide barriers, global loads and the shared-memory traffic (loads, ldmatrix, stores; instructions, not
# bytes); and their PTX instructions where there is no SASS.
SASS_OPCODES = {"wgmma": "HGMMA", "mma_sync": "HMMA", "ffma": "FFMA", "bar_sync": "BAR.SYNC", "global_loads": "LDG",
                "shared_loads": "LDS", "ldmatrix": "LDSM", "shared_stores": "STS"}
PTX_INSTRUCTIONS = {"wgmma": "wgmma.mma_async", "mma_sync": "mma.sync", "ffma": "fma.rn.f32", "bar_sync": "bar.sync",
                    "global_loads": "ld.global", "shared_loads": "ld.shared", "ldmatrix": "ldmatrix",
                    "shared_stores": "st.shared"}
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


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


def h100_persistent_configs(dtype, gates, precision, shapes=BENCHMARK_SHAPES):
    """((batch, hidden), meta, num_warps) of each of `shapes` whose persistent tiles fit an H100 at tl.dot's
    `precision`, with the tiles it gets there (`launch.persistent_tiles`)."""
    for batch, hidden in shapes:
        config = persistent_tiles(batch, hidden, TORCH_DTYPES[dtype], H100_SMS, H100_SHARED, gates=gates,
                                  precision=precision)
        if config is not None:
            meta = dict(config.meta, K_SPLIT=backward_k_split(config.meta))
            yield (batch, hidden), meta, meta.pop("num_warps")


def benchmark_configs(dtype, precision, shapes=BENCHMARK_SHAPES):
    """(kernel, shapes, meta, num_warps) of every kernel at each configuration `shapes` (the benchmark's) get on
    an H100 at tl.dot's `precision`, the shapes that share one together: the step kernels at
    `launch.step_config`'s tiles, the persistent pairs at `persistent_tiles`'."""
    configs = {}  # (kernel, meta's items, num_warps): the shapes that get it
    for kernel in STEP_KERNELS:
        for batch, hidden in shapes:
            meta = dict(step_config(batch, hidden, TORCH_DTYPES[dtype], on_gpu=True).meta, DOT_PRECISION=precision)
            configs.setdefault((kernel, tuple(meta.items()), 4), []).append((batch, hidden))
    for gates, kernels in PERSISTENT_KERNELS.items():
        for kernel in kernels:
            for shape, meta, num_warps in h100_persistent_configs(dtype, gates, precision, shapes):
                configs.setdefault((kernel, tuple(meta.items()), num_warps), []).append(shape)
    for (kernel, meta, num_warps), config_shapes in configs.items():
        yield kernel, config_shapes, dict(meta), num_warps


def _cuobjdump(cubin, option):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([os.path.join(_TOOLS, "cuobjdump"), option, file.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin):
    """(bytes of registers spilled to the stack, registers a thread) from cuobjdump's resource usage."""
    usage = _cuobjdump(cubin, "-res-usage")
    return int(re.search(r"STACK:(\d+)", usage).group(1)), int(re.search(r"REG:(\d+)", usage).group(1))


def sass(cubin):
    """The binary's SASS, one instruction a line ("/*1b40*/  @!P5 BRA 0x2bb0 ;")."""
    return [line for line in _cuobjdump(cubin, "-sass").splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]


def time_loop(sass_lines):
    """The instructions of the outermost loop (a kernel's time loop): from the target of the backward branch
    that spans the most to that branch; [] without a loop. Inner loops (a grid barrier's spin) lie inside."""
    code = [(int(re.match(r"\s*/\*([0-9a-f]+)\*/", line).group(1), 16), line) for line in sass_lines]
    loops = []  # (span, start, end) per backward branch; a branch to itself ends the code
    for address, line in code:
        branch = re.search(r"\bBRA\s+(0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < address:
            loops.append((address - int(branch.group(1), 16), int(branch.group(1), 16), address))
    if not loops:
        return []
    _, start, end = max(loops)
    return [line for address, line in code if start <= address <= end]


def instruction_counts(lines, patterns):
    """{name: how many of `lines` hold the instruction}, `patterns` {name: opcode or PTX instruction}."""
    counts = {name: sum(bool(re.search(rf"(?<![\w.]){re.escape(pattern)}\b", line)) for line in lines)
              for name, pattern in patterns.items()}
    return {"mma": counts["wgmma"] + counts.pop("mma_sync"), **counts}


def compiled_counts(compiled, kernel):
    """What a compiled kernel holds and does: registers, spills, shared memory and its instruction counts,
    the whole kernel's and, for a persistent kernel, `loop`: its time loop's body, once a step. Counted in
    the SASS (`counted_in`), or in the PTX where Triton ships no cuobjdump (then no registers, spills, loop)."""
    if not os.path.exists(os.path.join(_TOOLS, "cuobjdump")):
        return dict(registers=None, spill_bytes=None, shared_bytes=compiled.metadata.shared,
                    **instruction_counts(compiled.asm["ptx"].splitlines(), PTX_INSTRUCTIONS), loop=None,
                    counted_in="ptx")
    spill_bytes, registers = resource_usage(compiled.asm["cubin"])
    lines = sass(compiled.asm["cubin"])
    persistent = any(kernel in kernels for kernels in PERSISTENT_KERNELS.values())
    return dict(registers=registers, spill_bytes=spill_bytes, shared_bytes=compiled.metadata.shared,
                **instruction_counts(lines, SASS_OPCODES),
                loop=instruction_counts(time_loop(lines), SASS_OPCODES) if persistent else None, counted_in="sass")


def kernel_records(capabilities, dtypes, float32_precisions, kernel_names=None, shapes=BENCHMARK_SHAPES):
    """One record a kernel, architecture, dtype, precision and configuration of `benchmark_configs`, compiled
    with the fixed-length code (lengths_ptr None); `kernel_names` None: every kernel."""
    for capability in capabilities:
        for dtype in dtypes:
            for precision in float32_precisions if dtype == "fp32" else DOT_PRECISIONS[dtype]:
                for kernel, config_shapes, meta, num_warps in benchmark_configs(dtype, precision, shapes):
                    if kernel_names is not None and kernel.__name__ not in kernel_names:
                        continue
                    compiled = compile_kernel(kernel, dtype, length_variants(kernel, meta)[0][1], capability, num_warps)
                    tiles = {name: meta[name] for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "K_SPLIT") if name in meta}
                    yield dict(kernel=kernel.__name__, arch=f"sm_{capability}", dtype=dtype, precision=precision,
                               config=dict(tiles, num_warps=num_warps, shapes=config_shapes),
                               **compiled_counts(compiled, kernel), triton=triton.__version__)

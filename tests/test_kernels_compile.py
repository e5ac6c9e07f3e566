"""The kernels compile for real GPUs (A100 and H100 targets, float32, bfloat16, float16, both recurrence
paths and the fused generation step), checked without a GPU by Triton's ahead-of-time compiler: see
compile_kernels_for_gpu.py. The persistent kernels, with the tiles an H100 gets, must not spill more
than a few registers: a spill inside their time loop costs every step a round trip to local memory."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_kernels_for_gpu.py")


def test_every_kernel_compiles_for_a100_and_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line.split() for line in result.stdout.splitlines() if line.split()[3:4] == ["ok"]]
    # 2 architectures x 3 dtypes x 3 kernels, and the persistent pair for every shape whose tiles fit:
    # 3 shapes in half precision, 2 in float32 (at hidden 1024 its W_hh slices outgrow shared memory).
    persistent = [fields for fields in compiled if "persistent" in fields[2]]
    assert len(compiled) - len(persistent) == 2 * 3 * 3, result.stdout
    assert len(persistent) == 2 * 2 * (3 + 3 + 2), result.stdout
    # Measured: Triton 3.9 spills 16 to 48 bytes in the backward kernel at hidden 1024 (nearly all around
    # the one-time load of W_hh before the loop) and 8 in float32 forward; Triton 3.6 64 bytes in float32
    # forward for sm_80, none elsewhere. 4 warps instead of 8 spilled kilobytes.
    spilling = [" ".join(fields) for fields in persistent if int(fields[5]) > 64]
    assert not spilling, spilling

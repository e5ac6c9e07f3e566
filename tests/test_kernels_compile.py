"""The kernels compile for real GPUs (A100 and H100 targets, float32, bfloat16, float16, both recurrence
paths and the fused generation step), checked without a GPU by Triton's ahead-of-time compiler: see
compile_kernels_for_gpu.py."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_kernels_for_gpu.py")


def test_every_kernel_compiles_for_a100_and_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.split()[3:4] == ["ok"]]
    assert len(compiled) == 2 * 3 * 5, result.stdout

"""bench/kernel_report.py compiles the kernels for sm_90 and sm_80 without a GPU and counts what is in the
SASS. Checked here: the script's records (a subset: two kernels at one benchmark shape, to keep CI short),
the property the float32 policy relies on (at torch's default flags float32 runs on tensor cores, IEEE does
not), the persistent forwards' Hopper tensor-core path (wgmma) at every benchmark shape, and the counting itself
on SASS lines. Spills are limited by the compile check (test_kernels_compile.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

from nanochat_fast.kernels.gpu_compile import (
    BENCHMARK_SHAPES, PTX_INSTRUCTIONS, SASS_OPCODES, instruction_counts,
    time_loop)
from nanochat_fast.kernels.launch import dot_precision
from test_dot_precision import cudnn_tf32

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_report.py"
KEYS = {"kernel", "arch", "dtype", "precision", "config", "registers", "spill_bytes", "shared_bytes", "mma", "wgmma",
        "ffma", "bar_sync", "global_loads", "shared_loads", "ldmatrix", "shared_stores", "loop", "counted_in", "triton"}
ARGS = ["--kernels", "lstm_forward_step_kernel", "lstm_forward_persistent_kernel", "--shapes", "64x512", "--arch",
        "sm_90", "sm_80", "--dtypes", "fp32"]


def run_report(*args, selection=ARGS):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *selection, *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_float32_at_default_flags_runs_on_tensor_cores_and_ieee_does_not():
    with cudnn_tf32(True):  # torch's default
        default = dot_precision(torch.float32)
    records = json.loads(run_report("--precisions", default, "ieee", "--json"))
    assert len(records) == 2 * 2 * 2  # 2 kernels x 2 architectures x 2 precisions
    for record in records:
        assert KEYS <= record.keys(), record.keys()
        assert record["triton"] == triton.__version__ and record["counted_in"] == "sass"
        assert record["config"]["shapes"] == [[64, 512]]
        tensor_cores = record["precision"] == default
        assert (record["mma"] > 0) == tensor_cores, record
        if record["arch"] == "sm_80":
            assert record["wgmma"] == 0, record  # Ampere has mma.sync (HMMA) only
        if "persistent" in record["kernel"]:  # its time loop: the MMAs, a block barrier and the loads of each step
            loop = record["loop"]
            assert (loop["mma"] > 0) == tensor_cores and loop["bar_sync"] > 0 and loop["global_loads"] > 0, loop
        else:
            assert record["loop"] is None
    step_sm90 = {r["precision"]: r for r in records
                 if r["arch"] == "sm_90" and r["kernel"] == "lstm_forward_step_kernel"}
    assert step_sm90[default]["wgmma"] > 0 and step_sm90["ieee"]["ffma"] > 10 * step_sm90[default]["ffma"]


def test_persistent_forwards_use_wgmma_on_hopper_at_every_benchmark_shape():
    # With W_hh's slice as the dot's M (4 BLOCK_H >= 64 rows) and h^T as its N (BLOCK_B < 64), sm_90 gets
    # wgmma, which reads the slice from shared memory itself; h @ W^T, the other operand order, got
    # mma.sync fed by ldmatrix (kernels/DESIGN.md, "The persistent path").
    kernels = ["lstm_forward_persistent_kernel", "gru_forward_persistent_kernel"]
    records = json.loads(run_report("--json", selection=["--kernels", *kernels, "--arch", "sm_90", "--dtypes", "bf16",
                                                         "fp16", "fp32", "--precisions", "tf32"]))
    # Half precision at the 3 shapes (2 tilings), float32 at the 2 whose slices fit (1 tiling); both cells.
    assert len(records) == 2 * (2 + 2 + 1), records
    covered = {(record["dtype"], tuple(shape)) for record in records for shape in record["config"]["shapes"]}
    assert covered == {(dtype, shape) for dtype in ("bf16", "fp16") for shape in BENCHMARK_SHAPES} | {
        ("fp32", (64, 512)), ("fp32", (8, 512))}, covered
    for record in records:
        loop = record["loop"]
        assert loop["wgmma"] > 0 and loop["wgmma"] == loop["mma"], record  # every MMA of a step is a wgmma
        assert record["spill_bytes"] == 0, record


def test_table_names_the_triton_version():
    table = run_report("--precisions", "tf32")  # the same compilations as above: Triton's cache has them
    assert table.startswith(f"Triton {triton.__version__};")
    rows = [line for line in table.splitlines() if line.startswith("| lstm_forward")]
    assert len(rows) == 2 * 2 and all("| fp32 | tf32 |" in row for row in rows), table


def test_the_reports_shapes_are_the_benchmarks():
    spec = importlib.util.spec_from_file_location("gpu_table", SCRIPT.with_name("gpu_table.py"))
    gpu_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_table)
    assert BENCHMARK_SHAPES == [(batch, hidden) for batch, _, hidden in gpu_table.SHAPES]


SASS = """        /*0100*/                   LDG.E.128 R8, desc[UR42][R32.64] ;
        /*0110*/                   HGMMA.64x32x8.F32.TF32 R72, gdesc[UR36], R72 ;
        /*0120*/                   FFMA R1, R2, R3, R4 ;
        /*0130*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0140*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0150*/                   LDG.E R9, desc[UR4][R2.64] ;
        /*0154*/                   LDS.128 R12, [R3] ;
        /*0158*/                   LDSM.16.M88.4 R16, [R5] ;
        /*015c*/                   STS.64 [R3], R12 ;
        /*0160*/              @!P4 BRA 0x140 ;
        /*0170*/                   FFMA R1, R2, R3, R4 ;
        /*0180*/                   BRA 0x110 ;
        /*0190*/                   EXIT ;
        /*01a0*/                   BRA 0x1a0;""".splitlines()


def test_counts_and_the_time_loop_in_sass():
    assert instruction_counts(SASS, SASS_OPCODES) == dict(mma=2, wgmma=1, ffma=2, bar_sync=1, global_loads=2,
                                                          shared_loads=1, ldmatrix=1, shared_stores=1)
    # The outermost backward branch (0x180 -> 0x110) holds the inner one (the spin of a barrier, 0x160 -> 0x140);
    # a branch to itself (the end of the code) is no loop.
    assert time_loop(SASS) == SASS[1:12]
    assert time_loop(SASS[:6]) == []


def test_counts_in_ptx():
    ptx = ["\twgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {...};", "\tmma.sync.aligned.m16n8k16.row.col.f32",
           "\tfma.rn.f32 %f1, %f2, %f3, %f4;", "\tbar.sync \t0;", "\tld.global.v4.b32 { %r1 }, [ %rd1 + 0 ];",
           "\tst.global.b32 [ %rd2 + 0 ], %r3;", "\tld.shared.v4.b32 { %r4 }, [ %r5 + 0 ];",
           "\tldmatrix.sync.aligned.m8n8.x4.shared.b16 { %r6 }, [ %r7 ];", "\tst.shared.b32 [ %r8 + 0 ], %r9;"]
    assert instruction_counts(ptx, PTX_INSTRUCTIONS) == dict(mma=2, wgmma=1, ffma=1, bar_sync=1, global_loads=1,
                                                           shared_loads=1, ldmatrix=1, shared_stores=1)

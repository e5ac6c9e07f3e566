"""The kernels compile for real GPUs (A100 and H100 targets, float32 at its two precisions, bfloat16, float16,
both recurrence paths of both cells), checked without a GPU by Triton's ahead-of-time
compiler: see compile_kernels_for_gpu.py. The persistent kernels, with the tiles an H100 gets, must not
spill more than a few registers: spills inside their time loop cost every step round trips to local
memory. In the kernels with a grid barrier, every arrival must follow a block-wide barrier after the
last global store (the script exits non-zero otherwise): Triton 3.6 left it out, a race between warps;
and every wait must spin on acquire loads at gpu scope, with no load of h before it ends."""

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
    # 2 architectures x 3 dtypes x 4 kernels (the LSTM's and the GRU's step pairs),
    # and each cell's persistent pair for every shape whose tiles fit:
    # 3 shapes in half precision, 2 in float32 (at hidden 1024 its W_hh slices outgrow shared memory).
    # Every kernel that takes sequence lengths twice: without them and with them.
    # float32 at both of its precisions (TF32 on: tf32; off: tf32x3), so 4 compilations per architecture and
    # kernel; the persistent pairs' tiles do not fit at tf32x3 (W_hh's slice held twice: 288 KiB at H 512).
    persistent = [fields for fields in compiled if "persistent" in fields[2]]
    assert len(compiled) - len(persistent) == 2 * (2 + 1 + 1) * (4 + 4), result.stdout
    for cell in ("lstm", "gru"):
        assert sum(fields[2].startswith(cell) for fields in persistent) == 2 * 2 * 2 * (3 + 3 + 2), result.stdout
    assert {fields[2].rpartition("@")[2] for fields in compiled if fields[1] == "fp32"} == {"tf32", "tf32x3"}
    # Spilling kilobytes (as 4 warps instead of 8 did) would put local-memory traffic on every step. A few
    # registers are the price of issuing each step's HBM loads before its matmul, so that their latency is
    # hidden (the measured spills: kernels/DESIGN.md).
    spilling = [" ".join(fields) for fields in persistent if int(fields[5]) > 256]
    assert not spilling, spilling


def barrier_ptx(arrive, poll):
    """The PTX of a step's end as the persistent kernels compile it: the step's store of h, the block-wide
    barrier, the grid barrier's arrival (`arrive`) and its spin around `poll` (their operands bound, the
    loop as Triton writes it), then the next step's load of h."""
    def bound(asm):
        return asm.replace("$0", "%r9").replace("$1", "%rd7")
    return (f"\t@%p1 st.global.b16 [ %rd3 + 0 ], {{ %rs1 }};\n\tbar.sync \t0;\n{bound(arrive)}\n"
            f"$L__BB0_4:\n\t{bound(poll)}\n\tsetp.lt.s32 \t%p2, %r9, %r8;\n\t@%p2 bra \t$L__BB0_4;\n"
            "\t@%p1 ld.global.cg.b16 { %rs2 }, [ %rd3 + 0 ];\n")


def test_the_ordering_check_reads_the_grid_barriers_ptx():
    # Without a GPU nothing runs the barrier with several programs: the compile check's reading of the PTX
    # is what stands between a reordered barrier and a race, so it must fail each way the order can break.
    from compile_kernels_for_gpu import unordered_arrivals, unordered_waits

    from nanochat_fast.kernels.tiles import ARRIVE_PTX, POLL_PTX
    ptx = barrier_ptx(ARRIVE_PTX.value, POLL_PTX.value)
    assert (unordered_arrivals(ptx), unordered_waits(ptx)) == (0, 0)
    assert unordered_arrivals(ptx.replace("bar.sync", "// bar.sync")) == 1  # warps' stores not before the arrival
    assert unordered_waits(ptx.replace("ld.acquire.gpu", "ld.relaxed.gpu")) == 1  # a poll that orders nothing
    assert unordered_waits(ptx.replace("ld.acquire.gpu", "ld.acquire.cta")) == 1  # orders only this program
    early_h = ptx.replace("$L__BB0_4:", "\tld.global.cg.b16 { %rs3 }, [ %rd3 + 0 ];\n$L__BB0_4:")
    assert unordered_waits(early_h) == 1  # h read before every program arrived
    assert unordered_waits(ptx.replace("bra \t$L__BB0_4", "bra \t$L__BB0_5")) == 1  # an arrival with no wait

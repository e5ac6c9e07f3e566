"""What the compiler makes of every kernel, without a GPU: for each kernel at the configurations the benchmark's
shapes get on an H100/H200 (bench/gpu_table.py), per dtype and float32 precision, compiled for sm_90 and sm_80
with the installed Triton: registers, spilled bytes, shared memory, tensor-core MMAs (all; wgmma, Hopper's
HGMMA, among them; the rest mma.sync's HMMA), FFMAs, BAR.SYNCs and global loads (LDG), counted in the SASS
that Triton's bundled cuobjdump shows; for the persistent kernels also their time loop's body (once a step).

    python bench/kernel_report.py                      # a markdown table, both architectures
    python bench/kernel_report.py --arch sm_90 --json  # a list of records
"""

import argparse
import json
import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compilable objects, not interpreted ones

import triton  # noqa: E402

from nanochat_fast.kernels.gpu_compile import (  # noqa: E402
    BENCHMARK_SHAPES, DOT_PRECISIONS, PERSISTENT_KERNELS, STEP_KERNELS, TORCH_DTYPES, kernel_records)

KERNEL_NAMES = [kernel.__name__ for kernel in STEP_KERNELS + sum(PERSISTENT_KERNELS.values(), [])]
COUNTS = ("mma", "wgmma", "ffma", "bar_sync", "global_loads", "shared_loads", "ldmatrix", "shared_stores")


def config_text(config):
    tiles = "x".join(str(config[name]) for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K"))
    split = f", K_SPLIT {config['K_SPLIT']}" if "K_SPLIT" in config else ""
    shapes = "; ".join(f"B {batch} H {hidden}" for batch, hidden in config["shapes"])
    return f"{tiles}{split}, {config['num_warps']} warps ({shapes})"


TABLE_HEADER = ["| kernel | arch | dtype | precision | tiles (shapes) | registers | spilled B | shared B | "
                + " | ".join(COUNTS) + " | loop: " + " / ".join(COUNTS) + " |", "|---" * (9 + len(COUNTS)) + "|"]


def table_row(record):
    loop = " / ".join(str(record["loop"][name]) for name in COUNTS) if record["loop"] else "-"
    cells = [record["kernel"], record["arch"], record["dtype"], record["precision"], config_text(record["config"]),
             record["registers"], record["spill_bytes"], record["shared_bytes"],
             *(record[name] for name in COUNTS), loop]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=["sm_80", "sm_90"], default=["sm_90", "sm_80"])
    parser.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, help="only these kernels (default: every one)")
    parser.add_argument("--dtypes", nargs="+", choices=list(TORCH_DTYPES), default=list(TORCH_DTYPES))
    parser.add_argument("--precisions", nargs="+", choices=["tf32", "tf32x3", "ieee"],
                        default=list(DOT_PRECISIONS["fp32"]),
                        help="float32's tl.dot precisions (default: the two it runs at, TF32 on and off; ieee, "
                             "on FMAs, to compare)")
    parser.add_argument("--shapes", nargs="+", choices=[f"{b}x{h}" for b, h in BENCHMARK_SHAPES],
                        help="only these benchmark shapes, BATCHxHIDDEN (default: every one)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of records instead of the table")
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes] if args.shapes else BENCHMARK_SHAPES
    records = kernel_records([int(arch.removeprefix("sm_")) for arch in args.arch], args.dtypes, args.precisions,
                             args.kernels, shapes)
    if args.json:
        print(json.dumps(list(records), indent=1))
        return
    print(f"Triton {triton.__version__}; counted in the SASS (cuobjdump -sass), or the PTX where a row says so; "
          "loop: a persistent kernel's time loop body, once a step\n")
    print("\n".join(TABLE_HEADER))
    for record in records:  # a row as soon as it is compiled: the whole report takes minutes
        print(table_row(record) + (" (PTX)" if record["counted_in"] == "ptx" else ""), flush=True)


if __name__ == "__main__":
    main()

"""Sweep the LSTM's persistent kernels' tiles on a GPU: every (BLOCK_B, BLOCK_H, warps) that can be resident.

`launch.persistent_tiles` picks the tiles with the most programs that fit, for
`NANOCHAT_LSTM_PATH=persistent`; `auto` (the default) times every resident tiling on 8 warps at the
first call of a shape (kernels/path_choice.py). This sweep shows the whole picture: for each shape
(bfloat16) it times one layer's forward and backward recurrence (the kernels alone, as gpu_table.py's
recurrence table) with every candidate on 4 and 8 warps, checks each against the launch-per-step path
on the same inputs, and marks the configuration `persistent_tiles` picks. `--write FILE` appends the
table as markdown (bench/RESULTS.md). `--smoke` runs one step of a tiny shape on CPU (Triton
interpreter, where one step needs no barrier), so CI checks the script.

    python bench/persistent_tiles_sweep.py --write bench/RESULTS.md
"""

import datetime
import os
import sys
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --smoke: the kernels under the interpreter

import triton  # noqa: E402

from gpu_table import median_ms, parse_args, publish, recurrence_inputs  # noqa: E402
from nanochat_fast.kernels import lstm_persistent  # noqa: E402
from nanochat_fast.kernels.launch import (  # noqa: E402
    LaunchConfig, persistent_meta, persistent_tiles, resident_tiles, tile_meta)
from nanochat_fast.kernels.lstm_recurrence import run_backward, run_forward  # noqa: E402

SHAPES = [(64, 256, 1024), (64, 256, 512), (8, 256, 512)]  # (batch, seq_len, hidden)
SMOKE_SHAPES = [(17, 1, 33)]


def candidates(batch, hidden, dtype, max_programs, max_shared_bytes):
    """Every resident tiling (launch.resident_tiles) on 4 and on 8 warps."""
    for block_b, block_h, grid in resident_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, gates=4):
        for num_warps in (4, 8):
            yield LaunchConfig("persistent", grid, persistent_meta(dtype, block_b, block_h, hidden, num_warps))


def run_recurrence(config, inputs):
    """run_forward then run_backward (the launches of config's path, no CUDA graph) on `inputs`
    (gpu_table's recurrence_inputs), in fresh buffers; returns every output."""
    seq_len, directions, batch, four_hidden = inputs["gates_x"].shape
    h_all = inputs["h0"].new_empty(seq_len + 1, directions, batch, four_hidden // 4)
    cells_all = inputs["c0"].new_empty(seq_len + 1, directions, batch, four_hidden // 4)
    gates = torch.empty_like(inputs["gates_x"])
    run_forward(config, inputs["gates_x"], inputs["h0"], inputs["c0"], inputs["w_hh"], None, h_all, cells_all, gates)
    grad_gates_all = gates.new_empty(seq_len + 1, directions, batch, four_hidden)
    grad_c = torch.empty_like(inputs["grad_c_last"])
    run_backward(config, inputs["grad_output"], inputs["grad_c_last"], gates, cells_all, inputs["w_hh"], None,
                 grad_gates_all, grad_c)
    return h_all, cells_all, gates, grad_gates_all, grad_c


def sweep(shapes, dtype, device, max_programs, max_shared_bytes):
    lines = ["| B, T, H | BLOCK_B x BLOCK_H | warps | programs | fwd us/step | bwd us/step | max abs diff "
             "vs step path | picked |", "|---|---|---|---|---|---|---|---|"]
    for batch, seq_len, hidden in shapes:
        inputs = recurrence_inputs(seq_len, batch, hidden, dtype, device)
        step_config = LaunchConfig("step", (triton.cdiv(batch, 16), triton.cdiv(hidden, 16), 1),
                                   tile_meta(dtype, 16, 16, 16))
        reference = run_recurrence(step_config, inputs)
        picked = persistent_tiles(batch, hidden, dtype, max_programs, max_shared_bytes, gates=4)
        for config in candidates(batch, hidden, dtype, max_programs, max_shared_bytes):
            meta = config.meta
            try:
                outputs = run_recurrence(config, inputs)
                diff = max((ours.float() - ref.float()).abs().max().item()
                           for ours, ref in zip(outputs, reference, strict=True))
                # Timed reruns on the checked run's buffers: backward writes grad_gates_all[:T] and reads
                # its zero slab [T]; grad_c goes from dL/dc_T to dL/dc_0 in place (its values do not
                # change the work).
                h_all, cells_all, gates, grad_gates_all, grad_c = outputs
                forward = partial(lstm_persistent.forward_loop, config, inputs["gates_x"], inputs["w_hh"], None,
                                  h_all, cells_all, gates)
                backward = partial(lstm_persistent.backward_loop, config, inputs["grad_output"], gates, cells_all,
                                   inputs["w_hh"], None, grad_gates_all, grad_c)
                per_step = [median_ms(fn, device) * 1e3 / seq_len for fn in (forward, backward)]
                cells = f"{per_step[0]:.2f} | {per_step[1]:.2f} | {diff:.2e}"
            except Exception as error:  # one failing configuration must not hide the others
                cells = f"failed: {type(error).__name__}: {str(error)[:80]} ||"
            mark = "yes" if picked is not None and picked.meta == meta else ""
            lines.append(f"| {(batch, seq_len, hidden)} | {meta['BLOCK_B']} x {meta['BLOCK_H']} | {meta['num_warps']} "
                         f"| {config.grid[0] * config.grid[1]} | {cells} | {mark} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser, args = parse_args(argv, __doc__,
                              "one step of a tiny float32 shape on CPU (Triton interpreter): checks the script")
    if args.smoke:
        device, shapes, dtype, max_programs, max_shared_bytes = "cpu", SMOKE_SHAPES, torch.float32, 132, 227 * 1024
        card = "CPU (smoke run, H100 limits)"
    elif torch.cuda.is_available():
        device, shapes, dtype = "cuda", SHAPES, torch.bfloat16
        properties = torch.cuda.get_device_properties(0)
        max_programs, max_shared_bytes = properties.multi_processor_count, properties.shared_memory_per_block_optin
        card = torch.cuda.get_device_name()
    else:
        parser.error("no CUDA GPU found: the sweep is for a GPU (use --smoke to check the script on CPU)")
    report = (f"### Persistent tiles, {card}, {datetime.date.today()}\n\ntorch {torch.__version__}, triton "
              f"{triton.__version__}, {str(dtype).removeprefix('torch.')}; one layer's recurrence, median of "
              "triton.testing.do_bench per step.\n\n" + sweep(shapes, dtype, device, max_programs, max_shared_bytes))
    publish(report, args.write)


if __name__ == "__main__":
    main()

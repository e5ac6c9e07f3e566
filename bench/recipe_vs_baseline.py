"""The default recipe against the plain baseline at equal wall time, back to back on this machine.

First `python train.py --data DATA --max-minutes M` exactly as a user runs it (default flags; its budget
holds everything: loading, evaluations, checkpoints, the report card), timed from outside; then the
plain `torch.nn.LSTM` script of bench/plain_baseline.py for the same minutes of training steps (its
evaluations and data loading come on top, in its favour): 2 x 256 on chat data, the baseline recipe's
own size, and on a text file at the width the default picked for it (with its own two layers). Both
results are the best bits per character over the whole validation text, by the same evaluator. Prints
a markdown table with the CPU and its flags.

    python bench/recipe_vs_baseline.py                                              # the chat corpus, 5 minutes
    python bench/recipe_vs_baseline.py --data ../shared/data/tinyshakespeare.txt --write bench/RESULTS.md
    python bench/recipe_vs_baseline.py --smoke                                      # seconds: checks the script
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat_fast.model import ModelConfig
from nanochat_fast.precision import has_native_bfloat16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_baseline import train_plain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
PLAIN_CHAT_HIDDEN_SIZE = 256


def cpu_description() -> str:
    """The CPU's model name and whichever of FLAGS_OF_INTEREST it has (from /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # torch's capability and bfloat16 support are what the runs use: ATEN_CPU_CAPABILITY=avx2 and
    # ONEDNN_MAX_CPU_ISA=AVX2 make an AVX-512 machine train as an AVX2 one, whatever its flags say.
    return f"{name}; {' '.join(flag for flag in FLAGS_OF_INTEREST if flag in flags) or 'none of'} " \
           f"({', '.join(FLAGS_OF_INTEREST)} checked); torch's CPU capability " \
           f"{torch.backends.cpu.get_cpu_capability()}, native bfloat16 {has_native_bfloat16(torch.device('cpu'))}"


def run_default(data: str | None, minutes: float, out: Path, extra: list[str]) -> dict:
    """python train.py as a user runs it; its wall time, steps, speed and best validation."""
    command = [sys.executable, "train.py", "--out", str(out), "--max-minutes", str(minutes), *extra]
    if data:
        command += ["--data", data]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall_seconds = time.perf_counter() - started
    config = json.loads((out / "latest" / "config.json").read_text())
    state = config["train_state"]
    return {"steps": state["step"], "best": state["best_val_bits_per_char"], "wall_seconds": wall_seconds,
            "chars_per_second": state["chars_per_second"], "hidden_size": config["model"]["hidden_size"],
            "shape": ModelConfig(**config["model"]).shape, "embedding_size": config["model"]["embedding_size"],
            "dropout": config["model"]["dropout"], "weight_drop": config["model"]["weight_drop"],
            "kind": config["extra"]["corpus"]["kind"],
            "optimizer": config["extra"]["run_config"]["optimizer"],
            "batch_size": config["extra"]["run_config"]["batch_size"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="as train.py's --data (default: the embedded chat corpus)")
    parser.add_argument("--minutes", type=float, default=5.0, help="the wall-clock budget of each (default: 5)")
    parser.add_argument("--write", metavar="FILE", help="append the markdown table to FILE (e.g. bench/RESULTS.md)")
    parser.add_argument("--keep", metavar="DIR", help="train the default run into DIR and keep it (to chat with "
                        "it, or read its report card); by default it goes into a temporary folder")
    parser.add_argument("--smoke", action="store_true", help="a few seconds each, to check the script")
    args = parser.parse_args(argv)
    minutes = 0.02 if args.smoke else args.minutes
    with tempfile.TemporaryDirectory() as folder:
        ours = run_default(args.data, minutes, Path(args.keep or Path(folder) / "run"),
                           ["--max-steps", "3", "--hidden-size", "16"] if args.smoke else [])
    plain_hidden_size = PLAIN_CHAT_HIDDEN_SIZE if ours["kind"] == "chat" else ours["hidden_size"]
    plain = train_plain(args.data, minutes, hidden_size=plain_hidden_size, evaluations=1 if args.smoke else 10)
    gain = 1 - ours["best"] / plain["best_val_bits_per_char"]
    report = "\n".join([
        f"Default recipe against the plain baseline, {args.data or 'the chat corpus'}, {minutes:g} minutes each, "
        f"{datetime.date.today()}: {cpu_description()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.", "",
        "| run | steps | best validation (bits/char) | wall time | training chars/s (of each model) |",
        "|---|---|---|---|---|",
        f"| `python train.py` ({ours['shape']}, embedding {ours['embedding_size']}, "
        f"dropout {ours['dropout']:g}, weight drop {ours['weight_drop']:g}, {ours['optimizer']}, "
        f"{ours['batch_size']} streams) | {ours['steps']:,} | "
        f"{ours['best']:.4f} | {ours['wall_seconds']:.0f} s in all | {ours['chars_per_second']:,.0f} |",
        f"| plain nn.LSTM script (2 x {plain_hidden_size}) | {plain['steps']:,} | {plain['best_val_bits_per_char']:.4f}"
        f" | {plain['training_seconds']:.0f} s of steps, evaluations on top | |", "",
        f"The default is {abs(gain):.1%} {'below' if gain >= 0 else 'above'} the baseline (goal: at least 10% below).",
        ""])
    print(report)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()

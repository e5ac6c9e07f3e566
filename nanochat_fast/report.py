"""The report card of a training run: `report.md` with `loss.png` in the run folder.

Written by train.py (rank 0) when a run finishes, or again at any time from the run folder's checkpoints:

    python -m nanochat_fast.report --ckpt out/

It holds the configuration, the data statistics, the loss curves, the final validation bits per
character, throughput, wall time, the hardware and library versions of the training run (saved in its
checkpoints, see `environment.py`), and replies to fixed prompts (seeded, so a report is reproducible).
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanochat_fast.checkpoint import (BEST, CONFIG_FILE, LATEST, Checkpoint, CheckpointError, load_checkpoint,
                                      read_config)
from nanochat_fast.environment import environment
from nanochat_fast.generation import Chatbot, generate
from nanochat_fast.sampling import CHAT_SAMPLING, SamplingConfig

REPORT_FILE, PLOT_FILE = "report.md", "loss.png"
CHAT_PROMPTS = ("Hello", "How are you?", "What is your name?", "Tell me a joke.")
TEXT_PROMPTS = ("", "The ")  # "" starts at a message boundary
SAMPLE_SEED = 1337
SAMPLE_CHARS = 200
TEXT_SAMPLING = SamplingConfig(temperature=0.8)


def validation_figure(whole: float | None, sample: float | None) -> str:
    """A check's figure: the whole validation text's where it was read, else its sample's (training.validate)."""
    if whole is not None:
        return f"{whole:.4f} bits/char"
    return f"{sample:.4f} bits/char on a quarter of the validation text"


def plot_losses(train_bits_per_char: list[float], val_bits_per_char: list[list], path: Path):
    """Training bits/char per step and validation bits/char per evaluation, as a PNG."""
    figure = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(figure)  # render with Agg: no display, no global pyplot state
    axes = figure.add_subplot()
    axes.plot(range(1, len(train_bits_per_char) + 1), train_bits_per_char, lw=0.8, alpha=0.7, label="train")
    if val_bits_per_char:
        steps, bits = zip(*val_bits_per_char, strict=True)
        axes.plot(steps, bits, "o-", label="validation: a quarter of it (the weights' average)")
    axes.set(xlabel="step", ylabel="bits per character", title="Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)


def sample_replies(checkpoint: Checkpoint, kind: str) -> list[tuple[str, str]]:
    """(prompt, reply) pairs from the checkpoint: chat replies for chat data, else text."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    if kind == "chat":
        bot = Chatbot(model, tokenizer, CHAT_SAMPLING, max_reply_chars=SAMPLE_CHARS, seed=SAMPLE_SEED)
        replies = []
        for prompt in CHAT_PROMPTS:
            bot.reset()  # each prompt opens its own conversation
            replies.append((prompt, bot.reply(prompt)))
        return replies
    return [(prompt, prompt + "".join(generate(model, tokenizer, tokenizer.encode(prompt), SAMPLE_CHARS,
                                               TEXT_SAMPLING, seed=SAMPLE_SEED)))
            for prompt in TEXT_PROMPTS]


def _table(rows: dict) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows.items())]


def _quote(text: str) -> str:
    """Generated text as a fenced block, whatever characters it holds."""
    fence = "~~~~" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def write_report(run_dir) -> Path:
    """Write report.md and loss.png into the training run folder run_dir (holding latest/ and best/);
    return the report's path. Raises CheckpointError for a folder that holds no training run."""
    run_dir = Path(run_dir)
    try:
        config = read_config(run_dir / LATEST)
        state, extra = config["train_state"], config["extra"]
        run_config, stats = extra["run_config"], extra["corpus"]["stats"]
    except (CheckpointError, KeyError, TypeError) as error:
        reason = f"{error}" if isinstance(error, CheckpointError) else "its latest/ checkpoint has no run state"
        if run_dir.name in (BEST, LATEST) and (run_dir.parent / LATEST / CONFIG_FILE).is_file():
            reason = f"it is a checkpoint inside one; give the run folder: --ckpt {shlex.quote(str(run_dir.parent))}"
        raise CheckpointError(f"{run_dir} is not a training run folder: {reason}") from None
    sampled = load_checkpoint(run_dir)  # best/, what chat loads (latest/ while the run has no best/)
    sampled_from = "best checkpoint" if sampled.note is None else f"latest checkpoint: the run has no {BEST}/ yet"
    plot_losses(state["train_bits_per_char"], state["val_bits_per_char"], run_dir / PLOT_FILE)
    model = sampled.model.config  # the run's shape, with the defaults of fields older checkpoints lack
    chars_per_second = state.get("chars_per_second")
    final_val = state["val_bits_per_char"][-1] if state["val_bits_per_char"] else None
    if final_val and "best_sample_bits_per_char" not in state:  # older versions read the whole text at every check
        state = {**state, "final_val_bits_per_char": final_val[1]}
    final_figure = final_val and validation_figure(state.get("final_val_bits_per_char"), final_val[1])
    best_figure = state["best_step"] is not None and validation_figure(state["best_val_bits_per_char"],
                                                                        state.get("best_sample_bits_per_char"))
    total_chars = stats["train_characters"] + stats["val_characters"]
    saved_environment = extra.get("environment")
    environment_note = "" if saved_environment else " (of the machine that wrote this report; the run saved none)"
    saved_environment = saved_environment or environment(torch.device("cpu"))

    lines = [f"# Training report: {run_dir}", "",
             "## Configuration", "", *_table({
                 "data": stats["source"] + f" ({stats['kind']})",
                 "model": f"{model.shape}, "
                          f"embedding {model.input_size}, dropout {model.dropout:g}, "
                          f"weight drop {model.weight_drop:g}, vocabulary {model.vocab_size}",
                 **{name: "(default)" if value is None else value
                    for name, value in run_config.items() if name not in ("data", "out")}}), "",
             "## Data", "", *_table({
                 "characters": f"{total_chars:,}",
                 "train / validation characters": f"{stats['train_characters']:,} / {stats['val_characters']:,} "
                                                  f"({stats['val_characters'] / max(total_chars, 1):.1%} validation)",
                 "train / validation tokens": f"{stats['train_tokens']:,} / {stats['val_tokens']:,}",
                 **({"train / validation conversations": f"{stats['train_conversations']:,} / "
                                                         f"{stats['val_conversations']:,}"}
                    if "train_conversations" in stats else {}),
                 "vocabulary": f"{stats['vocab_size']} tokens",
                 "unknown characters": " ".join(map(repr, stats["unknown_chars"])) or "none"}), "",
             "## Results", "", *_table({
                 "steps": f"{state['step']:,} of {state['planned_steps']:,} planned",
                 "final validation": (f"{final_figure} at step {final_val[0]}" if final_val else "none"),
                 "best validation": (f"{best_figure} at step {state['best_step']} (in {BEST}/)"
                                     if state["best_step"] is not None else "none"),
                 "throughput": f"{chars_per_second:,.0f} training chars/s" if chars_per_second else "not measured",
                 "wall time": _duration(state["elapsed_seconds"]) + " (evaluation included)"}), "",
             f"![loss curves]({PLOT_FILE})", "",
             f"## Hardware and versions{environment_note}", "",
             *_table({**saved_environment["hardware"], **saved_environment["versions"]}), "",
             f"## Samples ({sampled_from}, seed {SAMPLE_SEED})", ""]
    for prompt, reply in sample_replies(sampled, stats["kind"]):
        if stats["kind"] == "chat":
            lines += [f"**User:** {prompt}", "", _quote(reply), ""]
        else:
            lines += [_quote(reply), ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat_fast.report",
                                     description="Write the report card (report.md, loss.png) of a training run.")
    parser.add_argument("--ckpt", default="out/",
                        help="training run folder, holding latest/ and best/; the report is written into it "
                             "(default: out/)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.ckpt)
    except (CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

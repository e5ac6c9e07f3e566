"""`python train.py`: train the chat model (or a model of any text) and save it in a run folder, with
the report card (report.md) of a finished run.

    python train.py                                   # the embedded chat corpus, 5 minutes, into out/
    python train.py --data tinyshakespeare --max-minutes 10 --out out-shakespeare
    python train.py --resume --out out                # go on with a stopped run (Ctrl-C saves one)
    python -m nanochat_fast.chat --ckpt out/          # then talk to it
    torchrun --standalone --nproc_per_node=4 train.py --data tinyshakespeare   # on 4 GPUs (DDP)
"""

import argparse
import shlex
import sys
from pathlib import Path

from nanochat_fast.backend import BACKENDS
from nanochat_fast.checkpoint import BEST, LATEST, CheckpointError, read_config
from nanochat_fast.data import DataError
from nanochat_fast import distributed
from nanochat_fast.device import DEVICES
from nanochat_fast.model import CELLS
from nanochat_fast.optimizer import MUON_LR_SCALE, OPTIMIZERS
from nanochat_fast.precision import PRECISIONS
from nanochat_fast.report import validation_figure, write_report
from nanochat_fast.time_budget import (BUDGET_WIDTHS, CHARACTERS_FOR_A_WIDER_MODEL, EVALS_PER_RUN, EVALUATION_SHARE,
                                       PLAN_EVERY)
from nanochat_fast.training import (ADAMW_BATCH_SIZE, DEFAULT_LR, DEFAULT_WARMUP_STEPS, FEW_PASSES,
                                    FEW_PASSES_DROPOUT, FEW_PASSES_WIDTH, LARGE_DATA_NUM_LAYERS, LOSS_ON,
                                    MANY_PASSES, MANY_PASSES_WEIGHT_DROP, MUON_BATCH_SIZE, CPU_TEXT_MEMBERS,
                                    SMALL_DATA_CHARS, SMALL_DATA_DROPOUT, SMALL_DATA_NUM_LAYERS,
                                    SMALL_DATA_WEIGHT_DROP, SMALL_HIDDEN_SIZE, WIDE_SMALL_DATA_DROPOUT,
                                    TrainConfig, TrainConfigError, default_lr, resume, train)

RESUME_FLAGS = ("resume", "out", "device", "lstm_backend")  # what --resume takes; the rest comes from the run


def build_parser() -> argparse.ArgumentParser:
    # Flags left out stay out of the namespace: TrainConfig holds the defaults, and --resume can tell
    # which settings were given.
    parser = argparse.ArgumentParser(description="Train the character-level LSTM (or GRU) chat model.",
                                     argument_default=argparse.SUPPRESS)
    d = TrainConfig
    parser.add_argument("--data", metavar="PATH", help="training data: a .jsonl file of conversations, a text file, "
                        "a folder of .txt files, or 'tinyshakespeare' (default: the embedded chatterbot-corpus "
                        "English dialogues)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"run folder for the checkpoints {LATEST}/ and {BEST}/ (default: {d.out})")
    parser.add_argument("--max-minutes", type=float,
                        help="the whole run's wall time, loading, evaluation, checkpoints and the report card "
                             "included: the step count is planned from the measured speed and evaluation cost, and "
                             f"planned again every {PLAN_EVERY} steps (default: {d.max_minutes:g})")
    parser.add_argument("--max-steps", type=int, help="number of optimizer steps; overrides --max-minutes")
    parser.add_argument("--hidden-size", type=int, help="recurrent width (default with a time budget: the widest of "
                        f"{', '.join(map(str, BUDGET_WIDTHS))} that trains on {CHARACTERS_FOR_A_WIDER_MODEL / 1e6:g}M "
                        "characters in it on this machine (in an ensemble of N, each model on N times that), measured "
                        "at the start in a few seconds; with --max-steps: "
                        f"256 for less than {SMALL_DATA_CHARS:,} characters of training text, else 512; with "
                        "--init-from, the checkpoint's)")
    parser.add_argument("--num-layers", type=int, help="recurrent layers (default for chat data or small text, which "
                        f"overfit within minutes: {SMALL_DATA_NUM_LAYERS}, as good as two at the same width and "
                        "faster; "
                        f"else {LARGE_DATA_NUM_LAYERS}; with --init-from, the checkpoint's)")
    parser.add_argument("--embedding-size", type=int, help="width of the character embedding, the first layer's "
                        "input (default: the vocabulary's size rounded up to a multiple of 32, at most the width: "
                        "a wider one adds nothing the model can express and costs time at every character; with "
                        "--init-from, the checkpoint's)")
    parser.add_argument("--dropout", type=float, help="dropout between layers and before the output (default for "
                        f"chat data or small text, which overfit within minutes: {SMALL_DATA_DROPOUT:g} up to "
                        f"{SMALL_HIDDEN_SIZE} wide, {WIDE_SMALL_DATA_DROPOUT:g} wider, or {FEW_PASSES_DROPOUT:g} "
                        f"where the run reads the training text fewer than {FEW_PASSES} times at "
                        f"{FEW_PASSES_WIDTH} wide, fewer in proportion to the recurrent weights' size when wider; "
                        "else 0)")
    parser.add_argument("--weight-drop", type=float, help="share of the recurrent weights W_hh zeroed afresh at each "
                        "training step, the same at every timestep (DropConnect, as in AWD-LSTM): it regularises the "
                        f"recurrence, which --dropout does not reach (default for chat data or small text: "
                        f"{SMALL_DATA_WEIGHT_DROP:g}, or {MANY_PASSES_WEIGHT_DROP:g} where the run reads the training "
                        f"text {MANY_PASSES} times or more at {FEW_PASSES_WIDTH} wide, fewer in proportion to the "
                        "recurrent weights' size when wider; else 0)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate of AdamW; Muon's is {MUON_LR_SCALE:g} x it "
                        f"(default: {DEFAULT_LR:g} x sqrt({SMALL_HIDDEN_SIZE} / the model's width): {DEFAULT_LR:g} at "
                        f"{SMALL_HIDDEN_SIZE} wide, {default_lr(512):.2g} at 512)")
    parser.add_argument("--min-lr", type=float, help=f"learning rate at the last step (default: {d.min_lr:g})")
    parser.add_argument("--warmup-steps", type=int, help="steps of linear warm-up before the cosine decay "
                        f"(default: {DEFAULT_WARMUP_STEPS}, or a tenth of --max-steps when smaller)")
    parser.add_argument("--weight-decay", type=float, help=f"decoupled weight decay of AdamW and Muon "
                        f"(default: {d.weight_decay:g})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help="muon = Muon for the recurrent layers' weight matrices (their updates orthogonalised: "
                             "more learned per second in runs of minutes) and AdamW for the embedding, head and "
                             "biases; adamw = AdamW for all (default: muon for plain text of "
                             f"{SMALL_DATA_CHARS:,} characters or more on CUDA or a CPU with bfloat16 instructions, "
                             "whose matrix products Muon needs; adamw for chat data and smaller text, which overfit "
                             "within minutes, where Muon only reaches a worse best sooner)")
    parser.add_argument("--grad-clip", type=float, help=f"max gradient norm (default: {d.grad_clip:g})")
    parser.add_argument("--batch-size", type=int, help="parallel streams through the text (default: "
                        f"{MUON_BATCH_SIZE} with Muon, {ADAMW_BATCH_SIZE} with AdamW)")
    parser.add_argument("--seq-len", type=int, help="characters per chunk; the recurrent state carries across "
                        f"chunks, gradients do not (default: {d.seq_len})")
    parser.add_argument("--eval-every", type=int, help="steps between validations and checkpoints; each reads a "
                        "quarter of the validation text, the last at the end all of it "
                        f"(default: {EVALS_PER_RUN} evaluations over the run; fewer when they "
                        f"would take more than {EVALUATION_SHARE * 100:g}%% of a time budget)")
    parser.add_argument("--seed", type=int, help=f"random seed for the weights and dropout (default: {d.seed})")
    parser.add_argument("--device", choices=DEVICES, help="auto = CUDA when available, else CPU (default: auto)")
    parser.add_argument("--resume", action="store_true",
                        help=f"go on with the run in --out from its {LATEST}/ checkpoint, with its saved settings")
    parser.add_argument("--init-from", metavar="CKPT", help="fine-tune: start from this checkpoint's weights and "
                        "vocabulary (a checkpoint folder or a run folder, whose best/ is used)")
    parser.add_argument("--loss-on", choices=LOSS_ON,
                        help="chat data: the characters the training loss counts: all (the user's turns too, which "
                             "teach the model more language) or replies (the assistant's alone, which validation "
                             "counts either way) (default: all)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="auto = bfloat16 autocast on CUDA and on CPUs with native bfloat16 (AVX-512 BF16, AMX), "
                             "float32 elsewhere (default: auto)")
    parser.add_argument("--cell", choices=CELLS, help="the recurrent layers: lstm or gru (a GRU has 3 gates to the "
                        "LSTM's 4: about 3/4 of the work a step) (default: lstm)")
    parser.add_argument("--members", type=int, help="models trained side by side, each on its own loss, whose "
                        "predictions are averaged (an ensemble: better on held-out text than one model; each costs a "
                        f"model's step and generation step). Default: {CPU_TEXT_MEMBERS} for text of "
                        f"{SMALL_DATA_CHARS:,} characters or more on a CPU with that many threads or more, one process "
                        "(they share its cores), else 1")
    parser.add_argument("--lstm-backend", choices=BACKENDS,
                        help="LSTM and GRU implementation: auto = Triton on CUDA, PyTorch on CPU (default: auto)")
    return parser


def interrupted_message(out: Path, argv: list[str]) -> str:
    """What a second Ctrl-C (quit at once, no save) leaves: the run's latest/ checkpoint and its step, or
    nothing, and the command that goes on from there."""
    try:
        step = read_config(out / LATEST)["train_state"]["step"]
    except (CheckpointError, KeyError, TypeError):
        return (f"interrupted before the first checkpoint: nothing was saved in {out}; start again with: "
                f"python {shlex.join(['train.py', *argv])}")
    return (f"interrupted; kept {out / LATEST} from step {step}; resume with: "
            f"python train.py --resume --out {shlex.quote(str(out))}")


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    flags = vars(parser.parse_args(argv))
    resuming = flags.pop("resume", False)
    if resuming:
        extra = [f"--{name.replace('_', '-')}" for name in flags if name not in RESUME_FLAGS]
        if extra:
            parser.error(f"--resume goes on with the run's saved settings; drop {' '.join(extra)}")
    ranks = distributed.start(flags.get("device", "auto"))  # under torchrun; else one process, no group
    try:
        result = resume(**flags, ranks=ranks) if resuming else train(TrainConfig(**flags), ranks)
    except (DataError, CheckpointError, TrainConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if ranks.main:
            print(interrupted_message(Path(flags.get("out", TrainConfig.out)), argv), file=sys.stderr)
        return 130
    distributed.stop()  # not after an error: the other ranks may be inside a collective
    if not ranks.main:
        return 0
    out = result.out
    if result.interrupted:
        print(f"stopped at step {result.state.step}, saved in {out / LATEST}; "
              f"resume with: python train.py --resume --out {shlex.quote(str(out))}")
    else:
        print(f"report: {write_report(out)}")
    state = result.state
    if state.best_step is not None:
        print(f"best validation {validation_figure(state.best_val_bits_per_char, state.best_sample_bits_per_char)} "
              f"at step {state.best_step}, saved in {out / BEST}")
    # Before the first validation there is no best/ yet: chat then loads latest/, and says so.
    print(f"chat with it: python -m nanochat_fast.chat --ckpt {shlex.quote(str(out))}/")
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())

"""What the command lines share: the checkpoint and sampling flags and their checks, loading the
checkpoint with a one-line error, and printing a stream of text as it comes."""

import argparse
import os
import sys

import torch

from nanochat_fast.checkpoint import CheckpointError, load_checkpoint
from nanochat_fast.device import DEVICES, resolve_device
from nanochat_fast.sampling import SamplingConfig


def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--ckpt", default="out/",
                        help="checkpoint folder, or a training run folder: its best/ is used, or its latest/ "
                             "while the run has no best/ yet (default: out/)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs; auto = CUDA when available, else CPU (default: auto)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float, top_p: float | None):
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="softmax temperature; lower is more conservative, 0 is greedy (which can loop, see "
                             f"--greedy) (default: {temperature})")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample only among the k most likely characters (default: off)")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help="sample only among the most likely characters whose probability adds up to p "
                             f"(nucleus sampling; default: {top_p or 'off'})")
    parser.add_argument("--greedy", action="store_true",
                        help="always take the most likely character (same as --temperature 0); greedy text "
                             "often gets stuck repeating one phrase, which sampling avoids")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed: the same seed gives the same text (default: a fresh random seed)")


def _sampling(parser: argparse.ArgumentParser, args) -> SamplingConfig:
    """The sampling rules the flags ask for; invalid values end the program with a usage error (exit 2)."""
    try:
        return SamplingConfig(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
    except ValueError as error:
        parser.error(str(error))


def _checkpoint(parser: argparse.ArgumentParser, args):
    """The checkpoint named by --ckpt on --device (with a note on stderr when a run folder's latest/ stands
    in for its best/); a missing or bad one ends the program (exit 2)."""
    try:
        checkpoint = load_checkpoint(args.ckpt, device=resolve_device(args.device))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ValueError as error:  # the device: e.g. --device cuda without a GPU
        parser.error(str(error))
    if checkpoint.note:
        print(checkpoint.note, file=sys.stderr)
    if next(checkpoint.model.parameters()).device.type == "cpu":
        # One character at a time is a chain of tiny ops: more threads only add synchronisation, which
        # stalls badly when the cores are busy.
        torch.set_num_threads(1)
    return checkpoint


def parse_and_load(parser: argparse.ArgumentParser, argv):
    """(the flags, the sampling rules they ask for, the checkpoint they name). Bad flags or a missing or
    bad checkpoint end the program with a one-line error (exit 2)."""
    args = parser.parse_args(argv)
    sampling = _sampling(parser, args)
    return args, sampling, _checkpoint(parser, args)


def write_stream(pieces) -> int:
    """Print pieces as they come (flushed, so text appears character by character); the exit status."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

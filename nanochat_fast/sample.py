"""`python -m nanochat_fast.sample`: stream text from a trained checkpoint to stdout.

    python -m nanochat_fast.sample --ckpt out/ --prompt "ROMEO:" --max-chars 500 --temperature 0.8

A chat model's text shows its turns as "User:" / "Assistant:" lines; --raw prints the markers instead.
"""

import argparse
import sys

from nanochat_fast.chat_format import readable_turns
from nanochat_fast.cli import add_model_arguments, add_sampling_arguments, int_at_least, parse_and_load, write_stream
from nanochat_fast.generation import generate, unknown_chars_notice


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanochat_fast.sample",
                                     description="Stream text from a trained checkpoint to stdout.")
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="",
                        help="text the model continues; printed first (default: none, start at a message boundary)")
    parser.add_argument("--max-chars", type=int_at_least(0), default=500, help="characters to generate (default: 500)")
    parser.add_argument("--stop-at-end", action="store_true",
                        help="stop at the first <|end|> the model writes (the end of a chat message)")
    parser.add_argument("--raw", action="store_true",
                        help="print the chat markers <|user|>, <|assistant|>, <|end|> as the model writes them; "
                             "by default a chat model's text shows them as User: / Assistant: lines and line "
                             "breaks (text models print the same either way)")
    add_sampling_arguments(parser, temperature=0.8, top_p=None)
    return parser


def main(argv=None) -> int:
    args, sampling, checkpoint = parse_and_load(make_parser(), argv)
    tokenizer = checkpoint.tokenizer

    notice = unknown_chars_notice(tokenizer, args.prompt)
    if notice:
        print(notice, file=sys.stderr)
    sys.stdout.write(args.prompt)
    pieces = generate(checkpoint.model, tokenizer, tokenizer.encode(args.prompt), args.max_chars, sampling,
                      seed=args.seed, stop_at_end=args.stop_at_end)
    if checkpoint.data_kind == "chat" and not args.raw:
        pieces = readable_turns(pieces, printed=args.prompt)
    return write_stream(pieces)


if __name__ == "__main__":
    sys.exit(main())

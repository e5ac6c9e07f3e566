"""`python -m nanochat_fast.chat`: talk with a trained checkpoint in the terminal.

    python -m nanochat_fast.chat --ckpt out/

Replies stream character by character. The model keeps its state between turns, so a turn costs the
same however long the conversation is. EOF (Ctrl-D) or Ctrl-C at the prompt exits; Ctrl-C during a
reply cuts that reply short.
"""

import argparse
import sys
from dataclasses import replace

from nanochat_fast.cli import add_model_arguments, add_sampling_arguments, int_at_least, parse_and_load, write_stream
from nanochat_fast.generation import Chatbot, unknown_chars_notice
from nanochat_fast.sampling import CHAT_SAMPLING

HELP = """commands:
  /reset            start a new conversation (forget everything said so far)
  /temperature X    set the sampling temperature (0 = greedy; now {temperature})
  /help             show this help
  /quit             leave (so do Ctrl-D and Ctrl-C)"""


def run_command(bot: Chatbot, line: str) -> bool:
    """Carry out a /command; False when it asks to leave."""
    command, _, argument = line.partition(" ")
    if command in ("/quit", "/exit"):
        return False
    if command == "/reset":
        bot.reset()
        print("(conversation reset)")
    elif command == "/temperature":
        try:
            bot.sampling = replace(bot.sampling, temperature=float(argument))
            print(f"(temperature {bot.sampling.temperature})")
        except ValueError as error:  # not a number, or out of range
            print(f"(usage: /temperature X with X a number >= 0; {error})")
    elif command == "/help":
        print(HELP.format(temperature=bot.sampling.temperature))
    else:
        print(f"(unknown command {command}; /help lists the commands)")
    return True


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanochat_fast.chat",
                                     description="Talk with a trained checkpoint in the terminal.")
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=CHAT_SAMPLING.temperature, top_p=CHAT_SAMPLING.top_p)
    parser.add_argument("--max-reply-chars", type=int_at_least(1), default=300,
                        help="longest reply, in characters, if the model does not end it first (default: 300)")
    return parser


def main(argv=None) -> int:
    args, sampling, checkpoint = parse_and_load(make_parser(), argv)
    model_config = checkpoint.model.config
    bot = Chatbot(checkpoint.model, checkpoint.tokenizer, sampling, args.max_reply_chars, seed=args.seed)

    device = next(checkpoint.model.parameters()).device
    print(f"chatting with {checkpoint.directory} ({model_config.shape}, {model_config.vocab_size} tokens, {device}); "
          "/help lists the commands")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(bot, line):
                return 0
            continue
        notice = unknown_chars_notice(bot.tokenizer, line)
        if notice:
            print(notice)
        sys.stdout.write("bot> ")
        write_stream(bot.stream(line))  # Ctrl-C cuts the reply; the chat goes on


if __name__ == "__main__":
    sys.exit(main())

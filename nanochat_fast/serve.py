"""`python -m nanochat_fast.serve`: the web chat and an OpenAI-compatible API for a trained checkpoint.

    python -m nanochat_fast.serve --ckpt out/            # then open http://127.0.0.1:8000
    # any OpenAI client: base_url="http://127.0.0.1:8000/v1"

One generation loop batches the next character of every active reply into one LSTM step
(continuous batching), so many conversations cost little more than one. The app lives in web/.
"""

import argparse
import logging
import sys

import torch
import uvicorn

from nanochat_fast.checkpoint import CheckpointError, load_checkpoint, read_config
from nanochat_fast.device import DEVICES, resolve_device
from nanochat_fast.web import ServerSettings
from nanochat_fast.web.app import create_app

DEFAULTS = ServerSettings()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanochat_fast.serve",
                                     description="Serve a checkpoint as a web chat and an OpenAI-compatible API.")
    parser.add_argument("--ckpt", default="out/",
                        help="checkpoint folder, or a training run folder (its best/ is used) (default: out/)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs; auto = CUDA when available, else CPU (default: auto)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the default serves this machine only. Binding beyond "
                             "localhost (e.g. 0.0.0.0) exposes the server: set --api-key (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /api and /v1 (the page asks for it); "
                             "meant for binding beyond localhost (default: no key)")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULTS.max_concurrent,
                        help=f"replies written at once, batched into one LSTM step (default: {DEFAULTS.max_concurrent})")
    parser.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                        help="requests that may wait for a free slot; beyond them the server answers 429 "
                             f"(default: {DEFAULTS.max_queue})")
    parser.add_argument("--max-reply-chars", type=int, default=DEFAULTS.max_reply_chars,
                        help=f"longest reply, in characters (default: {DEFAULTS.max_reply_chars})")
    parser.add_argument("--max-message-chars", type=int, default=DEFAULTS.max_message_chars,
                        help=f"longest message a user may send (default: {DEFAULTS.max_message_chars})")
    parser.add_argument("--max-history-chars", type=int, default=DEFAULTS.max_history_chars,
                        help="longest conversation history a request may carry, in characters "
                             f"(default: {DEFAULTS.max_history_chars})")
    parser.add_argument("--max-conversations", type=int, default=DEFAULTS.max_conversations,
                        help="conversation states kept; the least recently used is forgotten beyond it "
                             f"(default: {DEFAULTS.max_conversations})")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads,
                        help="CPU threads for the generation steps of 8 or more concurrent replies; fewer "
                             f"replies run fastest on one (default: {DEFAULTS.threads})")
    parser.add_argument("--model-name", default=DEFAULTS.model_name,
                        help=f"the model id the OpenAI API reports (default: {DEFAULTS.model_name})")
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        resolve_device(args.device)
        settings = ServerSettings(
            max_concurrent=args.max_concurrent, max_queue=args.max_queue, max_reply_chars=args.max_reply_chars,
            max_message_chars=args.max_message_chars, max_history_chars=args.max_history_chars,
            max_conversations=args.max_conversations, threads=args.threads, api_key=args.api_key,
            model_name=args.model_name)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        read_config(args.ckpt)  # a bad path fails now, not in the background loader
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The engine sets its own thread's count (settings.threads). Elsewhere tensor work is tiny: one
    # thread keeps it from starting an OpenMP pool, which slowed the engine's multi-threaded steps.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    app = create_app(lambda: load_checkpoint(args.ckpt, device=resolve_device(args.device)), settings)
    print(f"serving {args.ckpt} on http://{args.host}:{args.port} (OpenAI API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())

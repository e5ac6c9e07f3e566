"""`python -m nanochat_fast.serve`: the web chat and an OpenAI-compatible API for a trained checkpoint.

    python -m nanochat_fast.serve --ckpt out/            # then open http://127.0.0.1:8000
    # any OpenAI client: base_url="http://127.0.0.1:8000/v1"

One generation loop batches the next character of every active reply into one LSTM step
(continuous batching), so many conversations cost little more than one. The app lives in web/.
"""

import argparse
import errno
import logging
import socket
import sys

import torch
import uvicorn

from nanochat_fast.checkpoint import CheckpointError, load_checkpoint, read_config
from nanochat_fast.cli import add_model_arguments, int_at_least
from nanochat_fast.device import resolve_device
from nanochat_fast.web import ServerSettings
from nanochat_fast.web.app import create_app

DEFAULTS = ServerSettings()
# The server's limits: each a ServerSettings field, set by the flag of the same name.
LIMITS = {
    "max_concurrent": "replies written at once, batched into one LSTM step",
    "max_queue": "requests that may wait for a free slot; beyond them the server answers 429",
    "max_reply_chars": "longest reply, in characters",
    "max_message_chars": "longest message a user may send",
    "max_history_chars": "longest conversation history a request may carry, in characters",
    "max_conversations": "conversation states kept; the least recently used is forgotten beyond it",
    "threads": "CPU threads for the generation steps of 8 or more concurrent replies; fewer replies run "
               "fastest on one",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanochat_fast.serve",
                                     description="Serve a checkpoint as a web chat and an OpenAI-compatible API.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; the default serves this machine only. Binding beyond "
                             "localhost (e.g. 0.0.0.0) exposes the server: set --api-key (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /api and /v1 (the page asks for it); "
                             "meant for binding beyond localhost (default: no key)")
    for name, meaning in LIMITS.items():
        default = getattr(DEFAULTS, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int_at_least(0 if name == "max_queue" else 1),
                            default=default, help=f"{meaning} (default: {default})")
    parser.add_argument("--model-name", default=DEFAULTS.model_name,
                        help=f"the model id the OpenAI API reports (default: {DEFAULTS.model_name})")
    return parser


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to serve on. Bound here, before anything starts, so that a
    port in use is one clear error: uvicorn binds only after the app's startup, with the model already
    loading in a thread, and its exit then aborted the process."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_error(host: str, port: int, error: OSError) -> str:
    """What went wrong when binding host:port, in one line naming the flag to change."""
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} is already in use on {host} (another server?): stop it, or choose a free port "
                f"with --port")
    if error.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root): choose another with --port"
    return f"cannot listen on {host}:{port}: {error.strerror or error} (check --host and --port)"


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    try:
        resolve_device(args.device)  # --device cuda without a GPU fails now, not in the background loader
    except ValueError as error:
        parser.error(str(error))
    settings = ServerSettings(**{name: getattr(args, name) for name in LIMITS}, api_key=args.api_key,
                              model_name=args.model_name)
    try:
        read_config(args.ckpt)  # a bad path fails now, not in the background loader
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as error:  # socket.gaierror included: a --host that does not resolve
        print(f"error: {bind_error(args.host, args.port, error)}", file=sys.stderr)
        return 2
    # The engine sets its own thread's count (settings.threads). Elsewhere tensor work is tiny: one
    # thread keeps it from starting an OpenMP pool, which slowed the engine's multi-threaded steps.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    app = create_app(lambda: load_checkpoint(args.ckpt, device=resolve_device(args.device)), settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.ckpt} on http://{host}:{sock.getsockname()[1]} (OpenAI API at /v1)", file=sys.stderr)
    with sock:
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

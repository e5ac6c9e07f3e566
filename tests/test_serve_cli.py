"""`python -m nanochat_fast.serve`: it serves a checkpoint on 127.0.0.1 (a run's latest/, with a note, while it
has no best/), every flag has help, and bad input or a port in use ends it with a one-line error and exit
status 2 (no traceback, no abort)."""

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nanochat_fast import serve
from web_support import saved_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_every_flag_has_help():
    actions = serve.make_parser()._actions
    assert {"--ckpt", "--host", "--port", "--api-key", "--max-concurrent", "--max-queue"} <= \
        {flag for action in actions for flag in action.option_strings}
    assert all(action.help for action in actions)
    assert "127.0.0.1" in serve.make_parser().format_help()


@pytest.mark.parametrize("args, fragment", [
    (["--max-queue", "-1"], "--max-queue: must be >= 0"),
    (["--max-concurrent", "0"], "--max-concurrent: must be >= 1"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_flags_exit_2(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--ckpt", "anything", *args])
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_a_missing_checkpoint_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanochat_fast.serve", "--ckpt", str(tmp_path / "nothing")],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    directory = saved_checkpoint(tmp_path / "run" / "best")
    with socket.create_server(("127.0.0.1", 0)) as other_server:  # listening, as a running server would be
        port = other_server.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "nanochat_fast.serve", "--ckpt", str(directory.parent),
                                 "--port", str(port)], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2  # not 134: uvicorn's own exit aborted the process with the model loading
    assert result.stderr == (f"error: port {port} is already in use on 127.0.0.1 (another server?): stop it, or "
                             "choose a free port with --port\n")


@pytest.mark.parametrize("code, fragment", [(errno.EACCES, "no permission to listen on port 80"),
                                            (errno.EADDRNOTAVAIL, "cannot listen on 127.0.0.1:80: ")])
def test_other_bind_errors_name_the_flags(code, fragment):
    message = serve.bind_error("127.0.0.1", 80, OSError(code, os.strerror(code)))
    assert fragment in message and "--port" in message and "\n" not in message


@pytest.mark.parametrize("saved", ["best", "latest"])
def test_it_serves_a_checkpoint_on_localhost(tmp_path, saved):
    # A run stopped before its first validation has only latest/: served, with a note in the log.
    directory = saved_checkpoint(tmp_path / "run" / saved)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "nanochat_fast.serve", "--ckpt", str(directory.parent),
                                "--port", str(port), "--model-name", "cli-model"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert process.poll() is None, process.stderr.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "cli-model"
        assert httpx.get(f"{url}/api/config").json()["checkpoint"] == str(directory)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)  # reads, then closes, the pipe
    note = f"(note: {directory.parent} has no best/ checkpoint yet, using latest/)"
    assert (note in stderr.decode()) == (saved == "latest")

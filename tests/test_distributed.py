"""Training on many processes: 2 CPU processes under torchrun (gloo) against one process, on one
"machine" and on two meeting at a rendezvous endpoint; a killed rank ending the run without a hang or a
damaged checkpoint, which resumes on 1 process; and Ctrl-C seen by one rank stopping all of them at the
same step, resumed on 2 processes.

Tolerances: the per-step losses agree within 1e-5 relative, and the parameters and the carried LSTM
state within 2e-4 as max|2 processes - 1 process| / max|1 process| per tensor, in float32. The gradient is the same sum,
but split into two partial sums added by the all-reduce, so it differs by rounding (~1e-7 relative).
AdamW divides each update by the root of the squared gradients, which magnifies that rounding for
elements whose gradient is near zero, the more so with AdamW's beta2 0.99: after 8 steps the
parameters were seen up to 1.02e-4 apart, usually ~1e-6. A real mistake is larger, though not by much:
dropping the world-size factor of the loss puts them 3.8e-4 apart (the per-step losses do not show it).
"""

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from corpus_files import write_chat
from nanochat_fast.checkpoint import load_checkpoint, load_training_state
from nanochat_fast.distributed import Ranks
from nanochat_fast.training import TrainConfig, TrainConfigError, resume, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(hidden_size=16, batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-3, dropout=0.0,
                     max_steps=8, eval_every=4, device="cpu", precision="float32")
RELATIVE_TOLERANCE = 1e-5  # losses
PARAMETER_TOLERANCE = 2e-4  # parameters, after AdamW: see the docstring
RUN_SECONDS = 120  # a generous bound on one torchrun launch (a few seconds here): no test may hang
TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Runs train.py, with rank 1 sending itself a signal in the given step: SIGKILL (no clean-up at all), or
# SIGINT (Ctrl-C, seen by that rank only).
SIGNALLING_TRAIN_PY = """
import os, runpy, signal, sys
from nanochat_fast import training
real_step, steps = training.train_step, []

def step(*args):
    steps.append(args)
    if os.environ["RANK"] == "1" and len(steps) == {step}:
        os.kill(os.getpid(), signal.{signal})
    return real_step(*args)

training.train_step = step
sys.argv[0] = {train_py!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def flags(config: TrainConfig) -> list[str]:
    names = ("data", "out", "hidden_size", "batch_size", "seq_len", "lr", "min_lr", "dropout", "max_steps",
             "eval_every", "device", "precision")
    return [arg for name in names for arg in (f"--{name.replace('_', '-')}", str(getattr(config, name)))]


def signalling_train_py(folder: Path, signal: str, step: int) -> Path:
    script = folder / f"train_then_{signal}.py"
    script.write_text(SIGNALLING_TRAIN_PY.format(signal=signal, step=step, train_py=str(REPO / "train.py")))
    return script


def torchrun_command(script, args, launcher=("--standalone", "--nproc_per_node=2")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), *args]


def torchrun(script, args) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(script, args), capture_output=True, text=True, env=TORCHRUN_ENV,
                          timeout=RUN_SECONDS)


def assert_close_tensors(tensors, reference):
    for name, tensor in tensors.items():
        relative = ((tensor - reference[name]).abs().max() / reference[name].abs().max()).item()
        assert relative < PARAMETER_TOLERANCE, f"{name}: relative difference {relative:.2e}"


def assert_close_parameters(run_dir, reference_dir):
    assert_close_tensors(load_checkpoint(run_dir).model.state_dict(), load_checkpoint(reference_dir).model.state_dict())


def train_state(run_dir) -> dict:
    return load_checkpoint(Path(run_dir) / "latest").config["train_state"]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    config = replace(CONFIG, data=write_chat(tmp_path / "chat.jsonl", 60))
    single = train(replace(config, out=str(tmp_path / "single"))).state
    run = torchrun(REPO / "train.py", flags(replace(config, out=tmp_path / "ddp")))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("best validation") == 1  # rank 0 alone reports

    state = train_state(tmp_path / "ddp")
    assert state["step"] == 8 and state["stream_offsets"] == single.stream_offsets  # every rank's streams
    assert state["train_bits_per_char"] == pytest.approx(single.train_bits_per_char, rel=RELATIVE_TOLERANCE)
    assert [step for step, _ in state["val_bits_per_char"]] == [4, 8]
    assert_close_parameters(tmp_path / "ddp" / "latest", tmp_path / "single" / "latest")
    lstm_state = load_training_state(tmp_path / "ddp" / "latest")[1]
    single_lstm_state = load_training_state(tmp_path / "single" / "latest")[1]
    assert lstm_state["lstm_h"].shape[1] == config.batch_size  # gathered from both ranks
    # The carried state comes from those parameters: as close as they are (it once differed by over 1e-5).
    assert_close_tensors({name: lstm_state[name] for name in single_lstm_state}, single_lstm_state)


def test_two_machines_meeting_at_a_rendezvous_endpoint_train_like_one_process(tmp_path):
    # The README's multi-node command, with two "machines" of one process each on this host.
    config = replace(CONFIG, data=write_chat(tmp_path / "chat.jsonl", 60))
    single = train(replace(config, out=str(tmp_path / "single"))).state
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    launcher = ("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=test")
    command = torchrun_command(REPO / "train.py", flags(replace(config, out=tmp_path / "nodes")), launcher)
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=TORCHRUN_ENV)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=RUN_SECONDS) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # no-op once exited; a hung node must not outlive the test
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    assert sum(stdout.count("best validation") for stdout, _ in outputs) == 1  # rank 0 alone reports

    state = train_state(tmp_path / "nodes")
    assert state["step"] == 8 and state["stream_offsets"] == single.stream_offsets
    assert state["train_bits_per_char"] == pytest.approx(single.train_bits_per_char, rel=RELATIVE_TOLERANCE)
    assert_close_parameters(tmp_path / "nodes" / "latest", tmp_path / "single" / "latest")


def test_killed_rank_ends_the_run_and_the_checkpoint_resumes_on_one_process(tmp_path):
    config = replace(CONFIG, data=write_chat(tmp_path / "chat.jsonl", 60))
    killer = signalling_train_py(tmp_path, "SIGKILL", step=6)
    run = torchrun(killer, flags(replace(config, out=tmp_path / "killed")))  # the timeout: no hang
    assert run.returncode != 0
    assert "FAILED" in run.stderr and "SIGKILL" in run.stderr  # torchrun names the rank and the signal
    assert train_state(tmp_path / "killed")["step"] == 4  # the last good checkpoint, intact and loadable

    resumed = resume(tmp_path / "killed", device="cpu").state  # 2 ranks' streams onto 1 process
    unbroken = train(replace(config, out=str(tmp_path / "unbroken"))).state
    assert resumed.step == 8 and resumed.stream_offsets == unbroken.stream_offsets
    assert resumed.train_bits_per_char == pytest.approx(unbroken.train_bits_per_char, rel=RELATIVE_TOLERANCE)
    assert_close_parameters(tmp_path / "killed" / "latest", tmp_path / "unbroken" / "latest")


def test_batch_size_must_split_evenly_over_the_processes(tmp_path):
    config = replace(CONFIG, data=write_chat(tmp_path / "chat.jsonl", 60), out=str(tmp_path / "out"),
                     batch_size=5)
    with pytest.raises(TrainConfigError, match="--batch-size 5 must be divisible by the number of processes, 2"):
        train(config, Ranks(rank=0, world_size=2))


def test_each_rank_takes_an_equal_share_of_the_streams():
    shares = [Ranks(rank, 4).share(12) for rank in range(4)]
    assert [list(range(12))[share] for share in shares] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_ctrl_c_on_one_rank_stops_all_at_the_same_step_and_resumes_on_two(tmp_path):
    config = replace(CONFIG, data=write_chat(tmp_path / "chat.jsonl", 60))
    run = torchrun(signalling_train_py(tmp_path, "SIGINT", step=6), flags(replace(config, out=tmp_path / "split")))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stopped at step 6" in run.stdout and train_state(tmp_path / "split")["step"] == 6
    split = train_state(tmp_path / "split")  # stopped before the last check: best/'s figure is its sample's
    assert (f"best validation {split['best_sample_bits_per_char']:.4f} bits/char on a quarter of the validation "
            f"text at step {split['best_step']}, saved in") in run.stdout

    resumed = torchrun(REPO / "train.py", ["--resume", "--out", str(tmp_path / "split"), "--device", "cpu"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    unbroken = train(replace(config, out=str(tmp_path / "unbroken"))).state
    state = train_state(tmp_path / "split")
    assert state["step"] == 8 and state["stream_offsets"] == unbroken.stream_offsets
    assert f"best validation {state['best_val_bits_per_char']:.4f} bits/char at step" in resumed.stdout  # the whole's
    assert state["train_bits_per_char"] == pytest.approx(unbroken.train_bits_per_char, rel=RELATIVE_TOLERANCE)
    assert_close_parameters(tmp_path / "split" / "latest", tmp_path / "unbroken" / "latest")

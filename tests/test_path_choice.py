"""The kernel path, forced or measured (kernels/path_choice.py, launch.launch_config): the key, the fastest
correct candidate, the caches in memory and on disk, and the cooperative launch's refusal.

Without a GPU the measurement runs on CPU tensors under the interpreter, switched on for the test (a CPU user
gets the step path without measuring) and with an injected timer: the interpreter's timings mean nothing.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from conftest import DEVICE
from nanochat_fast.kernels import launch, lstm_persistent, path_choice
from nanochat_fast.kernels.gru_recurrence import gru_backward, gru_forward
from nanochat_fast.kernels.launch import CooperativeLaunchRefused, LaunchConfig, launch_config, launch_recurrence
from nanochat_fast.kernels.lstm_recurrence import lstm_backward, lstm_forward
from nanochat_fast.kernels.path_choice import Recurrence

RECURRENCE = Recurrence(gates=4, batch=3, hidden=33, directions=1, lengths=False, dtype=torch.float32, steps=5,
                        backward=False)
CPU = torch.device("cpu")
STEP = LaunchConfig("step", (1, 1, 1), dict(BLOCK_B=16, BLOCK_H=16))
PERSISTENT_32 = LaunchConfig("persistent", (1, 2, 1), dict(BLOCK_B=16, BLOCK_H=32))


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    """Measuring on: on CPU too, choices in tmp_path, none remembered yet, the path not forced."""
    monkeypatch.setenv(path_choice.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(path_choice.PATH_ENV_VAR, raising=False)
    monkeypatch.setattr(path_choice, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(path_choice, "_chosen", {})
    return tmp_path


def fake_timer(monkeypatch, seconds_by_label):
    """time_seconds runs the launch and returns the seconds given for its candidate."""
    def time_seconds(config, run):
        run()
        return seconds_by_label[config.label]
    monkeypatch.setattr(path_choice, "time_seconds", time_seconds)


class FakeRuns:
    """run(config) for `choose`: outputs per candidate label (None: refused), counting the calls."""

    def __init__(self, outputs_by_label):
        self.outputs_by_label, self.calls = outputs_by_label, 0

    def __call__(self, config):
        self.calls += 1
        return self.outputs_by_label[config.label]


def test_every_field_of_the_key_changes_it():
    key = path_choice.path_key(RECURRENCE, "ieee")
    changed = dict(gates=3, batch=4, hidden=32, directions=2, lengths=True, dtype=torch.float64, steps=9, backward=True)
    for field, value in changed.items():
        assert path_choice.path_key(dataclasses.replace(RECURRENCE, **{field: value}), "ieee") != key, field
    assert path_choice.path_key(RECURRENCE, "tf32") != key
    # T in power-of-two buckets: 5 to 8 steps share a key.
    assert path_choice.path_key(dataclasses.replace(RECURRENCE, steps=8), "ieee") == key


def test_the_fastest_correct_candidate_wins(monkeypatch, cache_dir, capsys):
    reference = [torch.ones(4, 5)]
    # The fastest is refused by the device, the next off by 1e-4 (the float32 bound is 1e-5).
    runs = FakeRuns({"step": reference, "persistent 16x16": None, "persistent 32x32": [reference[0] + 1e-4],
                     "persistent 16x32": [reference[0] + 1e-7]})
    fake_timer(monkeypatch, {"step": 3e-3, "persistent 16x16": 1e-4, "persistent 32x32": 1e-3,
                             "persistent 16x32": 2e-3})
    refused_config = LaunchConfig("persistent", (1, 1, 1), dict(BLOCK_B=16, BLOCK_H=16))
    wrong_config = LaunchConfig("persistent", (1, 1, 1), dict(BLOCK_B=32, BLOCK_H=32))
    candidates = [STEP, refused_config, wrong_config, PERSISTENT_32]
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: candidates, runs) == PERSISTENT_32
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "chose persistent 16x32" in lines[0] and "NANOCHAT_LSTM_PATH=step|persistent" in lines[0]
    assert "persistent 16x16 refused" in lines[0] and "persistent 32x32 rejected" in lines[0]
    # Remembered: the second call measures nothing and prints nothing.
    calls = runs.calls
    unused = lambda: pytest.fail("candidates built again")  # noqa: E731
    assert path_choice.choose(RECURRENCE, "ieee", CPU, unused, runs) == PERSISTENT_32
    assert runs.calls == calls and capsys.readouterr().err == ""
    # When the step path is the fastest it stays.
    fake_timer(monkeypatch, {"step": 1e-4, "persistent 16x32": 2e-3})
    other = dataclasses.replace(RECURRENCE, batch=4)
    assert path_choice.choose(other, "ieee", CPU, lambda: [STEP, PERSISTENT_32], runs) == STEP


def test_a_bounded_number_of_repetitions(monkeypatch, cache_dir):
    monkeypatch.setattr(path_choice, "MEASURE_SECONDS", 1.0)
    timed = []

    def time_seconds(config, run):
        timed.append(config.label)
        return 0.2 if config.path == "step" else 1e-6
    monkeypatch.setattr(path_choice, "time_seconds", time_seconds)
    runs = FakeRuns({"step": [torch.ones(2)], "persistent 16x32": [torch.ones(2)]})
    path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP, PERSISTENT_32], runs)
    # Half of MEASURE_SECONDS (1 s) each: a 0.2 s run is timed twice (0.4 s); a short one 1 + MAX_REPETITIONS times.
    assert timed.count("step") == 1 + 1 and timed.count("persistent 16x32") == 1 + path_choice.MAX_REPETITIONS


def test_remembered_in_memory_and_on_disk(monkeypatch, cache_dir):
    fake_timer(monkeypatch, {"step": 2e-3, "persistent 16x32": 1e-3})
    runs = FakeRuns({"step": [torch.ones(2)], "persistent 16x32": [torch.ones(2)]})
    candidates = [STEP, PERSISTENT_32]
    path_choice.choose(RECURRENCE, "ieee", CPU, lambda: candidates, runs)
    [cache_file] = cache_dir.iterdir()
    assert cache_file.name == os.path.basename(path_choice.cache_file(CPU))
    assert json.loads(cache_file.read_text()) == {path_choice.path_key(RECURRENCE, "ieee"): "persistent 16x32"}
    # A cleared memory reads the file.
    monkeypatch.setattr(path_choice, "_chosen", {})
    calls = runs.calls
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: candidates, runs) == PERSISTENT_32
    assert runs.calls == calls
    # So does another process (whose run would fail if called).
    script = ("import torch; from nanochat_fast.kernels import path_choice; "
              "from nanochat_fast.kernels.launch import LaunchConfig; "
              f"candidates = [LaunchConfig{(STEP.path, STEP.grid, STEP.meta)}, "
              f"LaunchConfig{(PERSISTENT_32.path, PERSISTENT_32.grid, PERSISTENT_32.meta)}]; "
              f"recurrence = path_choice.Recurrence(**{dataclasses.asdict(RECURRENCE)}); "
              "print(path_choice.choose(recurrence, 'ieee', torch.device('cpu'), lambda: candidates, None).label)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.stdout.strip() == "persistent 16x32", result.stderr
    # The remembered candidate no longer offered (another GPU's limits, say): measured again.
    monkeypatch.setattr(path_choice, "_chosen", {})
    other_tiles = LaunchConfig("persistent", (1, 1, 1), dict(BLOCK_B=16, BLOCK_H=64))
    fake_timer(monkeypatch, {"step": 2e-3, "persistent 16x64": 3e-3})
    runs_more = FakeRuns({"step": [torch.ones(2)], "persistent 16x64": [torch.ones(2)]})
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP, other_tiles], runs_more) == STEP
    assert runs_more.calls > 0


def test_the_step_path_alone_is_not_measured(cache_dir):
    runs = FakeRuns({})  # any run would fail
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP], runs) == STEP and runs.calls == 0


def test_written_atomically(monkeypatch, cache_dir):
    path = path_choice.cache_file(CPU)
    path_choice.write_choice(path, "old key", "step")
    replaced = []
    real_replace = os.replace

    def replace(source, target):  # at the swap, the new file is whole, beside the old one, still unchanged
        replaced.append((os.path.dirname(source), json.loads(Path(source).read_text()),
                         json.loads(Path(target).read_text())))
        real_replace(source, target)
    monkeypatch.setattr(path_choice.os, "replace", replace)
    path_choice.write_choice(path, "new key", "persistent 16x32")
    assert replaced == [(str(cache_dir), {"old key": "step", "new key": "persistent 16x32"}, {"old key": "step"})]

    def interrupted_dump(choices, f, **kwargs):
        f.write('{"old key": "st')
        raise KeyboardInterrupt
    monkeypatch.setattr(path_choice.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        path_choice.write_choice(path, "third key", "step")
    assert [p.name for p in cache_dir.iterdir()] == [os.path.basename(path)]  # no temporary file left
    assert path_choice.read_choices(path) == {"old key": "step", "new key": "persistent 16x32"}


@pytest.mark.parametrize("content", ['{"truncated": "st', '["a list"]', '{"key": 3}'])
def test_a_corrupt_file_is_ignored_with_a_warning(monkeypatch, cache_dir, content):
    path = path_choice.cache_file(CPU)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    fake_timer(monkeypatch, {"step": 2e-3, "persistent 16x32": 1e-3})
    runs = FakeRuns({"step": [torch.ones(2)], "persistent 16x32": [torch.ones(2)]})
    with pytest.warns(UserWarning, match="ignoring the path-choice cache") as warned:
        assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP, PERSISTENT_32], runs) == PERSISTENT_32
    assert all("\n" not in str(warning.message) for warning in warned)
    assert path_choice.read_choices(path) == {path_choice.path_key(RECURRENCE, "ieee"): "persistent 16x32"}


def test_nothing_measured_during_a_cuda_graph_capture(monkeypatch, cache_dir):
    monkeypatch.setattr(path_choice, "capturing", lambda device: True)
    runs = FakeRuns({})  # any run would fail
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP, PERSISTENT_32], runs) == STEP
    assert runs.calls == 0 and not list(cache_dir.iterdir())
    # A remembered choice still holds.
    path_choice.write_choice(path_choice.cache_file(CPU), path_choice.path_key(RECURRENCE, "ieee"), "persistent 16x32")
    assert path_choice.choose(RECURRENCE, "ieee", CPU, lambda: [STEP, PERSISTENT_32], runs) == PERSISTENT_32


def test_the_environment_forces_a_path(monkeypatch):
    monkeypatch.delenv("NANOCHAT_LSTM_PATH", raising=False)
    # auto on CPU: the step path, nothing measured (the run would fail if called).
    assert launch_config(RECURRENCE, CPU, None).path == "step"
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "persistent")
    config = launch_config(RECURRENCE, CPU, None)
    # The interpreter: one program, one direction a launch.
    assert (config.path, config.grid) == ("persistent", (1, 1, 1))
    assert config.meta["BLOCK_B"] >= 3 and config.meta["BLOCK_H"] >= 33
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "step")
    monkeypatch.setattr(path_choice, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    assert launch_config(RECURRENCE, CPU, None).path == "step"
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "fastest")
    with pytest.raises(ValueError, match="NANOCHAT_LSTM_PATH='fastest'"):
        launch_config(RECURRENCE, CPU, None)


def _lstm_inputs(steps=3, batch=2, hidden=8):
    generator = torch.Generator().manual_seed(3)
    return dict(gates_x=torch.randn(steps, 1, batch, 4 * hidden, generator=generator),
                h0=torch.randn(1, batch, hidden, generator=generator),
                c0=torch.randn(1, batch, hidden, generator=generator),
                w_hh=torch.randn(1, 4 * hidden, hidden, generator=generator) / hidden ** 0.5,
                grad_output=torch.randn(steps, 1, batch, hidden, generator=generator),
                grad_c_last=torch.randn(1, batch, hidden, generator=generator))


def _lstm_forward_backward(x):
    h_all, cells_all, gates = lstm_forward(x["gates_x"], x["h0"], x["c0"], x["w_hh"])
    return h_all, cells_all, gates, *lstm_backward(x["grad_output"], x["grad_c_last"], gates, cells_all, x["w_hh"])


def test_measured_through_the_lstm_recurrence(monkeypatch, cache_dir):
    x = _lstm_inputs()
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "step")
    reference = _lstm_forward_backward(x)
    monkeypatch.delenv("NANOCHAT_LSTM_PATH")
    fake_timer(monkeypatch, {"step": 2e-3, "persistent 16x16": 1e-3})
    for ours, ref in zip(_lstm_forward_backward(x), reference, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    choices = path_choice.read_choices(path_choice.cache_file(CPU))
    assert sorted(choices.values()) == ["persistent 16x16"] * 2  # forward and backward, each its own key
    assert sorted(key.split()[-1] for key in choices) == ["backward", "forward"]


def test_an_incorrect_fast_candidate_is_rejected(monkeypatch, cache_dir):
    real_forward_loop = lstm_persistent.forward_loop

    def wrong_forward_loop(config, gates_x, w_hh, lengths, h_all, cells_all, gates):
        real_forward_loop(config, gates_x, w_hh, lengths, h_all, cells_all, gates)
        h_all[-1] += 1e-3  # a stale or misplaced tile would be off by far more
    monkeypatch.setattr(lstm_persistent, "forward_loop", wrong_forward_loop)
    fake_timer(monkeypatch, {"step": 2e-3, "persistent 16x16": 1e-3})
    x = _lstm_inputs()
    lstm_forward(x["gates_x"], x["h0"], x["c0"], x["w_hh"])
    assert list(path_choice.read_choices(path_choice.cache_file(CPU)).values()) == ["step"]


def test_measured_through_the_gru_recurrence(monkeypatch, cache_dir):
    steps, batch, hidden = 3, 2, 8
    generator = torch.Generator().manual_seed(4)
    gates_x, h0 = torch.randn(steps, 1, batch, 3 * hidden, generator=generator), torch.randn(1, batch, hidden)
    w_hh, b_hn = torch.randn(1, 3 * hidden, hidden, generator=generator) / hidden ** 0.5, torch.randn(1, hidden)
    grad_output = torch.randn(steps, 1, batch, hidden, generator=generator)
    fake_timer(monkeypatch, {"step": 1e-3, "persistent 16x16": 2e-3})
    h_all, saved = gru_forward(gates_x, h0, w_hh, b_hn, None)
    gru_backward(grad_output, saved, h_all, w_hh, None)
    choices = path_choice.read_choices(path_choice.cache_file(CPU))
    assert sorted(choices.values()) == ["step"] * 2 and all(key.startswith("gates=3 ") for key in choices)


class FakeKernel:
    """kernel[grid](*args, **meta) raising `error`, recording the keywords."""

    def __init__(self, error):
        self.error, self.__name__, self.meta = error, "fake_kernel", None

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.meta = meta
            raise self.error
        return run


def test_cooperative_launch_and_its_refusal():
    from triton.backends.nvidia.compiler import CUDAOptions

    assert "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__  # the option Triton's launcher reads
    kernel = FakeKernel(RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch"))
    with pytest.raises(CooperativeLaunchRefused, match="fake_kernel: grid"):
        launch.launch_cooperative(kernel, (200, 1, 1), BLOCK_B=16)
    assert kernel.meta == dict(launch_cooperative_grid=True, BLOCK_B=16)
    # So is a compiled program over the device's shared memory.
    with pytest.raises(CooperativeLaunchRefused, match="shared memory"):
        launch.launch_cooperative(FakeKernel(triton.runtime.OutOfResources(240000, 232448, "shared memory")), (1, 1, 1))
    with pytest.raises(RuntimeError, match="out of memory") as raised:  # other errors pass through
        launch.launch_cooperative(FakeKernel(RuntimeError("Triton Error [CUDA]: out of memory")), (1, 1, 1))
    assert not isinstance(raised.value, CooperativeLaunchRefused)


def test_a_refused_launch_falls_back_to_the_step_path(monkeypatch, cache_dir):
    def run(config, x, out):
        if config.path == "persistent":
            raise CooperativeLaunchRefused("grid (200, 1, 1) refused")
        out.copy_(x + 1)
    recurrence = dataclasses.replace(RECURRENCE, steps=1)
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "persistent")
    with pytest.warns(UserWarning, match="refused; running the step path"):
        [out] = launch_recurrence(run, recurrence, [torch.zeros(2)], lambda: [torch.empty(2)])
    assert torch.equal(out, torch.ones(2))
    # Measured: a refused candidate is never chosen (never timed either).
    monkeypatch.delenv("NANOCHAT_LSTM_PATH")
    fake_timer(monkeypatch, {"step": 2e-3})
    [out] = launch_recurrence(run, recurrence, [torch.zeros(2)], lambda: [torch.empty(2)])
    assert torch.equal(out, torch.ones(2))
    assert list(path_choice.read_choices(path_choice.cache_file(CPU)).values()) == ["step"]


@pytest.mark.parametrize("tf32", [True, False])
def test_a_forced_persistent_path_that_does_not_fit_says_why(monkeypatch, tf32):
    monkeypatch.setenv(path_choice.PATH_ENV_VAR, "persistent")
    monkeypatch.setattr(launch, "persistent_configs", lambda recurrence, device: [])  # no resident tiling
    monkeypatch.setattr(launch, "cudnn_rnn_uses_tf32", lambda: tf32)
    with pytest.raises(ValueError, match="do not fit this GPU") as error:
        launch_config(RECURRENCE, torch.device("cuda"), run=None)
    assert ("fp32_precision = 'tf32'" in str(error.value)) == (not tf32)  # the way out, where there is one


@pytest.mark.skipif(DEVICE != "cuda", reason="measuring the paths needs a GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_auto_on_a_gpu_matches_the_step_path(monkeypatch, tmp_path, cell):
    monkeypatch.setenv(path_choice.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(path_choice, "_chosen", {})
    steps, batch, hidden = 37, 40, 200
    generator = torch.Generator().manual_seed(8)
    gates = 4 if cell == "lstm" else 3
    x = {name: torch.randn(*shape, generator=generator).to(DEVICE) for name, shape in dict(
        gates_x=(steps, 1, batch, gates * hidden), h0=(1, batch, hidden), c0=(1, batch, hidden),
        w_hh=(1, gates * hidden, hidden), b_hn=(1, hidden), grad_output=(steps, 1, batch, hidden),
        grad_c_last=(1, batch, hidden)).items()}
    x["w_hh"] /= hidden ** 0.5

    def run():
        if cell == "lstm":
            return _lstm_forward_backward(x)
        h_all, saved = gru_forward(x["gates_x"], x["h0"], x["w_hh"], x["b_hn"], None)
        return h_all, saved, *gru_backward(x["grad_output"], saved, h_all, x["w_hh"], None)

    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "step")
    reference = run()
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", "auto")
    for ours, ref in zip(run(), reference, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    choices = path_choice.read_choices(path_choice.cache_file(torch.device(DEVICE)))
    assert len(choices) == 2, choices  # forward and backward

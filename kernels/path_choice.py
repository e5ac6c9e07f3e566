"""The fastest correct path of a recurrence, measured where it runs: the first call of its kind times the
candidates (the step path, the persistent path at each of its resident tilings) on the caller's device with
the call's own inputs, checks each against the step path's output, and keeps the fastest correct one, as
`torch.backends.cudnn.benchmark` and `triton.autotune` do. The choice is remembered in memory and in a JSON
file per device name and torch / triton versions (`$NANOCHAT_CACHE_DIR`, default ~/.cache/nanochat_fast/),
so a later process measures nothing.

Nothing here knows a kernel: `choose` gets the candidates (`launch.LaunchConfig`s) and a function that runs
one of them into scratch outputs (`launch.launch_config` builds both).
"""

import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import triton

PATHS = ("auto", "step", "persistent")
PATH_ENV_VAR = "NANOCHAT_LSTM_PATH"  # the LSTM's and the GRU's: auto (measure), or a path forced
CACHE_DIR_ENV_VAR = "NANOCHAT_CACHE_DIR"
# Timed repetitions of all candidates of a key together: within the 2 s a first call may spend on it; the
# warm-up run of each candidate (compilation, the CUDA graph's capture, the output checked) comes on top.
MEASURE_SECONDS = 1.0
MAX_REPETITIONS = 10  # per candidate, after its first timed run; fewer when a run is long
# Measuring needs timings that mean something: a GPU's. Under the Triton interpreter (CPU tensors) every
# program is a Python loop and the persistent path a single program, so `launch.launch_config` gives a CPU
# user the step path without measuring; the tests add "cpu" here, and inject `time_seconds`, to run the
# measurement itself.
MEASURED_DEVICE_TYPES = ("cuda",)

_chosen = {}  # (device, key) -> the chosen candidate, this process: a call's only cost once chosen
_lock = threading.Lock()  # one measurement at a time: two threads at a new key measure it once


@dataclass(frozen=True)
class Recurrence:
    """What a recurrence's speed depends on, besides the device and the dot precision: the cell (its gate
    count), the shape, variable lengths or not, the dtype, the steps (a power-of-two bucket of them in the
    key) and the pass. Forward and backward choose apart: the tensors backward reads (the saved gates, cell
    states, h) are the same on both paths. Grad mode is not in it: the forward does the same work without."""
    gates: int
    batch: int
    hidden: int
    directions: int
    lengths: bool
    dtype: torch.dtype
    steps: int
    backward: bool


def path_key(recurrence, precision):
    """The cache key of a recurrence at a dot precision (the meta `launch.tile_meta` gives)."""
    r = recurrence
    return (f"gates={r.gates} batch={r.batch} hidden={r.hidden} directions={r.directions} lengths={int(r.lengths)} "
            f"dtype={str(r.dtype).removeprefix('torch.')} precision={precision} "
            f"steps<={triton.next_power_of_2(r.steps)} {'backward' if r.backward else 'forward'}")


def tolerance(dtype, precision):
    """The largest difference from the step path, relative to its largest value, a correct candidate shows."""
    # float32 and float64: the tests' bounds (persistent against step in tests/test_persistent_tiles.py,
    # against float64 in tests/test_lstm_vs_torch.py). Half precision and TF32 round each product's inputs
    # (and half each stored value), and the paths sum in different orders, so their roundings may differ by
    # an ulp that later steps carry on: a few units of the rounding, while a wrong or stale tile is off by
    # a tenth of the values or more.
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32 and precision != "tf32":
        return 1e-5
    rounding = 2.0 ** -10 if dtype == torch.float32 else torch.finfo(dtype).eps  # tf32: 10 mantissa bits
    return 4 * rounding


def relative_difference(outputs, reference):
    """max over the output tensors of max|ours - ref| / max|ref|."""
    return max(((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
               for ours, ref in zip(outputs, reference, strict=True))


def capturing(device):
    """Whether the current stream is capturing a CUDA graph: nothing is measured then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def time_seconds(config, run):
    """Device seconds of run() (a launch of `config`), between two events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def cache_file(device):
    """The file of this device's choices: one per device name and torch / triton versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"path-choice-{name}-torch-{torch.__version__}-triton-{triton.__version__}")
    directory = os.environ.get(CACHE_DIR_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "nanochat_fast")
    return os.path.join(directory, stem + ".json")


def read_choices(path):
    """{key: label} from the file; {} if there is none, and (with a warning) if it cannot be read."""
    try:
        with open(path) as f:
            choices = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring the path-choice cache {path}: {error}", stacklevel=2)
        return {}
    if not isinstance(choices, dict) or not all(isinstance(label, str) for label in choices.values()):
        warnings.warn(f"ignoring the path-choice cache {path}: not a JSON object of labels", stacklevel=2)
        return {}
    return choices


def write_choice(path, key, label):
    """Adds key: label to the file, atomically: a temporary file beside it, then os.replace, so a reader
    (another process) sees the old file or the new one, never part of one."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        choices = {**read_choices(path), key: label}  # re-read: another process may have added keys
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w") as f:
                json.dump(choices, f, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:  # a read-only home: the choice stays in this process's memory
        warnings.warn(f"could not write the path-choice cache {path}: {error}", stacklevel=2)


def measure(candidates, run, bound):
    """(the fastest correct candidate, a line saying what each cost). candidates[0] is the step path, the
    reference; run(config) -> its outputs, or None when the device refused to launch it."""
    reference = run(candidates[0])  # also the step path's warm-up
    notes, seconds = [], {}
    runnable = [candidates[0]]
    for config in candidates[1:]:
        outputs = run(config)  # the warm-up: compiles, and gives the outputs checked once
        if outputs is None:
            notes.append(f"{config.label} refused by the device")
            continue
        difference = relative_difference(outputs, reference)
        if not difference <= bound:  # NaN too
            notes.append(f"{config.label} rejected (differs from step by {difference:.1e})")
            continue
        runnable.append(config)
    del reference
    budget = MEASURE_SECONDS / len(runnable)
    for config in runnable:
        times = [time_seconds(config, lambda config=config: run(config))]
        repetitions = min(MAX_REPETITIONS, int(budget / max(times[0], 1e-9)) - 1)
        times += [time_seconds(config, lambda config=config: run(config)) for _ in range(repetitions)]
        seconds[config.label] = statistics.median(times)
    fastest = min(runnable, key=lambda config: seconds[config.label])
    costs = [f"{label} {1e3 * value:.3g} ms" for label, value in seconds.items()]
    return fastest, ", ".join(costs + notes)


def choose(recurrence, precision, device, candidates, run):
    """The candidate to launch for this recurrence on `device`: the remembered one, or the fastest correct
    one of candidates() (the step path first), measured now (see `measure`); during a CUDA graph's capture,
    the remembered one or the step path."""
    key = path_key(recurrence, precision)
    chosen = _chosen.get((device, key))
    if chosen is not None:
        return chosen
    with _lock:
        if (device, key) in _chosen:  # chosen by another thread meanwhile
            return _chosen[(device, key)]
        path, options = cache_file(device), candidates()
        label = read_choices(path).get(key)
        remembered = next((config for config in options if config.label == label), None)
        if remembered is not None or len(options) == 1:  # the step path alone: nothing to measure
            _chosen[(device, key)] = remembered or options[0]
            return _chosen[(device, key)]
        if capturing(device):
            return options[0]
        started = time.perf_counter()
        chosen, costs = measure(options, run, tolerance(recurrence.dtype, precision))
        _chosen[(device, key)] = chosen
        write_choice(path, key, chosen.label)
        print(f"nanochat_fast: measured the recurrence's paths at {key} in {time.perf_counter() - started:.2f} s "
              f"({costs}): chose {chosen.label}, remembered in {path}; {PATH_ENV_VAR}=step|persistent forces a "
              "path", file=sys.stderr)
        return chosen

"""Benchmark set-up: the device, and a closing table of each case's ratio to its baseline.

Every benchmark records `extra_info["case"]`, `["impl"]`, `["chars"]` (characters processed per
call); the implementation named "baseline" in a case is what the others are divided by. The ratios
printed at the end come from this run only (absolute times only mean something on a named GPU).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronized(fn):
    """fn, followed by a CUDA synchronize so the timer sees the GPU's work, not just the launches."""
    if DEVICE != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if "case" in b.extra_info and b.stats]
    if not benchmarks:
        return
    by_case = {}
    for bench in benchmarks:
        by_case.setdefault(bench.extra_info["case"], {})[bench.extra_info["impl"]] = bench
    write = terminalreporter.write_line
    write("")
    write(f"{'case':<48} {'implementation':<28} {'median ms':>10} {'chars/s':>12} {'speed-up':>9}")
    for case, impls in by_case.items():
        baseline = next((b for name, b in impls.items() if name.startswith("baseline")), None)
        for name, bench in impls.items():
            median_s = bench.stats.median
            chars_per_second = bench.extra_info["chars"] / median_s
            speedup = f"{baseline.stats.median / median_s:.2f}x" if baseline else "-"
            write(f"{case:<48} {name:<28} {median_s * 1e3:>10.3f} {chars_per_second:>12,.0f} {speedup:>9}")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """The main thread on one thread, as in the serve CLI (the engine thread sets its own thread count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_collection_modifyitems(items):
    # The serving benchmarks first. A benchmark that runs multi-threaded ops in the main thread leaves
    # an OpenMP thread pool behind, and with it the engine thread's multi-threaded steps in their own
    # thread ran 2-3x slower (measured on 2 cores).
    items.sort(key=lambda item: item.path.name not in ("test_bench_batching.py", "test_bench_serve.py"))

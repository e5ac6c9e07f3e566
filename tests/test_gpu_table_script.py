"""The GPU benchmark scripts (the table, the persistent tiles' sweep) run end to end (tiny shape, CPU,
Triton interpreter), so the command a GPU machine runs is not first exercised there."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_table.py"
SWEEP_SCRIPT = SCRIPT.with_name("persistent_tiles_sweep.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real table runs instead")
def test_smoke_table_has_a_measured_row_per_provider(tmp_path):
    results = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--write", str(results)], check=True,
                   capture_output=True, text=True, timeout=300)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| (3, 4, 33) | 2 |")]
    assert [row.split("|")[3].strip() for row in rows] == [
        "ours fp32 tf32", "nn.LSTM fp32 tf32", "ours fp32 tf32x3", "nn.LSTM fp32 ieee", "ours fp32 tf32 persistent",
        "ours fp32 bidirectional", "nn.LSTM fp32 bidirectional", "ours GRU fp32", "nn.GRU fp32", "ours fp32 packed",
        "nn.LSTM fp32 packed"]
    assert "(ours: tf32)" in results.read_text()  # the header's flags: torch's defaults
    # Each float32 row ran at the precision it names; the flags were restored after it (the bidirectional row
    # names none).
    assert [rows[i].split("|")[-2].strip() for i in (0, 2, 4, 5)] == [
        "triton (step, tf32)", "triton (step, tf32x3)", "triton (persistent, tf32)", "triton (auto, tf32)"]
    for row in rows:
        fwd_ms = float(row.split("|")[4])
        assert fwd_ms > 0, row
    recurrence_rows = [line for line in results.read_text().splitlines()
                       if line.startswith("| (3, 4, 33) | persistent fp32 |")]
    assert len(recurrence_rows) == 1 and all(float(cell) > 0 for cell in recurrence_rows[0].split("|")[3:5])
    generation_rows = [line for line in results.read_text().splitlines() if line.startswith("| 2x33 |")]
    assert [row.split("|")[2].strip() for row in generation_rows] == [
        "eager decode fp32", "host engine fp32", "nn.LSTM + head + sample_next fp32"]
    for row in generation_rows:  # batch 1 us/char greedy and sampled, batch 3 chars/s greedy and sampled
        assert all(float(cell.replace(",", "")) > 0 for cell in row.split("|")[3:7]), row


def test_without_gpu_or_smoke_it_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA GPU found" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real sweep runs instead")
def test_smoke_sweep_checks_every_tiling_against_the_step_path():
    result = subprocess.run([sys.executable, str(SWEEP_SCRIPT), "--smoke"], check=True, capture_output=True,
                            text=True, timeout=300)
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| (17, 1, 33)")]
    assert len(rows) >= 4, result.stdout  # several tilings, each on 4 and 8 warps
    assert all(float(row[7]) < 1e-5 for row in rows), result.stdout  # agrees with the step path
    assert [row[8].strip() for row in rows].count("yes") == 1, result.stdout  # persistent_tiles' pick is one of them


def test_gpu_session_script_parses_and_names_existing_tests():
    # bench/gpu_session.sh runs only on a lent GPU: a renamed test file or a syntax error would first
    # show there, in the session's few minutes.
    session = SCRIPT.with_name("gpu_session.sh")
    subprocess.run(["bash", "-n", str(session)], check=True)
    text = session.read_text()
    named = re.search(r"GPU_TESTS=\((.*?)\)", text, re.S).group(1).split()
    root = SCRIPT.parents[1]
    assert named and all((root / path).is_file() for path in named), named
    for path in re.findall(r"python (?:-m pytest \S+ )?(bench/\S+\.py)", text):
        assert (root / path).is_file(), path

"""bench/recipe_vs_baseline.py runs end to end in seconds (--smoke), so the benchmark's command works when
it is run for real: both runs' rows and the comparison, into the results file."""

import re
import subprocess
import sys
from pathlib import Path

from corpus_files import write_chat, write_text

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "recipe_vs_baseline.py"


def run_smoke(tmp_path, data) -> str:
    results = tmp_path / "RESULTS.md"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", data, "--write", str(results)], check=True,
                   capture_output=True, text=True, timeout=300)
    return results.read_text()


def test_text_data_compares_the_default_with_the_plain_script_at_its_width(tmp_path):
    report = run_smoke(tmp_path, write_text(tmp_path / "words.txt", 20_000))
    ours = re.search(r"\| `python train.py` \(1 x 16 LSTM, embedding 16, dropout [\d.]+, weight drop [\d.]+, "
                     r"(?:adamw|muon), \d+ streams\) \| 3 \| (\d\.\d{4}) \|", report)  # 20,000 characters: one layer
    plain = re.search(r"\| plain nn.LSTM script \(2 x 16\) \| [\d,]+ \| (\d\.\d{4}) \|", report)
    assert ours and plain, report
    stated = re.search(r"The default is (\d+\.\d)% (below|above) the baseline", report)
    gain = 1 - float(ours[1]) / float(plain[1])  # from the table's rounded figures: within 0.1%
    assert stated and abs(float(stated[1]) * (1 if stated[2] == "below" else -1) - 100 * gain) <= 0.1, report
    assert "avx2" in report or "none of" in report  # the CPU's flags are recorded
    assert re.search(r"torch's CPU capability \w+, native bfloat16 (True|False)", report), report  # what ran


def test_chat_data_is_measured_against_the_plain_2_x_256(tmp_path):
    report = run_smoke(tmp_path, write_chat(tmp_path / "chat.jsonl", 600))
    assert re.search(r"\| plain nn.LSTM script \(2 x 256\) \| [\d,]+ \| \d\.\d{4} \|", report), report

"""The report card: written by train.py at the end of a run and by `python -m nanochat_fast.report`, with
every section, the run's own figures, a loss plot that decodes as a PNG, and seeded sample replies."""

import random
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from corpus_files import WORDS, write_chat
from nanochat_fast.checkpoint import load_checkpoint, read_config
from nanochat_fast.generation import CHAT_SAMPLING, Chatbot
from nanochat_fast.report import CHAT_PROMPTS, SAMPLE_CHARS, SAMPLE_SEED, main, write_report
from nanochat_fast.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["## Configuration", "## Data", "## Results", "![loss curves](loss.png)", "## Hardware and versions",
            "## Samples"]


def test_a_finished_run_writes_the_report_and_the_cli_rewrites_it(tmp_path, capsys):
    train_py = runpy.run_path(str(REPO / "train.py"))["main"]
    assert train_py(["--data", write_chat(tmp_path / "chat.jsonl", 60), "--out", str(tmp_path / "run"),
                     "--hidden-size", "16", "--batch-size", "4", "--seq-len", "16", "--max-steps", "6",
                     "--eval-every", "3", "--device", "cpu"]) == 0
    assert f"report: {tmp_path / 'run' / 'report.md'}" in capsys.readouterr().out
    state = read_config(tmp_path / "run" / "latest")["train_state"]
    report = (tmp_path / "run" / "report.md").read_text()
    positions = [report.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    final_step, final_bits = state["val_bits_per_char"][-1][0], state["final_val_bits_per_char"]  # the whole text's
    assert f"| final validation | {final_bits:.4f} bits/char at step {final_step} |" in report
    assert f"| best validation | {state['best_val_bits_per_char']:.4f} bits/char at step {state['best_step']}" in report
    assert f"{state['chars_per_second']:,.0f} training chars/s" in report
    assert "| train / validation conversations | 54 / 6 |" in report and "| processes | 1 |" in report
    model = read_config(tmp_path / "run" / "latest")["model"]  # chat data: one layer, the embedding of its vocabulary
    assert (f"| model | 1 x 16 LSTM, embedding {model['embedding_size']}, dropout {model['dropout']:g}, "
            f"weight drop {model['weight_drop']:g}, vocabulary {model['vocab_size']} |") in report
    bot = Chatbot(load_checkpoint(tmp_path / "run").model, load_checkpoint(tmp_path / "run").tokenizer,
                  CHAT_SAMPLING, max_reply_chars=SAMPLE_CHARS, seed=SAMPLE_SEED)
    for prompt in CHAT_PROMPTS:
        bot.reset()
        assert f"**User:** {prompt}\n\n```text\n{bot.reply(prompt)}\n```" in report
    image = imread(tmp_path / "run" / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0

    (tmp_path / "run" / "report.md").unlink()
    (tmp_path / "run" / "loss.png").unlink()
    assert main(["--ckpt", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.md").read_text() == report  # seeded samples: the same report
    assert imread(tmp_path / "run" / "loss.png").shape == image.shape


def test_plain_text_runs_get_seeded_samples(tmp_path):
    text = tmp_path / "words.txt"
    text.write_text(" ".join(random.choices(WORDS, k=600)))
    train(TrainConfig(data=str(text), out=str(tmp_path / "run"), hidden_size=8, batch_size=2, seq_len=8,
                      max_steps=3, device="cpu"))
    report = write_report(tmp_path / "run").read_text()
    assert "(text)" in report and "**User:**" not in report and report.count("```text\n") == 2


@pytest.mark.parametrize("make_folder, message", [
    (lambda path: path, "does not exist"),
    (lambda path: path.mkdir() or path, "is not a training run folder"),
])
def test_cli_bad_ckpt_is_one_line_and_exit_2(tmp_path, make_folder, message):
    folder = make_folder(tmp_path / "nowhere")
    run = subprocess.run([sys.executable, "-m", "nanochat_fast.report", "--ckpt", str(folder)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_a_run_without_best_yet_samples_latest_and_a_checkpoint_folder_names_its_run(tmp_path, capsys):
    run = train(TrainConfig(data=write_chat(tmp_path / "chat.jsonl", 30), out=str(tmp_path / "run"), hidden_size=8,
                            batch_size=2, seq_len=8, max_steps=3, device="cpu")).out
    capsys.readouterr()  # the run's progress
    assert main(["--ckpt", str(run / "best")]) == 2
    assert capsys.readouterr().err == (f"error: {run / 'best'} is not a training run folder: it is a checkpoint "
                                       f"inside one; give the run folder: --ckpt {run}\n")
    shutil.rmtree(run / "best")  # as a run stopped before its first validation leaves it
    report = write_report(run).read_text()
    assert f"## Samples (latest checkpoint: the run has no best/ yet, seed {SAMPLE_SEED})" in report

"""The plain baseline the default recipe is measured against: `torch.nn.LSTM` trained by the recipe of
shared/docs/baseline-recipe.md, on our own data split, batches and evaluator, for a wall-clock budget.

2 x 256 (dropout 0.2, embedding of the hidden size), 32 streams x 128 characters with the state carried,
AdamW 3e-3 with cosine decay to 3e-4 by wall time, weight decay 0.01, gradient norm clipped at 1. Ten
evaluations over the whole validation text and one at the end; the result is the best. In the
baseline's favour, its budget counts training steps only: loading the data and evaluating come on top
(a `python train.py` run's budget holds everything).

    python bench/plain_baseline.py --data ../shared/data/tinyshakespeare.txt --minutes 5 --hidden-size 512
"""

import argparse
import math
import time

import torch
from torch import nn

from nanochat_fast.batching import TrainStreams
from nanochat_fast.data import load_corpus
from nanochat_fast.training import evaluate_bits_per_char, target_loss_sum


class PlainLSTM(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, dropout):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids, state=None):
        output, state = self.lstm(self.embedding(ids), state)
        return self.head(self.dropout(output)), state


def train_plain(data=None, minutes=5.0, hidden_size=256, num_layers=2, dropout=0.2, batch_size=32, seq_len=128,
                lr=3e-3, min_lr=3e-4, weight_decay=0.01, evaluations=10, seed=1337) -> dict:
    """Train for `minutes` of wall time in training steps; the validation curve."""
    torch.manual_seed(seed)
    corpus = load_corpus(data)
    model = PlainLSTM(corpus.tokenizer.vocab_size, hidden_size, num_layers, dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    streams = TrainStreams(corpus.train_ids, corpus.train_mask, batch_size, seq_len)
    budget, state, steps, curve, evaluating_seconds = minutes * 60, None, 0, [], 0.0

    def evaluate():
        nonlocal evaluating_seconds
        evaluation_started = time.perf_counter()
        curve.append([steps, evaluate_bits_per_char(model, corpus.val_ids, corpus.val_mask, seq_len,
                                                    torch.device("cpu"), precision="float32")])
        evaluating_seconds += time.perf_counter() - evaluation_started

    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started - evaluating_seconds) < budget:
        for group in optimizer.param_groups:  # cosine by wall time
            group["lr"] = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * elapsed / budget))
        batch = streams.next_batch()
        if batch.restarted is not None:
            state = tuple(part * (~batch.restarted).float()[None, :, None] for part in state)
        logits, state = model(batch.inputs, state)
        loss_sum, count = target_loss_sum(logits, batch.targets, batch.target_mask)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state = tuple(part.detach() for part in state)
        steps += 1
        if elapsed >= budget * (len(curve) + 1) / (evaluations + 1):
            evaluate()
    evaluate()
    return {"steps": steps, "val_bits_per_char": curve, "best_val_bits_per_char": min(bits for _, bits in curve),
            "training_seconds": time.perf_counter() - started - evaluating_seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="as train.py's --data (default: the embedded chat corpus)")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget (default: 5)")
    parser.add_argument("--hidden-size", type=int, default=256, help="LSTM width (default: 256)")
    args = parser.parse_args()
    result = train_plain(args.data, args.minutes, args.hidden_size)
    print(f"{result['steps']} steps, best validation {result['best_val_bits_per_char']:.4f} bits/char, "
          f"{result['training_seconds']:.0f} s of training steps")

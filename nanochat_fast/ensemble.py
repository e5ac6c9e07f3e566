"""An ensemble of character models: `config.members` copies of one model, each with its own weights from
its own initialisation, trained side by side on the same batches but each on its own loss, with its own
optimizer; predicting, they average their probabilities.

Why: on a CPU of few cores, two models trained side by side, a core each, each make over half the steps
that one model makes on both cores (small matrix products gain little from a second thread); the average
of two models' predictions is far better on held-out text than either, while one model's extra steps at
the end of a short run gain little (bench/RESULTS.md).

`CharEnsemble` has CharLSTM's interface (config, forward, step, initial_state), so training's evaluation,
the generation engine and every front end use it unchanged: its logits are the log of the averaged
probabilities (softmax gives the mixture back, cross-entropy on them is the mixture's loss), and its state
stacks the members' states along the first dimension, (members * num_layers, B, hidden) each, so rows of a
batch are indexed and concatenated as a single model's are. Training steps the members side by side
(`side_by_side`, see training.train_step).
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from nanochat_fast.model import CharLSTM, ModelConfig


class CharEnsemble(nn.Module):
    def __init__(self, config: ModelConfig, lstm_backend=None):
        super().__init__()
        if config.members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {config.members}")
        self.config = config
        member_config = replace(config, members=1)
        self.members = nn.ModuleList(CharLSTM(member_config, lstm_backend) for _ in range(config.members))

    def forward(self, ids, state=None):
        """As CharLSTM.forward: logits (B, T, vocab_size), the log of the members' averaged probabilities."""
        outputs = [member(ids, part) for member, part in zip(self.members, self.member_states(state), strict=True)]
        return self._mix(outputs)

    def step(self, ids, state=None):
        """As CharLSTM.step, for generation."""
        outputs = [member.step(ids, part) for member, part in zip(self.members, self.member_states(state),
                                                                   strict=True)]
        return self._mix(outputs)

    def initial_state(self, batch_size, device=None, dtype=torch.float32):
        return self.joined_state([member.initial_state(batch_size, device, dtype) for member in self.members])

    def member_states(self, state) -> list:
        """The ensemble's state split into each member's (None: None for each)."""
        if state is None:
            return [None] * len(self.members)
        return list(zip(*(part.chunk(len(self.members)) for part in state), strict=True))

    @staticmethod
    def joined_state(states) -> tuple:
        """The members' states stacked into the ensemble's."""
        return tuple(torch.cat(parts) for parts in zip(*states, strict=True))

    def _mix(self, outputs):
        # In float32 at least: bfloat16 logits (autocast) would round the mixture's probabilities.
        log_probabilities = torch.stack([F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                                       dim=-1) for logits, _ in outputs])
        mixture = torch.logsumexp(log_probabilities, dim=0) - math.log(len(outputs))
        return mixture, self.joined_state([state for _, state in outputs])


def build_model(config: ModelConfig, lstm_backend=None) -> CharLSTM | CharEnsemble:
    """The model a config describes: one CharLSTM, or an ensemble of config.members of them."""
    return CharLSTM(config, lstm_backend) if config.members == 1 else CharEnsemble(config, lstm_backend)


def side_by_side(function, *per_member, device: torch.device, draws_random_numbers: bool):
    """[function(*args) for args in zip(*per_member)], on CPU each member in a thread of its own with an
    equal share of torch's threads: the members' steps share no tensors, and torch's operators release
    Python's lock while they compute. One after another on CUDA (the GPU runs them in turn anyway), and
    where the steps draw random numbers (dropout): threads would draw from torch's one generator in no
    fixed order, and a run would not repeat, nor resume as it would have gone on."""
    items = list(zip(*per_member, strict=True))
    if device.type != "cpu" or draws_random_numbers:
        return [function(*args) for args in items]
    return list(_pool(len(items), max(1, torch.get_num_threads() // len(items))).map(lambda args: function(*args),
                                                                                     items))


@cache
def _pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    # torch's thread count is per thread: each worker sets its own once, at its start.
    return ThreadPoolExecutor(workers, thread_name_prefix="member", initializer=torch.set_num_threads,
                              initargs=(threads_each,))

"""The weights a run validates and keeps as best/: an exponential moving average of the trained weights.

The average of the last hundred or so steps' weights lies lower in the loss than the last step's, which
still jitter around it: on Tiny Shakespeare a run's end read 0.004 bits/char better (bench/RESULTS.md).
The training loop updates it after every optimizer step; latest/ keeps it beside the trained weights, so
a resumed run goes on with it.

torch.optim.swa_utils.AveragedModel does the same with a fixed decay, but it copies its update count to the
device at every step (a blocking copy: a wait for the GPU), and a fixed decay of 0.99 would still hold a
third of the initial weights after a hundred steps: here the decay warms up with the step (it reaches
AVERAGE_DECAY at step 890), as TensorFlow's ExponentialMovingAverage does with num_updates.
"""
import copy

import torch

AVERAGE_DECAY = 0.99  # 0.98 and 0.995 read 0.0007 and 0.0022 worse at 1,300 steps (bench/RESULTS.md)
WARM_UP = 10  # step t's decay: (1 + t) / (WARM_UP + t), until that exceeds AVERAGE_DECAY
SAVED_PREFIX = "average."  # the average's tensors among latest/'s training tensors


def decay_at(step: int) -> float:
    """The share of the average kept at 0-based step `step`: small at first, so it soon leaves the initial weights."""
    return min(AVERAGE_DECAY, (1 + step) / (WARM_UP + step))


class WeightAverage:
    """`model`: a copy of the trained model (in eval mode) whose weights are the average."""

    def __init__(self, model: torch.nn.Module, saved: dict[str, torch.Tensor] | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if saved:
            self.model.load_state_dict(saved)

    @torch.no_grad()
    def update(self, trained: torch.nn.Module, step: int):
        """Move the average towards `trained`'s weights after 0-based step `step`."""
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in trained.parameters()],
                             1 - decay_at(step))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average's weights, named for saving beside other training tensors (see `saved_in`)."""
        return {SAVED_PREFIX + name: tensor for name, tensor in self.model.state_dict().items()}

    @staticmethod
    def saved_in(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The average's weights among saved training tensors; None where a run saved none (older versions)."""
        saved = {name[len(SAVED_PREFIX):]: tensor for name, tensor in tensors.items() if name.startswith(SAVED_PREFIX)}
        return saved or None

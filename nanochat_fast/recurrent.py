"""What `nanochat_fast.LSTM` and `nanochat_fast.GRU` share around their kernels: the inputs `nn.LSTM` and
`nn.GRU` accept (padded tensors, batch-first or not, unbatched, PackedSequence) brought to one time-major
padded batch with optional per-row lengths, the time reversal of a bidirectional layer's second
direction, and the outputs laid out as PyTorch lays them.

A batch of variable lengths runs padded: rows stop updating after their length inside the kernels, so
nothing is sorted and a mixed batch costs what the padded batch costs.
"""

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


@dataclass
class SequenceBatch:
    """An input brought to (T, B, features), with what it takes to return outputs in the input's form."""
    x: torch.Tensor  # (T, B, features), time-major
    lengths: torch.Tensor | None  # (B,) int32 on x's device for packed input; None: every row has T steps
    batched: bool
    packed: PackedSequence | None  # the input itself when it was packed


def sequence_batch(module_name, input, input_size, batch_first):
    """`input` as nn.LSTM / nn.GRU accept it -> a SequenceBatch; bad shapes give one clear ValueError."""
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)  # batch in the caller's order, as hx and h_n are
        _check_features(module_name, padded, input_size)
        return SequenceBatch(padded, lengths.to(padded.device, torch.int32), True, input)
    if input.dim() not in (2, 3):
        raise ValueError(f"{module_name}: expected input of 2 (unbatched) or 3 (batched) dimensions, "
                         f"got shape {tuple(input.shape)}")
    _check_features(module_name, input, input_size)
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if batch_first else 1)
    x = input.transpose(0, 1) if batch_first else input
    return SequenceBatch(x, None, batched, None)


def _check_features(module_name, x, input_size):
    if x.size(-1) != input_size:
        raise ValueError(f"{module_name}: input.size(-1) must be input_size={input_size}, got {x.size(-1)}")


def reverse_time(x, lengths):
    """(T, B, ...) with each row's first `length` steps in reverse order (all T without lengths); steps past
    a row's length stay where they are. Its own inverse: it maps the reverse direction's input to its
    time and its output back."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.size(0), device=x.device)[:, None]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (T, B)
    return x.gather(0, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def last_outputs(output, lengths):
    """(D, B, H) h_n of a layer from its output (T, D, B, H) in each direction's own time: each row's output
    at its own last step (the last step without lengths)."""
    if lengths is None:
        return output[-1]
    index = (lengths.long() - 1).view(1, 1, -1, 1).expand(1, *output.shape[1:])
    return output.gather(0, index)[0]


def as_input_form(batch: SequenceBatch, output, batch_first):
    """The layers' output (T, B, features) in the form of the input: packed, batch-first or unbatched."""
    if batch.packed is not None:
        packed = batch.packed
        lengths = batch.lengths.cpu()
        if packed.sorted_indices is not None:  # pack in the input's order, longest first, as it was
            output, lengths = output.index_select(1, packed.sorted_indices), lengths[packed.sorted_indices.cpu()]
        data = pack_padded_sequence(output, lengths).data
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    if batch_first:
        output = output.transpose(0, 1)
    return output if batch.batched else output.squeeze(0 if batch_first else 1)

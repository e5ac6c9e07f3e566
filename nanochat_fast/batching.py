"""Batches for stateful truncated backprop through time, the char-rnn way.

Training: B streams read the training ids side by side, stream b starting at offset b * len / B. Each
step takes the next T inputs of every stream (and, one position further on, their T targets), so the
LSTM state left by one chunk is the right start for the same stream's next chunk. A stream whose next
chunk would run past the end starts again at 0; its carried state belongs to other text, so the batch
says which streams restarted and the trainer zeroes their state.

Validation: the whole validation text in S contiguous streams, walked chunk by chunk in order.

Position k's target is token k + 1, and whether it counts comes from the mask of that target token.
"""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) the token after each input
    target_mask: torch.Tensor  # (B, T) bool: which targets the loss counts
    restarted: torch.Tensor | None = None  # (B,) bool: streams that began again at offset 0, or None

    def to(self, device: torch.device) -> "Batch":
        if device.type != "cuda":
            return self
        # Pinned memory lets the copy run asynchronously instead of waiting for the GPU to drain.
        def move(tensor):
            return None if tensor is None else tensor.pin_memory().to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), move(self.target_mask), move(self.restarted))


def full_mask(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The targets mask, with None (plain text) meaning every position counts."""
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask


def start_offsets(length: int, batch_size: int) -> list[int]:
    """Where the B streams start reading a text of `length` tokens: evenly spread."""
    return [stream * length // batch_size for stream in range(batch_size)]


class TrainStreams:
    """B parallel read positions (`offsets`, part of the saved training state) through the training ids,
    which must hold at least seq_len + 1 tokens (`data.check_length`)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int, seq_len: int,
                 offsets: list[int] | None = None):
        self.ids, self.mask, self.seq_len = ids, full_mask(ids, mask), seq_len
        if offsets is None:
            offsets = start_offsets(len(ids), batch_size)
        if len(offsets) != batch_size:
            raise ValueError(f"{len(offsets)} stream offsets for {batch_size} streams")
        self.offsets = list(offsets)
        self._positions = torch.arange(seq_len + 1)

    def next_batch(self) -> Batch:
        restarted = [offset + self.seq_len + 1 > len(self.ids) for offset in self.offsets]
        starts = [0 if restart else offset for offset, restart in zip(self.offsets, restarted, strict=True)]
        self.offsets = [start + self.seq_len for start in starts]
        index = torch.tensor(starts)[:, None] + self._positions  # (B, T + 1)
        chunk = self.ids[index]
        return Batch(chunk[:, :-1], chunk[:, 1:], self.mask[index[:, 1:]],
                     torch.tensor(restarted) if any(restarted) else None)


def validation_batches(ids: torch.Tensor, mask: torch.Tensor | None, num_streams: int, seq_len: int):
    """Yield Batches that hold every (input, target) pair of `ids` exactly once: num_streams contiguous
    streams, the last one padded with positions that are not targets."""
    pairs = len(ids) - 1
    num_streams = max(1, min(num_streams, pairs))
    stream_len = -(-pairs // num_streams)  # ceil
    padded_ids = torch.zeros(num_streams * stream_len + 1, dtype=ids.dtype)
    padded_ids[:len(ids)] = ids
    padded_mask = torch.zeros(len(padded_ids), dtype=torch.bool)
    padded_mask[:len(ids)] = full_mask(ids, mask)
    inputs = padded_ids[:-1].view(num_streams, stream_len)
    targets = padded_ids[1:].view(num_streams, stream_len)
    target_mask = padded_mask[1:].view(num_streams, stream_len)
    for start in range(0, stream_len, seq_len):
        chunk = slice(start, start + seq_len)
        yield Batch(inputs[:, chunk], targets[:, chunk], target_mask[:, chunk])

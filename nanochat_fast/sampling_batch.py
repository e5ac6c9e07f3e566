"""The sampling rules of `sampling.SamplingConfig` for a whole batch at once, each row by its own
rules, in tensor ops only: no host sync and no torch.Generator, so that a CUDA graph can replay it.

A row's rules are three numbers in device tensors (`RowRules`): its temperature (0: greedy), top_k
(the vocabulary size when off) and top_p (`NO_TOP_P` when off). Greedy rows take `logits.argmax`,
exactly what `sample_next` takes. Sampled rows draw from the same distribution as `sample_next`, not
the same tokens: the draw inverts the cumulative probabilities of the kept tokens at one uniform
number per row and step, a hash of the row's noise key (a random 32-bit number, `NOISE_KEYS` of them)
and its step counter (a device tensor the caller advances), so a row's tokens depend on its key and
its own steps only, never on its neighbours.
"""

from dataclasses import dataclass

import torch

from nanochat_fast.sampling import SamplingConfig

NO_TOP_P = 2.0  # above any cumulative probability: keeps every token (as top_p None or 1 does)
NOISE_KEYS = 2 ** 32
_LOW_32_BITS = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # below 2**27, so a 32-bit value times it stays inside int64


@dataclass
class RowRules:
    """Each row's rules, (B,) tensors on one device: temperature float32 (0 = greedy), top_k int64,
    top_p float32."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor

    @classmethod
    def of(cls, configs: list[SamplingConfig], vocab_size: int, device) -> "RowRules":
        top_p = [NO_TOP_P if config.top_p is None or config.top_p >= 1 else config.top_p for config in configs]
        return cls(torch.tensor([config.temperature for config in configs], dtype=torch.float32, device=device),
                   torch.tensor([min(config.top_k or vocab_size, vocab_size) for config in configs], device=device),
                   torch.tensor(top_p, dtype=torch.float32, device=device))


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply, a bijection with full avalanche) of x in [0, 2**32),
    held in int64 so that no product overflows."""
    x = ((x >> 16) ^ x) * _HASH_MULTIPLIER & _LOW_32_BITS
    x = ((x >> 16) ^ x) * _HASH_MULTIPLIER & _LOW_32_BITS
    return (x >> 16) ^ x


def uniform_noise(keys, counters):
    """One number in [0, 1) per row, a function of (key, counter) only: keys (B,) int64 in [0, NOISE_KEYS),
    counters (B,) int64. For a fixed key, distinct counters (below 2**32) give distinct hashes; two rows
    share a number only where key ^ counter meet, which random keys make rare (about steps**2 / 2**32 a
    pair). One hash a step, the key being random already: each op is a node of the decode graph."""
    return (_mix32(keys ^ (counters & _LOW_32_BITS)) >> 8).to(torch.float32) * 2.0 ** -24  # 24 bits: float32's


def sample_rows(logits, rules: RowRules, keys, counters):
    """Next token ids (B,) from logits (B, vocab_size), row b by its rules and the noise of (keys[b],
    counters[b]). Written in few ops: each is a node of the decode graph, a microsecond or two."""
    greedy_tokens = logits.argmax(dim=-1)
    sampled = rules.temperature > 0
    scaled = logits.float() / torch.where(sampled, rules.temperature, 1.0).unsqueeze(1)
    # The rules' order: most likely first, top-k, then top-p on the probabilities renormalised after it.
    candidate_logits, candidate_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    probs = candidate_logits.masked_fill(ranks >= rules.top_k.unsqueeze(1), float("-inf")).softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    # A candidate stays while the more likely ones have not reached top_p: the kept ones are a prefix,
    # as long as top-k's and top-p's, and at least the most likely candidate (but none for a row of NaN
    # logits: the clamp keeps its index valid, since on CUDA one out of range fails the whole device).
    last_kept = (torch.minimum(rules.top_k, (cumulative - probs < rules.top_p.unsqueeze(1)).sum(dim=-1)) - 1).clamp(
        min=0).unsqueeze(1)
    target = uniform_noise(keys, counters).unsqueeze(1) * cumulative.gather(-1, last_kept)
    # The first candidate whose cumulative probability passes the target, within the kept prefix even
    # where rounding puts the target at the kept total.
    choice = torch.minimum((cumulative <= target).sum(dim=-1, keepdim=True), last_kept)
    return torch.where(sampled, candidate_ids.gather(-1, choice).squeeze(1), greedy_tokens)

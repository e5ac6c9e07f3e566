"""The sampling rules: how the next token is drawn from the logits, and the random streams drawn from.

Every writer of text (the engine, and through it the chat, sample, the report and the server) draws
with `sample_next` from a generator made by `new_generator`: a seed gives the same text on every
run, and generation never touches torch's global random state.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits: temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens (ties broken arbitrarily); top_p then keeps the
    smallest set of most likely tokens whose probability, renormalised after top-k, reaches top_p.
    None switches a filter off."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig(temperature=0)
CHAT_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9)  # greedy replies tend to stop or loop early


def new_generator(device, seed: int | None = None) -> torch.Generator:
    """A random stream of its own on device: from seed, or freshly (non-reproducibly) seeded."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None):
    """Next token ids (B,) drawn from logits (B, vocab_size) by the rules in `sampling`."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1 else None  # 1 keeps all
    if sampling.top_k is None and top_p is None:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    # Filter in order of likelihood: the candidates, most likely first, and their token ids.
    if sampling.top_k is not None:
        candidate_logits, candidate_ids = logits.topk(min(sampling.top_k, logits.size(-1)), dim=-1)
    else:
        candidate_logits, candidate_ids = logits.sort(dim=-1, descending=True)
    probs = candidate_logits.softmax(dim=-1)
    if top_p is not None:
        # Drop a candidate when the more likely ones already reach top_p; the most likely one always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # weights need not sum to 1
    return candidate_ids.gather(-1, choice).squeeze(-1)

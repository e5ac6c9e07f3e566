"""What the engine must equal, written without it: a prompt read with one whole-sequence forward, then
one token at a time sampled with `sample_next` and fed back with `model.step`."""

import torch

from nanochat_fast.sampling import sample_next


def read(model, ids, state=None):
    """(logits for the next token (1, vocab_size), state) after reading 1-D ids from state, in one forward."""
    with torch.inference_mode():
        logits, state = model(torch.as_tensor(ids, dtype=torch.long).reshape(1, -1), state)
    return logits[:, -1], state


def reference_reply(model, prompt_ids, sampling, max_new_tokens, stop_id=None, state=None, seed=None):
    """(tokens written, stop token left out; "stop" or "length"; the state after) for one sequence. A
    reply cut at max_new_tokens gets stop_id fed, as the chat closes it."""
    model.eval()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = read(model, prompt_ids, state)
    tokens = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = sample_next(logits, sampling, generator)
            logits, state = model.step(token, state)
            if token.item() == stop_id:
                return tokens, "stop", state
            tokens.append(token.item())
        if stop_id is not None:
            _, state = model.step(torch.tensor([stop_id]), state)
    return tokens, "length", state

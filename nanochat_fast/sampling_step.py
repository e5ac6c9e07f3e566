"""One generation step for a batch of streams that also picks each stream's next token.

Every row follows one rule on every device: temperature 0 is greedy (the argmax, ties to the lowest
id); temperature T > 0 draws from softmax(logits / T) by the Gumbel-max trick, argmax(logits / T + G)
with G = -log(-log U) and U uniform noise fixed by the row's seed and the step counter, so the same
(seed, step) gives the same token and each new step fresh noise. When the model's LSTM backend
resolves to Triton (CUDA tensors, or backend "triton" under the interpreter in tests), one fused
kernel runs the whole step (`nanochat_fast.kernels.lstm_generate`); otherwise (and for a GRU model,
which has no fused generation kernel yet) `CharLSTM.step` and the same rule in torch. The two draw their noise from different generators (Philox inside the kernel, a
torch.Generator per row here): equal seeds give the same distribution, not the same tokens. Top-k and
top-p are not fused: use `CharLSTM.step` and `generation.sample_next` for them.
"""

import torch

from nanochat_fast.backend import resolve_backend


def step_and_sample(model, ids, state, temperature, seeds, step: int):
    """ids (B,) int64; state (h, c), each (num_layers, B, hidden), or None for zeros; temperature (B,)
    float, 0 = greedy (must not be negative); seeds (B,) int64; step: a counter the caller advances
    every call. Returns next_ids (B,) int64, logits (B, vocab_size), the new state (on the fused path
    c stays float32 for half models)."""
    if model.config.cell != "lstm" or resolve_backend(model.lstm.backend, ids) != "triton":  # fused: LSTM only
        logits, state = model.step(ids, state)
        return gumbel_max(logits, temperature, seeds, step), logits, state
    from nanochat_fast.kernels.lstm_generate import generation_step  # imports triton: only when used

    if state is None:
        state = model.initial_state(ids.size(0), ids.device, model.embedding.weight.dtype)
    with torch.no_grad():
        weights, bias = model.lstm.step_weights().stacked
        return generation_step(ids, *state, model.embedding.weight, weights, bias, model.head.weight,
                               model.head.bias, temperature, seeds, step)


def gumbel_max(logits, temperature, seeds, step: int):
    """The next token of every row by the module's rule, in torch: logits (B, V), temperature (B,),
    seeds (B,), step. The noise of row b comes from a torch.Generator seeded with (seeds[b], step)."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    sampled = temperature > 0
    uniform = torch.stack([
        torch.rand(logits.size(1), device=logits.device,
                   generator=torch.Generator(logits.device).manual_seed(hash((seed, step)) % 2**64))
        for seed in seeds.tolist()])
    gumbel = -torch.log(-torch.log(uniform))  # U = 0 gives -inf: that token is never drawn
    scaled = scores / torch.where(sampled, temperature, 1).unsqueeze(1) + gumbel
    return torch.where(sampled.unsqueeze(1), scaled, scores).argmax(dim=1)

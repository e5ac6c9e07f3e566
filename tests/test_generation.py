"""Generation: the sampling rules against logits directly, seeds, greedy decoding against a
from-scratch reference, stopping at <|end|>, feeding state in pieces versus all at once, many prompts
read together versus one by one, and the model's single step against its whole-sequence forward."""

import math

import pytest
import torch

from generation_reference import read
from nanochat_fast.engine import Engine, Sequence, read_prompts
from nanochat_fast.generation import Chatbot, generate
from nanochat_fast.sampling import SamplingConfig, sample_next
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.!?'\n")
DRAWS = 4000  # per logits vector: one batched call draws them all


def random_model(seed, dtype=torch.float64, cell="lstm"):
    # float64 so that the step path and the whole-sequence path agree on every argmax.
    torch.manual_seed(seed)
    return CharLSTM(ModelConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=2, cell=cell)).to(dtype)


@pytest.fixture(params=["lstm", "gru"])
def cell(request):
    """The model's recurrent layers: the engine and generation work the same for both."""
    return request.param


def draw(logits, sampling, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return set(sample_next(logits.expand(DRAWS, -1), sampling, generator).tolist())


def nucleus(probs, top_p):
    """Reference top-p: the fewest most likely tokens whose probability reaches top_p."""
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def allowed_tokens(logits, temperature, top_k=None, top_p=None):
    """Reference for sample_next's allowed set, in plain Python over float64 probabilities."""
    scaled = [value / temperature for value in logits.tolist()]
    candidates = sorted(range(len(scaled)), key=lambda t: -scaled[t])[:top_k or len(scaled)]
    if top_p is None:
        return set(candidates)
    weights = {t: math.exp(scaled[t]) for t in candidates}
    total = sum(weights.values())
    probs = [weights.get(t, 0.0) / total for t in range(len(scaled))]
    return nucleus(probs, top_p)


def random_logits(seed, vocab_size=40):
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_greedy_is_argmax():
    logits = torch.randn(64, 50, dtype=torch.float64)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0)), logits.argmax(dim=-1))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_k", [1, 5])
def test_top_k_draws_only_the_k_most_likely(seed, top_k):
    logits = random_logits(seed)
    allowed = allowed_tokens(logits, 1.0, top_k=top_k)
    # Every allowed token is likely enough to appear in DRAWS draws, so the sets must be equal.
    assert draw(logits, SamplingConfig(temperature=1.0, top_k=top_k)) == allowed


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 0.5), (1.0, None, 0.9), (0.7, None, 0.8),
                                                       (1.5, 8, 0.9), (1.0, 1000, 0.9), (1.0, None, 1e-6)])
def test_top_p_draws_only_from_the_nucleus(seed, temperature, top_k, top_p):
    logits = random_logits(100 + seed)
    allowed = allowed_tokens(logits, temperature, top_k, top_p)
    drawn = draw(logits, SamplingConfig(temperature, top_k, top_p))
    assert drawn <= allowed
    assert logits.argmax().item() in drawn
    if len(allowed) > 1:
        assert len(drawn) > 1  # the filter must not collapse to greedy


def test_temperature_sharpens_the_distribution():
    logits = random_logits(7, vocab_size=6)
    generator = torch.Generator().manual_seed(3)
    for temperature in (0.5, 1.0, 2.0):
        draws = sample_next(logits.expand(40000, -1), SamplingConfig(temperature), generator)
        frequencies = torch.bincount(draws, minlength=6).double() / len(draws)
        torch.testing.assert_close(frequencies, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def sampled_text(model, seed, prompt="hello"):
    return "".join(generate(model, TOKENIZER, TOKENIZER.encode(prompt), 200, SamplingConfig(1.0), seed=seed,
                            stop_at_end=False))


def test_seeded_sampling_is_reproducible_and_independent_of_the_global_rng():
    model = random_model(0)
    torch.manual_seed(1)
    first = sampled_text(model, seed=11)
    global_rng = torch.get_rng_state()
    torch.manual_seed(2)  # a different global RNG must not matter...
    assert sampled_text(model, seed=11) == first
    torch.set_rng_state(global_rng)
    sampled_text(model, seed=11)
    assert torch.equal(torch.get_rng_state(), global_rng)  # ...and generation must not consume it
    assert sampled_text(model, seed=12) != first
    assert sampled_text(model, seed=None) != sampled_text(model, seed=None)


def reference_greedy(model, ids, steps):
    """Greedy continuation recomputed from scratch for every token, with whole-sequence forwards only."""
    ids = ids.tolist()
    for _ in range(steps):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        ids.append(logits[0, -1].argmax().item())
    return ids


def test_greedy_generation_matches_the_whole_sequence_forward(cell):
    model = random_model(3, cell=cell)
    prompt = TOKENIZER.encode("the quick brown fox")
    text = "".join(generate(model, TOKENIZER, prompt, 25, SamplingConfig(0), stop_at_end=False))
    assert text == TOKENIZER.decode(reference_greedy(model, prompt, 25)[len(prompt):])


def test_empty_prompt_starts_at_a_message_boundary():
    model = random_model(4)
    greedy = SamplingConfig(0)
    from_nothing = list(generate(model, TOKENIZER, [], 30, greedy, stop_at_end=False))
    from_end = list(generate(model, TOKENIZER, [TOKENIZER.end_id], 30, greedy, stop_at_end=False))
    assert from_nothing == from_end and len(from_nothing) == 30


def test_generation_stops_before_end_or_at_max_length():
    model = random_model(5)
    with torch.no_grad():
        model.head.bias[TOKENIZER.end_id] += 3.0  # make <|end|> come up within a few characters
    prompt = TOKENIZER.encode("hi")
    stopped = list(generate(model, TOKENIZER, prompt, 300, SamplingConfig(1.0), seed=2, stop_at_end=True))
    full = list(generate(model, TOKENIZER, prompt, 300, SamplingConfig(1.0), seed=2, stop_at_end=False))
    assert len(stopped) < 300 and "<|end|>" not in stopped
    assert full[:len(stopped) + 1] == stopped + ["<|end|>"]
    assert len(full) == 300
    assert all(len(piece) == 1 for piece in stopped)  # streamed character by character


def test_feeding_in_pieces_equals_feeding_at_once(cell):
    model = random_model(6, cell=cell)
    ids = TOKENIZER.encode("one two three four")
    at_once, in_pieces = Chatbot(model, TOKENIZER), Chatbot(model, TOKENIZER)
    at_once.read(ids)
    for piece in (ids[:5], ids[5:6], ids[6:6], ids[6:]):  # a forward, a single step, nothing, a forward
        in_pieces.read(piece)
    torch.testing.assert_close(in_pieces.state, at_once.state)
    torch.testing.assert_close(in_pieces.state, read(model, ids)[1])


def test_generation_continues_from_a_given_state(cell):
    model = random_model(7, cell=cell)
    history, prompt = TOKENIZER.encode("earlier text. "), TOKENIZER.encode("now")
    greedy = SamplingConfig(0)
    continued = list(generate(model, TOKENIZER, prompt, 30, greedy, state=read(model, history)[1], stop_at_end=False))
    whole = list(generate(model, TOKENIZER, torch.cat([history, prompt]), 30, greedy, stop_at_end=False))
    assert continued == whole


def test_writing_before_feeding_is_an_error():
    with pytest.raises(ValueError, match="at least one prompt token"):
        Engine(random_model(8)).add([Sequence(torch.tensor([], dtype=torch.long), SamplingConfig(0), 5)])


def test_reading_many_prompts_together_equals_reading_each_alone(cell):
    model = random_model(9, cell=cell).eval()
    generator = torch.Generator().manual_seed(9)
    lengths = [5, 1, 12, 5, 3, 12, 1]  # repeats, single tokens, and the longest twice
    streams = [torch.randint(4, TOKENIZER.vocab_size, (length,), generator=generator) for length in lengths]
    parts = len(model.initial_state(1))  # (h, c) or (h,)
    states = [None if index % 2 else tuple(torch.randn(2, 1, 32, generator=generator, dtype=torch.float64)
                                           for _ in range(parts)) for index in range(len(streams))]
    logits, together = read_prompts(model, streams, states)
    for row, (ids, state) in enumerate(zip(streams, states, strict=True)):
        alone_logits, alone = read(model, ids, state)
        torch.testing.assert_close(logits[row:row + 1], alone_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tuple(part[:, row:row + 1] for part in together), alone, rtol=1e-12, atol=1e-12)


def test_model_step_equals_the_whole_sequence_forward(cell):
    model = random_model(10, cell=cell).eval()
    ids = torch.randint(4, TOKENIZER.vocab_size, (3, 9), generator=torch.Generator().manual_seed(10))
    logits, final = model(ids)
    state, step_logits = None, []
    with torch.no_grad():
        for t in range(ids.size(1)):
            one_logits, state = model.step(ids[:, t], state)
            step_logits.append(one_logits)
    torch.testing.assert_close(torch.stack(step_logits, dim=1), logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)


def test_model_step_sees_updated_weights():
    # The step looks layer 0's input projection up in a table kept between calls: an in-place update
    # of the embedding or of the LSTM must rebuild it.
    model = random_model(11).eval()
    ids = torch.tensor([4, 5, 6])
    with torch.no_grad():
        model.step(ids)
        for weight in (model.embedding.weight, model.lstm.weight_ih_l0, model.lstm.bias_hh_l0):
            weight.mul_(-1.5)
            step_logits, _ = model.step(ids)
            torch.testing.assert_close(step_logits, model(ids[:, None])[0][:, 0], rtol=1e-12, atol=1e-12)


def test_model_step_is_differentiable_when_grad_is_enabled():
    model = random_model(12)
    logits, _ = model.step(torch.tensor([4, 5]))
    logits.sum().backward()
    assert model.embedding.weight.grad.abs().sum() > 0 and model.lstm.weight_ih_l0.grad.abs().sum() > 0

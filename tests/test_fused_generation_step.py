"""The fused generation step (`sampling_step.step_and_sample`) against `CharLSTM.step` + argmax, and
its sampling rule: per-row greedy or Gumbel-max draws, reproducible per (seed, step), fresh per step,
distributed as softmax(logits / T).

"fused" runs the Triton kernel (the interpreter on CPU, the real kernel on a GPU); "torch" the
fallback path (`CharLSTM.step` + the same rule in torch). Tolerance of logits, h and c, as in
test_lstm_vs_torch.py: max|ours - ref| / max|ref| < 1e-5 in float32 (measured up to 4e-7; a
misplaced gate or a stale layer input gives 1e-2 or more), 1e-12 in float64. Sizes are ragged on
purpose (hidden 33, vocab 37: two hidden tiles and three vocabulary tiles of 16 under the
interpreter; batch 1, 3, 17). Every test runs in a second or two under the interpreter.
"""

import pytest
import torch

from conftest import DEVICE
from lstm_reference import relative_error
from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.sampling_step import step_and_sample

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
HIDDEN, VOCAB = 33, 37
PATHS = {"fused": "triton", "torch": "torch"}  # path under test: the model's LSTM backend


def twin_models(num_layers, dtype=torch.float32, backend="triton", hidden=HIDDEN, head_scale=1.0):
    """(model on `backend`, the same weights on torch's LSTM) in eval mode; head_scale spreads the logits."""
    model = CharLSTM(ModelConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=num_layers), lstm_backend=backend)
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    reference = CharLSTM(model.config, lstm_backend="torch")
    reference.load_state_dict(model.state_dict())
    return (model.to(device=DEVICE, dtype=dtype).eval(), reference.to(device=DEVICE, dtype=dtype).eval())


def random_inputs(num_layers, batch, dtype=torch.float32, hidden=HIDDEN):
    ids = torch.randint(0, VOCAB, (batch,), device=DEVICE)
    state = tuple(torch.randn(num_layers, batch, hidden, device=DEVICE, dtype=dtype) for _ in range(2))
    return ids, state


def seeds_for(batch, first=0):
    return torch.arange(first, first + batch, device=DEVICE, dtype=torch.int64)


@pytest.mark.parametrize("num_layers, batch, dtype, with_state", [
    (1, 1, torch.float32, True),
    (2, 3, torch.float32, True),
    (3, 17, torch.float32, True),
    (2, 3, torch.float32, False),
    (3, 3, torch.float64, True),
])
def test_greedy_matches_model_step(num_layers, batch, dtype, with_state):
    torch.manual_seed(num_layers * 100 + batch)
    model, reference = twin_models(num_layers, dtype)
    ids, state = random_inputs(num_layers, batch, dtype)
    state = state if with_state else None
    greedy = torch.zeros(batch, device=DEVICE)
    with torch.inference_mode():
        next_ids, logits, (h, c) = step_and_sample(model, ids, state, greedy, seeds_for(batch), step=0)
        expected_logits, (expected_h, expected_c) = reference.step(ids, state)
    assert next_ids.dtype == torch.int64 and next_ids.shape == (batch,)
    assert torch.equal(next_ids, expected_logits.argmax(dim=1))
    errors = {name: relative_error(got, expected) for name, got, expected in
              (("logits", logits, expected_logits), ("h", h, expected_h), ("c", c, expected_c))}
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("path", PATHS)
def test_greedy_ties_go_to_the_lowest_id(path):
    # Tokens 5, 20, 21 and 30 share the largest logit, exactly 10 (zero weights, bias 10): within one
    # vocabulary tile (20, 21) and across tiles (5 in the first, 30 in the last), the lowest id wins,
    # as torch.argmax does.
    torch.manual_seed(5)
    model, _ = twin_models(2, backend=PATHS[path])
    with torch.no_grad():
        for token in (5, 20, 21, 30):
            model.head.weight[token] = 0.0
            model.head.bias[token] = 10.0
    ids, state = random_inputs(2, 3)
    greedy = torch.zeros(3, device=DEVICE)
    with torch.inference_mode():
        next_ids, logits, _ = step_and_sample(model, ids, state, greedy, seeds_for(3), 0)
    assert (logits[:, [5, 20, 21, 30]] == 10.0).all()
    assert next_ids.tolist() == [5, 5, 5]
    with torch.no_grad():
        model.head.bias[5] = 0.0
    with torch.inference_mode():
        assert step_and_sample(model, ids, state, greedy, seeds_for(3), 0)[0].tolist() == [20, 20, 20]


@pytest.mark.parametrize("path", PATHS)
def test_mixed_batch_greedy_rows_stay_argmax_and_hot_rows_spread(path):
    torch.manual_seed(6)
    batch, steps = 16, 8
    model, reference = twin_models(2, backend=PATHS[path])
    ids, state = random_inputs(2, batch)
    greedy_rows = torch.arange(batch, device=DEVICE) % 2 == 0
    temperature = torch.where(greedy_rows, 0.0, 10.0)  # T=10: nearly uniform over the 37 tokens
    with torch.inference_mode():
        argmax = reference.step(ids, state)[0].argmax(dim=1)
        draws = torch.stack([step_and_sample(model, ids, state, temperature, seeds_for(batch), step)[0]
                             for step in range(steps)])
    assert ((draws >= 0) & (draws < VOCAB)).all()
    assert (draws[:, greedy_rows] == argmax[greedy_rows]).all()
    # Greedy would give 64 hits; uniform draws about 64 / 37. Allow up to 16.
    assert (draws[:, ~greedy_rows] == argmax[~greedy_rows]).sum() <= 16, draws


@pytest.mark.parametrize("path", PATHS)
def test_same_seed_and_step_repeat_and_a_new_step_draws_afresh(path):
    torch.manual_seed(7)
    batch = 17
    model, _ = twin_models(1, backend=PATHS[path])
    ids, state = random_inputs(1, batch)
    ids, state = ids[:1].expand(batch), tuple(s[:, :1].expand(-1, batch, -1).contiguous() for s in state)
    temperature = torch.full((batch,), 5.0, device=DEVICE)  # same logits in every row, nearly uniform draws

    def draw(seeds, step):
        with torch.inference_mode():
            return step_and_sample(model, ids, state, temperature, seeds, step)[0]

    first = draw(seeds_for(batch), 3)
    assert torch.equal(first, draw(seeds_for(batch), 3))
    # 17 rows all equal by chance: about 37^-16. At least 12 of 17 changing: the chance to fail is tiny.
    assert len(set(first.tolist())) > 1, "rows with different seeds drew the same token"
    assert (draw(seeds_for(batch), 4) != first).sum() >= 12
    assert (draw(seeds_for(batch, first=1000), 3) != first).sum() >= 12


@pytest.mark.parametrize("path", PATHS)
def test_draw_frequencies_match_softmax_of_logits_over_temperature(path):
    # 256 rows of the same logits with distinct seeds, 8 steps: 2048 independent draws. Each token's
    # frequency must be within 5 standard deviations of softmax(logits / T) (a false failure about 1 in
    # 10^5 with 37 tokens; fixed seeds make it deterministic anyway), while a sampler that ignored the
    # temperature would be off by more than 10 on some token: the test can tell the two apart.
    torch.manual_seed(8)
    batch, steps, temperature = 256, 8, 0.6
    model, _ = twin_models(1, backend=PATHS[path], hidden=16, head_scale=8.0)
    ids, state = random_inputs(1, 1, hidden=16)
    ids, state = ids.expand(batch), tuple(s.expand(-1, batch, -1).contiguous() for s in state)
    temperatures = torch.full((batch,), temperature, device=DEVICE)
    with torch.inference_mode():
        results = [step_and_sample(model, ids, state, temperatures, seeds_for(batch, first=10**6), step)
                   for step in range(steps)]
    logits = results[0][1].double()
    assert torch.allclose(logits, logits[:1].expand_as(logits), rtol=1e-6, atol=1e-6)
    draws = torch.cat([next_ids for next_ids, _, _ in results])
    frequencies = torch.bincount(draws, minlength=VOCAB).double() / draws.numel()
    expected = torch.softmax(logits[0] / temperature, dim=0)
    sigma = (expected * (1 - expected) / draws.numel()).sqrt()
    ignoring_temperature = torch.softmax(logits[0], dim=0)
    assert ((ignoring_temperature - expected).abs() / sigma).max() > 10, "the test cannot see the temperature"
    z_scores = (frequencies - expected).abs() / sigma
    assert z_scores.max() < 5, {"worst token": z_scores.argmax().item(), "z": z_scores.max().item()}


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton interpreter has no bfloat16 arithmetic: "
                                             "half precision is tested on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_model_step(dtype):
    # Bound relative to model.step's own half-precision error against float32, as in test_lstm_vs_torch.
    torch.manual_seed(9)
    model32, reference32 = twin_models(2, hidden=256)
    model_half = CharLSTM(model32.config, lstm_backend="triton").to(device=DEVICE, dtype=dtype).eval()
    model_half.load_state_dict(model32.state_dict())
    ids, state = random_inputs(2, 16, hidden=256)
    greedy = torch.zeros(16, device=DEVICE)
    with torch.inference_mode():
        exact = reference32.step(ids, state)
        half_state = tuple(s.to(dtype) for s in state)
        theirs = model_half.step(ids, half_state)
        next_ids, logits, (h, c) = step_and_sample(model_half, ids, half_state, greedy, seeds_for(16), 0)
    assert c.dtype == torch.float32
    assert torch.equal(next_ids, logits.argmax(dim=1))
    for ours, their, exact_value in ((logits, theirs[0], exact[0]), (h, theirs[1][0], exact[1][0]),
                                     (c, theirs[1][1], exact[1][1])):
        our_error, their_error = relative_error(ours, exact_value), relative_error(their, exact_value)
        assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)


def test_a_weight_update_reaches_the_next_fused_step():
    # The fused path stacks the layer weights once and reuses them while the parameters are unchanged.
    torch.manual_seed(10)
    model, reference = twin_models(2)
    ids, state = random_inputs(2, 3)
    greedy = torch.zeros(3, device=DEVICE)
    with torch.inference_mode():
        before = step_and_sample(model, ids, state, greedy, seeds_for(3), 0)[1]
    with torch.no_grad():
        for lstm in (model.lstm, reference.lstm):
            lstm.weight_hh_l1.mul_(2.0)  # as an optimizer step would: in place
            lstm.bias_ih_l0.add_(0.5)
    with torch.inference_mode():
        after = step_and_sample(model, ids, state, greedy, seeds_for(3), 0)[1]
        expected = reference.step(ids, state)[0]
    assert relative_error(after, expected) < TOLERANCE[torch.float32] < relative_error(before, expected)

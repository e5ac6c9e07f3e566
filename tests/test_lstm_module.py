"""nanochat_fast.LSTM as a drop-in nn.LSTM: initialisation, state_dict, options, errors, dropout,
the single-step entry and the backend choice (the kernel path's: test_path_choice.py)."""

import pytest
import torch

from conftest import DEVICE
from lstm_reference import relative_error, twin_lstms
from nanochat_fast import LSTM
from nanochat_fast.backend import resolve_backend


# Every option changes which parameters exist, their shapes or their order.
OPTION_SETS = [dict(), dict(bias=False), dict(bidirectional=True), dict(proj_size=5),
               dict(bidirectional=True, proj_size=5, bias=False)]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_same_seed_same_parameters_as_nn_lstm(options):
    torch.manual_seed(5)
    ref = torch.nn.LSTM(7, 33, num_layers=3, **options)
    torch.manual_seed(5)
    ours = LSTM(7, 33, num_layers=3, **options)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("options", OPTION_SETS)
def test_state_dict_round_trip_both_ways(options):
    ref = torch.nn.LSTM(5, 33, num_layers=2, **options)
    ours = LSTM(5, 33, num_layers=2, **options)
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    for name, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value)
    fresh_ref = torch.nn.LSTM(5, 33, num_layers=2, **options)
    fresh_ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5)
    assert torch.equal(fresh_ref(x)[0], ref(x)[0])


@pytest.mark.parametrize("options, message", [
    (dict(proj_size=-1), "proj_size should be a positive integer"),
    (dict(proj_size=8), "proj_size has to be smaller than hidden_size"),
])
def test_bad_options_raise_as_nn_lstm(options, message):
    with pytest.raises(ValueError, match=message):
        torch.nn.LSTM(5, 8, **options)
    with pytest.raises(ValueError, match=message):
        LSTM(5, 8, **options)


def test_dropout_on_one_layer_warns_as_nn_lstm():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        LSTM(5, 8, dropout=0.5)


@pytest.mark.parametrize("options", [dict(bidirectional=True), dict(proj_size=4)])
def test_step_refuses_what_it_cannot_step(options):
    with pytest.raises(ValueError, match="unidirectional LSTM without proj_size"):
        LSTM(5, 8, **options).step(torch.randn(2, 5))


@pytest.mark.parametrize("make_call, message", [
    (lambda lstm: lstm(torch.randn(2, 3, 4, 5)), "2 \\(unbatched\\) or 3"),
    (lambda lstm: lstm(torch.randn(4, 3, 6)), "input_size=5"),
    (lambda lstm: lstm(torch.randn(4, 3, 5), (torch.randn(1, 3, 8), torch.randn(2, 3, 8))), "h_0"),
    (lambda lstm: lstm(torch.randn(4, 3, 5), (torch.randn(2, 3, 8), torch.randn(2, 2, 8))), "c_0"),
    (lambda lstm: lstm(torch.randn(4, 5), (torch.randn(2, 3, 8), torch.randn(2, 3, 8))), "unbatched"),
    (lambda lstm: lstm(torch.randn(4, 3, 5), torch.randn(2, 3, 8)), "tuple"),
    (lambda lstm: lstm(torch.nn.utils.rnn.pack_sequence([torch.randn(3, 6)])), "input_size=5"),
])
def test_bad_shapes_give_clear_errors(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call(LSTM(5, 8, num_layers=2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_active_in_train_mode_only(backend):
    torch.manual_seed(6)
    ref, ours = twin_lstms(backend, DEVICE, torch.float32, input_size=5, hidden_size=33, num_layers=3,
                           dropout=0.5)
    x = torch.randn(6, 3, 5, device=DEVICE)
    ref.eval()
    ours.eval()
    assert relative_error(ours(x)[0], ref(x)[0]) < 1e-5
    ours.train()
    first, second = ours(x)[0], ours(x)[0]
    assert relative_error(first, ref(x)[0]) > 1e-2  # dropout changed the result...
    assert relative_error(first, second) > 1e-2  # ...with a fresh mask per call


# On CPU the lean step multiplies one row with addmm and more with oneDNN's packed weights.
@pytest.mark.parametrize("backend, batch", [("triton", 3), ("torch", 1), ("torch", 3)])
def test_step_equals_sequence_path(backend, batch):
    torch.manual_seed(7)
    lstm = LSTM(5, 33, num_layers=2, backend=backend).to(DEVICE).eval()
    x = torch.randn(9, batch, 5, device=DEVICE)
    state = tuple(torch.randn(2, batch, 33, device=DEVICE) for _ in range(2))
    output, (h_n, c_n) = lstm(x, state)
    step_outputs = []
    with torch.no_grad():
        for t in range(x.size(0)):
            h_top, state = lstm.step(x[t], state)
            step_outputs.append(h_top)
    assert relative_error(torch.stack(step_outputs), output) < 1e-5
    assert relative_error(state[0], h_n) < 1e-5
    assert relative_error(state[1], c_n) < 1e-5


def test_step_sees_updated_weights():
    # The lean step caches its transposed (and partly doubled) weights: an in-place update must rebuild them.
    torch.manual_seed(8)
    lstm = LSTM(4, 16, num_layers=2).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        lstm.step(x)
        lstm.weight_hh_l1.mul_(-2.0)
        h_top, _ = lstm.step(x)
    assert relative_error(h_top, lstm(x.unsqueeze(0))[0][0]) < 1e-5


def test_step_is_differentiable_when_grad_is_enabled():
    torch.manual_seed(9)
    lstm = LSTM(4, 16)
    h_top, _ = lstm.step(torch.randn(3, 4))
    h_top.sum().backward()
    assert lstm.weight_ih_l0.grad is not None and lstm.weight_ih_l0.grad.abs().sum() > 0


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("NANOCHAT_LSTM_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on a GPU machine it is off; CPU tensors then need it
    assert resolve_backend(None, cpu) == "torch"  # auto on CPU: PyTorch's own LSTM
    monkeypatch.setenv("NANOCHAT_LSTM_BACKEND", "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins over the env var
    monkeypatch.setenv("NANOCHAT_LSTM_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown LSTM backend 'cudnn'"):
        resolve_backend(None, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)

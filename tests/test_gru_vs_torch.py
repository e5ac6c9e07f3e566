"""nanochat_fast.GRU against torch.nn.GRU with identical weights: parameters, state dicts, outputs, final
states and every gradient, for the options nn.GRU has (bidirectional, PackedSequence, batch_first,
layers, bias, unbatched input), pairwise. Tolerances as for the LSTM (test_lstm_vs_torch.py): float32
against nn.GRU in float64 on the same weights and inputs, < 1e-5.
"""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import DEVICE
from lstm_reference import random_input, relative_error, run_with_grads, twin_grus
from nanochat_fast import GRU

OPTION_SETS = [dict(), dict(bias=False), dict(bidirectional=True), dict(bidirectional=True, bias=False)]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_same_seed_same_parameters_and_state_dict_both_ways(options):
    torch.manual_seed(5)
    ref = torch.nn.GRU(7, 33, num_layers=3, **options)
    torch.manual_seed(5)
    ours = GRU(7, 33, num_layers=3, **options)
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    fresh_ref = torch.nn.GRU(7, 33, num_layers=3, **options)
    fresh_ref.load_state_dict(GRU(7, 33, num_layers=3, **options).state_dict())
    ours.load_state_dict(fresh_ref.state_dict())
    x = torch.randn(4, 3, 7)
    assert torch.equal(ours(x)[0], fresh_ref(x)[0])  # the torch backend on CPU: PyTorch's own GRU


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    return request.param


# (bidirectional, input, num_layers, batch_first, initial state, bias, (input_size, hidden_size, batch, seq_len))
CASES = [
    (True, "padded", 1, False, True, True, (5, 33, 3, 7)),
    (True, "unsorted", 2, True, False, False, (5, 20, 4, 6)),
    (True, "packed", 3, False, True, True, (3, 16, 3, 4)),
    (False, "padded", 3, True, True, False, (6, 33, 2, 5)),
    (False, "unsorted", 1, False, True, True, (5, 33, 5, 7)),
    (False, "packed", 2, False, False, True, (4, 17, 3, 5)),
    (True, "padded", 2, False, True, True, (8, 80, 17, 3)),  # several hidden tiles and K chunks, ragged
    (False, "unsorted", 2, True, True, True, (5, 33, 17, 9)),
]


@pytest.mark.parametrize("bidirectional, input_kind, num_layers, batch_first, with_state, bias, sizes", CASES)
def test_matches_torch_gru(backend, bidirectional, input_kind, num_layers, batch_first, with_state, bias, sizes):
    input_size, hidden_size, batch, seq_len = sizes
    seed = hash((bidirectional, input_kind, num_layers, sizes)) % 2**31
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = random_input(input_kind, batch_first, (seq_len, batch, input_size), DEVICE, generator)
    states = num_layers * (2 if bidirectional else 1)
    state = torch.randn(states, batch, hidden_size, device=DEVICE) if with_state else None
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=batch_first,
                  bidirectional=bidirectional, bias=bias)
    ref, ours = twin_grus(backend, DEVICE, torch.float32, **kwargs)
    x64 = PackedSequence(x.data.double(), *x[1:]) if isinstance(x, PackedSequence) else x.double()
    expected = run_with_grads(ref.double(), x64, None if state is None else state.double())
    got = run_with_grads(ours, x, state)
    assert expected.keys() == got.keys()
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    bad = {name: error for name, error in errors.items() if not error < 1e-5}
    assert not bad, f"relative errors against float64 nn.GRU above 1e-5: {bad}"


def test_unbatched_input_and_bad_shapes(backend):
    torch.manual_seed(2)
    ref, ours = twin_grus(backend, DEVICE, torch.float64, input_size=5, hidden_size=9, num_layers=2)
    x, h0 = torch.randn(7, 5, device=DEVICE, dtype=torch.float64), torch.randn(2, 9, device=DEVICE, dtype=torch.float64)
    for ours_value, ref_value in zip(ours(x, h0), ref(x, h0), strict=True):
        assert ours_value.shape == ref_value.shape and relative_error(ours_value, ref_value) < 1e-12
    with pytest.raises(ValueError, match="h_0"):
        ours(torch.randn(4, 3, 5, device=DEVICE, dtype=torch.float64), torch.randn(1, 3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="input_size=5"):
        ours(torch.randn(4, 3, 6, device=DEVICE, dtype=torch.float64))


def test_gradcheck_float64_bidirectional_packed():
    # Tiny on purpose: gradcheck runs the whole GRU twice per input element.
    torch.manual_seed(4)
    gru = GRU(2, 2, num_layers=2, bidirectional=True, backend="triton").to(device=DEVICE, dtype=torch.float64)
    names = [name for name, _ in gru.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    packing = pack_padded_sequence(torch.randn(3, 2, 2, dtype=torch.float64), torch.tensor([2, 3]),
                                   enforce_sorted=False)
    data = packing.data.to(DEVICE).requires_grad_()
    h0 = torch.randn(4, 2, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)

    def outputs(data, h0, *weights):
        output, h_n = torch.func.functional_call(gru, dict(zip(names, weights, strict=True)),
                                                 (PackedSequence(data, *packing[1:]), h0))
        return output.data, h_n

    assert torch.autograd.gradcheck(outputs, (data, h0, *weights), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


# On CPU the GRU's lean step is a few addmm and pointwise ops; on the Triton backend the step kernels.
@pytest.mark.parametrize("backend, batch", [("triton", 3), ("torch", 1), ("torch", 3)])
def test_step_equals_sequence_path(backend, batch):
    torch.manual_seed(7)
    gru = GRU(5, 33, num_layers=2, backend=backend).to(DEVICE).eval()
    x = torch.randn(9, batch, 5, device=DEVICE)
    h0 = torch.randn(2, batch, 33, device=DEVICE)
    output, h_n = gru(x, h0)
    state, step_outputs = (h0,), []
    with torch.no_grad():
        for t in range(x.size(0)):
            h_top, state = gru.step(x[t], state)
            step_outputs.append(h_top)
    assert relative_error(torch.stack(step_outputs), output) < 1e-5
    assert relative_error(state[0], h_n) < 1e-5


def test_step_refuses_a_bidirectional_gru():
    with pytest.raises(ValueError, match="unidirectional GRU"):
        GRU(5, 8, bidirectional=True).step(torch.randn(2, 5))

"""nanochat_fast.LSTM against torch.nn.LSTM with identical weights: outputs, final states and the
gradients of the input, the initial state and every parameter.

Tolerance: error per tensor, max|ours - ref| / max|ref|. A float32 run is measured against nn.LSTM in
float64 on the same (exactly widened) weights and inputs, so the bound is on our own rounding, not on
the difference between two roundings: < 1e-5. Our kernels round every operation to float32 (eps 1.2e-7);
over these short sequences and small sums that stays around 1e-7..1e-6, while any real mistake (a gate
out of place, a missing term, a wrong step) shows up at 1e-2 or more. (Against cuDNN's own float32
output, a GPU run differed by up to 1.1e-5: two roundings add up, hence the float64 reference.)
float64 runs are compared with nn.LSTM in float64, < 1e-12.

The options are covered pairwise rather than as a full product: under the Triton interpreter every
launch costs milliseconds. The triton cases run the interpreter on CPU, the real kernels on a GPU,
for both kernel paths: launch-per-step and persistent (one launch per sequence; under the
interpreter, its one-program configuration).
"""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import DEVICE
from lstm_reference import random_input, relative_error, run_with_grads, twin_lstms

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
IMPLEMENTATIONS = ["triton-step", "triton-persistent", "torch"]


@pytest.fixture(params=IMPLEMENTATIONS)
def backend(request, monkeypatch):
    """The LSTM backend under test; for Triton, the kernel path too (NANOCHAT_LSTM_PATH)."""
    backend, _, path = request.param.partition("-")
    if path:
        monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
    return backend

# (num_layers, batch_first, initial state, bias, (input_size, hidden_size, batch, seq_len))
PAIRWISE_CASES = [
    (1, False, False, True, (5, 33, 3, 17)),
    (1, True, True, False, (33, 16, 1, 1)),
    (2, False, True, False, (8, 33, 3, 1)),
    (2, True, False, True, (5, 33, 3, 17)),
    (2, True, True, True, (3, 80, 17, 3)),  # several hidden tiles and K chunks, ragged
    (3, False, True, True, (7, 20, 2, 5)),
    (3, True, False, False, (12, 33, 3, 4)),
]


def _compare(backend, dtype, lstm_kwargs, x, state):
    ref, ours = twin_lstms(backend, DEVICE, dtype, **lstm_kwargs)
    state64 = None if state is None else tuple(s.double() for s in state)
    x64 = PackedSequence(x.data.double(), *x[1:]) if isinstance(x, PackedSequence) else x.double()
    expected = run_with_grads(ref.double(), x64, state64)
    got = run_with_grads(ours, x, state)
    assert expected.keys() == got.keys()
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"relative errors against float64 nn.LSTM above {TOLERANCE[dtype]}: {bad}"


@pytest.mark.parametrize("num_layers, batch_first, with_state, bias, sizes", PAIRWISE_CASES)
def test_matches_torch_lstm(backend, num_layers, batch_first, with_state, bias, sizes):
    input_size, hidden_size, batch, seq_len = sizes
    dtype = torch.float32
    torch.manual_seed(hash((num_layers, batch_first, with_state, bias, sizes)) % 2**31)
    shape = (batch, seq_len, input_size) if batch_first else (seq_len, batch, input_size)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    state = None
    if with_state:
        state = tuple(torch.randn(num_layers, batch, hidden_size, device=DEVICE, dtype=dtype) for _ in range(2))
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, bias=bias,
                  batch_first=batch_first)
    _compare(backend, dtype, kwargs, x, state)


# The options nn.LSTM has beyond the chat model's, pairwise: (bidirectional, proj_size, input, num_layers,
# batch_first, initial state, (input_size, hidden_size, batch, seq_len)). "packed" input has random
# lengths in [1, T], 1 and T among them, sorted longest first; "unsorted" packs them with
# enforce_sorted=False.
OPTION_CASES = [
    (True, 0, "padded", 1, False, True, (5, 33, 3, 7)),
    (True, 4, "unsorted", 2, True, False, (5, 20, 4, 6)),
    (True, 0, "packed", 3, False, False, (3, 16, 3, 4)),
    (False, 4, "padded", 3, True, True, (6, 33, 2, 5)),
    (False, 0, "unsorted", 1, False, True, (5, 33, 5, 7)),
    (False, 7, "packed", 2, False, True, (4, 17, 3, 5)),
    (True, 5, "padded", 2, False, True, (8, 80, 17, 3)),  # several hidden tiles and K chunks, ragged
    (False, 0, "unsorted", 2, True, True, (5, 33, 17, 9)),
    (True, 3, "unsorted", 1, False, True, (2, 9, 6, 8)),
]


@pytest.mark.parametrize("bidirectional, proj_size, input_kind, num_layers, batch_first, with_state, sizes",
                         OPTION_CASES)
def test_options_match_torch_lstm(backend, bidirectional, proj_size, input_kind, num_layers, batch_first,
                                  with_state, sizes):
    input_size, hidden_size, batch, seq_len = sizes
    seed = hash((bidirectional, proj_size, input_kind, num_layers, sizes)) % 2**31
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = random_input(input_kind, batch_first, (seq_len, batch, input_size), DEVICE, generator)
    state = None
    if with_state:
        states = num_layers * (2 if bidirectional else 1)
        state = (torch.randn(states, batch, proj_size or hidden_size, device=DEVICE),
                 torch.randn(states, batch, hidden_size, device=DEVICE))
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=batch_first,
                  bidirectional=bidirectional, proj_size=proj_size)
    _compare(backend, torch.float32, kwargs, x, state)


def test_float64(backend):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 5, device=DEVICE, dtype=torch.float64)
    state = tuple(torch.randn(2, 3, 33, device=DEVICE, dtype=torch.float64) for _ in range(2))
    _compare(backend, torch.float64, dict(input_size=5, hidden_size=33, num_layers=2), x, state)


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(backend, batch_first):
    torch.manual_seed(2)
    x = torch.randn(7, 5, device=DEVICE)
    state = tuple(torch.randn(2, 33, device=DEVICE) for _ in range(2))
    kwargs = dict(input_size=5, hidden_size=33, num_layers=2, batch_first=batch_first)
    _compare(backend, torch.float32, kwargs, x, state)
    _compare(backend, torch.float32, kwargs, x, None)


def test_non_contiguous_input(backend):
    torch.manual_seed(3)
    x = torch.randn(3, 9, 10, device=DEVICE)[:, ::2, ::2].transpose(0, 1)  # (5, 3, 5), strided
    assert not x.is_contiguous()
    state = tuple(torch.randn(1, 3, 33, device=DEVICE)[:, :, :].transpose(1, 2).transpose(1, 2)
                  for _ in range(2))
    _compare(backend, torch.float32, dict(input_size=5, hidden_size=33), x, state)


@pytest.mark.parametrize("options, packed", [(dict(), False), (dict(bidirectional=True, proj_size=1), True)],
                         ids=["plain", "bidirectional-proj-packed"])
def test_gradcheck_float64(backend, options, packed):
    # Tiny on purpose: gradcheck runs the whole LSTM twice per input element (~250 times here).
    from nanochat_fast import LSTM

    torch.manual_seed(4)
    lstm = LSTM(2, 2, num_layers=2, backend=backend, **options).to(device=DEVICE, dtype=torch.float64)
    names = [name for name, _ in lstm.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    states = 2 * (2 if lstm.bidirectional else 1)
    x = torch.randn(3, 2, 2, device=DEVICE, dtype=torch.float64)
    lengths = torch.tensor([2, 3])  # unsorted: the packed batch is reordered and back
    data = pack_padded_sequence(x, lengths, enforce_sorted=False).data if packed else x
    data = data.detach().requires_grad_()
    h0 = torch.randn(states, 2, lstm.proj_size or 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(states, 2, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    reference_packing = pack_padded_sequence(x, lengths, enforce_sorted=False)

    def outputs(data, h0, c0, *weights):
        layer_input = PackedSequence(data, *reference_packing[1:]) if packed else data
        output, (h_n, c_n) = torch.func.functional_call(lstm, dict(zip(names, weights, strict=True)),
                                                        (layer_input, (h0, c0)))
        return (output.data if packed else output), h_n, c_n

    # fast_mode (a random projection of the Jacobian): the full one takes minutes under the interpreter
    # for the bidirectional, projected case's 22 inputs.
    assert torch.autograd.gradcheck(outputs, (data, h0, c0, *weights), eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=bool(options))


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton interpreter has no bfloat16 arithmetic: "
                                             "half precision is tested on a GPU only")
@pytest.mark.parametrize("path", ["step", "persistent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_nn_lstm(dtype, path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
    # Half inputs round every stored value, so the bound is relative to nn.LSTM's own half-precision
    # error against float32: ours (float32 accumulation and cell) must be within 2x of it.
    torch.manual_seed(10)
    kwargs = dict(input_size=64, hidden_size=256, num_layers=2)
    ref32, _ = twin_lstms("torch", DEVICE, torch.float32, **kwargs)
    ref_half, ours_half = twin_lstms("triton", DEVICE, dtype, **kwargs)
    ref_half.load_state_dict(ref32.state_dict())
    ours_half.load_state_dict(ref32.state_dict())
    x = torch.randn(32, 16, 64, device=DEVICE)
    state = tuple(torch.randn(2, 16, 256, device=DEVICE) for _ in range(2))
    exact = run_with_grads(ref32, x, state)
    half_state = tuple(s.to(dtype) for s in state)
    theirs = run_with_grads(ref_half, x.to(dtype), half_state)
    ours = run_with_grads(ours_half, x.to(dtype), half_state)
    for name in exact:
        our_error, their_error = relative_error(ours[name], exact[name]), relative_error(theirs[name], exact[name])
        assert our_error <= 2 * their_error + 1e-3, (name, our_error, their_error)


@pytest.mark.skipif(DEVICE != "cuda", reason="autocast to bfloat16 runs on a GPU only")
@pytest.mark.parametrize("path", ["step", "persistent"])
def test_bfloat16_autocast_training_step(path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
    torch.manual_seed(11)
    ref, ours = twin_lstms("triton", DEVICE, torch.float32, input_size=64, hidden_size=128, num_layers=2)
    x = torch.randn(20, 8, 64, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, (h_n, c_n) = ours(x)
    assert output.dtype == torch.bfloat16
    assert relative_error(output, ref(x)[0]) < 5e-2
    output.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())

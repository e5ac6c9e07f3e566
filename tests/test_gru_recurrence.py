"""The GRU recurrence on our Triton kernels (`gru_recurrence`) against a plain PyTorch float64 GRU loop
written here (one or two directions, variable lengths) and, for one direction without lengths, against
torch.nn.GRU itself: outputs and the gradients of every input.

Tolerance, as for the LSTM (test_lstm_vs_torch.py): error per tensor max|ours - ref| / max|ref|, a
float32 run against the float64 reference on the same (exactly widened) inputs < 1e-5, float64 < 1e-12.
Sizes are ragged (hidden 33 and 80: several hidden tiles and K chunks under the interpreter's tiles;
batch 3 and 17), lengths unsorted and include 1 and T. Under the interpreter every launch costs
milliseconds, so the cases are few and small. They run on both kernel paths (NANOCHAT_LSTM_PATH):
per step, and persistent, which the interpreter runs as one program a direction (several programs:
test_persistent_tiles.py).
"""

import pytest
import torch

from conftest import DEVICE
from lstm_reference import relative_error
from nanochat_fast.kernels import gru_persistent, gru_step
from nanochat_fast.kernels.gru_recurrence import gru_recurrence

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
PATH_MODULES = {"step": gru_step, "persistent": gru_persistent}


@pytest.fixture(params=PATH_MODULES)
def path(request, monkeypatch):
    """The kernel path under test: NANOCHAT_LSTM_PATH picks the GRU's as the LSTM's."""
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", request.param)
    return request.param


def reference_gru(gates_x, h0, w_hh, b_hn, lengths):
    """PyTorch's GRU formula, step by step: output (T, D, B, H), zero where t >= lengths[b]."""
    steps, _, batch, _ = gates_x.shape
    h = h0
    outputs = []
    for t in range(steps):
        gx_r, gx_z, gx_n = gates_x[t].chunk(3, dim=-1)
        gh_r, gh_z, gh_n = torch.einsum("dbk,dgk->dbg", h, w_hh).chunk(3, dim=-1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        n = torch.tanh(gx_n + r * (gh_n if b_hn is None else gh_n + b_hn[:, None, :]))
        h = (1 - z) * n + z * h
        if lengths is not None:
            h = torch.where((t < lengths)[None, :, None], h, 0.0)
        outputs.append(h)
    return torch.stack(outputs)


def random_inputs(steps, directions, batch, hidden, dtype, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)

    gates_x = randn(steps, directions, batch, 3 * hidden)
    h0 = randn(directions, batch, hidden)
    w_hh = randn(directions, 3 * hidden, hidden, scale=hidden ** -0.5)
    b_hn = randn(directions, hidden, scale=0.5) if bias else None
    return gates_x, h0, w_hh, b_hn


def outputs_and_grads(run, inputs, lengths):
    """output, h_n (gathered as a GRU module would) and the gradients of every input of a random
    projection of both, by name."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    output = run(*leaves, lengths)
    steps, _, batch, _ = output.shape
    last = torch.full((batch,), steps - 1, device=output.device) if lengths is None else lengths.long() - 1
    h_n = output[last, :, torch.arange(batch, device=output.device)]  # (B, D, H)
    generator = torch.Generator().manual_seed(1234)  # the same projection for every run
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum() for t in (output, h_n))
    loss.backward()
    names = ("gates_x", "h0", "w_hh", "b_hn")
    grads = {f"grad {name}": leaf.grad for name, leaf in zip(names, leaves, strict=True) if leaf is not None}
    return {"output": output.detach(), "h_n": h_n.detach(), **grads}


def assert_close(got, expected, dtype):
    assert got.keys() == expected.keys()
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    bad = {name: error for name, error in errors.items() if not error < TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]}: {bad}"


# (directions, hidden, batch, steps, lengths or None, dtype, bias)
CASES = [
    (1, 33, 3, 7, [7, 1, 4], torch.float32, True),
    (2, 80, 17, 5, [3, 5, 1, 2, 5, 4, 1, 3, 2, 5, 4, 4, 1, 2, 3, 5, 2], torch.float32, True),
    (2, 33, 3, 6, None, torch.float32, False),
    (2, 33, 3, 4, [4, 4, 4], torch.float32, True),  # lengths all T: the masked kernels, nothing masked
    (1, 80, 17, 3, None, torch.float64, True),
    (2, 33, 5, 5, [2, 5, 1, 3, 4], torch.float64, False),
]


@pytest.mark.parametrize("directions, hidden, batch, steps, lengths, dtype, bias", CASES)
def test_matches_reference(path, directions, hidden, batch, steps, lengths, dtype, bias):
    inputs = random_inputs(steps, directions, batch, hidden, dtype, bias, seed=hidden * batch + steps)
    if lengths is not None:
        lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    got = outputs_and_grads(gru_recurrence, inputs, lengths)
    expected = outputs_and_grads(reference_gru, [None if t is None else t.double() for t in inputs], lengths)
    assert_close(got, expected, dtype)
    if lengths is not None:
        finished = torch.arange(steps, device=DEVICE)[:, None] >= lengths[None, :]  # (T, B)
        assert (got["output"].permute(0, 2, 1, 3)[finished] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_gru(path, dtype):
    input_size, hidden, batch, steps = 5, 33, 3, 6
    torch.manual_seed(5)
    gru = torch.nn.GRU(input_size, hidden).to(device=DEVICE, dtype=torch.float64)
    x = torch.randn(steps, batch, input_size, device=DEVICE, dtype=torch.float64)
    h0 = torch.randn(1, batch, hidden, device=DEVICE, dtype=torch.float64)
    params = [p.detach() for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)]

    def ours(x, h0, w_ih, w_hh, b_ih, b_hh):
        # The module's job, done here: b_hr, b_hz folded into the projection, b_hn kept apart.
        gates_x = x @ w_ih.t() + b_ih + torch.cat([b_hh[:2 * hidden], torch.zeros_like(b_hh[2 * hidden:])])
        output = gru_recurrence(gates_x[:, None], h0, w_hh[None], b_hh[None, 2 * hidden:])
        return output[:, 0], output[-1]

    def theirs(x, h0, w_ih, w_hh, b_ih, b_hh):
        output, h_n = torch.func.functional_call(
            gru, dict(weight_ih_l0=w_ih, weight_hh_l0=w_hh, bias_ih_l0=b_ih, bias_hh_l0=b_hh), (x, h0))
        return output, h_n[0]

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        output, h_n = fn(*leaves)
        generator = torch.Generator().manual_seed(99)
        loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
                   for t in (output, h_n))
        loss.backward()
        names = ("x", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return {"output": output.detach(), "h_n": h_n.detach(),
                **{f"grad {name}": leaf.grad for name, leaf in zip(names, leaves, strict=True)}}

    expected = run(theirs, [x, h0, *params])
    got = run(ours, [t.to(dtype) for t in (x, h0[0], *params)])
    assert_close(got, expected, dtype)


def test_gradcheck_float64(path):
    # Fast mode (random projections of the Jacobian, a few evaluations per input): the full check runs the
    # recurrence twice per input element, a minute under the interpreter even at 2 x 2 units.
    gates_x, h0, w_hh, b_hn = (t.requires_grad_() for t in random_inputs(4, 2, 3, 3, torch.float64, seed=7))
    lengths = torch.tensor([4, 1, 2], dtype=torch.int32, device=DEVICE)
    assert torch.autograd.gradcheck(lambda *inputs: gru_recurrence(*inputs, lengths), (gates_x, h0, w_hh, b_hn),
                                    eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_the_path_runs_its_own_loops(path, monkeypatch):
    # Else both paths' tests could pass on the same kernels.
    calls = []

    def spy(name, run):
        def loop(*args):
            calls.append(name)
            return run(*args)
        return loop

    for module_path, module in PATH_MODULES.items():
        for loop in ("forward_loop", "backward_loop"):
            monkeypatch.setattr(module, loop, spy((module_path, loop), getattr(module, loop)))
    gates_x, h0, w_hh, b_hn = random_inputs(2, 2, 3, 16, torch.float32)
    gru_recurrence(gates_x.requires_grad_(), h0, w_hh, b_hn).sum().backward()
    assert calls == [(path, "forward_loop"), (path, "backward_loop")]


def test_compiles_with_torch_compile():
    # The kernels are custom ops with fake implementations: Dynamo traces through the Function.
    inputs = random_inputs(3, 2, 3, 16, torch.float32, seed=8)
    lengths = torch.tensor([3, 1, 2], dtype=torch.int32, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(gru_recurrence, fullgraph=True, backend="aot_eager")
    got, expected = outputs_and_grads(compiled, inputs, lengths), outputs_and_grads(gru_recurrence, inputs, lengths)
    assert got.keys() == expected.keys()
    for name in expected:
        assert relative_error(got[name], expected[name]) < 1e-6, name


def test_rejects_lengths_of_another_dtype():
    inputs = random_inputs(2, 1, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        gru_recurrence(*inputs, torch.tensor([2, 1, 2], device=DEVICE))

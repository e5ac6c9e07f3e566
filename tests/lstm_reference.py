"""Helpers shared by the LSTM tests: run ours and torch.nn.LSTM on the same weights and inputs."""

import torch
from torch.nn.utils.rnn import PackedSequence

from nanochat_fast import LSTM


def relative_error(ours, ref):
    """max|ours - ref| / max|ref|: one number per tensor, independent of the tensor's scale."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def twin_lstms(backend, device, dtype, **kwargs):
    """(reference nn.LSTM, our LSTM) with identical weights."""
    ref = torch.nn.LSTM(**kwargs).to(device=device, dtype=dtype)
    ours = LSTM(**kwargs, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_with_grads(lstm, x, state):
    """Forward, then backward of a random projection of every output; returns the outputs and the
    gradients of the inputs, the initial state and every parameter, by name. x may be a PackedSequence:
    then its data is the input leaf and the output's data is compared."""
    packed = isinstance(x, PackedSequence)
    leaves = {"input": (x.data if packed else x).detach().clone().requires_grad_()}
    if state is not None:
        leaves["h0"] = state[0].detach().clone().requires_grad_()
        leaves["c0"] = state[1].detach().clone().requires_grad_()
    hx = (leaves["h0"], leaves["c0"]) if state is not None else None
    layer_input = PackedSequence(leaves["input"], *x[1:]) if packed else leaves["input"]
    output, (h_n, c_n) = lstm(layer_input, hx)
    if packed:
        assert isinstance(output, PackedSequence)
        assert torch.equal(output.batch_sizes, x.batch_sizes)
        output = output.data
    outputs = {"output": output, "h_n": h_n, "c_n": c_n}
    generator = torch.Generator().manual_seed(1234)  # the same projection for both LSTMs
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
               for t in outputs.values())
    loss.backward()
    grads = {f"grad {name}": leaf.grad for name, leaf in leaves.items()}
    grads.update({f"grad {name}": p.grad for name, p in lstm.named_parameters()})
    return {**outputs, **grads}

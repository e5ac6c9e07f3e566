"""Helpers shared by the LSTM and GRU tests: run ours and PyTorch's module on the same weights and inputs."""

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from nanochat_fast import GRU, LSTM


def relative_error(ours, ref):
    """max|ours - ref| / max|ref|: one number per tensor, independent of the tensor's scale."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def twin_lstms(backend, device, dtype, **kwargs):
    """(reference nn.LSTM, our LSTM) with identical weights."""
    return twins(torch.nn.LSTM, LSTM, backend, device, dtype, **kwargs)


def twin_grus(backend, device, dtype, **kwargs):
    """(reference nn.GRU, our GRU) with identical weights."""
    return twins(torch.nn.GRU, GRU, backend, device, dtype, **kwargs)


def twins(reference_cls, our_cls, backend, device, dtype, **kwargs):
    ref = reference_cls(**kwargs).to(device=device, dtype=dtype)
    ours = our_cls(**kwargs, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_with_grads(module, x, state):
    """Forward, then backward of a random projection of every output; returns the outputs and the
    gradients of the inputs, the initial state and every parameter, by name. x may be a PackedSequence:
    then its data is the input leaf and the output's data is compared. state: (h_0, c_0) for an LSTM,
    h_0 for a GRU, or None."""
    packed = isinstance(x, PackedSequence)
    leaves = {"input": (x.data if packed else x).detach().clone().requires_grad_()}
    hx = None
    if isinstance(state, torch.Tensor):
        hx = leaves["h0"] = state.detach().clone().requires_grad_()
    elif state is not None:
        leaves["h0"] = state[0].detach().clone().requires_grad_()
        leaves["c0"] = state[1].detach().clone().requires_grad_()
        hx = (leaves["h0"], leaves["c0"])
    layer_input = PackedSequence(leaves["input"], *x[1:]) if packed else leaves["input"]
    output, final = module(layer_input, hx)
    if packed:
        assert isinstance(output, PackedSequence)
        assert torch.equal(output.batch_sizes, x.batch_sizes)
        output = output.data
    outputs = {"output": output, "h_n": final} if isinstance(final, torch.Tensor) else {
        "output": output, "h_n": final[0], "c_n": final[1]}
    generator = torch.Generator().manual_seed(1234)  # the same projection for both LSTMs
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
               for t in outputs.values())
    loss.backward()
    grads = {f"grad {name}": leaf.grad for name, leaf in leaves.items()}
    grads.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    return {**outputs, **grads}


def random_lengths(batch, seq_len, generator):
    """Lengths in [1, seq_len], with 1 and seq_len among them when the batch has room, in random order."""
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[0] = seq_len
    if batch > 1:
        lengths[1] = 1
    return lengths[torch.randperm(batch, generator=generator)]


def random_input(kind, batch_first, shape, device, generator):
    """A random input of (seq_len, batch, input_size) as `kind` says: "padded" (a tensor, batch-first if
    asked), "packed" (random_lengths, sorted longest first) or "unsorted" (packed with enforce_sorted=False)."""
    x = torch.randn(shape, device=device)
    if kind == "padded":
        return x.transpose(0, 1) if batch_first else x
    lengths = random_lengths(shape[1], shape[0], generator)
    if kind == "packed":
        lengths = lengths.sort(descending=True).values
    return pack_padded_sequence(x, lengths, enforce_sorted=kind == "packed")

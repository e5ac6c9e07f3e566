"""PyTorch's own test samples for nn.LSTM and nn.GRU (torch.testing._internal.common_modules.module_db): every
sample's constructor arguments and inputs, given to our module on the Triton backend (the interpreter
on CPU) and to PyTorch's, with identical weights, in float64; outputs, final states and every gradient
must match. The samples function is called directly, not through PyTorch's test harness.
"""

import pytest
import torch
from torch.testing._internal.common_modules import module_db
from conftest import DEVICE
from lstm_reference import relative_error
from nanochat_fast import GRU, LSTM

OURS = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU}
# Samples per training mode with torch 2.13 (small, unbatched and batched), by with_packed_sequence:
# PyTorch has packed samples for nn.GRU only (the LSTM's packed input is covered by our own tests).
SAMPLE_COUNTS = {(torch.nn.LSTM, False): 32, (torch.nn.GRU, False): 16, (torch.nn.GRU, True): 32}


def samples(module_cls, training, packed):
    (info,) = [info for info in module_db if info.module_cls is module_cls]
    options = {"with_packed_sequence": True} if packed else {}
    return info.module_inputs_func(info, device=DEVICE, dtype=torch.float64, requires_grad=True, training=training,
                                   **options)


def flatten(value):
    """Every tensor of an output, in order: tensors, tuples of them and PackedSequences."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return [value.data]
    return [t for item in value for t in flatten(item)]


def outputs_and_grads(module, args):
    """The module's outputs on fresh copies of args, and the gradients of args and parameters under the
    same random projection of the outputs."""
    leaves = [t.detach().clone().requires_grad_() for t in flatten(args)]
    remaining = iter(leaves)

    def rebuild(value):
        if isinstance(value, torch.Tensor):
            return next(remaining)
        if isinstance(value, torch.nn.utils.rnn.PackedSequence):
            return torch.nn.utils.rnn.PackedSequence(next(remaining), *value[1:])
        return type(value)(rebuild(item) for item in value)

    outputs = flatten(module(*rebuild(args)))
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum() for t in outputs)
    inputs = leaves + list(module.parameters())
    return outputs + list(torch.autograd.grad(loss, inputs, allow_unused=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("module_cls, packed", list(SAMPLE_COUNTS),
                         ids=lambda value: getattr(value, "__name__", "packed" if value else "tensors"))
def test_every_pytorch_sample_matches(module_cls, packed, training):
    module_samples = samples(module_cls, training, packed)
    assert len(module_samples) == SAMPLE_COUNTS[module_cls, packed]
    for number, sample in enumerate(module_samples):
        torch.manual_seed(number)
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ref = module_cls(*args, **kwargs).to(device=DEVICE, dtype=torch.float64).train(training)
        ours = OURS[module_cls](*args, **kwargs, backend="triton").to(device=DEVICE, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())
        ours.train(training)
        forward_args = sample.forward_input.args
        expected, got = outputs_and_grads(ref, forward_args), outputs_and_grads(ours, forward_args)
        assert len(expected) == len(got)
        for index, (ours_value, ref_value) in enumerate(zip(got, expected, strict=True)):
            assert ours_value.shape == ref_value.shape, (number, kwargs, index)
            assert relative_error(ours_value, ref_value) < 1e-12, (number, kwargs, index)

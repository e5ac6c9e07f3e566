"""PyTorch's own test samples for nn.LSTM (torch.testing._internal.common_modules.module_db): every
sample's constructor arguments and inputs, given to our module on the Triton backend (the interpreter
on CPU) and to PyTorch's, with identical weights, in float64; outputs, final states and every gradient
must match. The samples function is called directly, not through PyTorch's test harness.
"""

import pytest
import torch
from torch.testing._internal.common_modules import module_db
from conftest import DEVICE
from lstm_reference import relative_error
from nanochat_fast import LSTM

OURS = {torch.nn.LSTM: LSTM}
# Samples per training mode with torch 2.13 (small, unbatched and batched; no packed LSTM samples).
SAMPLE_COUNTS = {torch.nn.LSTM: 32}


def samples(module_cls, training):
    (info,) = [info for info in module_db if info.module_cls is module_cls]
    return info.module_inputs_func(info, device=DEVICE, dtype=torch.float64, requires_grad=True, training=training)


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
        return type(value)(rebuild(item) for item in value)

    outputs = flatten(module(*rebuild(args)))
    generator = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum() for t in outputs)
    inputs = leaves + list(module.parameters())
    return outputs + list(torch.autograd.grad(loss, inputs, allow_unused=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("module_cls", list(OURS), ids=lambda cls: cls.__name__)
def test_every_pytorch_sample_matches(module_cls, training):
    module_samples = samples(module_cls, training)
    assert len(module_samples) == SAMPLE_COUNTS[module_cls]
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

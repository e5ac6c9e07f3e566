"""The weights' average a run validates and keeps as best/: its decay, its copy, its saved tensors."""

import itertools

import pytest
import torch

from nanochat_fast.ensemble import build_model
from nanochat_fast.model import ModelConfig
from nanochat_fast.weight_average import AVERAGE_DECAY, WeightAverage, decay_at


def model_of(members=1):
    return build_model(ModelConfig(vocab_size=11, hidden_size=8, num_layers=2, dropout=0.0, members=members))


def test_the_decay_warms_up_to_its_value():
    decays = [decay_at(step) for step in range(2000)]
    assert decays[0] < 0.5 and all(a <= b for a, b in itertools.pairwise(decays))
    assert max(decays) == decays[-1] == AVERAGE_DECAY


@pytest.mark.parametrize("members", [1, 2])
def test_the_average_follows_the_weights_by_the_decay_of_each_step(members):
    torch.manual_seed(0)
    model = model_of(members)
    average = WeightAverage(model)
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))  # fresh weights each step, as far from the last as can be
        trained = {name: p.detach().clone() for name, p in model.named_parameters()}
        average.update(model, step)
        decay = decay_at(step)
        expected = {name: decay * expected[name] + (1 - decay) * p.double() for name, p in trained.items()}
        for name, p in model.named_parameters():
            assert torch.equal(p, trained[name])  # the trained weights untouched
    averaged = dict(average.model.named_parameters())
    assert averaged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-5, atol=1e-6)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())


def test_the_average_saved_among_other_tensors_reads_back_as_it_was():
    torch.manual_seed(1)
    model = model_of()
    average = WeightAverage(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    average.update(model, 5)
    saved = {"lstm_h": torch.randn(2, 3, 8)} | average.tensors()
    restored = WeightAverage(model_of(), WeightAverage.saved_in(saved))
    for name, p in average.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], p)
    assert WeightAverage.saved_in({"lstm_h": torch.zeros(1)}) is None  # an older run's latest/

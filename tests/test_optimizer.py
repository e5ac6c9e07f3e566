"""The training optimizer: which parameters Muon takes, the one schedule for both, and a saved state."""

import io

import pytest
import torch

from nanochat_fast.model import CharLSTM, ModelConfig
from nanochat_fast.optimizer import MUON_LR_SCALE, MUON_NEWTON_SCHULZ_STEPS, make_optimizer


def model_of(cell):
    torch.manual_seed(0)
    return CharLSTM(ModelConfig(vocab_size=11, hidden_size=8, num_layers=2, dropout=0.0, cell=cell))


def one_step(model, optimizer):
    ids = torch.randint(0, 11, (3, 5))
    logits, _ = model(ids)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    optimizer.step()


GATES = {"lstm": 4, "gru": 3}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_muon_takes_the_recurrent_weight_matrices_gate_by_gate_and_adamw_the_rest(cell):
    model = model_of(cell)
    optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.99))
    muon, adamw = optimizer.optimizers
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    blocked = {names[id(weight)]: (weight, blocks) for weight, blocks in optimizer.blocked}
    in_adamw = sorted(names[id(parameter)] for parameter in adamw.param_groups[0]["params"])
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sorted(blocked) == [f"{cell}.weight_{kind}_l{layer}" for kind in ("hh", "ih") for layer in (0, 1)]
    assert sorted(list(blocked) + in_adamw) == sorted(names.values())  # each parameter once
    assert muon.param_groups[0]["params"] == [block for _, blocks in optimizer.blocked for block in blocks]
    for weight, blocks in blocked.values():  # one block a gate, each a view of the weight's own rows
        assert len(blocks) == GATES[cell] and all(block.shape == (8, weight.shape[1]) for block in blocks)
        assert blocks[0].data_ptr() == weight.data_ptr() and torch.equal(torch.cat(blocks), weight)
    only_adamw, = make_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.99)).optimizers
    assert len(only_adamw.param_groups[0]["params"]) == len(names)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_step_moves_each_gate_block_as_muon_moves_a_matrix_of_its_own(cell):
    model = model_of(cell)
    weights = {name: parameter.detach().clone() for name, parameter in model.recurrent.named_parameters()
               if name.startswith("weight_")}
    optimizer = make_optimizer(model, "muon", 1e-2, 0.1, (0.9, 0.99))
    torch.manual_seed(1)
    one_step(model, optimizer)
    grads = {name: parameter.grad for name, parameter in model.recurrent.named_parameters() if name in weights}
    for name, weight in weights.items():  # torch's Muon on each gate's rows as a parameter of its own
        blocks = [torch.nn.Parameter(block.clone()) for block in weight.chunk(GATES[cell])]
        for block, grad in zip(blocks, grads[name].chunk(GATES[cell]), strict=True):
            block.grad = grad.clone()
        torch.optim.Muon(blocks, lr=1e-2 * MUON_LR_SCALE, weight_decay=0.1, adjust_lr_fn="match_rms_adamw",
                         ns_steps=MUON_NEWTON_SCHULZ_STEPS).step()
        moved = getattr(model.recurrent, name).detach()
        assert not torch.equal(moved, weight), name
        torch.testing.assert_close(moved, torch.cat([block.detach() for block in blocks]), rtol=0, atol=1e-6)
    optimizer.zero_grad()
    assert all(parameter.grad is None for parameter in model.parameters())


def test_one_schedule_sets_both_rates_also_after_loading_a_state():
    model = model_of("lstm")
    optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.99))
    optimizer.load_state_dict(make_optimizer(model, "muon", 5e-3, 0.1, (0.9, 0.99)).state_dict())
    optimizer.set_lr(2e-3)
    muon, adamw = optimizer.optimizers
    assert muon.param_groups[0]["lr"] == pytest.approx(2e-3 * MUON_LR_SCALE)
    assert adamw.param_groups[0]["lr"] == pytest.approx(2e-3)


def test_a_saved_state_goes_on_as_the_optimizer_would_have():
    model, twin = model_of("lstm"), model_of("lstm")
    optimizer = make_optimizer(model, "muon", 1e-2, 0.1, (0.9, 0.99))
    torch.manual_seed(1)
    one_step(model, optimizer)
    twin.load_state_dict(model.state_dict())
    restored = make_optimizer(twin, "muon", 1e-2, 0.1, (0.9, 0.99))
    saved = io.BytesIO()  # as a checkpoint keeps it (a state_dict holds the live tensors)
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    for trained, copy in ((model, optimizer), (twin, restored)):
        torch.manual_seed(2)
        one_step(trained, copy)
    for (name, parameter), twin_parameter in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(parameter, twin_parameter), name


def test_the_state_of_another_optimizer_is_refused_with_its_name():
    model = model_of("lstm")
    adamw_state = make_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.99)).state_dict()
    with pytest.raises(ValueError, match="AdamW, not Muon, AdamW"):
        make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.99)).load_state_dict(adamw_state)

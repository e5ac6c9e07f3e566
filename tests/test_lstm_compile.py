"""A model using our LSTM compiles with torch.compile(fullgraph=True) on the Triton backend (which
Dynamo refuses for nn.LSTM): the kernels are registered custom ops. Outputs and gradients must equal
eager mode's. On CPU the kernels run under the Triton interpreter."""

import pytest
import torch

from conftest import DEVICE
from lstm_reference import relative_error
from nanochat_fast.model import CharLSTM, ModelConfig


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager(compiler):
    torch.manual_seed(12)
    model = CharLSTM(ModelConfig(vocab_size=20, hidden_size=16, num_layers=2, dropout=0.0),
                     lstm_backend="triton").to(DEVICE)
    ids = torch.randint(0, 20, (3, 5), device=DEVICE)

    def logits_and_grads(run):
        model.zero_grad()
        logits, (h_n, c_n) = run(ids)
        (logits.square().sum() + h_n.sum() + c_n.sum()).backward()
        return [logits, h_n, c_n] + [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    eager = logits_and_grads(model)
    compiled = logits_and_grads(torch.compile(model, fullgraph=True, backend=compiler))
    for ours, ref in zip(compiled, eager, strict=True):
        assert relative_error(ours, ref) < 1e-6

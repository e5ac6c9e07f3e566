"""Throughput of nanochat_fast.LSTM and GRU against torch.nn.LSTM and GRU (cuDNN on a GPU), with
pytest-benchmark.

On a GPU: forward and forward+backward of our Triton kernels at the issue's shapes. On CPU (where
the auto backend is PyTorch's own LSTM) the same comparison measures our wrapper's overhead (the
ratio should be about 1.0) at smaller shapes, and the single-step generation path (our lean step
against calling nn.LSTM one step at a time). Run: python -m pytest bench -q
"""

import pytest
import torch

from conftest import DEVICE, synchronized
from nanochat_fast import GRU, LSTM

if DEVICE == "cuda":
    SHAPES = [(64, 256, 512), (64, 256, 1024), (8, 256, 512)]  # (batch, seq_len, hidden)
    LAYERS = [1, 2]
else:
    SHAPES = [(64, 64, 256), (8, 64, 256)]
    LAYERS = [2]


def _twins(hidden, layers, cell="LSTM"):
    reference_cls, our_cls = (torch.nn.LSTM, LSTM) if cell == "LSTM" else (torch.nn.GRU, GRU)
    ref = reference_cls(hidden, hidden, layers).to(DEVICE)
    ours = our_cls(hidden, hidden, layers).to(DEVICE)  # backend auto: triton on CUDA, torch on CPU
    ours.load_state_dict(ref.state_dict())
    return {"baseline": ref, "nanochat_fast": ours}


@pytest.mark.parametrize("impl", ["baseline", "nanochat_fast"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("batch, seq_len, hidden", SHAPES)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_sequence(benchmark, pass_, batch, seq_len, hidden, layers, cell, impl):
    torch.manual_seed(0)
    lstm = _twins(hidden, layers, cell)[impl]
    x = torch.randn(seq_len, batch, hidden, device=DEVICE, requires_grad=pass_ != "forward")

    def forward():
        with torch.no_grad():
            return lstm(x)

    def forward_backward():
        output, _ = lstm(x)
        output.sum().backward()

    benchmark.extra_info.update(case=f"{cell} {pass_} B={batch} T={seq_len} H={hidden} L={layers}",
                                impl=f"{impl} {cell}", chars=batch * seq_len)
    benchmark.group = benchmark.extra_info["case"]
    benchmark(synchronized(forward if pass_ == "forward" else forward_backward))


@pytest.mark.parametrize("impl", ["baseline nn.LSTM per step", "nanochat_fast.LSTM.step"])
@pytest.mark.parametrize("hidden", [256, 512])
def test_generation_step(benchmark, hidden, impl):
    """One character of generation (batch 1, 2 layers): what a chat reply pays per character."""
    torch.manual_seed(0)
    lstms = _twins(hidden, 2)
    x = torch.randn(1, hidden, device=DEVICE)
    state = tuple(torch.randn(2, 1, hidden, device=DEVICE) for _ in range(2))
    if impl.startswith("baseline"):
        lstm = lstms["baseline"].eval()

        def step():
            return lstm(x.unsqueeze(0), state)
    else:
        lstm = lstms["nanochat_fast"].eval()

        def step():
            return lstm.step(x, state)

    def run():
        with torch.no_grad():
            return step()

    benchmark.extra_info.update(case=f"generation step 2x{hidden}, batch 1", impl=impl, chars=1)
    benchmark.group = benchmark.extra_info["case"]
    benchmark(synchronized(run))

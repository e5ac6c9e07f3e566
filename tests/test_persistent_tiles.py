"""The persistent path's GPU tiles: how they are chosen, and the kernels run with them.

Under the interpreter the persistent path runs as one program (test_lstm_vs_torch.py). Here its kernels
run with the grid a GPU would get: several programs, each with its own resident W_hh slice, ragged
edges in both batch and hidden. Programs run one after another under the interpreter, so only a
single step can run this way (the grid barrier comes between steps, and none follows the last one).
The reference is one LSTM step written out in float64, with autograd for the gradients.
"""

import pytest
import torch

from compile_kernels_for_gpu import H100_SHARED, H100_SMS
from conftest import DEVICE
from nanochat_fast.kernels import lstm_persistent
from nanochat_fast.kernels.launch import backward_k_split, persistent_tiles


def test_tiles_use_most_programs_that_fit():
    # B 64, H 1024, bfloat16: 16-row tiles would need 256 programs; W_hh slices of 16 units are 128 KiB.
    config = persistent_tiles(64, 1024, torch.bfloat16, H100_SMS, H100_SHARED, gates=4)
    assert config.grid == (2, 64, 1) and (config.meta["BLOCK_B"], config.meta["BLOCK_H"]) == (32, 16)
    assert (config.meta["BLOCK_K"], config.meta["num_warps"]) == (1024, 8)
    assert backward_k_split(config.meta) == 8  # a piece of the sum over k per warp
    assert persistent_tiles(8, 512, torch.bfloat16, H100_SMS, H100_SHARED, gates=4).grid == (1, 32, 1)
    # Both directions of a bidirectional layer in one launch: twice the programs, or no tiling that fits.
    assert persistent_tiles(8, 512, torch.bfloat16, H100_SMS, H100_SHARED, directions=2, gates=4).grid == (1, 32, 2)
    assert persistent_tiles(64, 1024, torch.bfloat16, H100_SMS, H100_SHARED, directions=2, gates=4) is None
    # float32 at H 1024: even 16 units of W_hh (256 KiB) do not fit an SM's shared memory.
    assert persistent_tiles(64, 1024, torch.float32, H100_SMS, H100_SHARED, gates=4) is None
    assert persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4) is not None
    # More hidden tiles than SMs, even at 64 units per program.
    assert persistent_tiles(64, 64 * H100_SMS + 1, torch.bfloat16, H100_SMS, 10 ** 9, gates=4) is None


def _one_step_reference(gates_x, h0, c0, w_hh, grad_h1, grad_c1):
    leaves = [t.clone().requires_grad_() for t in (gates_x, c0)]
    in_gate, forget_gate, cell_gate, out_gate = (leaves[0][0] + h0 @ w_hh.T).chunk(4, dim=1)
    in_gate, forget_gate, out_gate = in_gate.sigmoid(), forget_gate.sigmoid(), out_gate.sigmoid()
    cell_gate = cell_gate.tanh()
    c1 = forget_gate * leaves[1] + in_gate * cell_gate
    h1 = out_gate * c1.tanh()
    grad_gates, grad_c0 = torch.autograd.grad((h1, c1), leaves, (grad_h1, grad_c1))
    gates = torch.cat([in_gate, forget_gate, cell_gate, out_gate], dim=1)
    return h1.detach(), c1.detach(), gates.detach(), grad_gates[0], grad_c0


def test_kernels_with_several_programs_match_one_step():
    # Both directions of a bidirectional layer, each with its own weights, in the same launch.
    batch, hidden, dtype, directions = 17, 33, torch.float64, 2
    config = persistent_tiles(batch, hidden, dtype, H100_SMS, H100_SHARED, directions, gates=4)
    assert config.grid == (2, 3, 2)  # 16 x 16 tiles, the last ones ragged
    generator = torch.Generator().manual_seed(6)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE)

    gates_x, w_hh = randn(1, directions, batch, 4 * hidden), randn(directions, 4 * hidden, hidden)
    h0, c0 = randn(directions, batch, hidden), randn(directions, batch, hidden)
    grad_h1, grad_c1 = randn(directions, batch, hidden), randn(directions, batch, hidden)
    # Backward reads dG of the step after the last from grad_gates_all[1]: zeros in real use, random here
    # so that the recurrent matmul dG_{t+1} W_hh is tested too.
    grad_gates_next = randn(directions, batch, 4 * hidden)
    references = [_one_step_reference(gates_x[:, d], h0[d], c0[d], w_hh[d], grad_h1[d] + grad_gates_next[d] @ w_hh[d],
                                      grad_c1[d]) for d in range(directions)]
    h1, c1, gates_ref, grad_gates_ref, grad_c0_ref = (torch.stack(parts) for parts in zip(*references, strict=True))

    h_all, cells_all = torch.stack([h0, h0]), torch.stack([c0, c0])  # slab [1] is overwritten
    gates = torch.empty_like(gates_x)
    lstm_persistent.forward_loop(config, gates_x, w_hh, None, h_all, cells_all, gates)
    grad_gates_all = torch.stack([grad_gates_next, grad_gates_next])  # slab [0] is overwritten
    grad_c = grad_c1.clone()
    lstm_persistent.backward_loop(config, grad_h1[None], gates, cells_all, w_hh, None, grad_gates_all, grad_c)

    for ours, ref in [(h_all[1], h1), (cells_all[1], c1), (gates[0], gates_ref), (grad_gates_all[0], grad_gates_ref),
                      (grad_c, grad_c0_ref)]:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(DEVICE != "cuda", reason="the grid barrier between steps needs all programs resident on a GPU")
@pytest.mark.parametrize("directions, variable_lengths", [(1, False), (2, True)])
def test_kernels_with_several_programs_match_step_path_over_a_sequence(monkeypatch, directions, variable_lengths):
    from nanochat_fast.kernels.lstm_recurrence import lstm_backward, lstm_forward

    generator = torch.Generator().manual_seed(7)
    steps, batch, hidden = 37, 40, 200  # ragged tiles, several programs, many barriers
    gates_x = torch.randn(steps, directions, batch, 4 * hidden, generator=generator).to(DEVICE)
    h0, c0 = (torch.randn(directions, batch, hidden, generator=generator).to(DEVICE) for _ in range(2))
    w_hh = (torch.randn(directions, 4 * hidden, hidden, generator=generator) / hidden ** 0.5).to(DEVICE)
    grad_output = torch.randn(steps, directions, batch, hidden, generator=generator).to(DEVICE)
    grad_c_last = torch.randn(directions, batch, hidden, generator=generator).to(DEVICE)
    lengths = None
    if variable_lengths:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator, dtype=torch.int32).to(DEVICE)
    results = {}
    for path in ("step", "persistent"):
        monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
        h_all, cells_all, gates = lstm_forward(gates_x, h0, c0, w_hh, lengths)
        results[path] = (h_all, cells_all, *lstm_backward(grad_output, grad_c_last, gates, cells_all, w_hh, lengths))
    for ours, ref in zip(results["persistent"], results["step"], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

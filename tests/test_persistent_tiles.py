"""The persistent path's GPU tiles: how they are chosen, and the kernels run with them, the LSTM's and
the GRU's.

Under the interpreter the persistent path runs as one program (test_lstm_vs_torch.py,
test_gru_recurrence.py). Here its kernels run with the grid a GPU would get: several programs, each
with its own resident W_hh slice, ragged edges in both batch and hidden. Programs run one after another
under the interpreter, so only a single step can run this way (the grid barrier comes between steps,
and none follows the last one). The reference is one step of the cell written out in float64, with
autograd for the gradients.
"""

import pytest
import torch

from conftest import DEVICE
from nanochat_fast.kernels import gru_persistent, lstm_persistent
from nanochat_fast.kernels.gpu_compile import H100_SHARED, H100_SMS
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
    assert persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4, precision="tf32") is not None
    # More hidden tiles than SMs, even at 64 units per program.
    assert persistent_tiles(64, 64 * H100_SMS + 1, torch.bfloat16, H100_SMS, 10 ** 9, gates=4) is None


def test_gru_tiles_are_the_lstms():
    # The GRU's forward slice takes four rows a unit, as the LSTM's (one dot over the gates, a power of two
    # of them: the fourth zeros), and it is the larger of its two slices: the same tiles.
    for batch, hidden, dtype, directions in [(64, 1024, torch.bfloat16, 1), (8, 512, torch.bfloat16, 2),
                                             (64, 512, torch.float32, 1), (64, 1024, torch.float32, 1)]:
        shape = (batch, hidden, dtype, H100_SMS, H100_SHARED, directions)
        assert (persistent_tiles(*shape, gates=3, precision="tf32")
                == persistent_tiles(*shape, gates=4, precision="tf32"))


def _random(seed, dtype=torch.float32):
    """randn(*shape) drawing from its own generator, on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE)


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
    randn = _random(6, dtype)
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


def _gru_one_step_reference(gates_x, h0, w_hh, b_hn, grad_h1):
    """h_1, the saved r, z, n, hn, and the gradients of gates_x, of hn = W_hn h_0 + b_hn and of h_0 through
    z h_0 alone (the direct part, what the kernels carry), for one direction."""
    hidden = h0.size(1)
    hn = (h0 @ w_hh[2 * hidden:].T + b_hn).requires_grad_()
    leaves = [gates_x.clone().requires_grad_(), hn, h0.clone().requires_grad_()]
    gx_r, gx_z, gx_n = leaves[0].chunk(3, dim=1)
    gh_r, gh_z = (h0 @ w_hh[:2 * hidden].T).chunk(2, dim=1)
    reset, update = (gx_r + gh_r).sigmoid(), (gx_z + gh_z).sigmoid()
    new = (gx_n + reset * hn).tanh()
    h1 = (1 - update) * new + update * leaves[2]
    saved = torch.cat([reset, update, new, hn], dim=1)
    return h1.detach(), saved.detach(), *torch.autograd.grad(h1, leaves, grad_h1)


def test_gru_kernels_with_several_programs_match_one_step():
    # Both directions, each with its own weights, in the same launch.
    batch, hidden, dtype, directions = 17, 33, torch.float64, 2
    config = persistent_tiles(batch, hidden, dtype, H100_SMS, H100_SHARED, directions, gates=3)
    assert config.grid == (2, 3, 2)  # 16 x 16 tiles, the last ones ragged
    randn = _random(9, dtype)
    gates_x, w_hh, b_hn = randn(1, directions, batch, 3 * hidden), randn(directions, 3 * hidden, hidden), randn(
        directions, hidden)
    h0, grad_h1, grad_carry = (randn(directions, batch, hidden) for _ in range(3))
    # Backward reads the gradients of the step after the last from slab [1] and the carry from grad_carry:
    # zeros in real use, random here so that the recurrent matmul and the carry are tested too.
    grad_gates_next, grad_hn_next = randn(directions, batch, 3 * hidden), randn(directions, batch, hidden)
    grad_h = (grad_h1 + grad_carry
              + torch.einsum("dbg,dgk->dbk", grad_gates_next[..., :2 * hidden], w_hh[:, :2 * hidden])
              + torch.einsum("dbg,dgk->dbk", grad_hn_next, w_hh[:, 2 * hidden:]))
    references = [_gru_one_step_reference(gates_x[0, d], h0[d], w_hh[d], b_hn[d], grad_h[d]) for d in range(directions)]
    h1, saved_ref, grad_gates_ref, grad_hn_ref, grad_carry_ref = (torch.stack(parts)
                                                                  for parts in zip(*references, strict=True))

    h_all, h_state = torch.stack([h0, h0]), h0.clone()  # slab [1] is overwritten; h_state goes from h_0 to h_1
    saved = gates_x.new_empty(1, directions, batch, 4 * hidden)
    gru_persistent.forward_loop(config, gates_x, w_hh, b_hn, None, h_all, saved, h_state)
    grad_gates_all, grad_hn_all = torch.stack([grad_gates_next] * 2), torch.stack([grad_hn_next] * 2)  # [0] overwritten
    gru_persistent.backward_loop(config, grad_h1[None], saved, h_all, w_hh, None, grad_gates_all, grad_hn_all,
                                 grad_carry)

    for ours, ref in [(h_all[1], h1), (h_state, h1), (saved[0], saved_ref), (grad_gates_all[0], grad_gates_ref),
                      (grad_hn_all[0], grad_hn_ref), (grad_carry, grad_carry_ref)]:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def _assert_persistent_matches_step(monkeypatch, run):
    """run() returns the same tensors on both paths (NANOCHAT_LSTM_PATH)."""
    results = {}
    for path in ("step", "persistent"):
        monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
        results[path] = run()
    for ours, ref in zip(results["persistent"], results["step"], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


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

    def run():
        h_all, cells_all, gates = lstm_forward(gates_x, h0, c0, w_hh, lengths)
        return h_all, cells_all, *lstm_backward(grad_output, grad_c_last, gates, cells_all, w_hh, lengths)

    _assert_persistent_matches_step(monkeypatch, run)


@pytest.mark.skipif(DEVICE != "cuda", reason="the grid barrier between steps needs all programs resident on a GPU")
@pytest.mark.parametrize("directions, variable_lengths", [(1, False), (2, True)])
def test_gru_kernels_with_several_programs_match_step_path_over_a_sequence(monkeypatch, directions, variable_lengths):
    from nanochat_fast.kernels.gru_recurrence import gru_backward, gru_forward

    steps, batch, hidden = 37, 40, 200  # ragged tiles, several programs, many barriers
    randn = _random(10)
    gates_x, h0 = randn(steps, directions, batch, 3 * hidden), randn(directions, batch, hidden)
    w_hh, b_hn = randn(directions, 3 * hidden, hidden) / hidden ** 0.5, randn(directions, hidden)
    grad_output = randn(steps, directions, batch, hidden)
    lengths = None
    if variable_lengths:
        lengths = torch.randint(1, steps + 1, (batch,), generator=torch.Generator().manual_seed(11),
                                dtype=torch.int32).to(DEVICE)

    def run():
        h_all, saved = gru_forward(gates_x, h0, w_hh, b_hn, lengths)
        return h_all, saved, *gru_backward(grad_output, saved, h_all, w_hh, lengths)

    _assert_persistent_matches_step(monkeypatch, run)

"""float32 runs at nn.LSTM's own precision (`launch.dot_precision`): TF32 when cuDNN's RNN would use it, tf32x3
when TF32 is off, IEEE for float64. The interpreter computes tf32 as IEEE, so on CPU this checks which
precision each flag setting gives every kernel (the compiled code's tensor cores: test_kernel_report.py);
on a GPU, the error of tf32 and tf32x3 against float64 nn.LSTM."""

from contextlib import contextmanager

import pytest
import torch

from conftest import DEVICE
from lstm_reference import relative_error, run_with_grads, twin_lstms
from nanochat_fast.kernels.gpu_compile import H100_SHARED, H100_SMS
from nanochat_fast.kernels.launch import dot_precision, persistent_meta, persistent_tiles, step_config, tile_meta

HAS_RNN_FLAG = hasattr(torch.backends.cudnn.rnn, "fp32_precision")  # torch >= 2.9


@contextmanager
def cudnn_tf32(allowed):
    """cuDNN's TF32 flag (conv and RNN), the others kept; the conftest fixture turns it off for every test."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=allowed):
        yield


@contextmanager
def rnn_fp32_precision(value):
    """cuDNN RNN's own flag, restored after. Plain assignment raises once torch's test internals are imported
    (test_module_db.py does: they freeze the backend flags), hence the mutation guard lifted around it."""
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    with torch.backends.__allow_nonbracketed_mutation():
        rnn.fp32_precision = value
    try:
        yield
    finally:
        with torch.backends.__allow_nonbracketed_mutation():
            rnn.fp32_precision = saved


def test_float32_is_tf32_when_cudnn_rnn_uses_it_and_tf32x3_when_not():
    with cudnn_tf32(True):  # torch's default
        assert dot_precision(torch.float32) == "tf32"
    with cudnn_tf32(False):  # cudnn.rnn.fp32_precision reads "none"
        assert dot_precision(torch.float32) == "tf32x3"
    assert not torch.backends.cuda.matmul.allow_tf32  # the matmul flag (off here) does not decide
    with cudnn_tf32(True):
        assert dot_precision(torch.float32) == "tf32"


@pytest.mark.skipif(not HAS_RNN_FLAG, reason="torch < 2.9 has no per-operator cuDNN flag")
@pytest.mark.parametrize("tf32_default", [True, False])
@pytest.mark.parametrize("rnn_precision", ["tf32", "ieee", "none"])
def test_float32_reads_the_rnn_flag_even_where_conv_differs(tf32_default, rnn_precision):
    # cuDNN's conv flag left at the other setting: reading cudnn.allow_tf32 would raise here.
    with cudnn_tf32(tf32_default), rnn_fp32_precision(rnn_precision):
        # "none" inherits cudnn.fp32_precision, itself "none" (not TF32) after cudnn.flags.
        assert dot_precision(torch.float32) == ("tf32" if rnn_precision == "tf32" else "tf32x3")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_ignore_the_flags(dtype):
    for allowed in (True, False):
        with cudnn_tf32(allowed):
            assert dot_precision(dtype) == "ieee"  # float64: no tensor cores; half inputs: the same code either way


@pytest.mark.parametrize("meta", [
    lambda dtype: step_config(64, 512, dtype, on_gpu=True).meta,
    lambda dtype: persistent_meta(dtype, 16, 16, 512),
    lambda dtype: tile_meta(dtype, 16, 16, 16),
], ids=["step", "persistent", "tile_meta"])
def test_every_kernel_gets_the_policy(meta):
    for allowed, precision in ((True, "tf32"), (False, "tf32x3")):
        with cudnn_tf32(allowed):
            assert meta(torch.float32)["DOT_PRECISION"] == precision
    assert meta(torch.float64)["DOT_PRECISION"] == "ieee"


# Error of a float32 run, max|ours - ref| / max|ref| per tensor (the output, the final state and every
# gradient), against float64 nn.LSTM on the same weights and input (hidden 256, 64 steps, 2 layers). tf32
# rounds each recurrent matmul operand to a 10-bit mantissa (2^-11 = 4.9e-4 relative an operand): the output
# errs by about 1e-4 (an emulation on CPU, operands rounded to TF32 and float32 sums: 8e-5 to 1e-4, IEEE
# 3e-7), so 2e-3 bounds it and the gradients with room, and above 1e-5 it shows TF32 really ran. tf32x3
# splits each operand in two TF32 halves and keeps three of the four products: what it drops is 2^-22
# relative, as float32's own rounding (the emulation: 2.6e-7, as IEEE): the float32 tests' 1e-5.
TF32_BOUND, TF32X3_BOUND = 2e-3, 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter computes tf32 as IEEE: the error needs a GPU")
@pytest.mark.parametrize("path", ["step", "persistent"])
@pytest.mark.parametrize("tf32, bound", [(True, TF32_BOUND), (False, TF32X3_BOUND)])
def test_float32_error_against_float64(tf32, bound, path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LSTM_PATH", path)
    torch.manual_seed(12)
    ref, ours = twin_lstms("triton", DEVICE, torch.float32, input_size=64, hidden_size=256, num_layers=2)
    x = torch.randn(64, 8, 64, device=DEVICE)
    expected = run_with_grads(ref.double(), x.double(), None)
    with cudnn_tf32(tf32):  # the input projection stays IEEE: the conftest fixture's matmul flag
        assert dot_precision(torch.float32) == ("tf32" if tf32 else "tf32x3")
        got = run_with_grads(ours, x, None)
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    assert max(errors.values()) < bound, errors
    if tf32:  # TF32 really ran: far coarser than float32
        assert errors["output"] > 1e-5, errors


def test_tf32x3_tiles_count_the_w_hh_slice_twice():
    # In the compiled persistent kernels tf32x3 holds W_hh's slice as two TF32 halves: at B 64, H 512 in
    # float32, 288 KiB of shared memory instead of 160, more than an H100 has; at tf32 it fits.
    assert persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4, precision="tf32") is not None
    assert persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4, precision="tf32x3") is None
    with cudnn_tf32(False):  # the flags' precision by default
        assert persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4) is None
    with cudnn_tf32(True):
        config = persistent_tiles(64, 512, torch.float32, H100_SMS, H100_SHARED, gates=4)
        assert config.meta["DOT_PRECISION"] == "tf32"

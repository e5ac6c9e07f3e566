"""Test set-up: without a GPU, the Triton kernels run on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    # The float32 reference must really be float32: on a GPU both cuDNN and matmuls may use TF32.
    # cuDNN's through its context manager: PyTorch's test internals (test_module_db.py) forbid setting
    # its flags directly once imported.
    cudnn = torch.backends.cudnn
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = saved

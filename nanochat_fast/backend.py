"""Which implementation runs an LSTM call: our Triton kernels or PyTorch's own LSTM.

"auto" picks Triton for CUDA tensors and PyTorch on CPU (Triton on CPU is the interpreter, which is
for tests only). An explicit argument wins over the env var NANOCHAT_LSTM_BACKEND=triton|torch|auto.
"""

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "NANOCHAT_LSTM_BACKEND"


def triton_interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: torch.compile (Dynamo) refuses to trace importlib's find_spec.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def resolve_backend(requested, tensor: torch.Tensor) -> str:
    """The backend ("triton" or "torch") that runs a call on `tensor`."""
    choice = requested or os.environ.get(BACKEND_ENV_VAR) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown LSTM backend {choice!r}: choose one of {', '.join(BACKENDS)} "
                         f"(argument `backend` or env var {BACKEND_ENV_VAR})")
    if choice == "auto":
        return "triton" if tensor.is_cuda and TRITON_AVAILABLE else "torch"
    if choice == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("the Triton LSTM backend needs the `triton` package (Linux only); "
                               f"use backend='torch' or {BACKEND_ENV_VAR}=torch")
        if not tensor.is_cuda and not triton_interpreter_enabled():
            raise RuntimeError("the Triton LSTM backend runs on CUDA tensors; on CPU it needs the Triton "
                               "interpreter (set TRITON_INTERPRET=1 before importing triton; slow, for tests)")
    return choice

"""The arithmetic a run computes in: float32, or bfloat16 autocast where the hardware has it natively."""

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def has_native_bfloat16(device: torch.device) -> bool:
    """CUDA, or a CPU with bfloat16 instructions (AVX-512 BF16, AMX); oneDNN's CPU LSTM refuses bfloat16
    without them."""
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def computes_in_bfloat16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a run autocasts to bfloat16: "auto" wherever the device has it natively; a CPU without it
    would only emulate it, more slowly."""
    if precision == "auto":
        return has_native_bfloat16(device)
    return precision == "bfloat16"


def autocast(device: torch.device, precision: str = "auto"):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_in_bfloat16(device, precision))

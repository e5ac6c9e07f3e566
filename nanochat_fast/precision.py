"""The arithmetic a run computes in: float32, or bfloat16 autocast where the hardware has it natively."""

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def can_compute_bfloat16(device: torch.device) -> bool:
    """CUDA, or a CPU oneDNN computes bfloat16 on: AVX-512 and up (converting to float32 where the CPU lacks
    bfloat16 instructions). On AVX2 oneDNN's LSTM refuses bfloat16 and torch's matrix products emulate it."""
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_native_bfloat16(device: torch.device) -> bool:
    """CUDA, or a CPU with bfloat16 instructions (AVX-512 BF16, AMX): only there is bfloat16 faster than
    float32. AVX-512 without them converts, and trains about 3 times slower (bench/RESULTS.md)."""
    return can_compute_bfloat16(device) and (device.type == "cuda" or torch.cpu._is_avx512_bf16_supported()
                                             or torch.cpu._is_amx_tile_supported())


def computes_in_bfloat16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a run autocasts to bfloat16: "auto" wherever the device has it natively; a CPU without it
    would only emulate it, more slowly."""
    if precision == "auto":
        return has_native_bfloat16(device)
    return precision == "bfloat16"


def autocast(device: torch.device, precision: str = "auto"):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_in_bfloat16(device, precision))

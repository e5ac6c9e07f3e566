"""The lean step's matmuls on CPU with the weights reordered once into oneDNN's blocked layout.

Generation multiplies a few rows by the same weights thousands of times. `torch.addmm` (MKL) is
fastest for one row, but from 2 rows on oneDNN with prepacked weights is faster, and uses a second
core where addmm hardly does (bench/RESULTS.md, serving). These are the ops inductor's CPU freezing
uses; they have no backward and run float32 here, hence `packing_pays`.
"""

import torch


def packing_pays(x: torch.Tensor) -> bool:
    """Whether to multiply x (rows, K) with packed weights: float32 on CPU, 2 rows or more, no
    autograd through the result, and a PyTorch built with oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.size(0) >= 2
            and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K), as F.linear takes it, reordered for `linear` and `linear_add`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x, packed, bias=None):
    """x @ weight^T + bias (bias may be None)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_add(x, packed, other):
    """x @ weight^T + other, other of the result's shape, added inside the matmul."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")

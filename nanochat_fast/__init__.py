"""nanochat_fast: a small, fast, readable character-level LSTM chatbot on fused Triton kernels."""

from nanochat_fast.lstm import LSTM

__all__ = ["LSTM"]

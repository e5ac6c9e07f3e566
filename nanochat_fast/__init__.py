"""nanochat_fast: a small, fast, readable character-level LSTM chatbot on fused Triton kernels."""

from nanochat_fast.lstm import LSTM
from nanochat_fast.generation import Chatbot, SamplingConfig, generate

__all__ = ["LSTM", "Chatbot", "SamplingConfig", "generate"]

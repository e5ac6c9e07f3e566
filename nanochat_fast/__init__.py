"""nanochat_fast: a small, fast, readable character-level LSTM chatbot on fused Triton kernels."""

from nanochat_fast.generation import Chatbot, generate
from nanochat_fast.gru import GRU
from nanochat_fast.lstm import LSTM
from nanochat_fast.sampling import SamplingConfig

__all__ = ["GRU", "LSTM", "Chatbot", "SamplingConfig", "generate"]

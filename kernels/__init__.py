"""Triton kernels for the LSTM recurrence (installed as `nanochat_fast.kernels`). See DESIGN.md."""

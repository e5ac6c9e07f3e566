"""Replay a loop of kernel launches from a CUDA graph, captured once per shape.

A graph holds fixed addresses, so each captured loop owns static input and output buffers: a call
copies its inputs in, replays, and copies the outputs out. The copies cost far less than T launches
of Triton's Python launcher. Set NANOCHAT_LSTM_CUDA_GRAPH=0 to launch eagerly instead (this and
generation's decode step, `nanochat_fast/device_decode.py`, which captures through `capture`).
"""

import os
import warnings
from collections import OrderedDict

import torch

GRAPH_ENV_VAR = "NANOCHAT_LSTM_CUDA_GRAPH"
_MAX_GRAPHS = 8  # training uses ~4 shapes (forward/backward x train/validation); evict the oldest
_graphs = OrderedDict()
_capture_failed = False


def capture(run):
    """run() once, then a CUDA graph of its launches, or None (with a warning) if the capture is refused
    (e.g. inside another capture). The first run is real, on a side stream: it compiles the kernels and
    builds what run() caches, so that the capture holds none of that one-off work."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        run()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            run()
    except RuntimeError as error:
        warnings.warn(f"CUDA graph capture failed, launching kernels eagerly: {error}", stacklevel=3)
        return None
    return graph


def run_in_cuda_graph(loop, config, inputs, outputs):
    """Same effect as loop(config, *inputs, *outputs), with the launches replayed from a cached graph."""
    global _capture_failed
    if _capture_failed or os.environ.get(GRAPH_ENV_VAR, "1") == "0":
        loop(config, *inputs, *outputs)
        return
    key = (loop, config.path, config.grid, tuple(config.meta.items()), inputs[0].device,
           tuple(None if t is None else (t.shape, t.dtype) for t in inputs + outputs))
    if key not in _graphs:
        static_inputs = [None if t is None else t.clone() for t in inputs]  # None: an absent optional input
        static_outputs = [torch.empty_like(t) for t in outputs]
        graph = capture(lambda: loop(config, *static_inputs, *static_outputs))
        if graph is None:  # stay correct: launch eagerly from now on
            _capture_failed = True
            loop(config, *inputs, *outputs)
            return
        _graphs[key] = graph, static_inputs, static_outputs
        if len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    graph, static_inputs, static_outputs = _graphs[key]
    for static, given in zip(static_inputs, inputs, strict=True):
        if given is not None:
            static.copy_(given)
    graph.replay()
    for given, static in zip(outputs, static_outputs, strict=True):
        given.copy_(static)

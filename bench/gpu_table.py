"""The GPU table: our Triton LSTM (float32, bfloat16) against nn.LSTM (float32, float16, bfloat16), float32
under both settings of cuDNN's TF32 flag (the header prints the flags), and
the other drop-in uses against PyTorch's module in the same run: a bidirectional LSTM, our GRU against
nn.GRU, and a packed batch (lengths uniform in [T/4, T], the same PackedSequence for both).

For each shape and layer count: median time of forward and forward+backward (triton.testing.do_bench),
microseconds per timestep, achieved TFLOP/s (matmul FLOPs only) and, for nn.LSTM, the cuDNN kernels
that ran (read off the profiler), with the card and versions on top. Then the recurrence alone (one
layer's kernel, the input projection and the matmuls after the loop left out): the "recurrent step"
of the targets, our two paths against each other. Then generation through the engine, every stream
one character a step read back on the host: the CUDA-graph decode against the same step eager, the
host engine (CharLSTM.step + sample_next) and nn.LSTM + head + sample_next; microseconds a character
at batch 1, characters/s at batch 32. Rows of path "auto" run the path measured fastest on this GPU
(kernels/path_choice.py: their first call measures, untimed; the choices are listed under the tables).
`--write FILE` appends the tables as markdown (bench/RESULTS.md). `--smoke` runs tiny shapes on CPU so
CI checks the script.

    python bench/gpu_table.py --write bench/RESULTS.md
"""

import argparse
import datetime
import itertools
import os
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --smoke: the kernels under the interpreter

import triton  # noqa: E402

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

from nanochat_fast import GRU, LSTM  # noqa: E402
from nanochat_fast.engine import Engine, Sequence  # noqa: E402
from nanochat_fast.sampling import CHAT_SAMPLING, GREEDY, new_generator, sample_next  # noqa: E402
from nanochat_fast.kernels import path_choice  # noqa: E402
from nanochat_fast.kernels.launch import dot_precision  # noqa: E402
from nanochat_fast.kernels.lstm_recurrence import cell_dtype, lstm_backward, lstm_forward  # noqa: E402
from nanochat_fast.model import CharLSTM, ModelConfig  # noqa: E402

SHAPES = [(64, 256, 512), (64, 256, 1024), (8, 256, 512)]  # (batch, seq_len, hidden)
SMOKE_SHAPES = [(3, 4, 33)]
# float32 rows name the precision they ran at, set through cuDNN's TF32 flag, which nn.LSTM follows and so do
# ours (launch.dot_precision): TF32 on, both tf32; off, ours tf32x3 and nn.LSTM IEEE FMA.
FLOAT32_TF32 = {"tf32": True, "tf32x3": False, "ieee": False}  # a word of the row's name: cuDNN's TF32 flag
PROVIDERS = {  # name: (implementation, dtype, kernel path of ours, variant)
    "ours fp32 tf32": ("ours", torch.float32, "step", "lstm"),
    "nn.LSTM fp32 tf32": ("torch", torch.float32, None, "lstm"),
    "ours fp32 tf32x3": ("ours", torch.float32, "step", "lstm"),
    "nn.LSTM fp32 ieee": ("torch", torch.float32, None, "lstm"),
    "ours bf16": ("ours", torch.bfloat16, "step", "lstm"),
    "ours fp32 tf32 persistent": ("ours", torch.float32, "persistent", "lstm"),
    "ours bf16 persistent": ("ours", torch.bfloat16, "persistent", "lstm"),
    "ours fp16 persistent": ("ours", torch.float16, "persistent", "lstm"),
    "ours bf16 auto": ("ours", torch.bfloat16, "auto", "lstm"),
    "nn.LSTM fp16": ("torch", torch.float16, None, "lstm"),
    "nn.LSTM bf16": ("torch", torch.bfloat16, None, "lstm"),
    "ours bf16 bidirectional": ("ours", torch.bfloat16, "auto", "bidirectional"),
    "nn.LSTM bf16 bidirectional": ("torch", torch.bfloat16, None, "bidirectional"),
    "ours GRU bf16": ("ours", torch.bfloat16, "step", "gru"),
    "nn.GRU bf16": ("torch", torch.bfloat16, None, "gru"),
    "ours bf16 packed": ("ours", torch.bfloat16, "auto", "packed"),
    "nn.LSTM bf16 packed": ("torch", torch.bfloat16, None, "packed"),
}
SMOKE_PROVIDERS = ["ours fp32 tf32", "nn.LSTM fp32 tf32", "ours fp32 tf32x3", "nn.LSTM fp32 ieee",
                   "ours fp32 tf32 persistent"]
# The other drop-in uses in float32 (the interpreter has no bfloat16), ours against PyTorch's.
SMOKE_VARIANT_PROVIDERS = {"ours fp32 bidirectional": ("ours", torch.float32, "auto", "bidirectional"),
                           "nn.LSTM fp32 bidirectional": ("torch", torch.float32, None, "bidirectional"),
                           "ours GRU fp32": ("ours", torch.float32, "step", "gru"),
                           "nn.GRU fp32": ("torch", torch.float32, None, "gru"),
                           "ours fp32 packed": ("ours", torch.float32, "auto", "packed"),
                           "nn.LSTM fp32 packed": ("torch", torch.float32, None, "packed")}
RECURRENCE_PROVIDERS = {  # name: (dtype, kernel path)
    "step bf16": (torch.bfloat16, "step"),
    "persistent bf16": (torch.bfloat16, "persistent"),
    "persistent fp16": (torch.float16, "persistent"),
    "persistent fp32": (torch.float32, "persistent"),
    "auto bf16": (torch.bfloat16, "auto"),
}
SMOKE_RECURRENCE_PROVIDERS = ["persistent fp32"]
GENERATION_MODELS = [(2, 512)]  # (layers, hidden)
SMOKE_GENERATION_MODELS = [(2, 33)]
GENERATION_BATCHES = (1, 32)  # batch 1: microseconds a character; the last: characters/s, all streams together
SMOKE_GENERATION_BATCHES = (1, 3)
GENERATION_VOCAB = 100  # about a character vocabulary
GENERATION_STEPS = (20, 200)  # (warm-up steps, which capture the graphs; timed steps)
SMOKE_GENERATION_STEPS = (1, 3)
GENERATION_PROVIDERS = {  # name: (implementation: an Engine decode mode or "cudnn", dtype)
    "graph decode fp32": ("graph", torch.float32),
    "graph decode bf16": ("graph", torch.bfloat16),
    "eager decode fp32": ("eager", torch.float32),
    "eager decode bf16": ("eager", torch.bfloat16),
    "host engine fp32": ("host", torch.float32),
    "host engine bf16": ("host", torch.bfloat16),
    "nn.LSTM + head + sample_next fp32": ("cudnn", torch.float32),
    "nn.LSTM + head + sample_next bf16": ("cudnn", torch.bfloat16),
}
SMOKE_GENERATION_PROVIDERS = ["eager decode fp32", "host engine fp32", "nn.LSTM + head + sample_next fp32"]


def median_ms(fn, device):
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matmul_flops(batch, seq_len, hidden, layers, with_backward):
    # Per layer and step: input and recurrent projections, 2 * B * 4H * (H + H) FLOPs. Backward does
    # twice the forward's matmul work (gradients of the inputs and of the weights).
    forward = layers * seq_len * 2 * batch * 4 * hidden * 2 * hidden
    return forward * (3 if with_backward else 1)


def cudnn_kernels(lstm, x):
    """Names of the GPU kernels one nn.LSTM forward launches (which cuDNN algorithm ran)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        lstm(x)
        torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages() if "memcpy" not in event.key.lower()}
    rnn_names = sorted(n for n in names if any(word in n.lower() for word in ("rnn", "lstm", "persist")))
    return ", ".join(rnn_names or sorted(names))[:120]


def variant_module(implementation, variant, hidden, layers):
    """The module a row times: ours (Triton backend) or PyTorch's, LSTM or GRU, one or two directions."""
    if variant == "gru":
        return GRU(hidden, hidden, layers, backend="triton") if implementation == "ours" else torch.nn.GRU(
            hidden, hidden, layers)
    cls = partial(LSTM, backend="triton") if implementation == "ours" else torch.nn.LSTM
    return cls(hidden, hidden, layers, bidirectional=variant == "bidirectional")


def variant_input(variant, batch, seq_len, hidden, device, dtype):
    """(input, share of the padded batch's steps it holds): a packed batch has lengths uniform in
    [T/4, T], the same ones for every provider."""
    x = torch.randn(seq_len, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    if variant != "packed":
        return x, 1.0
    lengths = torch.randint(max(1, seq_len // 4), seq_len + 1, (batch,), generator=torch.Generator().manual_seed(0))
    packed = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
    packed = PackedSequence(packed.data.requires_grad_(), *packed[1:])  # a leaf: backward runs again and again
    return packed, lengths.sum().item() / (batch * seq_len)


@contextmanager
def float32_precision(provider):
    """cuDNN's TF32 flag as the row's name says (tf32: on; tf32x3, ieee: off), restored after; a row that names
    none runs at the flags as they are (the header's)."""
    named = [FLOAT32_TF32[word] for word in provider.split() if word in FLOAT32_TF32]
    if not named:
        yield
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=named[0]):
        yield


def measure(shape, layers, provider, device, providers=PROVIDERS):
    with float32_precision(provider):
        return measure_at_flags(shape, layers, provider, device, providers)


def measure_at_flags(shape, layers, provider, device, providers):
    batch, seq_len, hidden = shape
    implementation, dtype, path, variant = providers[provider]
    torch.manual_seed(0)
    if implementation == "ours":
        os.environ["NANOCHAT_LSTM_PATH"] = path
    lstm = variant_module(implementation, variant, hidden, layers).to(device=device, dtype=dtype)
    x, share = variant_input(variant, batch, seq_len, hidden, device, dtype)
    # The matmul work against the LSTM's: a GRU has 3 gates of 4, a bidirectional layer twice the steps
    # (and its next layer twice the input), a packed batch only its sequences' steps.
    work = {"gru": 0.75, "bidirectional": 2 * (1 + 3 * (layers - 1) / 2) / layers}.get(variant, 1.0) * share

    def forward():
        with torch.no_grad():
            lstm(x)

    def forward_backward():
        output, _ = lstm(x)
        output = output.data if variant == "packed" else output
        output.backward(torch.ones_like(output))

    row = {}
    for name, fn, with_backward in (("fwd", forward, False), ("fwd+bwd", forward_backward, True)):
        if path == "auto":
            fn()  # the first call of a key measures the paths
        ms = median_ms(fn, device)
        flops = work * matmul_flops(batch, seq_len, hidden, layers, with_backward)
        row[name] = (ms, ms * 1e3 / seq_len, flops / ms / 1e9)
    precision = f", {dot_precision(dtype)}" if dtype == torch.float32 else ""  # what float32 really ran at
    kernels = f"triton ({path}{precision})" if implementation == "ours" else (
        cudnn_kernels(lstm, x) if device == "cuda" else "cpu")
    return row, kernels


def recurrence_inputs(seq_len, batch, hidden, dtype, device):
    """Random inputs of one layer's recurrence (`lstm_forward` / `lstm_backward`), by name."""
    generator = torch.Generator().manual_seed(0)
    state_dtype = cell_dtype(dtype)
    return dict(  # one direction
        gates_x=torch.randn(seq_len, 1, batch, 4 * hidden, generator=generator).to(device, dtype),
        w_hh=(torch.randn(1, 4 * hidden, hidden, generator=generator) / hidden ** 0.5).to(device, dtype),
        h0=torch.randn(1, batch, hidden, generator=generator).to(device, dtype),
        c0=torch.randn(1, batch, hidden, generator=generator).to(device, state_dtype),
        grad_output=torch.randn(seq_len, 1, batch, hidden, generator=generator).to(device, dtype),
        grad_c_last=torch.randn(1, batch, hidden, generator=generator).to(device, state_dtype),
    )


def recurrence_table(shapes, providers, device):
    lines = ["| B, T, H | path | fwd us/step | bwd us/step |", "|---|---|---|---|"]
    for batch, seq_len, hidden in shapes:
        for provider in providers:
            dtype, path = RECURRENCE_PROVIDERS[provider]
            os.environ["NANOCHAT_LSTM_PATH"] = path
            x = recurrence_inputs(seq_len, batch, hidden, dtype, device)
            try:
                _, cells_all, gates = lstm_forward(x["gates_x"], x["h0"], x["c0"], x["w_hh"])
                lstm_backward(x["grad_output"], x["grad_c_last"], gates, cells_all, x["w_hh"])  # auto measures here
                cells = [f"{median_ms(fn, device) * 1e3 / seq_len:.2f}" for fn in (
                    partial(lstm_forward, x["gates_x"], x["h0"], x["c0"], x["w_hh"]),
                    partial(lstm_backward, x["grad_output"], x["grad_c_last"], gates, cells_all, x["w_hh"]))]
            except Exception as error:  # one failing provider must not hide the others' numbers
                cells = [f"failed: {type(error).__name__}: {str(error)[:80]}", ""]
            lines.append(f"| {(batch, seq_len, hidden)} | {provider} | {' | '.join(cells)} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def generation_step(implementation, dtype, batch, layers, hidden, sampling, device):
    """A function that writes one character for each of `batch` streams of a random character model and
    reads them back on the host, as a chat does: through the engine in decode mode `implementation`,
    or through nn.LSTM (cuDNN on CUDA) on the model's embedding and head ("cudnn")."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=GENERATION_VOCAB, hidden_size=hidden, num_layers=layers)
    model = CharLSTM(config).to(device=device, dtype=dtype).eval()
    if implementation != "cudnn":
        engine = Engine(model, decode=implementation)
        engine.add([Sequence(torch.tensor([row % GENERATION_VOCAB]), sampling, max_new_tokens=10 ** 9,
                             generator=new_generator(device, row)) for row in range(batch)])
        return engine.step
    lstm = torch.nn.LSTM(hidden, hidden, layers).to(device=device, dtype=dtype)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    state = None
    generator = new_generator(device, 0)

    def step():
        nonlocal tokens, state
        with torch.inference_mode():
            output, state = lstm(model.embedding(tokens)[None], state)
            tokens = sample_next(model.head(output[0]), sampling, generator)
        return tokens.tolist()
    return step


def us_per_step(step, steps):
    warmup, timed = steps
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()  # each step reads its tokens back: no queued work is left outside the clock
    return (time.perf_counter() - start) / timed * 1e6


def generation_table(models, batches, providers, steps, device):
    samplings = {"greedy": GREEDY, f"T={CHAT_SAMPLING.temperature}, top-p {CHAT_SAMPLING.top_p}": CHAT_SAMPLING}
    columns = [f"batch {batches[0]} {name} us/char" for name in samplings]
    columns += [f"batch {batches[1]} {name} chars/s" for name in samplings]
    lines = [f"| layers x hidden | implementation | {' | '.join(columns)} |", "|---|---|" + "---|" * len(columns)]
    for layers, hidden in models:
        for provider in providers:
            implementation, dtype = GENERATION_PROVIDERS[provider]
            cells = []
            for batch, sampling in itertools.product(batches, samplings.values()):
                try:
                    step = generation_step(implementation, dtype, batch, layers, hidden, sampling, device)
                    us = us_per_step(step, steps)
                    cells.append(f"{us:.1f}" if batch == batches[0] else f"{batch / us * 1e6:,.0f}")
                except Exception as error:  # one failing provider must not hide the others' numbers
                    cells.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
            lines.append(f"| {layers}x{hidden} | {provider} | {' | '.join(cells)} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def precision_flags():
    """The flags float32 runs at: cuDNN's RNN flag (nn.LSTM's, and our recurrence's), the matmul flag (our
    input projection's, torch's F.linear)."""
    rnn = torch.backends.cudnn.rnn
    rnn_flag = (f"cudnn.rnn.fp32_precision {rnn.fp32_precision}" if hasattr(rnn, "fp32_precision")
                else f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
    return (f"float32 flags: {rnn_flag} (ours: {dot_precision(torch.float32)}), "
            f"cuda.matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")


def auto_choices(device):
    """What the path choice's cache file holds for this GPU: a line per key (the "auto" rows ran these)."""
    path = path_choice.cache_file(torch.device(device))
    return (f"\n`auto`'s choices on this GPU ({path}):\n\n"
            + "".join(f"- {key}: {label}\n" for key, label in sorted(path_choice.read_choices(path).items())))


def header(device):
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    cudnn = torch.backends.cudnn.version() if device == "cuda" else "-"
    return (f"### {card}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}; "
            "median of triton.testing.do_bench; us/step = time / seq_len; TFLOP/s counts matmul FLOPs only.\n"
            f"{precision_flags()}; rows named tf32 run with cuDNN's TF32 flag on, tf32x3 / ieee with it off "
            "(ours tf32x3, nn.LSTM IEEE FMA); our input projection keeps the matmul flag.\n")


def table(shapes, layer_counts, providers, device, provider_specs=PROVIDERS):
    lines = ["| B, T, H | layers | implementation | fwd ms | fwd us/step | fwd TFLOP/s | fwd+bwd ms "
             "| fwd+bwd us/step | fwd+bwd TFLOP/s | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for layers in layer_counts:
            for provider in providers:
                try:
                    row, kernels = measure(shape, layers, provider, device, provider_specs)
                except Exception as error:  # one failing provider must not hide the others' numbers
                    lines.append(f"| {shape} | {layers} | {provider} | failed: {type(error).__name__}: "
                                 f"{str(error)[:80]} |||||||")
                    continue
                cells = " | ".join(f"{ms:.3f} | {us:.1f} | {tflops:.2f}" for ms, us, tflops in row.values())
                lines.append(f"| {shape} | {layers} | {provider} | {cells} | {kernels} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def parse_args(argv, description, smoke_help):
    """The GPU scripts' command line: --write FILE and --smoke. Returns (parser, args)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE", help="append the markdown table to FILE (e.g. bench/RESULTS.md)")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser, parser.parse_args(argv)


def publish(report, path):
    """Print the report; append it to `path` too when one is given."""
    print(report)
    if path:
        with open(path, "a") as f:
            f.write("\n" + report)


def main(argv=None):
    parser, args = parse_args(argv, __doc__,
                              "tiny float32 shape on CPU (Triton interpreter): checks the script, measures nothing")
    if args.smoke:
        device, shapes, layer_counts, providers = "cpu", SMOKE_SHAPES, [2], SMOKE_PROVIDERS
        variant_table = "\n" + table(shapes, layer_counts, list(SMOKE_VARIANT_PROVIDERS), device,
                                      SMOKE_VARIANT_PROVIDERS)
        recurrence_providers = SMOKE_RECURRENCE_PROVIDERS
        generation_models, generation_batches = SMOKE_GENERATION_MODELS, SMOKE_GENERATION_BATCHES
        generation_providers, generation_steps = SMOKE_GENERATION_PROVIDERS, SMOKE_GENERATION_STEPS
    elif torch.cuda.is_available():
        device, shapes, layer_counts, providers = "cuda", SHAPES, [1, 2], list(PROVIDERS)
        variant_table = ""  # the variants are rows of the main table
        recurrence_providers = list(RECURRENCE_PROVIDERS)
        generation_models, generation_batches = GENERATION_MODELS, GENERATION_BATCHES
        generation_providers, generation_steps = list(GENERATION_PROVIDERS), GENERATION_STEPS
    else:
        parser.error("no CUDA GPU found: this table is for a GPU (use --smoke to check the script on CPU)")
    report = (header(device) + "\n" + table(shapes, layer_counts, providers, device) + variant_table
              + "\nThe recurrence alone: one layer's `lstm_forward` / `lstm_backward` (the kernels, with their "
              "buffers), per step.\n\n" + recurrence_table(shapes, recurrence_providers, device)
              + f"\nGeneration: every stream of the batch writes a character a step, read back on the host "
              f"(vocabulary {GENERATION_VOCAB}); wall time over {generation_steps[1]} steps after "
              f"{generation_steps[0]}. Graph decode: one CUDA-graph replay a step (sampling on the device); "
              "eager decode: the same step launched op by op; host engine: CharLSTM.step + sample_next.\n\n"
              + generation_table(generation_models, generation_batches, generation_providers, generation_steps,
                                 device)
              + (auto_choices(device) if device == "cuda" else ""))
    publish(report, args.write)


if __name__ == "__main__":
    main()

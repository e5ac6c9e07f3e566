"""Training the character model: stateful truncated backprop through time with AdamW (and Muon, see
optimizer.py and _data_defaults), a linear warm-up then cosine learning-rate schedule by step, an average
of the weights (weight_average.py) validated in bits per character (a sample of the validation text at each
check, the whole text at the last: see _validation_check), and checkpoints in a run folder: `latest/` to
resume, `best/` (the average at its best validation) to chat with.

`train(config)` starts a run (a fresh model, or fine-tuning one with `init_from`); `resume(out)` goes on
with a stopped run exactly where it stopped, on the same schedule. `train_step` is one optimizer step,
`_training_loop` the loop around it.

Under torchrun (`ranks` from `distributed.start()`) each process trains its share of the parallel
streams in DistributedDataParallel; rank 0 alone evaluates, prints and saves, and the checkpoints hold
every stream's state, so a run resumes on any number of processes.
"""

import math
import shlex
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanochat_fast.backend import resolve_backend
from nanochat_fast.batching import Batch, TrainStreams, start_offsets, validation_batches
from nanochat_fast.checkpoint import (BEST, LATEST, CheckpointError, load_checkpoint, load_training_state,
                                      save_checkpoint)
from nanochat_fast.data import Corpus, check_length, load_corpus
from nanochat_fast.device import resolve_device
from nanochat_fast.distributed import Ranks
from nanochat_fast.ensemble import CharEnsemble, build_model, side_by_side
from nanochat_fast.environment import environment
from nanochat_fast.model import CELLS, STATE_NAMES, CharLSTM, ModelConfig, embedding_size_for
from nanochat_fast.optimizer import OPTIMIZERS, make_optimizer
from nanochat_fast.precision import (PRECISIONS, autocast, can_compute_bfloat16, computes_in_bfloat16,
                                    has_native_bfloat16)
from nanochat_fast.time_budget import (CHARACTERS_FOR_A_WIDER_MODEL, EVALS_PER_RUN, FINISH_SECONDS, PLAN_EVERY,
                                       PROBE_STEPS, TIMED_STEPS, plan_steps, training_seconds_of, widest_affordable)
from nanochat_fast.weight_average import WeightAverage

SMALL_DATA_CHARS = 500_000  # below this much training text a smaller model, with dropout, generalises better
SMALL_HIDDEN_SIZE, LARGE_HIDDEN_SIZE = 256, 512
SMALL_DATA_DROPOUT, WIDE_SMALL_DATA_DROPOUT = 0.1, 0.4  # up to SMALL_HIDDEN_SIZE wide, and wider (bench/RESULTS.md)...
# ...but one reading the text fewer than FEW_PASSES times at FEW_PASSES_WIDTH, fewer in proportion to its W_hh's size
# when wider, learns more with FEW_PASSES_DROPOUT (bench/RESULTS.md)
FEW_PASSES, FEW_PASSES_WIDTH, FEW_PASSES_DROPOUT = 20, 384, 0.2
SMALL_DATA_WEIGHT_DROP = 0.3  # of the recurrent weights, on the same data (bench/RESULTS.md)...
MANY_PASSES, MANY_PASSES_WEIGHT_DROP = 75, 0.5  # ...but more from MANY_PASSES passes, counted as FEW_PASSES
# Data learned by heart within minutes gets one layer (as good as two at the same width where the run reads it
# many times, better where it reads it fewer), other text two (bench/RESULTS.md)
SMALL_DATA_NUM_LAYERS, LARGE_DATA_NUM_LAYERS = 1, 2
# Muon's steps cost more, and more streams a step make them pay (bench/RESULTS.md)
ADAMW_BATCH_SIZE, MUON_BATCH_SIZE = 32, 64
# Where text not learned by heart within minutes trains on a CPU of 2 threads or more, with Muon or AdamW, two
# models side by side, averaged, learn more in the same minutes than one (ensemble.py, bench/RESULTS.md)
CPU_TEXT_MEMBERS = 2
DEFAULT_WARMUP_STEPS = 50
# A shorter memory of the gradient's scale than 0.999: better in runs of minutes (bench/RESULTS.md)
ADAM_BETAS = (0.9, 0.99)
DEFAULT_LR = 8e-3  # at SMALL_HIDDEN_SIZE wide; Adam's updates move a wider layer's output more (bench/RESULTS.md)
VAL_STREAMS = 16
# The checks before a run's last read the first VAL_SAMPLE_SHARE of each validation stream: a sample spread
# over the whole text that ranks checkpoints as the whole does, at a quarter of the cost (bench/RESULTS.md)
VAL_SAMPLE_SHARE = 0.25
LOSS_ON = ("all", "replies")
PROGRESS_SECONDS = 1.0  # how often losses are read back from the device (a sync) for history and progress bar
clock = time.perf_counter  # the run's wall clock (a test sets its own)


class TrainConfigError(ValueError):
    """Settings that cannot work; the message names the flag and says why."""


@dataclass
class TrainConfig:
    """Every setting of a run, one per train.py flag; saved in the checkpoints, so resuming needs none."""
    data: str | None = None  # None: the embedded chat corpus; see data.load_corpus
    out: str = "out"
    max_minutes: float = 5.0  # the whole run's wall time, evaluation and checkpoints included (see plan_steps)
    max_steps: int | None = None  # overrides max_minutes
    hidden_size: int | None = None  # None: see _model_config
    num_layers: int | None = None  # None: see _model_config, or the checkpoint's with init_from
    embedding_size: int | None = None  # None: model.embedding_size_for the width, or the checkpoint's with init_from
    cell: str = "lstm"  # the recurrent layers: "lstm" or "gru" (the checkpoint's with init_from)
    members: int | None = None  # models trained side by side and averaged (ensemble.py); None: see _data_defaults
    dropout: float | None = None  # None: see _model_config
    weight_drop: float | None = None  # None: see _weight_drop
    lr: float | None = None  # None: default_lr(the model's width)
    min_lr: float = 3e-4
    warmup_steps: int | None = None  # None: 50, or a tenth of max_steps when that is smaller
    weight_decay: float = 0.1  # AdamW's and Muon's; 0.01 overfit the chat corpus within 5 minutes (bench/RESULTS.md)
    grad_clip: float = 1.0  # max gradient norm
    batch_size: int | None = None  # parallel streams through the training text; None: see _data_defaults
    seq_len: int = 64  # characters per chunk: how far back gradients flow (shorter: more steps in the same time)
    eval_every: int | None = None  # None: EVALS_PER_RUN evaluations over the planned steps
    seed: int = 1337
    device: str = "auto"
    init_from: str | None = None  # a checkpoint to fine-tune: its weights and tokenizer, a fresh optimizer
    lstm_backend: str = "auto"
    precision: str = "auto"  # see precision.computes_in_bfloat16
    loss_on: str = "all"  # chat data: "all" characters, or the assistant's "replies" alone (what validation counts)
    optimizer: str | None = None  # "muon" (optimizer.py) or "adamw"; None: see _data_defaults

    def check(self):
        """Raise TrainConfigError for the first setting that cannot work."""
        rules = [
            ("max_minutes", math.isfinite(self.max_minutes) and self.max_minutes > 0, "must be a positive number"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be at least 1"),
            ("hidden_size", self.hidden_size is None or self.hidden_size >= 1, "must be at least 1"),
            ("num_layers", self.num_layers is None or self.num_layers >= 1, "must be at least 1"),
            ("embedding_size", self.embedding_size is None or self.embedding_size >= 1, "must be at least 1"),
            ("cell", self.cell in CELLS, f"must be one of {', '.join(CELLS)}"),
            ("members", self.members is None or self.members >= 1, "must be at least 1"),
            ("dropout", self.dropout is None or 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("weight_drop", self.weight_drop is None or 0 <= self.weight_drop < 1, "must be in [0, 1)"),
            ("lr", self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "must be a positive number"),
            ("min_lr", 0 <= self.min_lr <= (self.lr or math.inf), "must be in [0, lr]"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must not be negative"),
            ("warmup_steps", self.max_steps is None or self.resolved_warmup_steps() < self.max_steps,
             "must be less than --max-steps"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("grad_clip", self.grad_clip > 0, "must be positive"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be at least 1"),
            ("seq_len", self.seq_len >= 1, "must be at least 1"),
            ("eval_every", self.eval_every is None or self.eval_every >= 1, "must be at least 1"),
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
            ("loss_on", self.loss_on in LOSS_ON, f"must be one of {', '.join(LOSS_ON)}"),
            ("optimizer", self.optimizer in (None, *OPTIMIZERS), f"must be one of {', '.join(OPTIMIZERS)}"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise TrainConfigError(f"--{name.replace('_', '-')} {rule}, got {getattr(self, name)!r}")
        if self.init_from and (self.hidden_size or self.num_layers or self.embedding_size or self.cell != "lstm"
                               or self.members):
            raise TrainConfigError("--hidden-size, --num-layers, --embedding-size, --cell and --members come from the "
                                   "checkpoint with --init-from")

    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(DEFAULT_WARMUP_STEPS, self.max_steps // 10) if self.max_steps else DEFAULT_WARMUP_STEPS


def learning_rate(step: int, planned_steps: int | None, lr: float, min_lr: float, warmup_steps: int) -> float:
    """The rate for step `step` (0-based): linear warm-up to lr over warmup_steps, then cosine down to
    min_lr at the last planned step. While the plan is unknown (the timed first steps of a run with a
    time budget) the cosine part holds at lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if planned_steps is None:
        return lr
    decay_steps = planned_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def target_loss_sum(logits, targets, target_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies in nats over the target positions, number of target positions).
    Kept apart rather than averaged so that a data-parallel version can all-reduce both, then divide."""
    counted_targets = targets.masked_fill(~target_mask, -100)  # -100: cross_entropy's ignore_index
    loss_sum = F.cross_entropy(logits.flatten(0, 1), counted_targets.flatten(), reduction="sum")
    return loss_sum, target_mask.sum()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batch: Batch, lstm_state: tuple, lr: float, grad_clip: float,
               ranks: Ranks = Ranks(), precision: str = "auto") -> tuple[torch.Tensor, tuple]:
    """One optimizer step on `batch`, the next chunk of every stream (on the device), from the LSTM state
    they carry: forward, masked loss, backward, gradient clipping, the optimizer's step. Returns the mean
    loss in nats over every rank's targets as a tensor (a step never waits for the device), and the state
    to carry on. An ensemble steps each member on its own loss, side by side, and returns their mean loss."""
    if not isinstance(model, CharEnsemble):
        return _model_step(model, optimizer, batch, lstm_state, lr, grad_clip, ranks, precision)
    results = side_by_side(lambda member, member_optimizer, member_state: _model_step(
        member, member_optimizer, batch, member_state, lr, grad_clip, ranks, precision),
        model.members, optimizer.per_member, model.member_states(lstm_state), device=batch.inputs.device,
        draws_random_numbers=bool(model.config.dropout or model.config.weight_drop))
    losses, states = zip(*results, strict=True)
    return torch.stack(losses).mean(), model.joined_state(states)


def _model_step(model, optimizer, batch: Batch, lstm_state: tuple, lr: float, grad_clip: float, ranks: Ranks,
                precision: str) -> tuple[torch.Tensor, tuple]:
    """train_step for one model (or its DDP wrapper)."""
    if batch.restarted is not None:  # those streams jumped back to the start of the text
        keep = (~batch.restarted).to(lstm_state[0].dtype)[None, :, None]
        lstm_state = tuple(part * keep for part in lstm_state)
    optimizer.set_lr(lr)
    with autocast(batch.inputs.device, precision):
        logits, lstm_state = model(batch.inputs, lstm_state)
        loss_sum, count = target_loss_sum(logits, batch.targets, batch.target_mask)
    # Normalise by the target count of the whole batch, every rank's streams. DDP averages the
    # gradients over the ranks; the world_size factor undoes that, so the gradient is the whole batch's.
    totals = ranks.sum(torch.stack([loss_sum.detach().float(), count.float()]))
    target_count = totals[1].clamp(min=1)
    loss = loss_sum * ranks.world_size / target_count
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return totals[0] / target_count, tuple(part.detach() for part in lstm_state)


@dataclass
class Validation:
    sample: float  # bits per character over the first VAL_SAMPLE_SHARE of every validation stream
    whole: float | None  # over the whole validation text; None where only the sample was read


@torch.no_grad()
def validate(model: CharLSTM, ids, mask, seq_len: int, device: torch.device, whole: bool = True,
             num_streams: int = VAL_STREAMS, precision: str = "auto") -> Validation:
    """Bits per target character of `ids`, read in num_streams contiguous streams whose LSTM state carries
    from chunk to chunk, in eval mode (no dropout): over the first VAL_SAMPLE_SHARE of every stream's chunks
    (more where those hold no target), and with `whole` over all of them, in the same pass."""
    was_training = model.training
    model.eval()
    batches = list(validation_batches(ids, mask, num_streams, seq_len))
    sample_batches = math.ceil(VAL_SAMPLE_SHARE * len(batches))
    state, loss_sum, count, sample = None, 0.0, 0, None
    try:
        for index, batch in enumerate(batches):
            batch = batch.to(device)
            with autocast(device, precision):
                logits, state = model(batch.inputs, state)
                batch_loss_sum, batch_count = target_loss_sum(logits, batch.targets, batch.target_mask)
            loss_sum, count = loss_sum + batch_loss_sum, count + batch_count
            if sample is None and index + 1 >= sample_batches and count > 0:
                sample = (loss_sum / count).item() / math.log(2)
                if not whole:
                    break
    finally:
        model.train(was_training)
    read = (loss_sum / count).item() / math.log(2)  # the whole text, or where it stopped
    return Validation(read if sample is None else sample, read if whole else None)


def evaluate_bits_per_char(model: CharLSTM, ids, mask, seq_len: int, device: torch.device,
                           num_streams: int = VAL_STREAMS, precision: str = "auto") -> float:
    """Bits per target character over the whole of `ids` (see validate)."""
    return validate(model, ids, mask, seq_len, device, whole=True, num_streams=num_streams, precision=precision).whole


@dataclass
class TrainState:
    """Where a run stands; saved (as JSON) in every checkpoint."""
    step: int = 0  # optimizer steps done
    planned_steps: int | None = None  # set from max_steps, or once from the measured speed
    stream_offsets: list[int] | None = None  # where each training stream reads next
    train_bits_per_char: list[float] = field(default_factory=list)  # one per step
    val_bits_per_char: list[list] = field(default_factory=list)  # [step, the sample's bits per char] per check
    best_sample_bits_per_char: float | None = None  # the best of those, best/'s until the last check
    best_step: int | None = None  # best/'s step
    # The whole validation text's, as the run's last check read them: best/'s, and the last step's
    best_val_bits_per_char: float | None = None
    final_val_bits_per_char: float | None = None
    eval_every: int | None = None  # steps between evaluations: given, or planned with a time budget
    chars_per_second: float | None = None  # training steps only, as measured by this run's last process
    elapsed_seconds: float = 0.0  # wall time of all processes of the run, evaluation included


@dataclass
class TrainResult:
    out: Path  # the run folder: latest/ and best/
    state: TrainState
    interrupted: bool  # stopped by Ctrl-C before the planned steps; resume(out) goes on


class StopOnCtrlC:
    """While active, the first Ctrl-C asks the training loop to stop after the current step, so the
    checkpoint it then saves holds whole steps; a second Ctrl-C interrupts at once."""
    requested, _previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step to save a checkpoint (press again to quit at once)")


def _device_and_backend(device_name: str, backend_name: str, ranks: Ranks) -> tuple[torch.device, str | None]:
    """This rank's device and the LSTM backend, checked now for a clear message, not at the first forward pass."""
    try:
        device = ranks.device(resolve_device(device_name))
    except ValueError as error:
        raise TrainConfigError(f"--device: {error}") from None
    try:
        resolve_backend(backend_name, torch.empty(0, device=device))
    except (RuntimeError, ValueError) as error:
        raise TrainConfigError(f"--lstm-backend {backend_name}: {error}") from None
    return device, None if backend_name == "auto" else backend_name  # None honours NANOCHAT_LSTM_BACKEND


def _check_bfloat16_support(config: TrainConfig, device: torch.device):
    """Before any training step (the width measurement's too), for a new run and a resumed one: the settings
    that need bfloat16 this device cannot compute. oneDNN's own error is no help, and torch's Muon would
    only emulate it, about 70 times slower."""
    if can_compute_bfloat16(device):
        return
    if config.precision == "bfloat16":
        raise TrainConfigError(f"--precision bfloat16 needs CUDA or a CPU with AVX-512, and this {device.type} has "
                               f"neither; use --precision float32")
    if config.optimizer == "muon":
        raise TrainConfigError(f"--optimizer muon needs bfloat16 matrix products (CUDA, or a CPU with AVX-512): "
                               f"torch's Muon orthogonalises in bfloat16, which this {device.type} emulates about "
                               f"70 times slower; use --optimizer adamw")


def overfits_in_minutes(corpus: Corpus) -> bool:
    """Chat data and small text: a model learns them by heart within a run of minutes."""
    return corpus.kind == "chat" or len(corpus.train_ids) < SMALL_DATA_CHARS


def _data_defaults(config: TrainConfig, corpus: Corpus, device: torch.device,
                   ranks: Ranks = Ranks()) -> TrainConfig:
    """The optimizer, batch size and members not given, by the data and the device (bench/RESULTS.md): Muon
    learns more per second, but data that overfit within minutes only reach their best sooner and worse,
    so they keep AdamW; and Muon orthogonalises in bfloat16, which a device without it emulates 70 times
    slower. MUON_BATCH_SIZE streams with Muon, ADAMW_BATCH_SIZE with AdamW. CPU_TEXT_MEMBERS side by side
    where text not learned by heart trains on a CPU with a thread for each, in one process; else one model
    (an ensemble is measured only there: data learned by heart train with dropout, whose random numbers make
    the members step one after the other). A fine-tuned run keeps its checkpoint's members (see _model_config)."""
    optimizer = config.optimizer or ("muon" if has_native_bfloat16(device) and not overfits_in_minutes(corpus)
                                     else "adamw")
    batch_size = config.batch_size or (MUON_BATCH_SIZE if optimizer == "muon" else ADAMW_BATCH_SIZE)
    side_by_side_fits = (not overfits_in_minutes(corpus) and device.type == "cpu" and not ranks.distributed
                         and torch.get_num_threads() >= CPU_TEXT_MEMBERS)
    members = config.members or (None if config.init_from else CPU_TEXT_MEMBERS if side_by_side_fits else 1)
    return replace(config, optimizer=optimizer, batch_size=batch_size, members=members)


def _model_config(config: TrainConfig, corpus: Corpus, device: torch.device, backend: str | None, ranks: Ranks,
                  base: ModelConfig | None = None) -> ModelConfig:
    """The model to train: the flags' sizes; else, with a time budget, the widest this machine trains
    enough steps of in it (measured now), and with a step count a width by the amount of data. Chat and
    small data get one layer, dropout and weight drop (they overfit within minutes): see _dropout and
    _weight_drop."""
    small = len(corpus.train_ids) < SMALL_DATA_CHARS
    cell = config.cell
    characters_per_step = config.batch_size * config.seq_len

    def passes_of(steps):  # over the training text
        return steps * characters_per_step / len(corpus.train_ids)
    passes = config.max_steps and passes_of(config.max_steps)
    vocab_size = corpus.tokenizer.vocab_size

    def model_at(width, passes=None):
        return ModelConfig(vocab_size, width, num_layers, _dropout(config, corpus, width, passes), cell,
                           _weight_drop(config, corpus, width, passes),
                           embedding_size or embedding_size_for(vocab_size, width), members)
    members = config.members
    if base is not None:  # fine-tuning keeps the model's shape
        hidden_size, num_layers, cell, embedding_size = base.hidden_size, base.num_layers, base.cell, base.input_size
        members = base.members
    else:
        by_heart = overfits_in_minutes(corpus)
        num_layers = config.num_layers or (SMALL_DATA_NUM_LAYERS if by_heart else LARGE_DATA_NUM_LAYERS)
        hidden_size = config.hidden_size or (SMALL_HIDDEN_SIZE if small else LARGE_HIDDEN_SIZE)
        embedding_size = config.embedding_size  # None: embedding_size_for the width
        if config.hidden_size is None and config.max_steps is None:
            measured = {}

            def seconds_per_step(width):
                measured[width] = _seconds_per_step(model_at(width), config, corpus, device, backend, ranks)
                return measured[width]

            def measured_width():
                # Each member of an ensemble must train on CHARACTERS_FOR_A_WIDER_MODEL once per member: averaged,
                # members that read more of the text beat wider ones that read less (bench/RESULTS.md).
                width = widest_affordable(config.max_minutes * 60, seconds_per_step, characters_per_step / members)
                return width, passes_of(training_seconds_of(config.max_minutes * 60) / measured[width])
            hidden_size, passes = ranks.from_main(measured_width() if ranks.main else None)  # rank 0's, on every rank
            if ranks.main:
                models, each = (f" {members} models", " each") if members > 1 else ("", "")
                print(f"width: {hidden_size}, the widest this machine trains{models} on "
                      f"{CHARACTERS_FOR_A_WIDER_MODEL * members / 1e6:g}M characters{each} in {config.max_minutes:g} "
                      "minutes (a step: "
                      + ", ".join(f"{seconds:.3f} s at {width}" for width, seconds in measured.items())
                      + f"; about {passes:.0f} passes over the training text; --hidden-size sets it)")
    return model_at(hidden_size, passes)


def default_lr(hidden_size: int) -> float:
    """AdamW's peak rate for a model this wide: DEFAULT_LR at SMALL_HIDDEN_SIZE, falling with the square root
    of the width (at 512 wide it beat half DEFAULT_LR on both CPUs measured: bench/RESULTS.md)."""
    return DEFAULT_LR * math.sqrt(SMALL_HIDDEN_SIZE / hidden_size)


def _scaled_passes(passes: float | None, hidden_size: int) -> float | None:
    """The passes a run makes over the training text, scaled by its recurrent weights' size against a
    FEW_PASSES_WIDTH-wide model's: a wider model learns the text by heart in fewer (None: not known)."""
    return None if passes is None else passes * (hidden_size / FEW_PASSES_WIDTH) ** 2


def _dropout(config: TrainConfig, corpus: Corpus, hidden_size: int, passes: float | None = None) -> float:
    """The flag's; else, on data learned by heart within minutes, more for wider models, unless the run reads
    the training text too few times to learn it by heart (passes: planned; None when not known)."""
    if config.dropout is not None:
        return config.dropout
    if not overfits_in_minutes(corpus):
        return 0.0
    if hidden_size <= SMALL_HIDDEN_SIZE:
        return SMALL_DATA_DROPOUT
    scaled = _scaled_passes(passes, hidden_size)
    return FEW_PASSES_DROPOUT if scaled is not None and scaled < FEW_PASSES else WIDE_SMALL_DATA_DROPOUT


def _weight_drop(config: TrainConfig, corpus: Corpus, hidden_size: int, passes: float | None = None) -> float:
    """The flag's; else, on data learned by heart within minutes, SMALL_DATA_WEIGHT_DROP, or more where the
    run reads the training text MANY_PASSES times or more (scaled as for _dropout)."""
    if config.weight_drop is not None:
        return config.weight_drop
    if not overfits_in_minutes(corpus):
        return 0.0
    scaled = _scaled_passes(passes, hidden_size)
    return MANY_PASSES_WEIGHT_DROP if scaled is not None and scaled >= MANY_PASSES else SMALL_DATA_WEIGHT_DROP


def _seconds_per_step(model_config: ModelConfig, config: TrainConfig, corpus: Corpus, device: torch.device,
                      backend: str | None, ranks: Ranks) -> float:
    """How long a training step of this model takes on this machine: the median of PROBE_STEPS steps after
    a first one (which warms the caches), on this rank's share of the streams, by a model thrown away
    after. The median, as a shared machine now and then stalls a step several times over."""
    model = build_model(model_config, lstm_backend=backend).to(device).train()
    optimizer = make_optimizer(model, config.optimizer, DEFAULT_LR, config.weight_decay, ADAM_BETAS)
    share = ranks.share(config.batch_size)
    streams = TrainStreams(corpus.train_ids, None, share.stop - share.start, config.seq_len)
    lstm_state = model.initial_state(share.stop - share.start, device)
    seconds = []
    for _ in range(1 + PROBE_STEPS):
        synchronize(device)
        began = clock()
        _, lstm_state = train_step(model, optimizer, streams.next_batch().to(device), lstm_state, DEFAULT_LR,
                                   config.grad_clip, precision=config.precision)
        synchronize(device)
        seconds.append(clock() - began)
    return statistics.median(seconds[1:])


def train(config: TrainConfig, ranks: Ranks = Ranks()) -> TrainResult:
    """Start a run: a fresh model, or with config.init_from the weights and tokenizer of a checkpoint
    (fine-tuning, with a fresh optimizer). Raises TrainConfigError, DataError or CheckpointError."""
    started = clock()
    config.check()
    device, backend = _device_and_backend(config.device, config.lstm_backend, ranks)
    source = load_checkpoint(config.init_from, lstm_backend=backend) if config.init_from else None
    corpus = load_corpus(config.data, tokenizer=source and source.tokenizer)
    config = _data_defaults(config, corpus, device, ranks)
    _check_bfloat16_support(config, device)
    model_config = _model_config(config, corpus, device, backend, ranks, base=source and source.model.config)
    if config.lr is None:  # saved in the checkpoints as it is, so the report and a resumed run read it
        config = replace(config, lr=default_lr(model_config.hidden_size))
        config.check()  # --min-lr against it
    torch.manual_seed(config.seed)  # after any measuring models: equal seeds give equal weights
    model = build_model(model_config, lstm_backend=backend)
    if source:
        model.load_state_dict(source.model.state_dict())
    return _training_loop(config, corpus, model, TrainState(), device, ranks, started)


def resume(out=TrainConfig.out, device: str = "auto", lstm_backend: str = "auto",
           ranks: Ranks = Ranks()) -> TrainResult:
    """Go on with the run in folder `out` from its latest/ checkpoint, with its saved settings and plan,
    on any number of processes."""
    started = clock()
    torch_device, backend = _device_and_backend(device, lstm_backend, ranks)
    latest = Path(out) / LATEST
    try:
        checkpoint = load_checkpoint(latest, lstm_backend=backend)
        config = TrainConfig(**{"optimizer": "adamw", **checkpoint.config["extra"]["run_config"]})  # older: AdamW
        optimizer_state, tensors = load_training_state(checkpoint.directory, torch_device)
        if "rng_cpu" not in tensors:  # older versions kept the random states in config.json, as base64
            raise CheckpointError(f"{latest} was written by an older version of nanochat_fast; start a new run, "
                                  f"or chat with it: python -m nanochat_fast.chat --ckpt {shlex.quote(str(out))}")
        state = TrainState(**checkpoint.config["train_state"])
        if state.best_sample_bits_per_char is None:  # older versions read the whole text at every check
            state.best_sample_bits_per_char = state.best_val_bits_per_char
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume the run in {out}: {error}") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"cannot resume from {latest}: it holds no training run state") from None
    config = replace(config, out=str(out), device=device, lstm_backend=lstm_backend)
    _check_bfloat16_support(config, torch_device)
    corpus = load_corpus(config.data, tokenizer=checkpoint.tokenizer)
    return _training_loop(config, corpus, checkpoint.model, state, torch_device, ranks, started, optimizer_state,
                          tensors)


def _validation_check(model, corpus: Corpus, config: TrainConfig, device: torch.device, state: TrainState,
                      last: bool, deadline: float) -> tuple[bool, str]:
    """A check of `model` (the weights' average) at state.step, recorded in `state`; returns whether it
    becomes best/, and the line to print. best/ is the check whose sample reads best. The run's last check
    reads the whole text, and where an earlier check's sample read better, best/ is read whole too (when one
    more whole read ends by `deadline`, on `clock`; else the last step replaces it): best/ is then whichever
    reads the whole text better, so that its figure is always the whole text's."""
    began = clock()
    validation = validate(model, corpus.val_ids, corpus.val_mask, config.seq_len, device, whole=last,
                          precision=config.precision)
    seconds = clock() - began
    state.val_bits_per_char.append([state.step, validation.sample])
    improved = state.best_sample_bits_per_char is None or validation.sample < state.best_sample_bits_per_char
    if not last:
        if improved:  # best/'s whole figure is read at the last check
            state.best_sample_bits_per_char, state.best_step, state.best_val_bits_per_char = (
                validation.sample, state.step, None)
        return improved, (f"step {state.step}: validation {validation.sample:.4f} bits/char on a quarter of the text"
                          + (" (best so far, saved)" if improved else ""))
    state.final_val_bits_per_char = validation.whole
    if not improved and clock() + seconds <= deadline:
        best = load_checkpoint(Path(config.out) / BEST, device).model
        best_whole = validate(best, corpus.val_ids, corpus.val_mask, config.seq_len, device,
                              precision=config.precision).whole
        improved = validation.whole < best_whole
        if not improved:
            state.best_val_bits_per_char = best_whole
    else:
        improved = True
    if improved:
        state.best_sample_bits_per_char, state.best_step = validation.sample, state.step
        state.best_val_bits_per_char = validation.whole
    return improved, (f"step {state.step}: validation {validation.whole:.4f} bits/char"
                      + (" (best, saved)" if improved else
                         f"; best/ (step {state.best_step}) reads {state.best_val_bits_per_char:.4f}"))


def _training_loop(config: TrainConfig, corpus: Corpus, model: CharLSTM, state: TrainState, device: torch.device,
                   ranks: Ranks, started: float, optimizer_state: dict | None = None,
                   saved: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """The loop around train_step, for a new or a resumed run: schedule, evaluation, checkpoints, progress
    bar, Ctrl-C. A resumed run brings its optimizer state and `saved`, the tensors of its latest/: the
    random states, the LSTM state of every stream (as `state.stream_offsets`; each rank takes its share) and
    the weights' average (older versions saved none: it starts from the weights).
    `started`: this process's start of the run, on `clock`.

    A time budget (no max_steps) is planned once TIMED_STEPS steps are timed, after an evaluation that
    measures what one costs, and planned again every PLAN_EVERY steps from the latest speed: so the run
    ends within its budget however fast this machine is and whatever else it runs meanwhile."""
    check_length(corpus, config.seq_len)
    if ranks.distributed and isinstance(model, CharEnsemble):
        raise TrainConfigError(f"--members {model.config.members}: an ensemble trains in one process; run it "
                               f"without torchrun, or train one model with --members 1")
    if config.batch_size % ranks.world_size:
        raise TrainConfigError(f"--batch-size {config.batch_size} must be divisible by the number of "
                               f"processes, {ranks.world_size}: each takes an equal share of the streams")
    model = model.to(device).train()
    average = WeightAverage(model, saved and WeightAverage.saved_in(saved))
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay, ADAM_BETAS)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except ValueError as error:  # saved by a version that trained with another optimizer
            raise CheckpointError(f"cannot resume the run in {config.out}: {error}; start a new run") from None
    share = ranks.share(config.batch_size)
    offsets = state.stream_offsets or start_offsets(len(corpus.train_ids), config.batch_size)
    # The user's turns teach the model language too: trained on every character, it writes better replies
    # (validation counts the replies alone either way; bench/RESULTS.md).
    train_mask = corpus.train_mask if config.loss_on == "replies" else None
    streams = TrainStreams(corpus.train_ids, train_mask, share.stop - share.start, config.seq_len,
                           offsets[share])
    state_names = [f"{model.config.cell}_{name}" for name in STATE_NAMES[model.config.cell]]  # lstm_h, lstm_c; gru_h
    lstm_state = tuple(saved[name] for name in state_names) if saved else model.initial_state(config.batch_size, device)
    lstm_state = tuple(part[:, share].to(device) for part in lstm_state)
    trained = DistributedDataParallel(model) if ranks.distributed else model
    warmup_steps = config.resolved_warmup_steps()
    time_budget = config.max_steps is None
    state.planned_steps = state.planned_steps or config.max_steps
    state.eval_every = state.eval_every or config.eval_every or (config.max_steps and config.max_steps // EVALS_PER_RUN)
    out, extra = Path(config.out), {"run_config": asdict(config),
                                    "corpus": {"name": corpus.name, "kind": corpus.kind, "stats": corpus.stats},
                                    "environment": environment(device, ranks.world_size)}  # for the report card
    if ranks.main:
        parameters = sum(p.numel() for p in model.parameters())
        budget = f"{state.planned_steps} steps" if state.planned_steps else f"{config.max_minutes:g} minutes"
        print(f"data: {corpus.name} ({corpus.kind}), {len(corpus.train_ids):,} training / "
              f"{len(corpus.val_ids):,} validation tokens, vocabulary {corpus.tokenizer.vocab_size}")
        side_by_side_note = " (trained side by side)" if model.config.members > 1 else ""
        print(f"model: {model.config.shape}{side_by_side_note}, "
              f"embedding {model.config.input_size}, {parameters / 1e6:.2f}M "
              f"parameters, dropout {model.config.dropout:g}, weight drop {model.config.weight_drop:g}, on {device}"
              + (" in bfloat16" if computes_in_bfloat16(device, config.precision) else ""))
        print(f"training: {budget} of {config.batch_size} streams x {config.seq_len} characters, "
              f"from step {state.step}, checkpoints in {config.out}/")
    if saved:  # the random states (dropout masks) as they were, so that a resumed run goes on bit for bit
        torch.set_rng_state(saved["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in saved:
            torch.cuda.set_rng_state(saved["rng_cuda"].cpu(), device)
    pending_losses = []  # the losses of recent steps, still on the device
    started, last_report = started - state.elapsed_seconds, clock()  # started: of the whole run, every process
    # For the speed: the clock starts after this process's first step (compilation, cold caches), less checkpoints.
    clock_started, timed_steps, untimed_seconds, evaluations = None, 0, 0.0, 0
    # Spacing counts from the last evaluation, not in multiples of eval_every: a plan that changes the
    # spacing would otherwise bring evaluations a few steps apart. Known to every rank (the history is rank 0's).
    last_evaluated_step = state.val_bits_per_char[-1][0] if state.val_bits_per_char else state.step
    with (tqdm(total=state.planned_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not ranks.main) as bar, StopOnCtrlC() as stop):
        while state.planned_steps is None or state.step < state.planned_steps:
            lr = learning_rate(state.step, state.planned_steps, config.lr, config.min_lr, warmup_steps)
            batch = streams.next_batch().to(device)
            loss, lstm_state = train_step(trained, optimizer, batch, lstm_state, lr, config.grad_clip, ranks,
                                          config.precision)
            pending_losses.append(loss)
            average.update(model, state.step)
            state.step += 1
            bar.update()
            if clock_started is None:
                synchronize(device)
                clock_started = clock()
                plan_window = (clock_started, state.step, untimed_seconds)  # where the speed of the next plan starts
            else:
                timed_steps += 1
            stopping = stop.requested
            if ranks.distributed:  # Ctrl-C reaches every rank, not at the same step: all stop once one has seen it
                stopping = ranks.sum(torch.tensor([float(stopping)], device=device)).item() > 0
            first_plan = state.planned_steps is None and timed_steps == TIMED_STEPS
            last = state.step == state.planned_steps
            # A periodic evaluation gives way to the last one when that is under half a spacing away.
            evaluating = first_plan or last or bool(state.eval_every
                                                    and state.step - last_evaluated_step >= state.eval_every
                                                    and state.planned_steps - state.step >= state.eval_every / 2)
            if evaluating:
                last_evaluated_step = state.step
            planning = time_budget and not last and (first_plan or (state.planned_steps is not None
                                                                    and state.step % PLAN_EVERY == 0))
            if evaluating or stopping or planning or clock() - last_report >= PROGRESS_SECONDS:
                # The one wait for the device: the pending losses go into the history, and the bar shows them.
                synchronize(device)
                state.train_bits_per_char += [nats / math.log(2) for nats in torch.stack(pending_losses).tolist()]
                pending_losses = []
                if timed_steps:
                    seconds_per_step = (clock() - clock_started - untimed_seconds) / timed_steps
                    state.chars_per_second = config.batch_size * config.seq_len / seconds_per_step
                bar.set_postfix({"train_bpc": f"{state.train_bits_per_char[-1]:.3f}", "lr": f"{lr:.2e}",
                                 "chars/s": f"{state.chars_per_second or 0:,.0f}"}, refresh=False)
                last_report = clock()
            if evaluating or stopping:
                checkpoint_started = clock()  # the device is idle: the losses were just read back
                # Every stream's read position and LSTM state, from all ranks (which all take part).
                state.stream_offsets = ranks.gather(torch.tensor(streams.offsets, device=device), dim=0).tolist()
                train_tensors = {name: ranks.gather(part, dim=1) for name, part in zip(state_names, lstm_state,
                                                                                       strict=True)}
                if ranks.main:
                    improved, check_line = False, None
                    if evaluating:
                        deadline = started + config.max_minutes * 60 - FINISH_SECONDS if time_budget else math.inf
                        improved, check_line = _validation_check(average.model, corpus, config, device, state, last,
                                                                 deadline)
                    state.elapsed_seconds = clock() - started
                    # latest/ holds all a resumed run needs; best/ what chat and sample load (and the curves).
                    train_tensors["rng_cpu"] = torch.get_rng_state()  # the random states, as they are after this step
                    if device.type == "cuda":
                        train_tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
                    save_checkpoint(out / LATEST, model, corpus.tokenizer, optimizer, asdict(state), extra,
                                    train_tensors | average.tensors())
                    if improved:
                        save_checkpoint(out / BEST, average.model, corpus.tokenizer, train_state=asdict(state),
                                        extra=extra)
                    if check_line:
                        tqdm.write(check_line)
                untimed_seconds += clock() - checkpoint_started
                evaluations += evaluating
                if stopping:
                    break
            if planning:  # rank 0's plan, for every rank, from the speed of the steps since the last plan
                window_clock, window_step, window_untimed = plan_window
                recent_seconds_per_step = ((clock() - window_clock - (untimed_seconds - window_untimed))
                                           / (state.step - window_step))
                # The last check reads the whole text, and best/ too where an earlier check is best so far.
                whole_reads = 1 if state.best_step == last_evaluated_step else 2
                evaluation_seconds = untimed_seconds / evaluations
                plan = plan_steps(config.max_minutes * 60, clock() - started, state.step, recent_seconds_per_step,
                                  evaluation_seconds, config.eval_every, [step for step, _ in state.val_bits_per_char],
                                  last_evaluation_seconds=whole_reads * evaluation_seconds / VAL_SAMPLE_SHARE)
                state.planned_steps, state.eval_every = ranks.from_main(plan)
                bar.total = state.planned_steps
                bar.refresh()
                plan_window = (clock(), state.step, untimed_seconds)
    return TrainResult(out, state, interrupted=state.planned_steps is None or state.step < state.planned_steps)

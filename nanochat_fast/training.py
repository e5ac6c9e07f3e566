"""Training the character model: stateful truncated backprop through time with AdamW, a linear warm-up
then cosine learning-rate schedule by step, validation in bits per character over the whole validation
text, and checkpoints in a run folder: `latest/` to resume, `best/` (best validation) to chat with.

`train(config)` starts a run (a fresh model, or fine-tuning one with `init_from`); `resume(out)` goes on
with a stopped run exactly where it stopped, on the same schedule. `Trainer.step` is one optimizer step.

Under torchrun (`ranks` from `distributed.start()`) each process trains its share of the parallel
streams in DistributedDataParallel; rank 0 alone evaluates, prints and saves, and the checkpoints hold
every stream's state, so a run resumes on any number of processes.
"""

import base64
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanochat_fast.backend import resolve_backend
from nanochat_fast.batching import TrainStreams, start_offsets, validation_batches
from nanochat_fast.checkpoint import BEST, LATEST, CheckpointError, load_checkpoint, load_training_state, save_checkpoint
from nanochat_fast.data import Corpus, check_length, load_corpus
from nanochat_fast.device import resolve_device
from nanochat_fast.distributed import Ranks
from nanochat_fast.environment import environment
from nanochat_fast.model import CharLSTM, ModelConfig

SMALL_DATA_CHARS = 500_000  # below this much training text a smaller model, with dropout, generalises better
SMALL_HIDDEN_SIZE, LARGE_HIDDEN_SIZE = 256, 512
SMALL_DATA_DROPOUT = 0.2
DEFAULT_NUM_LAYERS = 2
DEFAULT_WARMUP_STEPS = 50
TIMED_STEPS = 10  # steps timed, after one untimed step, to turn a time budget into a step count
EVALS_PER_RUN = 10  # evaluations over a run when eval_every is not given
VAL_STREAMS = 16
PROGRESS_SECONDS = 1.0  # how often losses are read back from the device (a sync) for history and progress bar


class TrainConfigError(ValueError):
    """Settings that cannot work; the message names the flag and says why."""


@dataclass
class TrainConfig:
    """Every setting of a run, one per train.py flag; saved in the checkpoints, so resuming needs none."""
    data: str | None = None  # None: the embedded chat corpus; see data.load_corpus
    out: str = "out"
    max_minutes: float = 5.0  # time for training steps, turned into a step count once; evaluation comes on top
    max_steps: int | None = None  # overrides max_minutes
    hidden_size: int | None = None  # None: 256 with less than SMALL_DATA_CHARS of training text, else 512
    num_layers: int | None = None  # None: 2, or the checkpoint's with init_from
    dropout: float | None = None  # None: 0.2 for chat or small data (they overfit within minutes), else 0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int | None = None  # None: 50, or a tenth of max_steps when that is smaller
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max gradient norm
    batch_size: int = 32  # parallel streams through the training text
    seq_len: int = 128  # characters per chunk: how far back gradients flow
    eval_every: int | None = None  # None: EVALS_PER_RUN evaluations over the planned steps
    seed: int = 1337
    device: str = "auto"
    init_from: str | None = None  # a checkpoint to fine-tune: its weights and tokenizer, a fresh optimizer
    lstm_backend: str = "auto"

    def check(self):
        """Raise TrainConfigError for the first setting that cannot work."""
        rules = [
            ("max_minutes", math.isfinite(self.max_minutes) and self.max_minutes > 0, "must be a positive number"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be at least 1"),
            ("hidden_size", self.hidden_size is None or self.hidden_size >= 1, "must be at least 1"),
            ("num_layers", self.num_layers is None or self.num_layers >= 1, "must be at least 1"),
            ("dropout", self.dropout is None or 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number"),
            ("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]"),
            ("warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "must not be negative"),
            ("warmup_steps", self.max_steps is None or self.resolved_warmup_steps() < self.max_steps,
             "must be less than --max-steps"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("grad_clip", self.grad_clip > 0, "must be positive"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("seq_len", self.seq_len >= 1, "must be at least 1"),
            ("eval_every", self.eval_every is None or self.eval_every >= 1, "must be at least 1"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise TrainConfigError(f"--{name.replace('_', '-')} {rule}, got {getattr(self, name)!r}")
        if self.init_from and (self.hidden_size or self.num_layers):
            raise TrainConfigError("--hidden-size and --num-layers come from the checkpoint with --init-from")

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


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; nothing on CPU, where it would only be slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One optimizer step per `step(lr)`: the next chunk of every stream, forward from the carried LSTM
    state, loss on the target characters, backward, gradient clipping, AdamW. It never waits for the
    device: the loss comes back as a tensor."""

    def __init__(self, model: CharLSTM, optimizer, streams: TrainStreams, grad_clip: float,
                 device: torch.device, lstm_state=None, ranks: Ranks = Ranks()):
        self.model, self.optimizer, self.streams = model, optimizer, streams
        self.grad_clip, self.device, self.ranks = grad_clip, device, ranks
        if lstm_state is None:
            lstm_state = model.initial_state(len(streams.offsets), device)
        self.lstm_state = lstm_state

    def step(self, lr: float) -> torch.Tensor:
        batch = self.streams.next_batch().to(self.device)
        state = self.lstm_state
        if batch.restarted is not None:  # those streams jumped back to the start of the text
            keep = (~batch.restarted).to(state[0].dtype)[None, :, None]
            state = tuple(part * keep for part in state)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device):
            logits, state = self.model(batch.inputs, state)
            loss_sum, count = target_loss_sum(logits, batch.targets, batch.target_mask)
        # Normalise by the target count of the whole batch, every rank's streams. DDP averages the
        # gradients over the ranks; the world_size factor undoes that, so the gradient is the whole batch's.
        totals = self.ranks.sum(torch.stack([loss_sum.detach().float(), count.float()]))
        target_count = totals[1].clamp(min=1)
        loss = loss_sum * self.ranks.world_size / target_count
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.lstm_state = tuple(part.detach() for part in state)
        return totals[0] / target_count


@torch.no_grad()
def evaluate_bits_per_char(model: CharLSTM, ids, mask, seq_len: int, device: torch.device,
                           num_streams: int = VAL_STREAMS) -> float:
    """Bits per target character over the whole of `ids`, read in num_streams contiguous streams whose
    LSTM state carries from chunk to chunk, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    state, loss_sum, count = None, 0.0, 0
    try:
        for batch in validation_batches(ids, mask, num_streams, seq_len):
            batch = batch.to(device)
            with autocast(device):
                logits, state = model(batch.inputs, state)
                batch_loss_sum, batch_count = target_loss_sum(logits, batch.targets, batch.target_mask)
            loss_sum, count = loss_sum + batch_loss_sum, count + batch_count
    finally:
        model.train(was_training)
    return (loss_sum / count).item() / math.log(2)


@dataclass
class TrainState:
    """Where a run stands; saved (as JSON) in every checkpoint."""
    step: int = 0  # optimizer steps done
    planned_steps: int | None = None  # set from max_steps, or once from the measured speed
    stream_offsets: list[int] | None = None  # where each training stream reads next
    train_bits_per_char: list[float] = field(default_factory=list)  # one per step
    val_bits_per_char: list[list] = field(default_factory=list)  # [step, bits per char] per evaluation
    best_val_bits_per_char: float | None = None
    best_step: int | None = None
    chars_per_second: float | None = None  # training steps only, as measured by this run's last process
    elapsed_seconds: float = 0.0  # wall time of all processes of the run, evaluation included
    rng: dict | None = None  # random generator states (dropout), to resume bit for bit


def _encode_rng(generator_state: torch.Tensor) -> str:
    return base64.b64encode(generator_state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict:
    """The states of the generators training draws from (dropout masks), JSON-able."""
    state = {"torch_cpu": _encode_rng(torch.get_rng_state())}
    if device.type == "cuda":
        state["torch_cuda"] = _encode_rng(torch.cuda.get_rng_state(device).cpu())
    return state


def restore_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(_decode_rng(state["torch_cpu"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(_decode_rng(state["torch_cuda"]), device)


class StepTimer:
    """Wall seconds per training step in this process. The clock starts after the first step (which
    pays for compilation and cold caches) and stops while evaluating and saving."""

    def __init__(self, device: torch.device):
        self.device, self.steps, self._seconds, self._since = device, 0, 0.0, None

    def step_done(self):
        if self._since is None:
            synchronize(self.device)
            self._since = time.perf_counter()
        else:
            self.steps += 1

    @contextmanager
    def paused(self):
        if self._since is not None:
            synchronize(self.device)
            self._seconds += time.perf_counter() - self._since
        try:
            yield
        finally:
            if self._since is not None:
                self._since = time.perf_counter()

    def seconds_per_step(self) -> float | None:
        if not self.steps:
            return None
        synchronize(self.device)
        return (self._seconds + time.perf_counter() - self._since) / self.steps


class StopOnCtrlC:
    """While active, the first Ctrl-C asks the training loop to stop after the current step, so the
    checkpoint it then saves holds whole steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None

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


@dataclass
class TrainResult:
    out: Path  # the run folder: latest/ and best/
    state: TrainState
    interrupted: bool  # stopped by Ctrl-C before the planned steps; resume(out) goes on


def _lstm_backend(name: str, device: torch.device) -> str | None:
    try:  # fail now with a clear message, not at the first forward pass
        resolve_backend(name, torch.empty(0, device=device))
    except (RuntimeError, ValueError) as error:
        raise TrainConfigError(f"--lstm-backend {name}: {error}") from None
    return None if name == "auto" else name  # None honours the env var NANOCHAT_LSTM_BACKEND


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as error:
        raise TrainConfigError(f"--device: {error}") from None


def _model_config(config: TrainConfig, corpus: Corpus, base: ModelConfig | None = None) -> ModelConfig:
    small = len(corpus.train_ids) < SMALL_DATA_CHARS
    dropout = config.dropout
    if dropout is None:
        dropout = SMALL_DATA_DROPOUT if corpus.kind == "chat" or small else 0.0
    if base is not None:  # fine-tuning keeps the model's shape
        return ModelConfig(base.vocab_size, base.hidden_size, base.num_layers, dropout)
    hidden_size = config.hidden_size or (SMALL_HIDDEN_SIZE if small else LARGE_HIDDEN_SIZE)
    return ModelConfig(corpus.tokenizer.vocab_size, hidden_size, config.num_layers or DEFAULT_NUM_LAYERS, dropout)


def train(config: TrainConfig, ranks: Ranks = Ranks()) -> TrainResult:
    """Start a run: a fresh model, or with config.init_from the weights and tokenizer of a checkpoint
    (fine-tuning, with a fresh optimizer). Raises TrainConfigError, DataError or CheckpointError."""
    config.check()
    device = ranks.device(_device(config.device))
    backend = _lstm_backend(config.lstm_backend, device)
    torch.manual_seed(config.seed)
    if config.init_from:
        source = load_checkpoint(config.init_from, lstm_backend=backend)
        corpus = load_corpus(config.data, tokenizer=source.tokenizer)
        model = CharLSTM(_model_config(config, corpus, base=source.model.config), lstm_backend=backend)
        model.load_state_dict(source.model.state_dict())
    else:
        corpus = load_corpus(config.data)
        model = CharLSTM(_model_config(config, corpus), lstm_backend=backend)
    return TrainingRun(config, corpus, model, TrainState(), device, ranks=ranks).run()


def resume(out=TrainConfig.out, device: str = "auto", lstm_backend: str = "auto",
           ranks: Ranks = Ranks()) -> TrainResult:
    """Go on with the run in folder `out` from its latest/ checkpoint, with its saved settings and plan,
    on any number of processes."""
    torch_device = ranks.device(_device(device))
    backend = _lstm_backend(lstm_backend, torch_device)
    try:
        checkpoint = load_checkpoint(Path(out) / LATEST, lstm_backend=backend)
        config = TrainConfig(**checkpoint.config["extra"]["run_config"])
        state = TrainState(**checkpoint.config["train_state"])
    except CheckpointError as error:
        raise CheckpointError(f"cannot resume the run in {out}: {error}") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"cannot resume from {Path(out) / LATEST}: it holds no training run state") from None
    config = replace(config, out=str(out), device=device, lstm_backend=lstm_backend)
    optimizer_state, tensors = load_training_state(checkpoint.directory, torch_device)
    lstm_state = (tensors["lstm_h"], tensors["lstm_c"]) if "lstm_h" in tensors else None
    corpus = load_corpus(config.data, tokenizer=checkpoint.tokenizer)
    return TrainingRun(config, corpus, checkpoint.model, state, torch_device, optimizer_state, lstm_state,
                       ranks).run()


class TrainingRun:
    """The loop around Trainer.step: schedule, evaluation, checkpoints, progress bar, Ctrl-C.
    `lstm_state` and `state.stream_offsets` are those of all streams; each rank takes its share."""

    def __init__(self, config: TrainConfig, corpus: Corpus, model: CharLSTM, state: TrainState,
                 device: torch.device, optimizer_state: dict | None = None, lstm_state=None,
                 ranks: Ranks = Ranks()):
        check_length(corpus, config.seq_len)
        if config.batch_size % ranks.world_size:
            raise TrainConfigError(f"--batch-size {config.batch_size} must be divisible by the number of "
                                   f"processes, {ranks.world_size}: each takes an equal share of the streams")
        self.config, self.corpus, self.state, self.device, self.ranks = config, corpus, state, device, ranks
        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=device.type == "cuda")
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        share = ranks.share(config.batch_size)
        offsets = state.stream_offsets or start_offsets(len(corpus.train_ids), config.batch_size)
        streams = TrainStreams(corpus.train_ids, corpus.train_mask, share.stop - share.start, config.seq_len,
                               offsets[share])
        if lstm_state is None:
            lstm_state = self.model.initial_state(config.batch_size, device)
        lstm_state = tuple(part[:, share].to(device) for part in lstm_state)
        trained = DistributedDataParallel(self.model) if ranks.distributed else self.model
        self.trainer = Trainer(trained, self.optimizer, streams, config.grad_clip, device, lstm_state, ranks)
        self.warmup_steps = config.resolved_warmup_steps()
        self.chars_per_step = config.batch_size * config.seq_len
        if state.planned_steps is None:
            state.planned_steps = config.max_steps
        self.timer = StepTimer(device)
        self.lr = config.lr  # the rate of the latest step, for the progress bar
        self.pending_losses = []  # losses of recent steps, still on the device
        self.saved_step = state.step  # the step latest/ holds (nothing to save before the first step)
        self.started = time.perf_counter()
        self.elapsed_before = state.elapsed_seconds
        self.environment = environment(device, ranks.world_size)  # for the report card

    def run(self) -> TrainResult:
        state, config, main = self.state, self.config, self.ranks.main
        if main:
            self._print_plan()
        if state.rng is not None:
            restore_rng_state(state.rng, self.device)
        self.bar = tqdm(total=state.planned_steps, initial=state.step, unit="step", dynamic_ncols=True,
                        disable=not main)
        last_report = time.perf_counter()
        try:
            with StopOnCtrlC() as stop:
                while (not self._stop_requested(stop)
                       and (state.planned_steps is None or state.step < state.planned_steps)):
                    self.lr = learning_rate(state.step, state.planned_steps, config.lr, config.min_lr,
                                            self.warmup_steps)
                    self.pending_losses.append(self.trainer.step(self.lr))
                    state.step += 1
                    self.timer.step_done()
                    self.bar.update()
                    if state.planned_steps is None and self.timer.steps == TIMED_STEPS:
                        self._plan_steps()
                    evaluation_due = self._evaluation_due()
                    if evaluation_due or time.perf_counter() - last_report >= PROGRESS_SECONDS:
                        self._record_losses()
                        last_report = time.perf_counter()
                    if evaluation_due:
                        with self.timer.paused():
                            self._collect_streams()
                            if main:
                                self._evaluate_and_save()
                if self.saved_step != state.step:  # stopped by Ctrl-C between evaluations
                    self._record_losses()
                    self._collect_streams()
                    if main:
                        self._save(LATEST)
        finally:
            self.bar.close()
        interrupted = state.planned_steps is None or state.step < state.planned_steps
        return TrainResult(Path(config.out), state, interrupted)

    def _stop_requested(self, stop: StopOnCtrlC) -> bool:
        """Ctrl-C reaches every rank, though not at the same step: they stop when any one has seen it."""
        if not self.ranks.distributed:
            return stop.requested
        return self.ranks.sum(torch.tensor([float(stop.requested)], device=self.device)).item() > 0

    def _print_plan(self):
        corpus, model_config = self.corpus, self.model.config
        parameters = sum(p.numel() for p in self.model.parameters())
        budget = (f"{self.state.planned_steps} steps" if self.state.planned_steps
                  else f"{self.config.max_minutes:g} minutes of steps")
        print(f"data: {corpus.name} ({corpus.kind}), {len(corpus.train_ids):,} training / "
              f"{len(corpus.val_ids):,} validation tokens, vocabulary {corpus.tokenizer.vocab_size}")
        print(f"model: {model_config.num_layers} x {model_config.hidden_size} LSTM, {parameters / 1e6:.2f}M "
              f"parameters, dropout {model_config.dropout:g}, on {self.device}")
        print(f"training: {budget} of {self.config.batch_size} streams x {self.config.seq_len} characters, "
              f"from step {self.state.step}, checkpoints in {self.config.out}/")

    def _plan_steps(self):
        """Turn the time budget into a step count, once, from the measured speed; saved, so that a
        resumed run keeps the schedule."""
        budget_seconds = self.config.max_minutes * 60
        planned = int(budget_seconds / self.timer.seconds_per_step())
        # Rank 0's measure, so that every rank plans the same number of steps.
        self.state.planned_steps = self.ranks.from_main(max(planned, self.state.step, self.warmup_steps + 1))
        self.bar.total = self.state.planned_steps
        self.bar.refresh()

    def _evaluation_due(self) -> bool:
        step, planned = self.state.step, self.state.planned_steps
        every = self.config.eval_every or (planned // EVALS_PER_RUN if planned else 0)
        return step == planned or (every > 0 and step % every == 0)

    def _record_losses(self):
        """Move the pending losses into the history (the one wait for the device) and show progress."""
        if self.pending_losses:
            losses = torch.stack(self.pending_losses).tolist()
            self.pending_losses.clear()
            self.state.train_bits_per_char += [loss / math.log(2) for loss in losses]
        seconds_per_step = self.timer.seconds_per_step()
        if seconds_per_step:
            self.state.chars_per_second = self.chars_per_step / seconds_per_step
        self.bar.set_postfix({"train_bpc": f"{self.state.train_bits_per_char[-1]:.3f}", "lr": f"{self.lr:.2e}",
                              "chars/s": f"{self.state.chars_per_second or 0:,.0f}"}, refresh=False)

    def _evaluate_and_save(self):
        state = self.state
        val_bits_per_char = evaluate_bits_per_char(self.model, self.corpus.val_ids, self.corpus.val_mask,
                                                   self.config.seq_len, self.device)
        state.val_bits_per_char.append([state.step, val_bits_per_char])
        improved = state.best_val_bits_per_char is None or val_bits_per_char < state.best_val_bits_per_char
        if improved:
            state.best_val_bits_per_char, state.best_step = val_bits_per_char, state.step
        self._save(LATEST)
        if improved:
            self._save(BEST)
        tqdm.write(f"step {state.step}: validation {val_bits_per_char:.4f} bits/char"
                   + (" (best so far, saved)" if improved else ""))

    def _collect_streams(self):
        """Every stream's read position and LSTM state, from all ranks, for the checkpoint (on every rank,
        which all take part)."""
        offsets = torch.tensor(self.trainer.streams.offsets, device=self.device)
        self.state.stream_offsets = self.ranks.gather(offsets, dim=0).tolist()
        self.all_lstm_state = tuple(self.ranks.gather(part, dim=1) for part in self.trainer.lstm_state)
        self.saved_step = self.state.step

    def _save(self, name: str):
        """latest/ holds all a resumed run needs; best/ just what chat and sample load (and the curves).
        Rank 0 only, after _collect_streams."""
        state = self.state
        state.elapsed_seconds = self.elapsed_before + time.perf_counter() - self.started
        state.rng = rng_state(self.device)
        resumable = name == LATEST
        h, c = self.all_lstm_state
        save_checkpoint(Path(self.config.out) / name, self.model, self.corpus.tokenizer,
                        optimizer=self.optimizer if resumable else None, train_state=asdict(state),
                        extra={"run_config": asdict(self.config),
                               "corpus": {"name": self.corpus.name, "kind": self.corpus.kind,
                                          "stats": self.corpus.stats},
                               "environment": self.environment},
                        train_tensors={"lstm_h": h, "lstm_c": c} if resumable else None)

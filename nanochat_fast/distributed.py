"""Training on many processes: which rank this process is, and the few collectives training needs.

`torchrun --nproc_per_node=N train.py ...` starts N copies of train.py and sets RANK, WORLD_SIZE and
LOCAL_RANK in each; `start()` reads them and joins the process group (NCCL on CUDA, gloo on CPU), the
way nanoGPT's train.py does. Without those variables (plain `python train.py`) there is no process
group: world size 1, and every collective here returns its input unchanged.
"""

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others. Rank 0 evaluates and saves while the other ranks
# wait in the next step's all-reduce, so this bounds evaluation time too; a killed rank is noticed sooner
# (its sockets close, and torchrun stops the others).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # which GPU of this machine
    distributed: bool = False  # a process group exists (started by torchrun, even with one process)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that evaluates, logs, writes checkpoints and the report."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's streams among batch_size parallel streams (checked divisible beforehand)."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU when on CUDA."""
        return torch.device("cuda", self.local_rank) if self.distributed and device.type == "cuda" else device

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of tensor over all ranks."""
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's tensor, concatenated in rank order along dim (the same shape on every rank)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def from_main(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start(device_name: str = "auto") -> Ranks:
    """Join the process group torchrun describes in the environment; Ranks() when not run by torchrun."""
    if "RANK" not in os.environ:
        return Ranks()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    # device_id binds the NCCL communicator to this rank's GPU at once (and lets barrier() know it).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    return Ranks(rank, world_size, local_rank, distributed=True)


def stop():
    """Leave the process group, if this process joined one: on every rank, after its last collective.
    The barrier first: a rank closing its connections while another still tears down its own made gloo
    abort that rank at exit (about 1 run in 10 here)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int):
    """End the process with this exit code. A process started by torchrun ends without the interpreter's
    teardown: DDP's reducer keeps the gloo process group alive past destroy_process_group (its worker
    threads were still running at exit, torch 2.13), and when such a thread frees a finished
    collective's tensors during the teardown it needs the GIL, is killed mid-C++, and the process
    aborts ("terminate called without an active exception"; about 1 run in 40 of the Ctrl-C test, seen
    in a core dump). Checkpoints are on disk by now; only the output buffers are left to flush."""
    if "RANK" not in os.environ:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

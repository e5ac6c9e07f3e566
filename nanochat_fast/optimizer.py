"""The optimizer of a training run: Muon for the recurrent layers' weight matrices, AdamW for the rest.

Muon (torch.optim.Muon) replaces each matrix's momentum by its nearest orthogonal matrix (a few
Newton-Schulz iterations), so every direction of the matrix moves at the same rate, and AdamW's noisy
per-weight scaling is gone where it matters most: the weights applied to the hidden state at every step.
In runs of minutes it learned more per second than AdamW alone, though each step costs more
(bench/RESULTS.md). The embedding (a lookup table), the head and the biases keep AdamW. With
adjust_lr_fn="match_rms_adamw" a Muon update is as large as an AdamW one, so both follow the one schedule,
Muon's rate MUON_LR_SCALE times AdamW's.

A recurrent weight matrix stacks one block per gate (four for an LSTM, three for a GRU), and Muon
orthogonalises each block on its own: the gates do different jobs and their gradients differ in scale, and
one orthogonalisation of the stacked matrix would give them one shared set of directions. Per gate it
learned more in the same minutes (bench/RESULTS.md). torch's Muon does it unchanged, stepping views of the
blocks (see gate_blocks).
"""
import torch

from nanochat_fast.ensemble import CharEnsemble

OPTIMIZERS = ("muon", "adamw")
MUON_LR_SCALE = 2.0  # bench/RESULTS.md: x1 and x4 learned less in 5 minutes
# torch's default is 5 iterations, each three matrix products per gate block: at 5 about a fifth of a CPU
# training step. With 3 a 5-minute run makes 14 to 17% more steps and ends a little lower; with 2 it ends
# higher (bench/RESULTS.md).
MUON_NEWTON_SCHULZ_STEPS = 3


class Optimizers:
    """Several torch optimizers stepped as one, each keeping its own groups and state. A group's `lr_scale`
    is its rate over the schedule's (see set_lr). `blocked`: (weight, its blocks) for the weights an
    optimizer steps through views of their blocks (see gate_blocks): each step hands the blocks their
    slices of the weight's gradient."""

    def __init__(self, *optimizers: torch.optim.Optimizer, blocked: tuple = ()):
        self.optimizers = optimizers
        self.blocked = blocked

    @property
    def param_groups(self) -> list[dict]:  # read anew: load_state_dict replaces an optimizer's groups
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr(self, lr: float):
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def zero_grad(self):
        """Every gradient to None, the blocked weights' too (their optimizer holds only the blocks)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        for weight, _ in self.blocked:
            weight.grad = None

    def step(self):
        for weight, blocks in self.blocked:
            grads = [None] * len(blocks) if weight.grad is None else weight.grad.chunk(len(blocks))
            for block, grad in zip(blocks, grads, strict=True):
                block.grad = grad
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {type(optimizer).__name__: optimizer.state_dict() for optimizer in self.optimizers}

    def load_state_dict(self, state_dict: dict):
        names = [type(optimizer).__name__ for optimizer in self.optimizers]
        if sorted(state_dict) != sorted(names):
            raise ValueError(f"the saved state is of {', '.join(sorted(state_dict))}, not {', '.join(names)}")
        for name, optimizer in zip(names, self.optimizers, strict=True):
            optimizer.load_state_dict(state_dict[name])


class MemberOptimizers:
    """An ensemble's optimizers, one Optimizers per member (`per_member`, in the members' order): each member
    trains on its own loss, so each steps on its own (training.train_step)."""

    def __init__(self, per_member: list[Optimizers]):
        self.per_member = per_member

    def state_dict(self) -> dict:
        return {"members": [optimizer.state_dict() for optimizer in self.per_member]}

    def load_state_dict(self, state_dict: dict):
        saved = state_dict.get("members")
        if saved is None or len(saved) != len(self.per_member):
            raise ValueError(f"the saved state is not of an ensemble of {len(self.per_member)}")
        for optimizer, member_state in zip(self.per_member, saved, strict=True):
            optimizer.load_state_dict(member_state)


def gate_blocks(weight: torch.Tensor, gates: int) -> tuple[torch.Tensor, ...]:
    """weight's `gates` row blocks as tensors of their own that share its storage (and its version counter,
    which parameter_cache reads): an optimizer updating them in place updates the weight."""
    return weight.detach().chunk(gates)


def make_optimizer(model, name: str, lr: float, weight_decay: float, betas: tuple[float, float]) -> Optimizers:
    """`name` "muon": Muon for the recurrent layers' weight matrices, gate by gate, and AdamW for the other
    parameters; "adamw": AdamW for all. Fused AdamW on CUDA. An ensemble gets one such per member."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: must be one of {', '.join(OPTIMIZERS)}")
    if isinstance(model, CharEnsemble):
        return MemberOptimizers([make_optimizer(member, name, lr, weight_decay, betas) for member in model.members])
    recurrent = model.recurrent
    matrices = [parameter for parameter_name, parameter in recurrent.named_parameters()
                if parameter_name.startswith("weight_")] if name == "muon" else []
    in_muon = {id(parameter) for parameter in matrices}
    others = [parameter for parameter in model.parameters() if id(parameter) not in in_muon]
    fused = next(model.parameters()).device.type == "cuda"
    adamw = torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    adamw.param_groups[0]["lr_scale"] = 1.0
    if not matrices:
        return Optimizers(adamw)
    blocked = tuple((weight, gate_blocks(weight, weight.shape[0] // recurrent.hidden_size)) for weight in matrices)
    muon = torch.optim.Muon([block for _, blocks in blocked for block in blocks], lr=lr * MUON_LR_SCALE,
                            weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                            ns_steps=MUON_NEWTON_SCHULZ_STEPS)
    muon.param_groups[0]["lr_scale"] = MUON_LR_SCALE
    return Optimizers(muon, adamw, blocked=blocked)

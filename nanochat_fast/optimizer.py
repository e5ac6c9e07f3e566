"""The optimizer of a training run: Muon for the recurrent layers' weight matrices, AdamW for the rest.

Muon (torch.optim.Muon) replaces each matrix's momentum by its nearest orthogonal matrix (a few
Newton-Schulz iterations), so every direction of the matrix moves at the same rate, and AdamW's noisy
per-weight scaling is gone where it matters most: the weights applied to the hidden state at every step.
In runs of minutes it learned more per second than AdamW alone, though each step costs more
(bench/RESULTS.md). The embedding (a lookup table), the head and the biases keep AdamW. With
adjust_lr_fn="match_rms_adamw" a Muon update is as large as an AdamW one, so both follow the one schedule,
Muon's rate MUON_LR_SCALE times AdamW's.
"""
import torch

OPTIMIZERS = ("muon", "adamw")
MUON_LR_SCALE = 2.0  # bench/RESULTS.md: x1 and x4 learned less in 5 minutes


class Optimizers:
    """Several torch optimizers stepped as one, each keeping its own groups and state. A group's `lr_scale`
    is its rate over the schedule's (see set_lr)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:  # read anew: load_state_dict replaces an optimizer's groups
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr(self, lr: float):
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
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


def make_optimizer(model, name: str, lr: float, weight_decay: float, betas: tuple[float, float]) -> Optimizers:
    """`name` "muon": Muon for the recurrent layers' weight matrices and AdamW for the other parameters;
    "adamw": AdamW for all. Fused AdamW on CUDA."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: must be one of {', '.join(OPTIMIZERS)}")
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
    muon = torch.optim.Muon(matrices, lr=lr * MUON_LR_SCALE, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    muon.param_groups[0]["lr_scale"] = MUON_LR_SCALE
    return Optimizers(muon, adamw)

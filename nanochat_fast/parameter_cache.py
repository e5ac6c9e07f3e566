"""Tensors derived from parameters (transposed weights, lookup tables), kept until a parameter changes.

Generation calls the same small step thousands of times with unchanged weights: whatever can be
computed from the weights alone is computed once. A parameter's version counter moves on every
in-place update (an optimizer step, `load_state_dict`) and its storage address on `.to(device)`, so
the pair tells when to rebuild. While autograd needs gradients through them, they are built fresh
each call and never kept, so nothing stale or detached leaks into training.
"""

import torch


class ParameterCache:
    def __init__(self):
        self._key = None
        self._value = None

    def get(self, params, build):
        """build() when any of params changed since the last call (or autograd needs it), else the kept value."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        key = tuple((p.data_ptr(), p._version) for p in params)
        if key != self._key:
            self._key, self._value = key, build()
        return self._value

"""Tensors derived from parameters (weights in another layout, lookup tables), kept until a parameter
changes: one cache for the whole package, one entry per module that derives something.

Generation calls the same small step thousands of times with unchanged weights: whatever can be
computed from the weights alone is computed once. A parameter's version counter moves on every
in-place update (an optimizer step, `load_state_dict`) and its storage address on `.to(device)`, so
the pair tells when to rebuild. While autograd needs gradients through them, they are built fresh
each call and never kept, so nothing stale or detached leaks into training. Entries are weakly keyed
by their module: they die with it.
"""

import weakref

import torch

_kept = weakref.WeakKeyDictionary()  # module -> (the parameters' (address, version)s, derived value)


def derived(module: torch.nn.Module, params, build):
    """build(), kept for module until one of params changes (or built afresh while autograd needs it)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return build()
    key = tuple((p.data_ptr(), p._version) for p in params)
    kept = _kept.get(module)
    if kept is None or kept[0] != key:
        kept = _kept[module] = (key, build())
    return kept[1]

"""Buffers the checkpoint does not hold (rotary `inv_freq`, Gemma's `embed_scale`,
non-persistent state inside layers), computed exactly as the model's own code does.

`to_empty` gives every buffer uninitialized memory. transformers fills such buffers in
its `_init_weights(module)` (the loader calls it for whatever the checkpoint lacks), so
streamq calls the same method on each module that owns a missing buffer. Parameters of
those modules are flagged as initialized for the call (transformers' `init` functions
skip flagged tensors): the checkpoint fills them, and re-initializing a vocabulary-sized
embedding would only cost time. A floating buffer that `_init_weights` leaves untouched
(still the NaN sentinel) is an error naming it, never silently uninitialized memory.
"""

from __future__ import annotations

import torch
from torch import nn

from streamq.errors import CheckpointError


@torch.no_grad()
def init_missing_buffers(model: nn.Module, root: nn.Module, prefix: str, present: set[str] | dict) -> list[str]:
    """Fill the buffers of `root` (already `to_empty`) whose full name (`prefix` + relative)
    is not in `present`, the way `model._init_weights` does. Returns their full names."""
    init_weights = getattr(model, "_init_weights", None)
    done: list[str] = []
    for mod_name, module in root.named_modules():
        missing = [(b, buf) for b, buf in module.named_buffers(recurse=False)
                   if buf is not None and _full(prefix, mod_name, b) not in present]
        if not missing:
            continue
        for _, buf in missing:
            if buf.is_floating_point():
                buf.fill_(float("nan"))
        params = [p for p in module.parameters(recurse=False)]
        flags = [getattr(p, "_is_hf_initialized", None) for p in params]
        for p in params:
            p._is_hf_initialized = True
        try:
            if init_weights is not None:
                init_weights(module)
        finally:
            for p, flag in zip(params, flags, strict=True):
                if flag is None:
                    p.__dict__.pop("_is_hf_initialized", None)
                else:
                    p._is_hf_initialized = flag
        for b, buf in missing:
            full = _full(prefix, mod_name, b)
            if buf.is_floating_point() and buf.numel() and bool(torch.isnan(buf).all()):
                raise CheckpointError(f"buffer '{full}' ({type(module).__name__}) is not in the checkpoint and "
                                      f"{type(model).__name__}._init_weights does not compute it; streamq "
                                      "cannot initialize it as the model's own code does")
            done.append(full)
    return done


def _full(prefix: str, module: str, buffer: str) -> str:
    return prefix + (f"{module}.{buffer}" if module else buffer)

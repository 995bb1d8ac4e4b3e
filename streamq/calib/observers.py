"""Input absmax of every quantized Linear over real (non-padding) tokens.

Statistics stay on the device as float32 tensors and are folded with `maximum`, so
observing costs no host synchronization per batch.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerObserver:
    """Running absmax per module of one layer; `token_mask` marks real tokens of the batch."""

    def __init__(self) -> None:
        self.absmax: dict[str, torch.Tensor] = {}  # module name -> float32 [] (or [E] for experts)
        self.token_mask: torch.Tensor | None = None  # bool [B, T]
        self._handles: list = []

    def flat_mask(self, rows: int) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        mask = self.token_mask.reshape(-1)
        assert mask.numel() == rows, (mask.numel(), rows)
        return mask

    def fold(self, key: str, value: torch.Tensor) -> None:
        value = value.to(torch.float32)
        old = self.absmax.get(key)
        self.absmax[key] = value if old is None else torch.maximum(old, value)

    def row_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """Absmax of each token (row) in float32, zero for padding tokens."""
        rows = x.reshape(-1, x.shape[-1]).abs().amax(dim=-1).to(torch.float32)
        mask = self.flat_mask(rows.numel())
        return rows if mask is None else torch.where(mask, rows, torch.zeros_like(rows))

    def watch_linears(self, layer: nn.Module, names: list[str]) -> None:
        """Hook the inputs of these Linear modules (names relative to `layer`)."""
        for name in names:
            module = layer.get_submodule(name)

            def hook(_mod: nn.Module, args: tuple, _name: str = name) -> None:
                self.fold(_name, self.row_absmax(args[0]).amax())

            self._handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

"""The exact inputs a model gives its decoder layers, captured without running any layer.

Every decoder layer is temporarily replaced by a catcher that records its hidden states
and keyword arguments (rotary `position_embeddings`, the attention mask of its layer
type, position ids) and passes the hidden states through. The model's own forward
builds these, so masks per layer type (sliding window) come out right.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, index: int, sink: dict, stop_at: int):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: no parameters move
        self.index, self.sink, self.stop_at = index, sink, stop_at

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        kwargs.pop("past_key_values", None)
        self.sink.setdefault("kwargs", []).append(kwargs)
        if self.index == self.stop_at:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture(model: nn.Module, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Run the model's stem; return (hidden states entering layer 0, kwargs of each layer)."""
    layers = model.model.layers
    sink: dict = {}
    model.model.layers = nn.ModuleList(_Catcher(layer, i, sink, len(layers) - 1) for i, layer in enumerate(layers))
    try:
        model.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    use_cache=False)
    except _StopForward:
        pass
    finally:
        model.model.layers = layers
    return sink["hidden"], sink["kwargs"]


@torch.no_grad()
def capture_batches(model: nn.Module, batches: list, cache, device: torch.device, ids: list[int] | None = None
                    ) -> None:
    """Hidden states entering layer 0 for the calibration batches `ids` (default: all),
    into `cache` (batch index -> tensor)."""
    for b in range(len(batches)) if ids is None else ids:
        batch = batches[b]
        hidden, _ = capture(model, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
        cache.put(b, hidden)


class LayerKwargs:
    """Per-batch layer kwargs, rebuilt on demand from shapes alone (no embedding needed).

    Masks and rotary tables depend only on positions and the padding mask, so they are
    recomputed from a zero `inputs_embeds` instead of being cached for every batch.
    """

    def __init__(self, model: nn.Module, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model, self.hidden_size, self.dtype, self.device = model, hidden_size, dtype, device
        self._key: tuple | None = None
        self._value: list[dict] = []

    def for_batch(self, batch_id: int, attention_mask: torch.Tensor) -> list[dict]:
        """Kwargs of every layer for this batch. Batches without padding share one set, so
        pass the host mask: checking it costs no device synchronization."""
        full = attention_mask.device.type == "cpu" and bool(attention_mask.all())
        key = ("full" if full else batch_id, tuple(attention_mask.shape))
        if key != self._key:
            b, t = attention_mask.shape
            embeds = torch.zeros(b, t, self.hidden_size, dtype=self.dtype, device=self.device)
            _, self._value = capture(self.model, inputs_embeds=embeds, attention_mask=attention_mask.to(self.device))
            self._key = key
        return self._value

"""How many scales a tensor gets: one per tensor, per output channel, or per token.

A granularity is a small value object, so code asks `isinstance(g, PerChannel)` instead
of comparing strings; the YAML spellings live in one table (`parse_granularity`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    yaml_name = "per-tensor"
    ct_strategy = "tensor"  # compressed-tensors' name


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of a Linear weight)."""

    yaml_name = "per-channel"
    ct_strategy = "channel"


@dataclass(frozen=True)
class PerToken:
    """One scale per token, computed at inference time (activations only)."""

    yaml_name = "per-token"
    ct_strategy = "token"


Granularity = PerTensor | PerChannel | PerToken

WEIGHT_GRANULARITIES: dict[str, Granularity] = {g.yaml_name: g() for g in (PerTensor, PerChannel)}
ACTIVATION_GRANULARITIES: dict[str, Granularity] = {g.yaml_name: g() for g in (PerTensor, PerToken)}

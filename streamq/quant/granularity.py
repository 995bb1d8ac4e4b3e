"""How many scales a tensor gets: one per tensor, per output channel, per group of input
columns, per 2D block, or per token.

A granularity is a small value object, so code asks `isinstance(g, PerChannel)` instead
of comparing strings; the YAML spellings live in one table (`WEIGHT_GRANULARITIES`,
`ACTIVATION_GRANULARITIES`). `ct_strategy` is compressed-tensors' name for the same idea.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    yaml_name = "per-tensor"
    ct_strategy = "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of a Linear weight)."""

    yaml_name = "per-channel"
    ct_strategy = "channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per output row and group of `size` consecutive input columns."""

    size: int = 128
    yaml_name = "per-group"
    ct_strategy = "group"


@dataclass(frozen=True)
class PerBlock:
    """One scale per `rows` x `cols` tile of the weight (edge tiles are partial)."""

    rows: int = 128
    cols: int = 128
    yaml_name = "per-block"
    ct_strategy = "block"


@dataclass(frozen=True)
class PerToken:
    """One scale per token, computed at inference time (activations only)."""

    yaml_name = "per-token"
    ct_strategy = "token"


Granularity = PerTensor | PerChannel | PerGroup | PerBlock | PerToken

WEIGHT_GRANULARITIES: dict[str, Granularity] = {g.yaml_name: g() for g in (PerTensor, PerChannel)}
ACTIVATION_GRANULARITIES: dict[str, Granularity] = {g.yaml_name: g() for g in (PerTensor, PerToken)}


def scale_shape(granularity: Granularity, out_features: int, in_features: int) -> tuple[int, ...]:
    """Shape of a weight's scale tensor (in the scheme's natural layout; formats may reshape)."""
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        return (out_features, 1)
    if isinstance(granularity, PerGroup):
        return (out_features, -(-in_features // granularity.size))
    if isinstance(granularity, PerBlock):
        return (-(-out_features // granularity.rows), -(-in_features // granularity.cols))
    raise ValueError(f"a weight has no {granularity} scales")

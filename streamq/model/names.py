"""Names on disk -> parameters in memory, from transformers' own conversion mapping.

transformers v5 renames and fuses checkpoint tensors on load (`conversion_mapping`,
`core_model_loading`): Mixtral's `block_sparse_moe.experts.<e>.w1/w3` become rows of
`mlp.experts.gate_up_proj`, Qwen-MoE's `mlp.experts.<e>.{gate,up}_proj` the same. streamq
reads and writes the names on disk, but calibrates the module tree in memory, so it needs
that mapping per tensor. It takes it from transformers' own transforms for the model (the
same objects its loader applies: every renaming, then at most one converter), and
understands the converters that stack experts (`MergeModulelist(dim=0)`, optionally then
`Concatenate(dim=1)`: expert e, source k is block k of row e). Anything else is reported
as a layout streamq cannot map, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Converter target leaf -> the role of each of its sources, in order.
_ROLES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_STACKING_OPS = (("MergeModulelist",), ("MergeModulelist", "Concatenate"))


@dataclass(frozen=True)
class MemoryName:
    name: str  # the parameter in memory (full name), e.g. model.layers.0.mlp.experts.gate_up_proj
    expert: int | None = None  # index along the stacked expert dimension
    role: str | None = None  # gate_proj | up_proj | down_proj: which block of that expert's rows
    problem: str | None = None  # a conversion streamq cannot map (the message says which)


def _transforms(model: nn.Module) -> list:
    try:  # transformers >= 5: the transforms its loader applies to this model
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    try:
        return list(get_model_conversion_mapping(model, add_legacy=False) or [])
    except TypeError:  # older signature
        return list(get_model_conversion_mapping(model) or [])


class NameMap:
    """Disk tensor name -> `MemoryName`, the loader's renamings then at most one converter."""

    def __init__(self, model: nn.Module | None):
        transforms = _transforms(model) if model is not None else []
        self.renamings = [t for t in transforms if not hasattr(t, "operations")]
        self.converters = [t for t in transforms if hasattr(t, "operations")]
        # transformers without a conversion mapping for a fused-experts model: the per-expert
        # layout every Qwen/DeepSeek-style checkpoint uses (what transformers 5.x maps itself).
        self.classic = model is not None and not transforms and any(
            isinstance(getattr(m, "gate_up_proj", None), nn.Parameter) for m in model.modules())

    def to_memory(self, disk: str) -> MemoryName:
        key = disk
        for renaming in self.renamings:
            key, _ = _rename(renaming, key)
        for conv in self.converters:
            target, pattern = _rename(conv, key)
            if pattern is None:
                continue
            return self._converted(disk, key, target, pattern, conv)
        m = _CLASSIC.match(key) if self.classic else None
        if m:
            target = "gate_up_proj" if m.group("role") != "down_proj" else "down_proj"
            return MemoryName(f"{m.group('parent')}.{target}", int(m.group("idx")), m.group("role"))
        return MemoryName(key)

    @staticmethod
    def _converted(disk: str, key: str, target: str, pattern: str, conv) -> MemoryName:
        ops = tuple(type(op).__name__ for op in conv.operations)
        dims = tuple(getattr(op, "dim", None) for op in conv.operations)
        roles = _ROLES.get(target.rpartition(".")[2])
        sources = list(conv.source_patterns)
        body = re.escape(pattern).replace(r"\*", r"(\d+)")
        m = re.search(body, key)
        if ops not in _STACKING_OPS or dims[:2] != (0, 1)[:len(dims)] or roles is None \
                or len(roles) != len(sources) or m is None or not m.groups():
            return MemoryName(target, problem=f"tensor '{disk}' is converted on load into '{target}' by "
                                              f"{'+'.join(ops)}, a layout streamq cannot map to experts")
        return MemoryName(target, expert=int(m.group(1)), role=roles[sources.index(pattern)])


_CLASSIC = re.compile(r"^(?P<parent>.+\.experts)\.(?P<idx>\d+)\.(?P<role>gate_proj|up_proj|down_proj)\.weight$")


def _rename(transform, key: str) -> tuple[str, str | None]:
    """transformers' own `rename_source_key` where it has one; else its patterns applied the
    same way (a source pattern with `*` for the expert index, replaced by the first target)."""
    method = getattr(transform, "rename_source_key", None)
    if method is not None:
        return method(key)
    targets = list(getattr(transform, "target_patterns", []) or [])
    for pattern in getattr(transform, "source_patterns", []) or []:
        regex = pattern if "*" not in pattern else re.escape(pattern).replace(r"\*", r"\d+")
        m = re.search(regex, key)
        if m and targets:
            return key[:m.start()] + re.sub(regex, targets[0], m.group(0)) + key[m.end():], pattern
    return key, None

"""Which tensors of a decoder layer are quantized Linear weights, and which are copied.

Decided from the meta skeleton (module types) and the names on disk. transformers v5
fuses MoE experts in memory (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj
[E, H, I]`) while checkpoints store `experts.<e>.{gate,up,down}_proj.weight`; the
layout maps between the two so the output keeps the on-disk (unfused) names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from streamq.errors import CheckpointError
from streamq.model.ignore import IgnoreMatcher

# Linears that route tokens; vLLM keeps them in high precision.
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")
EXPERT_RE = re.compile(r"^(?P<parent>.+)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def natural_key(name: str) -> list:
    """Sort 'experts.2' before 'experts.10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class ExpertRef:
    parent: str  # relative name of the fused experts module, e.g. "mlp.experts"
    index: int
    proj: str  # gate_proj | up_proj | down_proj


@dataclass
class LayerLayout:
    index: int
    prefix: str  # "model.layers.3."
    quantized: dict[str, str] = field(default_factory=dict)  # module (full name) -> weight tensor name
    experts: dict[str, ExpertRef] = field(default_factory=dict)  # module (full name) -> fused location
    copied: list[str] = field(default_factory=list)  # tensor names written bit for bit
    ignored: list[str] = field(default_factory=list)  # Linear modules left unquantized on purpose

    def rel(self, module: str) -> str:
        return module[len(self.prefix):]


def fused_expert_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Modules holding all experts as 3D parameters (transformers v5 in-memory layout)."""
    return {n: m for n, m in layer.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)
            and isinstance(getattr(m, "down_proj", None), nn.Parameter)}


def plan_layer(layer: nn.Module, index: int, layer_prefix: str, tensor_names: list[str],
               ignore: IgnoreMatcher) -> LayerLayout:
    prefix = f"{layer_prefix}.{index}."
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    fused = fused_expert_modules(layer)
    out = LayerLayout(index=index, prefix=prefix)
    seen_linears = set()
    for name in sorted(tensor_names, key=natural_key):
        rel = name[len(prefix):]
        module, _, leaf = rel.rpartition(".")
        expert = EXPERT_RE.match(module) if leaf == "weight" else None
        is_linear = leaf == "weight" and module in linears
        is_expert = expert is not None and expert.group("parent") in fused
        if not (is_linear or is_expert) or module.rpartition(".")[2] in ROUTER_LEAVES:
            out.copied.append(name)
            continue
        full = prefix + module
        seen_linears.add(module)
        if ignore.matches(full):
            out.ignored.append(full)
            out.copied.append(name)
            continue
        out.quantized[full] = name
        if is_expert:
            out.experts[full] = ExpertRef(expert.group("parent"), int(expert.group("idx")), expert.group("proj"))
    missing = sorted(linears - seen_linears - {m for m in linears if m.rpartition(".")[2] in ROUTER_LEAVES})
    if missing:
        raise CheckpointError(f"layer {index}: Linear '{prefix}{missing[0]}' has no weight tensor in the "
                              "checkpoint; the checkpoint does not match its config.json")
    for parent, module in fused.items():
        n = getattr(module, "num_experts", module.gate_up_proj.shape[0])
        found = {ref.index for ref in out.experts.values() if ref.parent == parent}
        found |= {int(EXPERT_RE.match(m.rpartition(".")[0][len(prefix):]).group("idx"))
                  for m in out.copied if EXPERT_RE.match(m.rpartition(".")[0][len(prefix):] or "")}
        if len(found) != n:
            raise CheckpointError(f"layer {index}: expected {n} experts under '{prefix}{parent}', found "
                                  f"{len(found)} on disk (unfused per-expert tensors are required)")
    return out

"""Which tensors of a decoder layer are quantized Linear weights, and which are copied.

Decided from the meta skeleton (module types) and the names on disk. transformers v5
renames and fuses on load (Mixtral's `block_sparse_moe.experts.<e>.w1` is a block of
`mlp.experts.gate_up_proj [E, 2I, H]` in memory); `streamq.model.names` maps each disk
tensor to its parameter in memory with transformers' own conversion mapping, so the
layer runs with the model's code while the output keeps the on-disk names.

Routers are recognized by what they are, not by name: inside an MoE block (the parent of
an experts module), a weight that maps the block's input to one logit per expert (or to
one gate value, like Qwen2-MoE's `shared_expert_gate`) and is not part of an MLP. They
stay in high precision and are listed in the format's ignore list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from streamq.errors import CheckpointError, ConfigError
from streamq.model.fused import fused_group_key
from streamq.model.ignore import IgnoreMatcher
from streamq.model.names import NameMap

EXPERT_ROLES = ("gate_proj", "up_proj", "down_proj")


def natural_key(name: str) -> list:
    """Sort 'experts.2' before 'experts.10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class ExpertRef:
    parent: str  # relative name of the fused experts module, e.g. "mlp.experts"
    index: int
    proj: str  # gate_proj | up_proj | down_proj (the role, whatever the name on disk)

    @property
    def kind(self) -> str:
        """The fused weight the Linear lives in, which names its input's statistics:
        "gate_up" (gate and up read the hidden states) or "down" (reads act(gate) * up)."""
        return "down" if self.proj == "down_proj" else "gate_up"


def experts_per_parent(refs) -> dict[str, int]:
    """Experts of each fused experts module (`ExpertRef.parent` -> count), from the highest
    index among `refs`: the layout's refs, so a process holding a share of the experts' Linears
    still counts them all."""
    nums: dict[str, int] = {}
    for ref in refs:
        nums[ref.parent] = max(nums.get(ref.parent, 0), ref.index + 1)
    return nums


@dataclass
class LayerLayout:
    index: int
    prefix: str  # "model.layers.3."
    quantized: dict[str, str] = field(default_factory=dict)  # module (full disk name) -> weight tensor name
    experts: dict[str, ExpertRef] = field(default_factory=dict)  # module (full disk name) -> fused location
    copied: list[str] = field(default_factory=list)  # tensor names written bit for bit
    ignored: list[str] = field(default_factory=list)  # modules (disk names) left unquantized on purpose
    memory: dict[str, str] = field(default_factory=dict)  # disk module -> module in memory (relative), if renamed
    sources: dict[str, str] = field(default_factory=dict)  # parameter/buffer in memory (relative) -> disk tensor
    expert_sources: dict[tuple[str, int, str], str] = field(default_factory=dict)  # (parent, e, role) -> disk

    def rel(self, module: str) -> str:
        """The module in memory (relative to the layer) that a disk module name lives in."""
        return self.memory.get(module, module[len(self.prefix):])


def fused_expert_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Modules holding all experts as 3D parameters (transformers v5 in-memory layout)."""
    return {n: m for n, m in layer.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), nn.Parameter)
            and isinstance(getattr(m, "down_proj", None), nn.Parameter)}


def _expert_containers(layer: nn.Module) -> dict[str, int]:
    """Experts modules and their expert counts: fused 3D ones, and ModuleLists of MLPs."""
    out = {n: m.gate_up_proj.shape[0] for n, m in fused_expert_modules(layer).items()}
    for n, m in layer.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and all(
                sum(isinstance(c, nn.Linear) for c in e.modules()) >= 2 for e in m):
            out[n] = len(m)
    return out


def routing_modules(layer: nn.Module) -> set[str]:
    """Modules (relative names) that route tokens in an MoE block: a 2D weight with one row per
    expert (or a single gate row) that is neither inside the experts nor inside an MLP."""
    modules = dict(layer.named_modules())
    linear_count = {n: sum(isinstance(c, nn.Linear) for c in m.modules()) for n, m in modules.items()}
    out = set()
    for parent, num_experts in _expert_containers(layer).items():
        block = parent.rpartition(".")[0]
        start = f"{block}." if block else ""
        for name, module in modules.items():
            if not name.startswith(start) or name == parent or name.startswith(parent + "."):
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.ndim != 2 or weight.shape[0] not in (num_experts, 1):
                continue
            parts = name[len(start):].split(".")
            ancestors = [start + ".".join(parts[:i]) for i in range(1, len(parts))]
            if not any(linear_count.get(a, 0) >= 2 for a in ancestors):
                out.add(name)
    return out


def _check_ignored_alike(loaded_as_one: dict[str, tuple[list[str], list[str]]], experts: set[str],
                         ignore: IgnoreMatcher) -> None:
    """Refuse an `ignore_layers` that leaves part of what vLLM loads as one module unquantized:
    vLLM fuses q/k/v and gate/up into one Linear, and a layer's experts into one module (the
    keys in `experts`), each with one quantization scheme. It refuses a fused Linear whose
    shards differ ("Detected some but not all shards of ... are quantized") and takes an
    experts module that any ignore entry names as unquantized whole, so the quantized experts
    would not load. Raises ConfigError naming the entry and one member of each kind."""
    for key, (quantized, ignored) in loaded_as_one.items():
        if not quantized or not ignored:
            continue
        entry = next((p for p in ignore.patterns if IgnoreMatcher((p,)).matches(ignored[0])), "?")
        if key in experts:
            # On disk "<parent>.<expert>.<proj>": a parent name covers its children.
            parent = ignored[0].rsplit(".", 2)[0]
            what = (f"the experts of '{parent}', which vLLM loads as one fused module; ignore all of them "
                    f"('{parent}') or none")
        else:
            parent, _, group = key.rpartition(".")
            what = f"'{parent}.{group.replace('+', '/')}', which vLLM loads as one fused Linear; ignore all or none"
        raise ConfigError(f"compression.quantization.ignore_layers entry '{entry}' leaves '{ignored[0]}' unquantized "
                          f"but not '{quantized[0]}' ({len(ignored)} of {len(quantized) + len(ignored)} members "
                          f"ignored): both are part of {what}")


def plan_layer(layer: nn.Module, index: int, layer_prefix: str, tensor_names: list[str],
               ignore: IgnoreMatcher, names: NameMap | None = None) -> LayerLayout:
    """Classify every disk tensor of one layer. `names` maps disk names to memory (transformers'
    conversion mapping for the model; identity when None)."""
    names = names or NameMap(None)
    prefix = f"{layer_prefix}.{index}."
    linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    fused = fused_expert_modules(layer)
    routers = routing_modules(layer)
    out = LayerLayout(index=index, prefix=prefix)
    seen_linears = set()
    # What vLLM loads as one Linear (q/k/v, gate/up) or one fused experts module: key ->
    # (quantized, ignored) members, which `ignore_layers` must treat alike.
    loaded_as_one: dict[str, tuple[list[str], list[str]]] = {}
    for name in sorted(tensor_names, key=natural_key):
        mem = names.to_memory(name)
        if mem.problem:
            raise CheckpointError(f"layer {index}: {mem.problem}")
        if not mem.name.startswith(prefix):
            raise CheckpointError(f"layer {index}: tensor '{name}' is loaded into '{mem.name}', outside its layer")
        rel = mem.name[len(prefix):]
        module, _, leaf = rel.rpartition(".")
        disk_module = name.rpartition(".")[0]
        if mem.expert is not None:
            if module not in fused:
                raise CheckpointError(f"layer {index}: tensor '{name}' is loaded into '{mem.name}', which is not "
                                      "a fused experts module streamq knows")
            out.expert_sources[(module, mem.expert, mem.role)] = name
        elif module in fused:
            raise CheckpointError(
                f"layer {index}: the experts of '{prefix}{module}' are stored fused on disk as '{name}' "
                f"(one {len(_shape_hint(layer, rel))}D tensor for all experts); streamq quantizes experts stored "
                "one tensor per expert (experts.<e>.<proj>.weight) only, and does not write fused FP8 experts yet")
        else:
            out.sources[rel] = name
        is_linear = mem.expert is not None or (leaf == "weight" and module in linears)
        if module in routers and leaf == "weight":
            out.ignored.append(disk_module)
        if not is_linear or module in routers:
            out.copied.append(name)
            continue
        seen_linears.add(module)
        key = prefix + module if mem.expert is not None else fused_group_key(disk_module)
        if ignore.matches(disk_module) or ignore.matches(prefix + module):
            loaded_as_one.setdefault(key, ([], []))[1].append(disk_module)
            out.ignored.append(disk_module)
            out.copied.append(name)
            continue
        loaded_as_one.setdefault(key, ([], []))[0].append(disk_module)
        out.quantized[disk_module] = name
        if mem.expert is not None:
            out.experts[disk_module] = ExpertRef(module, mem.expert, mem.role)
        elif module != disk_module[len(prefix):]:
            out.memory[disk_module] = module
    _check_ignored_alike(loaded_as_one, {prefix + parent for parent in fused}, ignore)
    missing = sorted(linears - seen_linears - routers)
    if missing:
        raise CheckpointError(f"layer {index}: Linear '{prefix}{missing[0]}' has no weight tensor in the "
                              "checkpoint; the checkpoint does not match its config.json")
    for parent, module in fused.items():
        n = getattr(module, "num_experts", module.gate_up_proj.shape[0])
        found = {(e, role) for (p, e, role) in out.expert_sources if p == parent}
        lost = sorted({e for e in range(n) for role in EXPERT_ROLES if (e, role) not in found})
        if lost:
            raise CheckpointError(f"layer {index}: expected {n} experts under '{prefix}{parent}' with gate, up and "
                                  f"down projections each; {len(lost)} incomplete or missing on disk "
                                  f"(first: {lost[0]})")
    return out


def _shape_hint(layer: nn.Module, rel: str) -> tuple:
    try:
        return tuple(layer.get_parameter(rel).shape)
    except AttributeError:
        return (0, 0, 0)

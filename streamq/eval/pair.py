"""The two checkpoints of an eval: same model or a clear error, and how the second is quantized.

The quantized checkpoint must be the original with some Linear weights replaced by FP8
weights plus scales: same config (apart from `quantization_config` and dtype fields), same
layers, same tensor names once `weight_scale` / `input_scale` are set aside, same shapes.
Its quantized modules are then swapped into a meta skeleton as `FP8Linear` / `FP8Experts`
built from the on-disk shapes, so materializing a layer reads the FP8 tensors as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamq.checkpoint.reader import TORCH_DTYPES, CheckpointReader, TensorInfo
from streamq.errors import CheckpointError
from streamq.eval.fp8_linear import (
    DYNAMIC_TENSOR,
    DYNAMIC_TOKEN,
    STATIC,
    WEIGHT_ONLY,
    Expert,
    FP8Experts,
    FP8Linear,
)
from streamq.model.layout import fused_expert_modules
from streamq.model.moe import check_supported

SCALE_SUFFIXES = (".weight_scale", ".input_scale")
# config.json keys that may differ between a model and its quantized copy.
NON_ARCH_KEYS = {"quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache"}


@dataclass(frozen=True)
class QuantFormat:
    name: str  # "none" | "fp8" (vLLM) | "compressed-tensors"
    mode: str  # activation quantization, one of fp8_linear.ACT_MODES

    def describe(self) -> str:
        return "unquantized" if self.name == "none" else f"{self.name}, activations {self.mode}"


def read_format(config: dict, where: Path) -> QuantFormat:
    """The activation scheme a checkpoint's `quantization_config` declares."""
    qc = config.get("quantization_config")
    if not qc:
        return QuantFormat("none", WEIGHT_ONLY)
    method = qc.get("quant_method")
    if method == "fp8":
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("static", "dynamic"):
            raise CheckpointError(f"{where}: quantization_config.activation_scheme '{scheme}' is not static/dynamic")
        return QuantFormat("fp8", STATIC if scheme == "static" else DYNAMIC_TENSOR)
    if method == "compressed-tensors":
        return QuantFormat("compressed-tensors", _compressed_tensors_mode(qc, where))
    raise CheckpointError(f"{where}: quantization_config.quant_method '{method}' is not supported by eval "
                          "(supported: fp8, compressed-tensors)")


def _compressed_tensors_mode(qc: dict, where: Path) -> str:
    if qc.get("format") not in ("float-quantized", "naive-quantized", None):
        raise CheckpointError(f"{where}: compressed-tensors format '{qc.get('format')}' is not supported by eval "
                              "(supported: float-quantized)")
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    for g in groups:
        w = g.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise CheckpointError(f"{where}: only FP8 (type float, num_bits 8) weights are supported, got {w}")
    acts = [g.get("input_activations") for g in groups]
    if any(a != acts[0] for a in acts):
        raise CheckpointError(f"{where}: config_groups quantize activations differently; eval supports one scheme")
    a = acts[0]
    if a is None:
        return WEIGHT_ONLY
    strategy, dynamic = a.get("strategy"), a.get("dynamic")
    if a.get("type") != "float" or a.get("num_bits") != 8 or strategy not in ("tensor", "token"):
        raise CheckpointError(f"{where}: input_activations {a} is not FP8 per-tensor or per-token")
    if not dynamic:
        if strategy != "tensor":
            raise CheckpointError(f"{where}: static input_activations must be per-tensor, got '{strategy}'")
        return STATIC
    return DYNAMIC_TOKEN if strategy == "token" else DYNAMIC_TENSOR


@dataclass
class CheckpointPair:
    original: CheckpointReader
    quantized: CheckpointReader
    config: dict  # the original's config.json
    fmt: QuantFormat
    quantized_modules: set[str]  # full module names with an FP8 weight in the quantized checkpoint

    @property
    def num_layers(self) -> int:
        return self.original.num_layers


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None


def open_pair(original: str | Path, quantized: str | Path) -> CheckpointPair:
    """Read both indexes and configs; raise CheckpointError naming the first mismatch."""
    orig, quant = CheckpointReader(original), CheckpointReader(quantized)
    oc, qc = _load_json(orig.path / "config.json"), _load_json(quant.path / "config.json")
    if oc.get("quantization_config"):
        method = oc["quantization_config"].get("quant_method")
        raise CheckpointError(f"{orig.path}: --original is itself quantized ({method}); pass the unquantized source")
    diff = sorted(k for k in (set(oc) | set(qc)) - NON_ARCH_KEYS if oc.get(k) != qc.get(k))
    if diff:
        k = diff[0]
        raise CheckpointError(f"the checkpoints are different models: config.json '{k}' is {oc.get(k)!r} in "
                              f"{orig.path} and {qc.get(k)!r} in {quant.path} ({len(diff)} keys differ: "
                              f"{', '.join(diff[:8])})")
    if sorted(orig.layers) != sorted(quant.layers):
        raise CheckpointError(f"the checkpoints have different decoder layers: {orig.num_layers} in {orig.path}, "
                              f"{quant.num_layers} in {quant.path}")
    fmt = read_format(qc, quant.path)
    modules = _check_tensors(orig, quant)
    if modules and fmt.name == "none":
        raise CheckpointError(f"{quant.path}: has FP8 weights (e.g. '{sorted(modules)[0]}.weight') but config.json "
                              "has no quantization_config")
    if fmt.mode == STATIC:
        missing = sorted(m for m in modules if f"{m}.input_scale" not in quant.tensors)
        if missing:
            raise CheckpointError(f"{quant.path}: static activation scheme but '{missing[0]}.input_scale' is missing "
                                  f"({len(missing)} modules without one)")
    return CheckpointPair(orig, quant, oc, fmt, modules)


def _check_tensors(orig: CheckpointReader, quant: CheckpointReader) -> set[str]:
    """Same names (scales aside) and shapes; returns the modules whose weight is FP8."""
    base = {n for n in quant.tensors if not n.endswith(SCALE_SUFFIXES)}
    extra, missing = sorted(base - set(orig.tensors)), sorted(set(orig.tensors) - base)
    if extra or missing:
        what = (f"'{extra[0]}' is in {quant.path} but not in {orig.path}" if extra
                else f"'{missing[0]}' is in {orig.path} but not in {quant.path}")
        raise CheckpointError(f"the checkpoints have different tensors: {what} "
                              f"({len(extra)} extra, {len(missing)} missing)")
    modules = set()
    for name in sorted(base):
        o, q = orig.tensors[name], quant.tensors[name]
        if o.shape != q.shape:
            raise CheckpointError(f"tensor '{name}' has shape {o.shape} in {orig.path} and {q.shape} in {quant.path}")
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if q.dtype == "F8_E4M3":
            if module is None or f"{module}.weight_scale" not in quant.tensors:
                raise CheckpointError(f"{quant.path}: FP8 tensor '{name}' has no '{module}.weight_scale'")
            modules.add(module)
    orphans = sorted(n for n in quant.tensors if n.endswith(SCALE_SUFFIXES)
                     and n.rsplit(".", 1)[0] not in modules)
    if orphans:
        raise CheckpointError(f"{quant.path}: scale '{orphans[0]}' belongs to no FP8 weight")
    return modules


# ------------------------------------------------------------------ skeleton surgery


def _fp8_linear(quant: CheckpointReader, module: str, mode: str) -> FP8Linear:
    w: TensorInfo = quant.tensors[f"{module}.weight"]
    scale = quant.tensors[f"{module}.weight_scale"].shape
    inp = quant.tensors.get(f"{module}.input_scale")
    bias = quant.tensors.get(f"{module}.bias")
    return FP8Linear(w.shape[1], w.shape[0], scale, mode, inp.shape if inp is not None else None,
                     TORCH_DTYPES[bias.dtype] if bias is not None else None)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_in_fp8(root: nn.Module, prefix: str, pair: CheckpointPair) -> int:
    """Replace the quantized Linears / fused experts under meta module `root` (checkpoint
    prefix `prefix`, e.g. "model.layers.3.") by FP8 modules; returns how many were swapped."""
    mode, quant, modules = pair.fmt.mode, pair.quantized, pair.quantized_modules
    swapped = 0
    with torch.device("meta"):
        for rel, experts in fused_expert_modules(root).items():
            projs = [f"{prefix}{rel}.{e}.{p}" for e in range(experts.gate_up_proj.shape[0])
                     for p in ("gate_proj", "up_proj", "down_proj")]
            hit = [p in modules for p in projs]
            if not any(hit):
                continue
            if not all(hit):
                raise CheckpointError(f"'{prefix}{rel}': some experts are FP8 and some are not; eval needs all or none")
            check_supported(experts, prefix + rel)
            built = [Expert(*(_fp8_linear(quant, projs[3 * e + i], mode) for i in range(3)))
                     for e in range(len(projs) // 3)]
            _set_submodule(root, rel, FP8Experts(built, experts.act_fn, mode))
            swapped += len(projs)
        for rel, linear in list(root.named_modules()):
            if isinstance(linear, nn.Linear) and f"{prefix}{rel}" in modules:
                _set_submodule(root, rel, _fp8_linear(quant, f"{prefix}{rel}", mode))
                swapped += 1
    return swapped

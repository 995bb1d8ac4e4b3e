"""The two checkpoints of an eval: same model or a clear error, and how the second is quantized.

The quantized checkpoint's `quantization_config` is read by the format registry
(`streamq.formats.parse_quantization_config`: format, QuantSpec, ignore list), the one parser
streamq has. The checkpoint must then be the original with some Linear weights replaced by
the tensors that format writes for that spec (`Format.specs`: names, dtypes, shapes): same
config (apart from `quantization_config` and dtype fields), same layers, every other tensor
under the same name with the same shape. A module is quantized where the format's scale
tensor (`Format.marker`) is present.

Its quantized modules are then swapped into a meta skeleton as the Linear that computes what
a server computes for that spec (`fp8_linear.FP8Linear`, `quant_linear.Int8Linear`,
`BlockFP8Linear`, `W4A16Linear`, `GPTQLinear`, `AWQLinear`; fused MoE experts as `FP8Experts` holding
per-expert ones), built from the on-disk names and shapes, so materializing a layer reads the
quantized tensors as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamq.checkpoint.reader import TORCH_DTYPES, CheckpointReader, TensorInfo
from streamq.errors import CheckpointError
from streamq.eval.fp8_linear import DYNAMIC_TOKEN, STATIC, WEIGHT_ONLY, Expert, FP8Experts, FP8Linear
from streamq.eval.quant_linear import (
    AWQLinear,
    BlockFP8Linear,
    GPTQLinear,
    Int8Linear,
    LinearKind,
    W4A16Linear,
    linear_kind,
)
from streamq.formats.base import INPUT_SCALE, SCALE, SHAPE, WEIGHT, ZERO_POINT, Format, QuantSpec, TensorSpec
from streamq.model.layout import fused_expert_modules
from streamq.model.moe import check_supported

# config.json keys that may differ between a model and its quantized copy.
NON_ARCH_KEYS = {"quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache"}
# safetensors dtypes only a quantized tensor has.
QUANT_DTYPES = {"F8_E4M3", "F8_E5M2", "I8", "U8", "I32"}
# Tensor suffixes the quantized formats write (to name them when config.json says nothing).
QUANT_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".weight_packed", ".weight_zero_point",
                  ".weight_shape")
FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantFormat:
    """How the quantized checkpoint is quantized: its format, spec and what eval computes for it."""

    name: str  # "none" or the format's save_name ("fp8", "compressed-tensors", ...)
    kind: LinearKind | None = None
    fmt: Format | None = None
    spec: QuantSpec | None = None
    ignored: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """How inputs are quantized (one of `quant_linear.ALL_MODES`)."""
        return self.kind.mode if self.kind is not None else WEIGHT_ONLY

    def describe(self) -> str:
        return "unquantized" if self.kind is None else f"{self.name}, {self.kind.describe()}"

    def tensor_specs(self, out_features: int, in_features: int) -> list[TensorSpec]:
        assert self.fmt is not None and self.spec is not None
        return self.fmt.specs(self.spec, out_features, in_features)

    @property
    def marker(self) -> str:
        """The suffix whose presence makes a module quantized."""
        assert self.fmt is not None and self.spec is not None
        return self.fmt.marker(self.spec)


def read_format(config: dict, where: Path) -> QuantFormat:
    """The format, spec and eval computation a checkpoint's `quantization_config` declares."""
    qc = config.get("quantization_config")
    if not qc:
        return QuantFormat("none")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: config.json quantization_config must be a mapping, got {type(qc).__name__}")
    from streamq.formats import parse_quantization_config

    try:
        fmt, spec, ignored = parse_quantization_config(qc)
    except ValueError as e:
        raise CheckpointError(f"{where / 'config.json'}: {e}") from None
    try:
        kind = linear_kind(spec)
    except ValueError as e:
        raise CheckpointError(f"{where}: eval cannot run this checkpoint's quantization ({fmt.save_name}): {e}") \
            from None
    return QuantFormat(fmt.save_name, kind, fmt, spec, tuple(ignored))


@dataclass
class CheckpointPair:
    original: CheckpointReader
    quantized: CheckpointReader
    config: dict  # the original's config.json
    fmt: QuantFormat
    quantized_modules: set[str]  # full module names stored quantized in the quantized checkpoint
    # role -> tensor suffix of a quantized module, from the format's specs
    suffixes: dict[str, str] = field(default_factory=dict)

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
    if fmt.kind is None:
        _check_unquantized(orig, quant)
        return CheckpointPair(orig, quant, oc, fmt, set())
    modules, suffixes = _check_tensors(orig, quant, fmt)
    return CheckpointPair(orig, quant, oc, fmt, modules, suffixes)


def _check_names(orig: CheckpointReader, quant: CheckpointReader, base: set[str]) -> None:
    extra, missing = sorted(base - set(orig.tensors)), sorted(set(orig.tensors) - base)
    if extra or missing:
        what = (f"'{extra[0]}' is in {quant.path} but not in {orig.path}" if extra
                else f"'{missing[0]}' is in {orig.path} but not in {quant.path}")
        raise CheckpointError(f"the checkpoints have different tensors: {what} "
                              f"({len(extra)} extra, {len(missing)} missing)")


def _check_unquantized(orig: CheckpointReader, quant: CheckpointReader) -> None:
    """No quantization_config: every tensor under the same name, shape and kind of dtype."""
    for name in sorted(quant.tensors):
        q, o = quant.tensors[name], orig.tensors.get(name)
        scale_like = name.endswith(QUANT_SUFFIXES) and o is None
        quant_dtype = q.dtype in QUANT_DTYPES and (o is None or o.dtype not in QUANT_DTYPES)
        if scale_like or quant_dtype:
            raise CheckpointError(f"{quant.path}: has quantized tensors (e.g. '{name}', {q.dtype}) but config.json "
                                  "has no quantization_config")
    _check_names(orig, quant, set(quant.tensors))
    for name in sorted(quant.tensors):
        o, q = orig.tensors[name], quant.tensors[name]
        if o.shape != q.shape:
            raise CheckpointError(f"tensor '{name}' has shape {o.shape} in {orig.path} and {q.shape} in {quant.path}")


def _fits(info: TensorInfo, t: TensorSpec) -> str | None:
    """None if the stored tensor is what the format's spec says, else what differs."""
    shape = tuple(info.shape)
    if shape != tuple(t.shape) and not (math.prod(shape) == 1 and math.prod(t.shape) == 1):
        return f"has shape {list(shape)}, expected {list(t.shape)}"
    if t.role in (SCALE, INPUT_SCALE):
        # Scales: float32 for the 8-bit formats, the model dtype for int4 ones.
        if info.dtype not in FLOAT_DTYPES:
            return f"is {info.dtype}, expected a float dtype"
    elif info.dtype != t.dtype:
        return f"is {info.dtype}, expected {t.dtype}"
    return None


def _check_tensors(orig: CheckpointReader, quant: CheckpointReader, qf: QuantFormat
                   ) -> tuple[set[str], dict[str, str]]:
    """Every quantized module stores what the format's specs say; every other tensor matches
    the original by name and shape. Returns the quantized modules and the suffix of each role."""
    marker = "." + qf.marker
    owned: set[str] = set()
    modules: set[str] = set()
    suffixes: dict[str, str] = {}
    no_input_scale = []
    try:
        for name in sorted(n for n in quant.tensors if n.endswith(marker)):
            module = name[: -len(marker)]
            o = orig.tensors.get(f"{module}.weight")
            if o is None or len(o.shape) != 2:
                raise CheckpointError(f"{quant.path}: '{name}' belongs to no Linear weight of {orig.path}")
            for t in qf.tensor_specs(*o.shape):
                suffixes[t.role] = t.suffix
                full = f"{module}.{t.suffix}"
                info = quant.tensors.get(full)
                if info is None:
                    if t.role == INPUT_SCALE:
                        no_input_scale.append(module)
                        continue
                    raise CheckpointError(f"{quant.path}: quantized module '{module}' has no '{full}' (a {qf.name} "
                                          f"Linear stores {', '.join(s.suffix for s in qf.tensor_specs(*o.shape))})")
                problem = _fits(info, t)
                if problem:
                    raise CheckpointError(f"{quant.path}: tensor '{full}' {problem} (the {qf.name} layout of a "
                                          f"Linear of shape {list(o.shape)}, {qf.describe()})")
                owned.add(full)
            if f"{module}.input_scale" in quant.tensors:  # kept (and ignored, as vLLM does) under dynamic schemes
                owned.add(f"{module}.input_scale")
            modules.add(module)
    except ValueError as e:  # the format has no layout for this spec or shape
        raise CheckpointError(f"{quant.path}: {e}") from None
    if no_input_scale:
        raise CheckpointError(f"{quant.path}: static activation scheme but '{no_input_scale[0]}.input_scale' is "
                              f"missing ({len(no_input_scale)} modules without one)")
    if qf.mode == STATIC and modules and INPUT_SCALE not in suffixes:
        suffixes[INPUT_SCALE] = "input_scale"
    weights = {f"{m}.weight" for m in modules}
    rest = {n for n in quant.tensors if n not in owned}
    _check_names(orig, quant, rest | weights)
    for name in sorted(rest):
        o, q = orig.tensors[name], quant.tensors[name]
        if o.shape != q.shape:
            raise CheckpointError(f"tensor '{name}' has shape {o.shape} in {orig.path} and {q.shape} in {quant.path}")
        if q.dtype in QUANT_DTYPES and o.dtype not in QUANT_DTYPES:
            module = name.rsplit(".", 1)[0]
            raise CheckpointError(f"{quant.path}: tensor '{name}' is {q.dtype} but '{module}{marker}' is missing")
        if name.endswith(QUANT_SUFFIXES):
            raise CheckpointError(f"{quant.path}: '{name}' belongs to no quantized weight")
    return modules, suffixes


# ------------------------------------------------------------------ skeleton surgery


def quantized_linear(pair: CheckpointPair, module: str) -> nn.Module:
    """The quantized Linear of `module` (on the current default device, normally meta)."""
    qf, quant = pair.fmt, pair.quantized
    kind = qf.kind
    assert kind is not None
    out_features, in_features = pair.original.tensors[f"{module}.weight"].shape
    bias = quant.tensors.get(f"{module}.bias")
    bias_dtype = TORCH_DTYPES[bias.dtype] if bias is not None else None
    scale = quant.tensors[f"{module}.{pair.suffixes[SCALE]}"]
    inp = quant.tensors.get(f"{module}.input_scale")
    if kind.weights == "fp8":
        return FP8Linear(in_features, out_features, scale.shape, kind.mode, inp.shape if inp is not None else None,
                         bias_dtype)
    if kind.weights == "int8":
        return Int8Linear(in_features, out_features, scale.shape, kind.mode, inp.shape if inp is not None else None,
                          bias_dtype)
    if kind.weights == "fp8-block":
        assert kind.block is not None
        return BlockFP8Linear(in_features, out_features, kind.block, kind.mode, pair.suffixes[SCALE], bias_dtype)
    if qf.name == "gptq":
        return GPTQLinear(in_features, out_features, scale.shape[0], TORCH_DTYPES[scale.dtype], bias_dtype)
    if qf.name == "awq":
        return AWQLinear(in_features, out_features, scale.shape[0], TORCH_DTYPES[scale.dtype], bias_dtype)
    if qf.name != "compressed-tensors":
        raise CheckpointError(f"{quant.path}: eval has no INT4 Linear for the {qf.name} layout")
    names = {"weight": pair.suffixes[WEIGHT], "scale": pair.suffixes[SCALE]}
    if SHAPE in pair.suffixes:
        names["shape"] = pair.suffixes[SHAPE]
    if ZERO_POINT in pair.suffixes:
        names["zero_point"] = pair.suffixes[ZERO_POINT]
    return W4A16Linear(in_features, out_features, kind.group_size, TORCH_DTYPES[scale.dtype],
                       ZERO_POINT in pair.suffixes, bias_dtype, names, has_shape=SHAPE in pair.suffixes)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_in_quantized(root: nn.Module, prefix: str, pair: CheckpointPair) -> int:
    """Replace the quantized Linears / fused experts under meta module `root` (checkpoint
    prefix `prefix`, e.g. "model.layers.3.") by quantized modules; returns how many were swapped."""
    modules, kind = pair.quantized_modules, pair.fmt.kind
    swapped = 0
    with torch.device("meta"):
        for rel, experts in fused_expert_modules(root).items():
            projs = [f"{prefix}{rel}.{e}.{p}" for e in range(experts.gate_up_proj.shape[0])
                     for p in ("gate_proj", "up_proj", "down_proj")]
            hit = [p in modules for p in projs]
            if not any(hit):
                continue
            if not all(hit):
                raise CheckpointError(f"'{prefix}{rel}': some experts are quantized and some are not; eval needs "
                                      "all or none")
            check_supported(experts, prefix + rel)
            if kind.weights == "int8" and kind.mode not in (DYNAMIC_TOKEN, WEIGHT_ONLY):
                raise CheckpointError(f"'{prefix}{rel}': INT8 experts with activations {kind.mode}; eval runs INT8 "
                                      "experts with dynamic per-token inputs (vLLM's INT8 MoE path)")
            built = [Expert(*(quantized_linear(pair, projs[3 * e + i]) for i in range(3)))
                     for e in range(len(projs) // 3)]
            _set_submodule(root, rel, FP8Experts(built, experts.act_fn, kind.mode))
            swapped += len(projs)
        for rel, linear in list(root.named_modules()):
            if isinstance(linear, nn.Linear) and f"{prefix}{rel}" in modules:
                _set_submodule(root, rel, quantized_linear(pair, f"{prefix}{rel}"))
                swapped += 1
    return swapped


# The name eval used when it ran FP8 checkpoints only.
swap_in_fp8 = swap_in_quantized

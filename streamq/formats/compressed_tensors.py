"""The compressed-tensors checkpoint (llm-compressor lineage, quant_method: compressed-tensors).

One `config_groups.group_0` targeting every Linear, `ignore` for the rest. Per quantized
Linear, by the group's `format`:

- `float-quantized` (FP8): `weight` F8_E4M3 [out, in], `weight_scale` F32 [1] (tensor),
  [out, 1] (channel) or [ceil(out/r), ceil(in/c)] (block, `block_structure: [r, c]`);
  static activations add `input_scale` F32 [1].
- `int-quantized` (W8A8 INT8): `weight` I8 [out, in], `weight_scale` F32 [out, 1]; inputs
  dynamic per token, nothing stored.
- `pack-quantized` (W4A16, GPTQ / AWQ / round-to-nearest): `weight_packed` I32 [out, in/8]
  (code + 8 in 4 bits, element i of a row in word i//8 at bits 4*(i%8)), `weight_scale`
  [out, in/group] in the model dtype, `weight_shape` I64 [2]; asymmetric adds
  `weight_zero_point` I32 packed along dim 0, [ceil(out/8), in/group]. Packing:
  `streamq.formats.int4_packing`.

vLLM and transformers (through the `compressed-tensors` package) load these.
"""

from __future__ import annotations

from typing import Any

from streamq.formats.base import (
    INPUT_SCALE,
    SCALE,
    SHAPE,
    WEIGHT,
    ZERO_POINT,
    Format,
    QuantSpec,
    TensorSpec,
    register,
)
from streamq.quant.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken

_FORMAT_OF = {("float", 8): "float-quantized", ("int", 8): "int-quantized", ("int", 4): "pack-quantized"}
_WEIGHT_STRATEGIES = {"tensor": PerTensor, "channel": PerChannel, "block": PerBlock, "group": PerGroup}
_DTYPE_OF = {("float", 8): "F8_E4M3", ("int", 8): "I8"}


def _args(type_: str, bits: int, symmetric: bool, dynamic: bool, strategy: str, observer: str | None,
          block: list[int] | None = None, group_size: int | None = None) -> dict[str, Any]:
    # Key order is part of the bytes of config.json (kept stable across releases).
    return {"num_bits": bits, "type": type_, "symmetric": symmetric, "dynamic": dynamic, "strategy": strategy,
            "group_size": group_size, "block_structure": block, "actorder": None, "observer": observer}


@register
class CompressedTensors(Format):
    save_name = "compressed-tensors"
    quant_methods = ("compressed-tensors",)

    def supports(self, spec: QuantSpec) -> str | None:
        if (spec.type, spec.bits) not in _FORMAT_OF:
            return f"streamq writes compressed-tensors for 8-bit float or int weights, not {spec.type}{spec.bits}"
        if spec.bits == 4:
            if not isinstance(spec.weight, PerGroup) or not spec.weight_only:
                return "4-bit weights are written per group, weight-only (W4A16)"
            if spec.actorder not in (None, "static"):
                return "vLLM refuses actorder 'group'; streamq writes null or 'static'"
            return None
        if spec.type == "int" and not isinstance(spec.weight, PerChannel):
            return "INT8 weights are written per channel (vLLM's INT8 MoE path takes channel weights only)"
        return None

    def specs(self, spec: QuantSpec, out_features: int, in_features: int, scale_dtype: str = "F32"
              ) -> list[TensorSpec]:
        w = spec.weight
        if spec.bits == 4:
            groups = -(-in_features // w.size)
            out = [TensorSpec("weight_packed", "I32", (out_features, -(-in_features // 8)), WEIGHT),
                   TensorSpec("weight_scale", scale_dtype, (out_features, groups), SCALE),
                   TensorSpec("weight_shape", "I64", (2,), SHAPE)]
            if not spec.symmetric:
                out.append(TensorSpec("weight_zero_point", "I32", (-(-out_features // 8), groups), ZERO_POINT))
            return out
        if isinstance(w, PerTensor):
            scale_shape: tuple[int, ...] = (1,)
        elif isinstance(w, PerChannel):
            scale_shape = (out_features, 1)
        elif isinstance(w, PerBlock):
            scale_shape = (-(-out_features // w.rows), -(-in_features // w.cols))
        else:
            raise ValueError(f"no compressed-tensors layout for {w}")
        out = [TensorSpec("weight", _DTYPE_OF[(spec.type, spec.bits)], (out_features, in_features), WEIGHT),
               TensorSpec("weight_scale", "F32", scale_shape, SCALE)]
        if spec.static_activations:
            out.append(TensorSpec("input_scale", "F32", (1,), INPUT_SCALE))
        return out

    def logical_shape(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
        if spec.bits == 4:
            packed = shapes.get("weight_packed")
            return (packed[0], packed[1] * 8) if packed is not None and len(packed) == 2 else None
        return super().logical_shape(spec, shapes)

    def pack(self, module, q, spec):
        if spec.bits == 4:
            from streamq.formats.int4_packing import to_compressed_tensors

            # The scheme hands over the scale already in the dtype it is stored in.
            tensors = to_compressed_tensors(q.weight, q.weight_scale, q.zero_point, q.weight_scale.dtype)
            return {f"{module}.{k}": v for k, v in tensors.items()}
        # compressed-tensors registers per-tensor scales with shape [1].
        scale = q.weight_scale.reshape(1) if q.weight_scale.ndim == 0 else q.weight_scale
        out = {f"{module}.weight": q.weight, f"{module}.weight_scale": scale.contiguous()}
        if q.input_scale is not None:
            out[f"{module}.input_scale"] = q.input_scale.reshape(1).contiguous()
        return out

    def config_block(self, spec: QuantSpec, ignored: list[str]) -> dict[str, Any]:
        w = spec.weight
        block = [w.rows, w.cols] if isinstance(w, PerBlock) else None
        group = w.size if isinstance(w, PerGroup) else None
        weights = _args(spec.type, spec.bits, spec.symmetric, False, w.ct_strategy, "minmax", block, group)
        if spec.actorder is not None:
            weights["actorder"] = spec.actorder
        if spec.activation is None:
            activations = None
        elif spec.static_activations:
            activations = _args(spec.type, spec.bits, True, False, PerTensor.ct_strategy, "minmax")
        else:
            # A block-FP8 checkpoint quantizes inputs per token in groups of 128 at run time.
            strategy = "group" if isinstance(w, PerBlock) else spec.activation.ct_strategy
            activations = _args(spec.type, spec.bits, True, True, strategy, None,
                                group_size=w.cols if isinstance(w, PerBlock) else None)
        fmt = _FORMAT_OF[(spec.type, spec.bits)]
        return {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations, "output_activations": None,
                                          "format": fmt}},
            "ignore": ignored,
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "global_compression_ratio": None,
        }

    def parse(self, qc: dict[str, Any]) -> tuple[QuantSpec, list[str]]:
        fmt = qc.get("format")
        if fmt not in _FORMAT_OF.values():
            raise ValueError(f"quantization_config.format is {fmt!r}; expected one of {', '.join(_FORMAT_OF.values())}")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("quantization_config.config_groups must be a non-empty mapping")
        if len(groups) != 1:
            raise ValueError(f"quantization_config.config_groups has {len(groups)} groups; streamq reads exactly one")
        name, group = next(iter(groups.items()))
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise ValueError(f"{where} must be a mapping")
        if not isinstance(group.get("targets"), list) or not group["targets"]:
            raise ValueError(f"{where}.targets must be a non-empty list")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise ValueError(f"{where}.weights must be a mapping")
        type_, bits = w.get("type"), w.get("num_bits")
        if _FORMAT_OF.get((type_, bits)) != fmt:
            want = next(k for k, v in _FORMAT_OF.items() if v == fmt)
            raise ValueError(f"quantization_config.format is {fmt!r}, which needs {where}.weights with num_bits "
                             f"{want[1]} and type '{want[0]}' (got {bits!r}, {type_!r})")
        if w.get("dynamic") is not False:
            raise ValueError(f"{where}.weights.dynamic must be false (weights are quantized offline)")
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block", "group"):
            raise ValueError(f"{where}.weights.strategy is {strategy!r}; expected tensor, channel, block or group")
        actorder = w.get("actorder")
        if actorder not in (None, "static", "weight"):
            raise ValueError(f"{where}.weights.actorder is {actorder!r}; streamq reads null or 'static' "
                             "(vLLM refuses 'group')")
        if strategy == "group":
            size = w.get("group_size")
            if not (isinstance(size, int) and size > 0):
                raise ValueError(f"{where}.weights.group_size is {size!r}; expected a positive integer")
            weight = PerGroup(size)
        elif strategy == "block":
            block = w.get("block_structure")
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(x, int) and x > 0 for x in block)):
                raise ValueError(f"{where}.weights.block_structure is {block!r}; expected [rows, cols]")
            weight = PerBlock(*block)
        else:
            weight = _WEIGHT_STRATEGIES[strategy]()
        a = group.get("input_activations")
        activation, static = None, False
        if a is not None:
            if not isinstance(a, dict):
                raise ValueError(f"{where}.input_activations must be a mapping")
            if not isinstance(a.get("dynamic"), bool):
                raise ValueError(f"{where}.input_activations.dynamic must be true or false")
            static = not a["dynamic"]
            strat = a.get("strategy")
            if static and strat != "tensor":
                raise ValueError(f"{where}.input_activations: static activations must use strategy 'tensor'")
            if strat not in ("tensor", "token", "group"):
                raise ValueError(f"{where}.input_activations.strategy is {strat!r}; expected tensor, token or group")
            activation = PerTensor() if strat == "tensor" else PerToken()
        ignored = qc.get("ignore", []) or []
        if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
            raise ValueError("quantization_config.ignore must be a list of module names or 're:' patterns")
        return (QuantSpec(type_, bits, weight, bool(w.get("symmetric", True)), activation, static,
                          "static" if actorder in ("static", "weight") else None), list(ignored))

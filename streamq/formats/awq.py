"""The AutoAWQ GEMM checkpoint layout (quant_method: awq, version: gemm), `save_name: awq`.

Per quantized Linear with weight [out, in] and groups of g input columns: `qweight` I32
[in, out/8] (packed along the output, nibble order 0,2,4,6,1,3,5,7), `qzeros` I32
[in/g, out/8] packed the same way, `scales` F16 [in/g, out]; dequant (q - z) * s with q, z in
0..15. streamq's codes are signed (-8..7, value (c - zp) * s), so the stored code is c + 8 and
the stored zero zp + 8; a symmetric weight is written with zero 8 (AutoAWQ GEMM always stores
zeros) and `zero_point: false`. Packing: `streamq.formats.awq_packing`. out must be a multiple
of 8. vLLM loads this layout; transformers needs autoawq / gptqmodel, so streamq tests it by
round trip.
"""

from __future__ import annotations

from typing import Any

from streamq.formats.base import SCALE, WEIGHT, ZERO_POINT, Format, QuantSpec, TensorSpec, register
from streamq.quant.granularity import PerGroup

CODE_OFFSET = 8  # signed int4 code -> AutoAWQ's unsigned nibble


@register
class Awq(Format):
    save_name = "awq"
    quant_methods = ("awq",)

    def supports(self, spec: QuantSpec) -> str | None:
        if not spec.w4a16:
            return "the AWQ layout stores 4-bit per-group weight-only (W4A16) checkpoints"
        if spec.actorder is not None:
            return "the AWQ layout has no activation order"
        return None

    def specs(self, spec: QuantSpec, out_features: int, in_features: int, scale_dtype: str = "F16"
              ) -> list[TensorSpec]:
        groups = -(-in_features // spec.weight.size)
        return [TensorSpec("qweight", "I32", (in_features, out_features // 8), WEIGHT),
                TensorSpec("qzeros", "I32", (groups, out_features // 8), ZERO_POINT),
                TensorSpec("scales", "F16", (groups, out_features), SCALE)]

    def marker(self, spec: QuantSpec) -> str:
        return "qweight"

    def logical_shape(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
        q = shapes.get("qweight")
        return (q[1] * 8, q[0]) if q is not None and len(q) == 2 else None

    def pack(self, module, q, spec):
        import torch

        from streamq.errors import CheckpointError
        from streamq.formats.awq_packing import pack_awq

        codes = q.weight.to(torch.int32) + CODE_OFFSET
        if q.zero_point is None:
            zeros = torch.full(q.weight_scale.shape, CODE_OFFSET, dtype=torch.int32, device=codes.device)
        else:
            zeros = q.zero_point.to(torch.int32) + CODE_OFFSET
        try:
            tensors = pack_awq(codes, zeros, q.weight_scale.to(torch.float32))
        except ValueError as e:
            raise CheckpointError(f"'{module}': {e}; write compressed-tensors instead (save_name: "
                                  "compressed-tensors), or list the module in ignore_layers") from None
        return {f"{module}.{k}": v for k, v in tensors.items()}

    def config_block(self, spec: QuantSpec, ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": spec.weight.size,
                "zero_point": not spec.symmetric, "modules_to_not_convert": ignored}

    def parse(self, qc: dict[str, Any]) -> tuple[QuantSpec, list[str]]:
        if qc.get("bits", qc.get("w_bit")) != 4:
            raise ValueError(f"quantization_config.bits is {qc.get('bits')!r}; streamq reads 4-bit AWQ")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version is {qc.get('version')!r}; streamq reads the gemm layout")
        size = qc.get("group_size", qc.get("q_group_size"))
        if not (isinstance(size, int) and size > 0):
            raise ValueError(f"quantization_config.group_size is {size!r}; expected a positive integer")
        zero_point = qc.get("zero_point", True)
        if not isinstance(zero_point, bool):
            raise ValueError(f"quantization_config.zero_point is {zero_point!r}; expected true or false")
        ignored = qc.get("modules_to_not_convert") or []
        if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
            raise ValueError("quantization_config.modules_to_not_convert must be a list of module names")
        return QuantSpec("int", 4, PerGroup(size), not zero_point, None, False), list(ignored)

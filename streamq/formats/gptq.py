"""The GPTQ checkpoint layout (AutoGPTQ v1, quant_method: gptq), for tools that want it.

Per quantized Linear: `qweight` I32 [in/8, out] (packed along the input), `qzeros` I32
[in/group, out/8] (v1 stores zero - 1: 7 for symmetric 4-bit), `scales` F16 [in/group, out],
`g_idx` I32 [in] = i // group. Symmetric only and `desc_act: false`: vLLM refuses
asymmetric GPTQ and `desc_act: true` with groups, so streamq never writes them
(`actorder: static` reorders only during the solve and leaves groups in column order).
Packing: `streamq.formats.int4_packing`.
"""

from __future__ import annotations

from typing import Any

from streamq.formats.base import GROUP_INDEX, SCALE, WEIGHT, ZERO_POINT, Format, QuantSpec, TensorSpec, register
from streamq.quant.granularity import PerGroup


@register
class Gptq(Format):
    save_name = "gptq"
    quant_methods = ("gptq",)

    def supports(self, spec: QuantSpec) -> str | None:
        if not spec.w4a16:
            return "the GPTQ layout stores 4-bit per-group weight-only (W4A16) checkpoints"
        if not spec.symmetric:
            return "vLLM refuses asymmetric GPTQ checkpoints (use compressed-tensors for asymmetric W4A16)"
        return None

    def specs(self, spec: QuantSpec, out_features: int, in_features: int, scale_dtype: str = "F16"
              ) -> list[TensorSpec]:
        groups = -(-in_features // spec.weight.size)
        return [TensorSpec("qweight", "I32", (in_features // 8, out_features), WEIGHT),
                TensorSpec("qzeros", "I32", (groups, out_features // 8), ZERO_POINT),
                TensorSpec("scales", "F16", (groups, out_features), SCALE),
                TensorSpec("g_idx", "I32", (in_features,), GROUP_INDEX)]

    def marker(self, spec: QuantSpec) -> str:
        return "qweight"

    def logical_shape(self, spec: QuantSpec, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
        q = shapes.get("qweight")
        return (q[1], q[0] * 8) if q is not None and len(q) == 2 else None

    def pack(self, module, q, spec):
        import torch

        from streamq.formats.int4_packing import to_gptq

        tensors = to_gptq(q.weight, q.weight_scale.to(torch.float32), spec.weight.size, torch.float16)
        return {f"{module}.{k}": v for k, v in tensors.items()}

    def config_block(self, spec: QuantSpec, ignored: list[str]) -> dict[str, Any]:
        return {"quant_method": "gptq", "bits": 4, "group_size": spec.weight.size, "desc_act": False,
                "sym": True, "static_groups": False, "checkpoint_format": "gptq",
                "modules_in_block_to_quantize": None, "ignored_layers": ignored}

    def parse(self, qc: dict[str, Any]) -> tuple[QuantSpec, list[str]]:
        if qc.get("bits") != 4:
            raise ValueError(f"quantization_config.bits is {qc.get('bits')!r}; streamq reads 4-bit GPTQ")
        if qc.get("desc_act"):
            raise ValueError("quantization_config.desc_act is true; vLLM refuses it with groups")
        if qc.get("sym") is False:
            raise ValueError("quantization_config.sym is false; vLLM refuses asymmetric GPTQ")
        size = qc.get("group_size")
        if not (isinstance(size, int) and size > 0):
            raise ValueError(f"quantization_config.group_size is {size!r}; expected a positive integer")
        ignored = qc.get("ignored_layers") or []
        return QuantSpec("int", 4, PerGroup(size), True, None, False), list(ignored)

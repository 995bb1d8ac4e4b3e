"""vLLM's `fp8` checkpoint (quant_method: fp8), two layouts under one config block:

- per-tensor (AutoFP8 lineage): `weight` F8_E4M3 [out, in], `weight_scale` F32 [] and, for
  static activations, `input_scale` F32 []; `activation_scheme: static | dynamic`.
- block-wise (the DeepSeek-V3 / official Qwen3-FP8 layout): `weight` F8_E4M3 [out, in] and
  `weight_scale_inv` F32 [ceil(out/128), ceil(in/128)], which despite its name is the
  dequantization multiplier (block absmax / 448); `weight_block_size: [128, 128]`,
  activations dynamic per token in groups of 128 (vLLM refuses static with blocks).
  vLLM and transformers' FineGrainedFP8 loader both read it.
"""

from __future__ import annotations

from typing import Any

from streamq.formats.base import (
    INPUT_SCALE,
    SCALE,
    WEIGHT,
    Format,
    QuantSpec,
    TensorSpec,
    register,
)
from streamq.quant.granularity import PerBlock, PerTensor, PerToken


@register
class VllmFp8(Format):
    save_name = "fp8"
    aliases = ("fp8_blockwise",)
    quant_methods = ("fp8",)

    def supports(self, spec: QuantSpec) -> str | None:
        if spec.type != "float" or spec.bits != 8:
            return "vLLM's fp8 format stores FP8 weights only"
        if isinstance(spec.weight, PerBlock):
            if spec.static_activations:
                return "block-wise FP8 needs dynamic activations (vLLM refuses static ones with blocks)"
            return None
        if not isinstance(spec.weight, PerTensor):
            return "vLLM's fp8 format stores one weight scale per tensor (or per 128x128 block)"
        if isinstance(spec.activation, PerToken):
            return "vLLM's fp8 format has per-tensor activation scales only"
        return None

    def specs(self, spec: QuantSpec, out_features: int, in_features: int, scale_dtype: str = "F32"
              ) -> list[TensorSpec]:
        weight = TensorSpec("weight", "F8_E4M3", (out_features, in_features), WEIGHT)
        if isinstance(spec.weight, PerBlock):
            b = spec.weight
            return [weight, TensorSpec("weight_scale_inv", "F32",
                                       (-(-out_features // b.rows), -(-in_features // b.cols)), SCALE)]
        out = [weight, TensorSpec("weight_scale", "F32", (), SCALE)]
        if spec.static_activations:
            out.append(TensorSpec("input_scale", "F32", (), INPUT_SCALE))
        return out

    def pack(self, module, q, spec):
        out = {f"{module}.weight": q.weight}
        if isinstance(spec.weight, PerBlock):
            out[f"{module}.weight_scale_inv"] = q.weight_scale.contiguous()
            return out
        out[f"{module}.weight_scale"] = q.weight_scale.reshape(()).contiguous()
        if q.input_scale is not None:
            out[f"{module}.input_scale"] = q.input_scale.reshape(()).contiguous()
        return out

    def config_block(self, spec: QuantSpec, ignored: list[str]) -> dict[str, Any]:
        if isinstance(spec.weight, PerBlock):
            # Both spellings of the ignore list: vLLM reads ignored_layers, transformers'
            # FineGrainedFP8 reads modules_to_not_convert.
            return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [spec.weight.rows, spec.weight.cols],
                    "ignored_layers": ignored, "modules_to_not_convert": ignored}
        return {"quant_method": "fp8", "activation_scheme": "static" if spec.static_activations else "dynamic",
                "ignored_layers": ignored}

    def parse(self, qc: dict[str, Any]) -> tuple[QuantSpec, list[str]]:
        scheme = qc.get("activation_scheme")
        if scheme not in ("static", "dynamic"):
            raise ValueError(f"quantization_config.activation_scheme is {scheme!r}; expected 'static' or 'dynamic'")
        ignored = qc.get("ignored_layers", qc.get("modules_to_not_convert", [])) or []
        if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
            raise ValueError("quantization_config.ignored_layers must be a list of module names")
        block = qc.get("weight_block_size")
        allowed = {"quant_method", "activation_scheme", "ignored_layers"}
        if block is not None:
            if (not isinstance(block, list) or len(block) != 2
                    or not all(isinstance(x, int) and x > 0 for x in block)):
                raise ValueError(f"quantization_config.weight_block_size is {block!r}; expected [rows, cols]")
            if scheme != "dynamic":
                raise ValueError("quantization_config.weight_block_size needs activation_scheme 'dynamic'")
            allowed |= {"weight_block_size", "fmt", "modules_to_not_convert"}
            weight = PerBlock(*block)
        else:
            weight = PerTensor()
        extra = sorted(set(qc) - allowed)
        if extra:
            raise ValueError(f"quantization_config has unexpected keys for quant_method fp8: {', '.join(extra)}")
        activation = PerToken() if block is not None else PerTensor()
        return QuantSpec("float", 8, weight, True, activation, scheme == "static"), list(ignored)

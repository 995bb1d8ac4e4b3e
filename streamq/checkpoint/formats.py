"""How quantized tensors are named and described on disk: vLLM "fp8" or compressed-tensors.

The scheme says what a Linear becomes (FP8 weight, scales); a format only decides
tensor shapes of the scales and the `quantization_config` block of config.json.
"""

from __future__ import annotations

import torch

from streamq.quant.granularity import PerTensor
from streamq.quant.scheme import QuantizedLinear, QuantScheme

VLLM_FP8 = "fp8"
COMPRESSED_TENSORS = "compressed-tensors"


def linear_tensors(module: str, q: QuantizedLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors a quantized Linear writes: weight, weight_scale and (static) input_scale.

    vLLM's fp8 loader takes scalar scales (AutoFP8 writes shape []); compressed-tensors
    registers per-tensor scale parameters of shape [1], so the shape must match there.
    """
    def shaped(scale: torch.Tensor) -> torch.Tensor:
        if fmt == COMPRESSED_TENSORS and scale.ndim == 0:
            return scale.reshape(1)
        return scale

    out = {f"{module}.weight": q.weight, f"{module}.weight_scale": shaped(q.weight_scale).contiguous()}
    if q.input_scale is not None:
        out[f"{module}.input_scale"] = shaped(q.input_scale).contiguous()
    return out


def quantization_config(fmt: str, scheme: QuantScheme, ignored: list[str]) -> dict:
    """The `quantization_config` entry of config.json for this scheme and format."""
    if fmt == VLLM_FP8:
        return {"quant_method": "fp8", "activation_scheme": "static" if scheme.static_activations else "dynamic",
                "ignored_layers": ignored}
    if fmt != COMPRESSED_TENSORS:
        raise ValueError(f"unknown format {fmt}")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": scheme.weight.ct_strategy, "group_size": None, "block_structure": None,
               "actorder": None, "observer": "minmax"}
    activations = {"num_bits": 8, "type": "float", "symmetric": True,
                   "dynamic": not scheme.static_activations,
                   "strategy": scheme.activation.ct_strategy if not scheme.static_activations
                   else PerTensor.ct_strategy,
                   "group_size": None, "block_structure": None, "actorder": None,
                   "observer": "minmax" if scheme.static_activations else None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": activations, "output_activations": None,
                                      "format": "float-quantized"}},
        "ignore": ignored,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }

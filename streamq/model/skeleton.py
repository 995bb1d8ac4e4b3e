"""The model without weights: built on the meta device from config.json.

Only what the current step needs is ever materialized: the embedding and rotary
tables for input capture, one decoder layer at a time for calibration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from streamq.errors import CheckpointError
from streamq.model.buffers import init_missing_buffers

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model_config(path: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read as a transformers config: {e}") from None


def compute_dtype(config: PretrainedConfig, torch_dtype: str) -> torch.dtype:
    """The dtype layers run in: the config's unless the YAML names one."""
    if torch_dtype != "auto":
        return _DTYPES[torch_dtype]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def attention_implementation(config: PretrainedConfig) -> str | None:
    """sdpa where the model class supports it, eager otherwise; None (transformers'
    own default) for classes outside the auto mapping (remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """AutoModelForCausalLM on the meta device: module tree and shapes, no memory."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=attention_implementation(config),
                                                     trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        arch = getattr(config, "architectures", None) or getattr(config, "model_type", "?")
        raise CheckpointError(f"unsupported architecture {arch}: transformers cannot build it ({e})") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CheckpointError(f"unsupported architecture {type(model).__name__}: streamq needs a "
                              "decoder stack at model.layers (Llama/Qwen-style causal LMs)")
    return model.eval().requires_grad_(False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def materialize_outside_layers(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give the embedding (and anything else loaded from `tensors`) real storage on `device`.

    Computed buffers the checkpoint lacks (rotary tables, Gemma's `embed_scale`) are
    filled by the model's own `_init_weights`, since meta buffers hold no values to move.
    """
    base = model.model
    for name, module in list(base.named_children()):
        if name == "layers":
            continue
        prefix = f"model.{name}."
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        if (params and all(prefix + p in tensors for p in params)) or (buffers and not params):
            module.to_empty(device=device)
            init_missing_buffers(model, module, prefix, tensors)
            with torch.no_grad():
                for p, param in module.named_parameters():
                    param.copy_(tensors[prefix + p])
                for b, buf in module.named_buffers():
                    if prefix + b in tensors:
                        buf.copy_(tensors[prefix + b])


def release_outside_layers(model: nn.Module) -> None:
    for name, module in model.model.named_children():
        if name != "layers":
            module.to("meta")

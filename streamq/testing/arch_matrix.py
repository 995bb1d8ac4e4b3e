"""Tiny checkpoints of the architectures people quantize, saved by transformers itself.

Each entry is a 2-layer model of tiny widths built with `AutoModelForCausalLM.from_config`
and written with `save_pretrained`, so the names on disk are the names transformers
writes (and reads back through its conversion mapping): Mixtral's
`block_sparse_moe.experts.<e>.w1`, Granite-MoE's fused `input_linear`, Llama-4's 3D
`experts.gate_up_proj`. Layers transformers does not model but real releases ship are
added with their hub names: DeepSeek-V3 / GLM-4.5 next-token-prediction layers at
`model.layers.<num_hidden_layers>.*` and Qwen3-Next's separate `mtp.*` stack.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from streamq.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, _fill_weights, tiny_tokenizer

_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
               max_position_embeddings=512, vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
               pad_token_id=PAD_ID, tie_word_embeddings=False)
_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)

# model_type -> config overrides (on top of _COMMON). Every MoE layer has its experts in memory fused.
MATRIX = {
    "llama": dict(head_dim=16),
    "mistral": dict(head_dim=16, sliding_window=16),
    "mixtral": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(),
    "qwen2_moe": dict(_MOE, shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(_MOE, head_dim=16, decoder_sparse_step=1),
    "qwen3_next": dict(_MOE, head_dim=16, shared_expert_intermediate_size=64, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"], num_nextn_predict_layers=1),
    "deepseek_v2": dict(_MLA, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16),
    "deepseek_v3": dict(_MLA, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, num_nextn_predict_layers=1),
    "glm4_moe": dict(_MLA, head_dim=16, num_key_value_heads=2, num_nextn_predict_layers=1),
    "phi3": dict(),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        interleave_moe_layer_step=1),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gemma3_text": dict(head_dim=16, sliding_window=16, tie_word_embeddings=True),
}


def matrix_config(arch: str, num_layers: int = 2) -> PreTrainedConfig:
    return AutoConfig.for_model(arch, **{**_COMMON, "num_hidden_layers": num_layers, **MATRIX[arch]})


def _mtp_tensors(arch: str, tensors: dict[str, torch.Tensor], num_layers: int, seed: int) -> dict[str, torch.Tensor]:
    """The next-token-prediction layer a real release ships, with its hub names.

    DeepSeek-V3 and GLM-4.5 put it after the decoder (`model.layers.<N>`): a full decoder
    layer plus `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}` (and `embed_tokens`
    in DeepSeek-V3). Qwen3-Next keeps a separate stack: `mtp.{fc,norm,pre_fc_norm_*}`
    and `mtp.layers.0.*`.
    """
    last = f"model.layers.{num_layers - 1}."
    hidden = tensors["model.norm.weight"].shape[0]
    g = torch.Generator().manual_seed(seed + 1000)

    def rand(*shape: int, norm: bool = False) -> torch.Tensor:
        noise = torch.randn(shape, generator=g)
        return (1 + 0.05 * noise if norm else 0.02 * noise).to(torch.bfloat16)

    out: dict[str, torch.Tensor] = {}
    if arch == "qwen3_next":
        base = "mtp."
        out |= {base + "fc.weight": rand(hidden, 2 * hidden), base + "norm.weight": rand(hidden, norm=True),
                base + "pre_fc_norm_embedding.weight": rand(hidden, norm=True),
                base + "pre_fc_norm_hidden.weight": rand(hidden, norm=True)}
        layer = base + "layers.0."
    else:
        base = layer = f"model.layers.{num_layers}."
        out |= {base + "enorm.weight": rand(hidden, norm=True), base + "hnorm.weight": rand(hidden, norm=True),
                base + "eh_proj.weight": rand(hidden, 2 * hidden),
                base + "shared_head.norm.weight": rand(hidden, norm=True),
                base + "shared_head.head.weight": rand(VOCAB_SIZE, hidden)}
        if arch == "deepseek_v3":
            out[base + "embed_tokens.weight"] = rand(VOCAB_SIZE, hidden)
    for name, t in tensors.items():  # a decoder layer like the last one, own values
        if name.startswith(last):
            out[layer + name[len(last):]] = (t.float() * 1.01 + 0.001).to(t.dtype)
    return out


def build_arch_model(arch: str, out_dir: str | Path, *, num_layers: int = 2, seed: int = 0,
                     with_tokenizer: bool = True) -> Path:
    """Save a seeded bf16 tiny `arch` checkpoint with `save_pretrained` (plus MTP layers
    where the architecture's releases have them)."""
    out_dir = Path(out_dir)
    config = matrix_config(arch, num_layers)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _fill_weights(model, seed)
    model.save_pretrained(out_dir)
    if getattr(config, "num_nextn_predict_layers", 0):
        file = out_dir / "model.safetensors"
        tensors = load_file(file)
        tensors |= _mtp_tensors(arch, tensors, num_layers, seed)
        save_file(tensors, file, metadata={"format": "pt"})
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out_dir)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(out_dir)
    return out_dir

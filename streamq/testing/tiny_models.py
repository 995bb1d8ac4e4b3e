"""Tiny, realistically named Hugging Face checkpoints built fully offline.

Tests need checkpoints whose tensor names, dtypes, sharding and side files (tokenizer,
generation config) look like the real Llama / Qwen2 / Qwen3 / Qwen3-MoE releases, but
that build in a second on CPU without downloads. Everything here is seeded: the same
arguments give the same bytes, so tests can compare outputs byte for byte.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig, PreTrainedTokenizerFast

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")

VOCAB_SIZE = 512
BOS_TOKEN, PAD_TOKEN, IM_START, EOS_TOKEN = ("<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The BPE trainer gives special tokens the first ids in this order, so the model config
# can name them without training the tokenizer (with_tokenizer=False stays fast).
SPECIAL_TOKENS = (BOS_TOKEN, PAD_TOKEN, IM_START, EOS_TOKEN)
BOS_ID, PAD_ID, EOS_ID = (SPECIAL_TOKENS.index(t) for t in (BOS_TOKEN, PAD_TOKEN, EOS_TOKEN))

# ChatML as Qwen writes it, preceded by BOS because the tokenizer adds BOS to plain text:
# both rendering paths then start with exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CALIB_FILE = Path(__file__).resolve().parents[2] / "data" / "calib" / "tiny_chat.jsonl"

_COMMON_CONFIG = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
    vocab_size=VOCAB_SIZE,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
# Real Qwen2 configs carry no head_dim (it is hidden_size // heads = 16 here).
_ARCH_CONFIG = {
    "llama": dict(head_dim=16, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "qwen3_moe": dict(
        head_dim=16,
        tie_word_embeddings=False,
        num_experts=12,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    ),
}

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _corpus_texts() -> list[str]:
    """Every string value of the shipped calibration file, in file order."""
    if not CALIB_FILE.is_file():
        raise FileNotFoundError(f"tiny tokenizer corpus not found: {CALIB_FILE}")
    texts: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for line in CALIB_FILE.read_text(encoding="utf-8").splitlines():
        walk(json.loads(line))
    return texts


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the JSON string is immutable to share."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_texts(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) != SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"special token {token} did not get id {SPECIAL_TOKENS.index(token)}")
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh (mutable) copy of the tiny tokenizer: ~512 byte-level BPE tokens + ChatML."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=_COMMON_CONFIG["max_position_embeddings"],
    )


def tiny_config(arch: str, num_layers: int = 2, overrides: dict | None = None) -> PreTrainedConfig:
    """The config of a tiny model of `arch` (see module docstring for the shapes);
    `overrides` changes config values (e.g. sizes that a group size of 128 divides)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    values = {**_COMMON_CONFIG, **_ARCH_CONFIG[arch], **(overrides or {})}
    return AutoConfig.for_model(arch, num_hidden_layers=num_layers, **values)


@torch.no_grad()
def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values so nothing is zero or constant.

    The models' own init leaves biases at 0 and norms at exactly 1, which would hide
    bugs such as a dropped bias or a norm copied from the wrong layer.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.05 * noise
        else:
            values = 0.02 * noise
        param.copy_(values.to(param.dtype))


def _shard_of(key: str, split_layer: int) -> int:
    """Shard 1 holds everything up to `split_layer`'s attention; shard 2 the rest.

    Layer `split_layer` therefore has its attention in one file and its MLP in the other,
    which is how real releases cut layers at shard boundaries.
    """
    match = _LAYER_KEY.match(key)
    if match is None:
        return 1 if key.startswith("model.embed_tokens.") else 2
    layer, rest = int(match.group(1)), match.group(2)
    if layer != split_layer:
        return 1 if layer < split_layer else 2
    return 1 if rest.startswith(("self_attn.", "input_layernorm.")) else 2


def _split_layer_across_shards(out_dir: Path, num_layers: int) -> None:
    """Rewrite the saved weights as two shards plus model.safetensors.index.json."""
    single = out_dir / "model.safetensors"
    tensors = load_file(single)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {key: names[_shard_of(key, num_layers // 2) - 1] for key in sorted(tensors)}
    for name in names:
        shard = {key: tensors[key] for key, file in weight_map.items() if file == name}
        save_file(shard, out_dir / name, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    seed: int = 0,
    split_layer_across_shards: bool = False,
    with_tokenizer: bool = True,
    overrides: dict | None = None,
) -> Path:
    """Save a seeded bf16 tiny `arch` checkpoint (plus tokenizer, generation config);
    `overrides` changes config values (see `tiny_config`)."""
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers, overrides), dtype=torch.bfloat16)
    _fill_weights(model, seed)
    model.save_pretrained(out_dir)
    if split_layer_across_shards:
        _split_layer_across_shards(out_dir, num_layers)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out_dir)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(out_dir)
    return out_dir

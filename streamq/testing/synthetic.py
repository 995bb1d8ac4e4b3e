"""Synthetic Hugging Face checkpoints with the exact layout of real Qwen models.

Benchmarks and tests need checkpoints whose tensor names, shapes, dtype, sharding and
`config.json` match the real models (Qwen3-235B-A22B, Qwen3-30B-A3B, Qwen2.5-7B), but we
cannot download hundreds of GB. `write_synthetic` writes such a checkpoint with only the
first N decoder layers, filled with random bf16 weights at a realistic scale.

Layout, as the hub checkpoints have it:
  * experts are stored UNFUSED: `model.layers.<i>.mlp.experts.<e>.{gate,up,down}_proj.weight`,
    router `model.layers.<i>.mlp.gate.weight` [E, H] (transformers v5 fuses them on load);
  * tensors in module order (embeddings, layer 0..N-1, final norm, lm_head), packed into
    `model-0000k-of-0000K.safetensors` shards of at most `shard_size_gb` (1 GB = 1e9 bytes,
    as `save_pretrained` counts), plus `model.safetensors.index.json`; we always write the
    sharded form with an index, even for a single shard, so readers see one layout.

Values are seeded per (seed, tensor name), so the same command (same device kind, same
torch) writes the same bytes. On `device="cuda"` every tensor is i.i.d. normal, drawn on the
GPU. On CPU, to stay fast on few cores, each tensor is ONE seeded random block of
`CPU_BLOCK` (a prime) elements tiled over the flat tensor: values repeat with that period,
but as the period is prime, rows start at different offsets of the block, so rows, columns
and quantization blocks still differ. CPU and CUDA bytes differ from each other.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamq.errors import ConfigError, OutputError

# Hub config.json of each model (values as published), with full depth. `write_synthetic`
# copies one and changes only num_hidden_layers (and vocab_size when asked).
_QWEN3_MOE_COMMON: dict = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "norm_topk_prob": True,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _remap_token_ids(cfg: dict, old_vocab: int, new_vocab: int) -> None:
    """Keep special-token ids valid in a smaller vocabulary.

    Qwen's special tokens sit at the end of the vocabulary; an id that no longer fits keeps
    its distance from the end, so distinct ids stay distinct and the embedding row exists.
    """
    def remap(i: int) -> int:
        return i if i < new_vocab else max(0, new_vocab - (old_vocab - i))

    for key in _TOKEN_ID_KEYS:
        value = cfg.get(key)
        if isinstance(value, int):
            cfg[key] = remap(value)
        elif isinstance(value, list):
            cfg[key] = [remap(i) for i in value]


def _shrunk(cfg: dict, old_vocab: int, new_vocab: int, **changes) -> dict:
    """A copy of `cfg` with `changes` applied and its token ids fitted to `new_vocab`."""
    out = {**copy.deepcopy(cfg), **changes}
    _remap_token_ids(out, old_vocab, new_vocab)
    if "vocab_size" in out:
        out["vocab_size"] = new_vocab
    return out


GEOMETRIES: dict[str, dict] = {
    "qwen3-235b-a22b": {
        **_QWEN3_MOE_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_window_layers": 94,
        "moe_intermediate_size": 1536,
        "num_attention_heads": 64,
        "num_hidden_layers": 94,
    },
    "qwen3-30b-a3b": {
        **_QWEN3_MOE_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_window_layers": 48,
        "moe_intermediate_size": 768,
        "num_attention_heads": 32,
        "num_hidden_layers": 48,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
}

# generation_config.json as published (Qwen3 chat models sample; Qwen2.5 base is greedy).
_QWEN3_GENERATION: dict = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}
GENERATION_CONFIGS: dict[str, dict] = {
    "qwen3-235b-a22b": _QWEN3_GENERATION,
    "qwen3-30b-a3b": _QWEN3_GENERATION,
    "qwen2.5-7b": {
        "bos_token_id": 151643,
        "do_sample": False,
        "eos_token_id": 151643,
        "max_new_tokens": 2048,
        "transformers_version": "4.37.0",
    },
}

# CI-sized stand-ins: the real architectures (Qwen3-MoE, Qwen3 dense) with every dimension
# small, including a 1024-token vocabulary (special ids moved into it by _remap_token_ids).
_TINY = dict(
    head_dim=32,
    hidden_size=256,
    intermediate_size=768,
    max_window_layers=4,
    num_attention_heads=8,
    num_hidden_layers=4,
    num_key_value_heads=2,
)
_QWEN_VOCAB, _TINY_VOCAB = 151936, 1024
GEOMETRIES["tiny-moe"] = _shrunk(
    _QWEN3_MOE_COMMON, _QWEN_VOCAB, _TINY_VOCAB,
    **_TINY, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
)
GEOMETRIES["tiny-dense"] = _shrunk(
    {
        key: value
        for key, value in _QWEN3_MOE_COMMON.items()
        if key not in ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "num_experts",
                       "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef")
    },
    _QWEN_VOCAB, _TINY_VOCAB, **_TINY, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
)
for _name in ("tiny-moe", "tiny-dense"):
    GENERATION_CONFIGS[_name] = _shrunk(_QWEN3_GENERATION, _QWEN_VOCAB, _TINY_VOCAB)

# Elements in the CPU path's random block per tensor: prime, so tiles never align with rows.
CPU_BLOCK = 262147


def build_config(geometry: str, layers: int | None = None, vocab_size: int | None = None) -> dict:
    """The config.json dict of `geometry` cut to `layers` decoder layers."""
    if geometry not in GEOMETRIES:
        raise ConfigError(f"unknown geometry {geometry!r}; choose one of {sorted(GEOMETRIES)}")
    cfg = copy.deepcopy(GEOMETRIES[geometry])
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    if vocab_size is not None:
        if vocab_size < 16:
            raise ConfigError(f"--vocab-size must be at least 16, got {vocab_size}")
        _remap_token_ids(cfg, cfg["vocab_size"], vocab_size)
        cfg["vocab_size"] = vocab_size
    return cfg


def build_generation_config(geometry: str, config: dict) -> dict:
    """generation_config.json of `geometry`, its token ids fitted to config's vocabulary."""
    gen = copy.deepcopy(GENERATION_CONFIGS[geometry])
    _remap_token_ids(gen, GEOMETRIES[geometry]["vocab_size"], config["vocab_size"])
    return gen


def _is_moe_layer(cfg: dict, i: int) -> bool:
    # Same rule as transformers' Qwen3MoeDecoderLayer.
    return (
        cfg.get("num_experts", 0) > 0
        and i not in cfg.get("mlp_only_layers", [])
        and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor on disk, in the order real checkpoints store them."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // n_q
    qwen3 = cfg["model_type"] in ("qwen3", "qwen3_moe")
    # Qwen2 always has q/k/v biases; Qwen3 has q/k/v/o biases only with attention_bias.
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = qwen3 and cfg.get("attention_bias", False)

    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, out in (("q_proj", n_q * hd), ("k_proj", n_kv * hd), ("v_proj", n_kv * hd)):
            specs.append((f"{p}self_attn.{proj}.weight", (out, h)))
            if qkv_bias:
                specs.append((f"{p}self_attn.{proj}.bias", (out,)))
        specs.append((f"{p}self_attn.o_proj.weight", (h, n_q * hd)))
        if o_bias:
            specs.append((f"{p}self_attn.o_proj.bias", (h,)))
        if qwen3:
            specs += [(f"{p}self_attn.q_norm.weight", (hd,)), (f"{p}self_attn.k_norm.weight", (hd,))]
        if _is_moe_layer(cfg, i):
            e_count, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
            specs.append((f"{p}mlp.gate.weight", (e_count, h)))
            for e in range(e_count):
                q = f"{p}mlp.experts.{e}."
                specs += [
                    (f"{q}gate_proj.weight", (inter, h)),
                    (f"{q}up_proj.weight", (inter, h)),
                    (f"{q}down_proj.weight", (h, inter)),
                ]
        else:
            inter = cfg["intermediate_size"]
            specs += [
                (f"{p}mlp.gate_proj.weight", (inter, h)),
                (f"{p}mlp.up_proj.weight", (inter, h)),
                (f"{p}mlp.down_proj.weight", (h, inter)),
            ]
        specs += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
    specs.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (v, h)))
    return specs


def _init_scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor: what a trained model's weights roughly look like."""
    if name.endswith("norm.weight"):
        return 1.0, 0.05  # RMSNorm gains sit near 1; noise keeps them from being all-equal
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith("mlp.gate.weight"):
        return 0.0, 0.01  # small router: near-uniform routing, so calibration hits every expert
    if name == "model.embed_tokens.weight":
        return 0.0, 0.02
    return 0.0, 1.0 / math.sqrt(shape[-1])  # linear [out, in]: keeps activations O(1)


def _tensor_seed(seed: int, name: str) -> int:
    # hashlib, not hash(): Python's str hash is salted per process.
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def fill_tensor(out: torch.Tensor, name: str, seed: int) -> None:
    """Fill `out` (bf16, contiguous, on the generating device) with the values of `name`.

    CUDA: i.i.d. normal. CPU: one seeded block of CPU_BLOCK values tiled (module docstring).
    """
    mean, std = _init_scale(name, tuple(out.shape))
    gen = torch.Generator(device=out.device)
    gen.manual_seed(_tensor_seed(seed, name))
    if out.device.type != "cpu":
        out.normal_(mean, std, generator=gen)
        return
    flat = out.view(-1)
    n = min(flat.numel(), CPU_BLOCK)
    block = (torch.randn(n, generator=gen) * std + mean).to(torch.bfloat16)
    reps = flat.numel() // n
    flat[: reps * n].view(reps, n).copy_(block.expand(reps, n))
    flat[reps * n :].copy_(block[: flat.numel() - reps * n])


@contextlib.contextmanager
def _cpu_fill_pool() -> Iterator[ThreadPoolExecutor]:
    """Threads that fill tensors in parallel, each running torch ops single-threaded.

    The CPU fill is many small memory-bound ops; with torch's intra-op (OpenMP) threads every
    op ends in a barrier, and on a machine whose cores are busy those barriers made filling
    ~8x slower. One tensor per Python thread (torch releases the GIL) has no barriers.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            yield pool
    finally:
        torch.set_num_threads(previous)


def plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Pack tensors in order into shards of at most `shard_bytes` (save_pretrained's rule:
    a tensor larger than a shard gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def write_synthetic(
    geometry: str,
    out_dir: str | Path,
    layers: int | None,
    seed: int = 0,
    device: str = "cpu",
    shard_size_gb: float = 4.0,
    vocab_size: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a synthetic checkpoint of `geometry` with `layers` layers (None: full depth).

    `device` is where values are drawn ("cpu": tiled fast path, "cuda": i.i.d.). Host memory
    holds one shard at a time. Existing shards and index in `out_dir` are replaced. Returns
    `out_dir` as a Path.
    """
    cfg = build_config(geometry, layers, vocab_size)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    if shard_size_gb <= 0:
        raise ConfigError(f"--shard-size-gb must be positive, got {shard_size_gb}")
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, int(shard_size_gb * 1e9))
    total = sum(math.prod(s) * 2 for _, s in specs)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Shards of an earlier run with another shard count would confuse readers of the directory.
    for old in out.iterdir():
        if _SHARD_RE.match(old.name) or old.name == "model.safetensors.index.json":
            old.unlink()
    free = shutil.disk_usage(out).free
    if free < total:
        raise OutputError(f"{out} has {free / 1e9:.1f} GB free; the checkpoint needs {total / 1e9:.1f} GB")

    log(
        f"{geometry}: {cfg['num_hidden_layers']} layers, {len(specs)} tensors, "
        f"{total / 1e9:.2f} GB in {len(shards)} shard(s) -> {out} (device {dev.type})"
    )
    # One flat buffer the size of the largest shard, reused for every shard: host memory
    # stays at one shard, and its pages are faulted in once (first touch is slow on VMs).
    # On CUDA the values are drawn into a GPU twin and copied down in one transfer.
    start = time.perf_counter()  # includes the buffers' allocation (pinning 4 GB takes a while)
    shard_numel = max(sum(math.prod(shape) for _, shape in shard) for shard in shards)
    host = torch.empty(shard_numel, dtype=torch.bfloat16, pin_memory=dev.type == "cuda")
    staging = host if dev.type == "cpu" else torch.empty(shard_numel, dtype=torch.bfloat16, device=dev)
    weight_map: dict[str, str] = {}
    written = 0
    with _cpu_fill_pool() if dev.type == "cpu" else contextlib.nullcontext() as pool:
        fill_map = map if pool is None else pool.map  # CUDA: one stream, serial launches suffice
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            views: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, fill here, save this)
            offset = 0
            for name, shape in shard:
                n = math.prod(shape)
                part = slice(offset, offset + n)
                views.append((name, staging[part].view(shape), host[part].view(shape)))
                offset += n
            list(fill_map(lambda v: fill_tensor(v[1], v[0], seed), views))
            if staging is not host:
                host[:offset].copy_(staging[:offset])
            # Disjoint views of one buffer are fine: save_file writes each from its own pointer.
            save_file({name: saved for name, _, saved in views}, out / fname, metadata={"format": "pt"})
            os.chmod(out / fname, 0o644)  # safetensors creates 0600; downloaded checkpoints are 0644
            written += offset * 2
            weight_map.update((name, fname) for name, _ in shard)
            elapsed = time.perf_counter() - start
            log(f"  [{k}/{len(shards)}] {fname}  {written / 1e9:.2f}/{total / 1e9:.2f} GB  "
                f"{written / 1e9 / elapsed:.2f} GB/s")

    # Index and configs last: a directory without them is an interrupted run.
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    generation = build_generation_config(geometry, cfg)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - start
    rate = written / 1e9 / max(elapsed, 1e-9)
    log(f"wrote {written} bytes ({written / 1e9:.2f} GB) in {elapsed:.1f} s: {rate:.2f} GB/s")
    return out

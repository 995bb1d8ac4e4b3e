"""A job, checked and prepared before the output directory is touched.

`prepare` validates the source checkpoint, the architecture and the calibration data and
builds the meta skeleton and per-layer layouts; it reads no weights. Both the planner and
the layer loop start from its `Job`, so neither imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from streamq.checkpoint.reader import CheckpointReader
from streamq.config import JobConfig
from streamq.errors import CheckpointError, ConfigError
from streamq.model.ignore import IgnoreMatcher
from streamq.model.layout import LayerLayout, fused_expert_modules, natural_key, plan_layer
from streamq.model.moe import check_supported
from streamq.model.names import NameMap
from streamq.model.skeleton import build_skeleton, compute_dtype, decoder_layers, load_model_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"global.device is '{name}' but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"global.device is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device

log = logging.getLogger("streamq")


@dataclass
class Job:
    """Everything checked and derived before the output directory is touched."""

    config: JobConfig
    reader: CheckpointReader
    hf_config: object
    skeleton: nn.Module
    dtype: torch.dtype
    layouts: list[LayerLayout]
    device: torch.device
    batches: list = field(default_factory=list)  # calibration batches (static only)
    # The batches whose hidden states this process keeps (several processes split them); None: all.
    batch_ids: list[int] | None = None
    # Processes splitting each layer's work units (GPTQ's solves, AWQ's searches); for the plan.
    work_ranks: int = 1
    # Several processes of a machine taking every layer: one reads it, each receives the
    # layer as one device buffer held through the layer (`engine.prefetch.NodePrefetcher`).
    received_layers: bool = False
    # False where another process of the machine reads the layers (it holds no read buffers).
    reads_layers: bool = True
    # False where another process writes the non-layer shard (under torchrun, rank 0 does).
    writes_rest: bool = True
    # Processes taking turns writing layers (calibrated schemes under torchrun): each keeps
    # one output arena, not two (`engine.staging.OutputArenas`).
    write_turns: int = 1
    # False where other processes write every layer (under torchrun, the machine's reader).
    writes_layers: bool = True
    # Output arenas page-locked for the largest layer before the loop (torchrun's writers),
    # not grown layer by layer.
    reserves_arenas: bool = False

    @property
    def my_batches(self) -> list[int]:
        return list(range(len(self.batches))) if self.batch_ids is None else self.batch_ids

    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    @property
    def carried(self) -> list[str]:
        """Tensors outside the model transformers builds (next-token-prediction layers past
        `num_hidden_layers`, separate `mtp.*` stacks): copied bit for bit, never quantized."""
        known = {n for n, _ in self.skeleton.named_parameters()} | {n for n, _ in self.skeleton.named_buffers()}
        return sorted((n for n in self.reader.other if n not in known), key=natural_key)

    @property
    def ignored(self) -> list[str]:
        """Linears left unquantized, for the format's ignore list (lm_head always, and every
        Linear of the carried layers)."""
        names = ["lm_head"] + [m for lay in self.layouts for m in lay.ignored] + carried_linears(
            self.carried, self.reader)
        return sorted(set(names), key=names.index)

    @property
    def notes(self) -> list[str]:
        carried = self.carried
        if not carried:
            return []
        groups = sorted({".".join(n.split(".")[:3]) if n.startswith(f"{self.reader.layer_prefix}.")
                         else n.split(".")[0] for n in carried}, key=natural_key)
        return [f"carried unquantized ({len(carried)} tensors, not part of the decoder transformers builds): "
                + ", ".join(groups)]


def carried_linears(names: list[str], reader: CheckpointReader) -> list[str]:
    """Modules of carried tensors that are Linear weights (2D `.weight` that is not a norm or
    an embedding): they stay in high precision, so the format's ignore list names them."""
    out = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        last = module.rpartition(".")[2]
        if leaf == "weight" and len(reader.tensors[name].shape) == 2 and "norm" not in last \
                and "embed" not in last:
            out.append(module)
    return out


def prepare(config: JobConfig, load_data: bool = True) -> Job:
    """Validate source, architecture and calibration data; read no weights.

    `load_data=False` (the planner) leaves `batches` empty: the plan then sizes the
    calibration cache from dataset.num_samples x dataset.max_seq_length, so a job can be
    planned before its calibration file is at hand.
    """
    reader = CheckpointReader(config.model.model_path)
    hf_config = load_model_config(reader.path, config.model.trust_remote_code)
    dtype = compute_dtype(hf_config, config.model.torch_dtype)
    skeleton = build_skeleton(hf_config, dtype, config.model.trust_remote_code)
    layers = decoder_layers(skeleton)
    reader.carry_layers_from(len(layers))
    if reader.num_layers != len(layers) or set(reader.layers) != set(range(len(layers))):
        raise CheckpointError(f"{reader.path}: config.json declares {len(layers)} decoder layers, the "
                              f"safetensors hold layers {sorted(reader.layers)[:3]}... ({len(reader.layers)} in all)")
    ignore = IgnoreMatcher(tuple(config.quant.ignore_layers))
    names = NameMap(skeleton)  # transformers' own disk -> memory conversion for this model
    layouts = [plan_layer(layers[i], i, reader.layer_prefix, reader.layers[i], ignore, names)
               for i in range(len(layers))]
    job = Job(config, reader, hf_config, skeleton, dtype, layouts, resolve_device(config.device))
    config.scheme.check_shapes({m: tuple(reader.tensors[n].shape) for lay in layouts for m, n in lay.quantized.items()})
    # Names on disk and in memory both count (an entry may use either spelling).
    known = [n for n, _ in skeleton.named_modules() if n] + sorted({t.rpartition(".")[0] for t in reader.tensors})
    for entry in ignore.unmatched(known):
        log.warning("compression.quantization.ignore_layers entry '%s' matches no module of %s; it has no effect",
                    entry, reader.path)
    if config.scheme.needs_calibration:
        if load_data:
            job.batches = load_calibration(config, reader.path, hf_config)
        for lay in layouts:
            for parent, module in fused_expert_modules(layers[lay.index]).items():
                check_supported(module, lay.prefix + parent)
    return job


def load_calibration(config: JobConfig, model_path: Path, hf_config) -> list:
    from streamq.calib.dataset import load_text_dataset, make_batches, random_token_samples

    d = config.dataset
    assert d is not None
    if d.name == "RandomTokens":
        samples = random_token_samples(hf_config.vocab_size, d.num_samples, d.max_seq_length, d.seed)
        pad_id = 0
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_path),
                                                      trust_remote_code=config.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{model_path}: no usable tokenizer for TextDataset calibration ({e})") from None
        samples = load_text_dataset(d.data_path, tokenizer, max_seq_length=d.max_seq_length,
                                    num_samples=d.num_samples, skip_bad_lines=d.skip_bad_lines)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return make_batches(samples, d.batch_size, pad_id)

"""Shared fixtures: tiny checkpoints built once per session, config dicts, running a job.

The tiny models are built once per test session under pytest's tmp dir and are
read-only for tests: a test that wants to damage a checkpoint copies it first
(`copy_model`). Quantized outputs of the common jobs are cached per session too
(`quantized`), so the format tests and the transformers load tests share them.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from streamq.config import parse_config
from streamq.testing.tiny_models import ARCHS, CALIB_FILE, build_tiny_model

# Every tiny arch plus qwen3 whose layer 1 has its attention in one shard and its MLP in the other.
SPLIT = "qwen3_split"
MODEL_VARIANTS = (*ARCHS, SPLIT)
NUM_LAYERS = 2


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny matmuls run faster on one thread than two, and far faster on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch (or 'qwen3_split') -> path of a seeded bf16 tiny checkpoint. Do not modify."""
    root = tmp_path_factory.mktemp("tiny_models")
    models = {arch: build_tiny_model(arch, root / arch, num_layers=NUM_LAYERS) for arch in ARCHS}
    models[SPLIT] = build_tiny_model("qwen3", root / SPLIT, num_layers=NUM_LAYERS, split_layer_across_shards=True)
    return models


def make_config(model_path: str | Path, save_path: str | Path, *, algorithm: str = "fp8_dynamic",
                save_name: str = "fp8", weight: str = "per-tensor", activation: str = "per-tensor",
                ignore_layers: list[str] | None = None, device: str = "cpu", num_samples: int = 8,
                max_seq_length: int = 64, batch_size: int = 4) -> dict[str, Any]:
    """An AngelSlim-style config dict (what the YAML parses to) for one job."""
    quant: dict[str, Any] = {"name": algorithm, "bits": 8, "save_name": save_name,
                             "quant_method": {"weight": weight, "activation": activation}}
    if ignore_layers is not None:
        quant["ignore_layers"] = list(ignore_layers)
    cfg: dict[str, Any] = {
        "global": {"save_path": str(save_path), "device": device},
        "model": {"name": "tiny", "model_path": str(model_path)},
        "compression": {"name": "PTQ", "quantization": quant},
    }
    if algorithm == "fp8_static":
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB_FILE), "num_samples": num_samples,
                          "max_seq_length": max_seq_length, "batch_size": batch_size}
    return cfg


def run_job(cfg: dict[str, Any], overwrite: bool = False):
    """Parse and run a config dict in-process; returns the engine's Report."""
    from streamq.engine.run import quantize

    return quantize(parse_config(cfg, "test-config"), overwrite=overwrite, show_progress=False)


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a directory (names must be unique)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            assert name not in out, f"{name} stored twice (second time in {file.name})"
            out[name] = tensor
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def quantized(tiny_models, tmp_path_factory):
    """quantized(variant, save_name, weight='per-tensor') -> output dir of an fp8_dynamic job.

    Each distinct job runs once per session; the outputs are read-only for tests.
    """
    root = tmp_path_factory.mktemp("quantized")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(variant: str, save_name: str, weight: str = "per-tensor") -> Path:
        key = (variant, save_name, weight)
        if key not in cache:
            out = root / "-".join(key)
            run_job(make_config(tiny_models[variant], out, save_name=save_name, weight=weight))
            cache[key] = out
        return cache[key]

    return get


def load_script(name: str):
    """A module from scripts/ (they are not a package), e.g. load_script("bench")."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"streamq_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scheme_config(model_path: str | Path, save_path: str | Path, algorithm: str, *, save_name: str | None = None,
                  block_size: tuple[int, int] | None = None, smooth: bool = False, smooth_alpha: float | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """An AngelSlim-style config dict for the plug-in schemes (int8_dynamic, fp8_blockwise),
    with each scheme's own quant_method keys; `save_name` None keeps the scheme's default."""
    quant: dict[str, Any] = {"name": algorithm, "bits": 8, "ignore_layers": ["lm_head", "model.embed_tokens"]}
    if algorithm == "int8_dynamic":
        quant["quant_method"] = {"weight": "per-channel", "activation": "per-token"}
    elif algorithm == "fp8_blockwise":
        quant["quant_method"] = {"block_size": list(block_size or (128, 128))}
    if save_name is not None:
        quant["save_name"] = save_name
    if smooth:
        quant["quant_helpers"] = ["smooth"]
        if smooth_alpha is not None:
            quant["smooth_alpha"] = smooth_alpha
    cfg: dict[str, Any] = {
        "global": {"save_path": str(save_path), "device": device},
        "model": {"name": "tiny", "model_path": str(model_path)},
        "compression": {"name": "PTQ", "quantization": quant},
    }
    if smooth:
        cfg["dataset"] = {"name": "TextDataset", "data_path": str(CALIB_FILE), "num_samples": 8,
                          "max_seq_length": 64, "batch_size": 4}
    return cfg


@pytest.fixture(scope="session")
def quantized_scheme(tiny_models, tmp_path_factory):
    """quantized_scheme(variant, algorithm, save_name=None, block_size=None, smooth=False) -> output dir.

    The plug-in schemes' jobs (`scheme_config`), each run once per session; read-only for tests.
    """
    root = tmp_path_factory.mktemp("quantized_scheme")
    cache: dict[tuple, Path] = {}

    def get(variant: str, algorithm: str, save_name: str | None = None, block_size: tuple[int, int] | None = None,
            smooth: bool = False) -> Path:
        key = (variant, algorithm, save_name, tuple(block_size) if block_size else None, smooth)
        if key not in cache:
            block = f"{key[3][0]}x{key[3][1]}" if key[3] else None
            out = root / "-".join(str(k) for k in (variant, algorithm, save_name, block, "smooth" if smooth else None)
                                  if k is not None)
            run_job(scheme_config(tiny_models[variant], out, algorithm, save_name=save_name, block_size=block_size,
                                  smooth=smooth))
            cache[key] = out
        return cache[key]

    return get

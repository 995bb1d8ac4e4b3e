"""Checks of the paths a job names, made before torch or transformers are imported.

A wrong model path, a missing calibration file or a save path that would clobber the
source must fail in about a second with a message naming the key and the absolute path
tried, not after five seconds of imports (or, worse, after something was written).
This module therefore imports nothing heavy: only `pathlib`, `re` and `streamq.errors`.
"""

from __future__ import annotations

import re
from pathlib import Path

from streamq.errors import CheckpointError, ConfigError, DatasetError, OutputError

# `Org/Name` (optionally `Org/Name@rev`): what a Hugging Face hub id looks like.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_RELATIVE_NOTE = "relative paths are taken from the current directory"


def _tried(path: str) -> str:
    """The absolute path a relative one resolves to, and the rule that made it."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    return f"{Path.cwd() / p} ({_RELATIVE_NOTE}, {Path.cwd()})"


def looks_like_hub_id(path: str) -> bool:
    """True for `Qwen/Qwen3-235B-A22B`-shaped strings that do not exist on disk."""
    return bool(_HUB_ID_RE.match(path)) and not Path(path).expanduser().exists()


def check_model_path(model_path: str, key: str = "model.model_path") -> None:
    """The model directory exists and holds a `config.json` (CheckpointError, exit 1)."""
    p = Path(model_path).expanduser()
    hint = ""
    if looks_like_hub_id(model_path):
        hint = (f"; '{model_path}' looks like a Hugging Face hub id, but streamq reads local directories only: "
                "download it first (e.g. `huggingface-cli download "
                f"{model_path} --local-dir DIR`) and pass --model-path DIR")
    if not p.exists():
        raise CheckpointError(f"{key}: directory not found: {_tried(model_path)}{hint}")
    if not p.is_dir():
        raise CheckpointError(f"{key}: '{p.resolve()}' is not a directory (model_path is a Hugging Face "
                              "checkpoint directory: config.json + safetensors)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{key}: {p.resolve() / 'config.json'}: missing; is this a Hugging Face checkpoint?")


def check_data_path(data_path: str, key: str = "dataset.data_path") -> None:
    """The calibration file exists and is a file (DatasetError, exit 1)."""
    p = Path(data_path).expanduser()
    if not p.exists():
        raise DatasetError(f"{key}: calibration file not found: {_tried(data_path)}; pass --data-path FILE "
                           "to use another one")
    if not p.is_file():
        raise DatasetError(f"{key}: '{p.resolve()}' is not a file (a JSONL calibration file is expected)")


def _relation(a: Path, b: Path) -> str | None:
    """How resolved path a sits relative to resolved path b: 'is', 'inside', 'contains' or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    if a in b.parents:
        return "contains"
    return None


def check_save_path(save_path: str, model_path: str, data_path: str | None = None) -> None:
    """Refuse a save path equal to, inside, or containing the model path or the calibration file.

    Symlinks are resolved first, so a link to the model directory is the model directory.
    Done before anything else, whatever the flags: `--overwrite` on such a path could
    delete the source checkpoint.
    """
    save = Path(save_path).expanduser().resolve()
    guarded = [("model.model_path", model_path)]
    if data_path:
        guarded.append(("dataset.data_path", data_path))
    for key, value in guarded:
        other = Path(value).expanduser().resolve()
        relation = _relation(save, other)
        if relation is not None:
            words = {"is": "is", "inside": "is inside", "contains": "contains"}[relation]
            raise OutputError(f"save_path '{save}' {words} {key} '{other}'; streamq never writes next to or over "
                              "its input: choose a save_path outside it")


def calibration_file(config) -> str | None:
    """The calibration file a job reads (a scheme that calibrates, TextDataset), else None."""
    d = config.dataset
    scheme = getattr(config, "scheme", None)
    if scheme is not None and scheme.needs_calibration and d is not None and d.name == "TextDataset":
        return d.data_path
    return None


def check_writable(path: str, flag: str, needs_module: str | None = None) -> None:
    """An output file a command will write at its end can be written (ConfigError, exit 2).

    Checked up front so that a long evaluation does not end in a failed write: the parent
    directory exists and is writable, the path is not a directory, and any module needed
    to produce it is installed.
    """
    import importlib.util
    import os

    p = Path(path).expanduser()
    parent = p.parent.resolve()
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} {path}: not writable ({p.resolve()})")
    if needs_module and importlib.util.find_spec(needs_module) is None:
        raise ConfigError(f"{flag} needs {needs_module} (pip install {needs_module})")

"""The job description: AngelSlim-style YAML, validated before anything is read or written.

Every problem is a `ConfigError` (exit code 2) whose message names the key path and the
allowed values. Keys that mean nothing to a streaming engine (`device_map`, ...) are
accepted and reported as notes, so existing AngelSlim configs run unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamq.errors import ConfigError
from streamq.formats.base import format_names, get_format
from streamq.schemes.base import SCHEMES, Scheme, get_scheme, scheme_names

CACHE_LOCATIONS = ("auto", "device", "host", "disk")
DATASET_NAMES = ("TextDataset", "RandomTokens")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")

# Accepted for AngelSlim compatibility; a streaming engine has no use for them.
NOTED_KEYS = {
    "model.device_map": "streamq places one layer at a time on global.device",
    "model.low_cpu_mem_usage": "streamq never loads the whole model",
    "model.use_cache": "calibration never uses a KV cache",
    "model.cache_dir": "streamq reads model_path directly",
    "global.deploy_backend": "the output format is chosen by compression.quantization.save_name",
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, key: str) -> int | None:
    """'8GiB', '500MB', 1234 -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: '{value}' is not a size (examples: 8GiB, 512MiB, 20GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])


@dataclass
class ModelConfig:
    model_path: str
    name: str = ""
    trust_remote_code: bool = False
    torch_dtype: str = "auto"


@dataclass
class DatasetConfig:
    name: str = "TextDataset"
    data_path: str = ""
    max_seq_length: int = 2048
    num_samples: int = 128
    batch_size: int = 1
    skip_bad_lines: bool = False
    seed: int = 0  # RandomTokens only


@dataclass
class QuantConfig:
    name: str
    bits: int
    weight: str = "per-tensor"
    activation: str = "per-tensor"
    ignore_layers: list[str] = field(default_factory=lambda: ["lm_head"])
    low_memory: bool = True
    save_name: str = "fp8"
    moe_calibrate_all_experts: bool = False
    hidden_cache: str = "auto"
    # The scheme's own keys as given (smooth_alpha, actorder, ...): part of the job identity.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobConfig:
    model: ModelConfig
    quant: QuantConfig
    save_path: str
    device: str = "auto"
    max_gpu_memory: int | None = None
    max_cpu_memory: int | None = None
    dataset: DatasetConfig | None = None
    # Static runs save the hidden-state cache every N layers / T minutes so a resume
    # does not replay every finished layer (0 disables that trigger).
    cache_checkpoint_layers: int = 0
    cache_checkpoint_minutes: float = 30.0
    source_file: str = ""
    notes: list[str] = field(default_factory=list)
    scheme: Scheme | None = field(default=None, repr=False)  # built and validated by parse_config

    @property
    def format(self):
        """The output format (`streamq.formats`) named by save_name."""
        return get_format(self.quant.save_name)

    def job_identity(self) -> dict:
        """Everything that changes the output bytes (not paths, device or budgets)."""
        relevant = {"model": {"torch_dtype": self.model.torch_dtype}, "quant": asdict(self.quant),
                    "dataset": asdict(self.dataset) if self.dataset else None}
        relevant["quant"].pop("low_memory")
        relevant["quant"].pop("hidden_cache")
        if not relevant["quant"]["params"]:
            relevant["quant"].pop("params")  # jobs from before scheme plug-ins keep their hash
        return relevant

    def job_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.job_identity(), sort_keys=True).encode()).hexdigest()[:16]

    def effective_dict(self) -> dict:
        d = asdict(self)
        d.pop("notes")
        d["scheme"] = self.scheme.identity() if self.scheme is not None else None
        return d


# key path -> (python types, required)
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "global": ((dict,), True),
    "global.save_path": ((str,), True),
    "global.device": ((str,), False),
    "global.max_gpu_memory": ((str, int), False),
    "global.max_cpu_memory": ((str, int), False),
    "global.cache_checkpoint_layers": ((int,), False),
    "global.cache_checkpoint_minutes": ((int, float), False),
    "model": ((dict,), True),
    "model.name": ((str,), False),
    "model.model_path": ((str,), True),
    "model.trust_remote_code": ((bool,), False),
    "model.torch_dtype": ((str,), False),
    "compression": ((dict,), True),
    "compression.name": ((str,), True),
    "compression.quantization": ((dict,), True),
    "compression.quantization.name": ((str,), True),
    "compression.quantization.bits": ((int,), True),
    "compression.quantization.quant_method": ((dict,), False),
    "compression.quantization.quant_method.weight": ((str,), False),
    "compression.quantization.quant_method.activation": ((str,), False),
    "compression.quantization.ignore_layers": ((list,), False),
    "compression.quantization.low_memory": ((bool,), False),
    "compression.quantization.save_name": ((str,), False),
    "compression.quantization.moe_calibrate_all_experts": ((bool,), False),
    "compression.quantization.hidden_cache": ((str,), False),
    "dataset": ((dict,), False),
    "dataset.name": ((str,), True),
    "dataset.data_path": ((str,), False),
    "dataset.max_seq_length": ((int,), False),
    "dataset.num_samples": ((int,), False),
    "dataset.batch_size": ((int,), False),
    "dataset.skip_bad_lines": ((bool,), False),
    "dataset.seed": ((int,), False),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true/false", dict: "a mapping", list: "a list"}


def _scheme_schema(raw: dict) -> tuple[dict[str, tuple[tuple[type, ...], bool]], dict[str, str]]:
    """The schema extended by the named scheme's own keys, and the keys it only notes."""
    schema, noted = dict(_SCHEMA), dict(NOTED_KEYS)
    q = (raw.get("compression") or {}).get("quantization") if isinstance(raw.get("compression"), dict) else None
    name = q.get("name") if isinstance(q, dict) else None
    scheme_names()  # loads the built-in schemes
    cls = SCHEMES.get(name) if isinstance(name, str) else None
    if cls is None:
        return schema, noted
    for key in [k for k in schema if k.startswith(f"{_Q}.quant_method.")]:
        del schema[key]
    for key, types in cls.method_keys.items():
        schema[f"{_Q}.quant_method.{key}"] = (types, False)
    for key, types in cls.keys.items():
        schema[f"{_Q}.{key}"] = (types, False)
    noted.update({f"{_Q}.{k}": why for k, why in cls.noted_keys.items()})
    return schema, noted


_Q = "compression.quantization"


def _walk(node: dict, prefix: str, notes: list[str], source: str,
          schema: dict | None = None, noted: dict | None = None) -> None:
    schema = _SCHEMA if schema is None else schema
    noted = NOTED_KEYS if noted is None else noted
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in noted:
            notes.append(f"{path} is accepted but not used: {noted[path]}")
            continue
        if path not in schema:
            siblings = sorted(k[len(prefix):] for k in schema if k.startswith(prefix) and "." not in k[len(prefix):])
            raise ConfigError(f"{source}: unknown key '{path}' (allowed here: {', '.join(siblings)})")
        types, _ = schema[path]
        # bool is an int in Python; an integer key must not accept `true`.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if value is None and not schema[path][1]:
            ok = True
        if not ok:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(f"{source}: '{path}' must be {want}, got {type(value).__name__} {value!r}")
        if isinstance(value, dict):
            _walk(value, f"{path}.", notes, source, schema, noted)


def _require(raw: dict, source: str) -> None:
    for path, (_, required) in _SCHEMA.items():
        parent, _, leaf = path.rpartition(".")
        node: Any = raw
        for part in parent.split(".") if parent else []:
            node = node.get(part) if isinstance(node, dict) else None
        if required and isinstance(node, dict) and node.get(leaf) is None:
            raise ConfigError(f"{source}: missing required key '{path}'")


def _one_of(value: str, allowed: tuple[str, ...], key: str, source: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{source}: '{key}' is '{value}'; allowed: {', '.join(allowed)}")
    return value


def parse_config(raw: Any, source: str = "<config>", overrides: dict[str, Any] | None = None) -> JobConfig:
    """Validate a parsed YAML document (plus CLI overrides) into a JobConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with global, model, compression")
    notes: list[str] = []
    schema, noted = _scheme_schema(raw)
    _walk(raw, "", notes, source, schema, noted)
    _require(raw, source)
    g, m, c = raw["global"], raw["model"], raw["compression"]
    q = c["quantization"]
    _one_of(c["name"], ("quantization", "PTQ", "PTQWeightOnly"), "compression.name", source)

    algo = q["name"]
    scheme = get_scheme(algo, source).from_yaml(q, source)
    save_name = _one_of(q.get("save_name", scheme.default_format), tuple(format_names()),
                        "compression.quantization.save_name", source)
    spec = scheme.spec
    why = get_format(save_name).supports(spec)
    if why is not None:
        fits = [n for n in format_names() if get_format(n).supports(spec) is None]
        act = spec.activation.yaml_name if spec.activation is not None else "none"
        raise ConfigError(f"{source}: {algo} with weights {spec.weight.yaml_name} / activations {act} cannot be "
                          f"written as save_name '{save_name}' ({why}); set 'compression.quantization.save_name' "
                          f"to one of: {', '.join(fits)}")
    method = q.get("quant_method") or {}
    common = {"name", "bits", "quant_method", "ignore_layers", "low_memory", "save_name",
              "moe_calibrate_all_experts", "hidden_cache"}
    noted_here = type(scheme).noted_keys
    params = {k: v for k, v in q.items() if k not in common and k not in noted_here}
    params.update({f"quant_method.{k}": v for k, v in method.items()
                   if k not in ("weight", "activation") and f"quant_method.{k}" not in noted_here})
    ignore = q.get("ignore_layers")
    ignore = ["lm_head"] if ignore is None else [str(x) for x in ignore]
    for pattern in ignore:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ConfigError(f"{source}: 'compression.quantization.ignore_layers' entry '{pattern}' is not a "
                                  f"valid regular expression: {e}") from None
    quant = QuantConfig(
        name=algo, bits=q["bits"], weight=method.get("weight", spec.weight.yaml_name),
        activation=method.get("activation", spec.activation.yaml_name if spec.activation else "none"),
        ignore_layers=ignore, low_memory=q.get("low_memory", True), save_name=save_name, params=params,
        moe_calibrate_all_experts=q.get("moe_calibrate_all_experts", False),
        hidden_cache=_one_of(q.get("hidden_cache", "auto"), CACHE_LOCATIONS,
                             "compression.quantization.hidden_cache", source),
    )
    if not quant.low_memory:
        notes.append("compression.quantization.low_memory: false is accepted; streamq always streams layer by layer")

    dataset = None
    if raw.get("dataset") is not None:
        d = raw["dataset"]
        dataset = DatasetConfig(**{k: v for k, v in d.items()})
        _one_of(dataset.name, DATASET_NAMES, "dataset.name", source)
        for key in ("max_seq_length", "num_samples", "batch_size"):
            if getattr(dataset, key) < 1:
                raise ConfigError(f"{source}: 'dataset.{key}' must be at least 1, got {getattr(dataset, key)}")
    if scheme.needs_calibration and dataset is None:
        raise ConfigError(f"{source}: {algo} calibrates on data and needs a 'dataset' section")
    if not scheme.needs_calibration and dataset is not None:
        notes.append(f"dataset is not used by {algo} (no calibration needed)")

    model = ModelConfig(model_path=m["model_path"], name=m.get("name") or "",
                        trust_remote_code=m.get("trust_remote_code", False),
                        torch_dtype=_one_of(m.get("torch_dtype", "auto"), TORCH_DTYPES, "model.torch_dtype", source))
    job = JobConfig(model=model, quant=quant, save_path=g["save_path"], device=g.get("device") or "auto",
                    max_gpu_memory=parse_size(g.get("max_gpu_memory"), "global.max_gpu_memory"),
                    max_cpu_memory=parse_size(g.get("max_cpu_memory"), "global.max_cpu_memory"),
                    dataset=dataset, source_file=source, notes=notes, scheme=scheme,
                    cache_checkpoint_layers=g.get("cache_checkpoint_layers") or 0,
                    cache_checkpoint_minutes=float(g.get("cache_checkpoint_minutes") or 30.0))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "model_path":
            job.model.model_path = value
        elif key == "data_path":
            if job.dataset is None:
                notes.append("--data-path is not used: the config has no dataset section"
                             + ("" if scheme.needs_calibration else f" ({algo} needs no calibration)"))
            else:
                job.dataset.data_path = value
        elif key in ("save_path", "device"):
            setattr(job, key, value)
        elif key in ("max_gpu_memory", "max_cpu_memory"):
            setattr(job, key, parse_size(value, f"--{key.replace('_', '-')}"))
        else:
            raise AssertionError(f"unknown override {key}")
    if dataset is not None and dataset.name == "TextDataset" and not dataset.data_path:
        raise ConfigError(f"{source}: 'dataset.data_path' is required for dataset.name: TextDataset "
                          "(or pass --data-path)")
    check_device(job.device, source)
    return job


def check_device(device: str, source: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"{source}: 'global.device' is '{device}'; allowed: auto, cpu, cuda, cuda:N")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    job = parse_config(raw, str(path), overrides)
    # Relative paths in a config are relative to where the user runs the command (as in AngelSlim).
    return job

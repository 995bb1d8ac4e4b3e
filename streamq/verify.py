"""`streamq verify`: check a finished checkpoint without loading its weights (a CI gate).

Structure is decided from safetensors headers, `config.json`, the index and the run
manifest; tensor data is read for the scales, the shards' checksums and the FP8 NaN scan
(the last two streamed in chunks and skipped by `--fast`). Each
problem is one line naming the file and, where there is one, the tensor.

Checks:
  * `config.json` exists and carries a well-formed `quantization_config` of a format
    streamq writes (parsed by that format, `streamq.formats`);
  * `streamq_run.json`, when present, says the run is complete and its shards' sizes and
    sha256 match (`--fast`: sizes only);
  * no F8_E4M3 weight holds a NaN code (bytes 0x7F / 0xFF), scanned in chunks (not with
    `--fast`);
  * the index maps every tensor to an existing, untruncated shard whose header lists
    exactly the tensors mapped to it, and `total_size` matches;
  * every quantized Linear holds exactly the tensors the format's specs describe (names,
    dtypes, shapes), scales finite and > 0; `input_scale` on all of them (static) or none;
  * every decoder layer is there, and every expert of every MoE layer;
  * with a source checkpoint: every source tensor is present (quantized Linears as
    weight + scales of the same shape, everything else with identical dtype and shape)
    and nothing else is.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamq.checkpoint.reader import INDEX_FILE, LAYER_RE, SINGLE_FILE, CheckpointReader, read_safetensors_header
from streamq.errors import StreamqError
from streamq.formats.base import (
    INPUT_SCALE,
    SCALE,
    WEIGHT,
    Format,
    QuantSpec,
    ignore_entry_matches,
    parse_quantization_config,
)

MANIFEST = "streamq_run.json"  # streamq.engine.state.MANIFEST, without importing torch-heavy modules
EXPERT_RE = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.(?P<parent>.*experts)\.(?P<idx>\d+)\.")
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PROJ_NAMES = (EXPERT_PROJS, ("w1", "w3", "w2"))  # names on disk: Qwen/DeepSeek style, Mixtral style
# Weight dtypes that only a quantized Linear has (an unquantized one keeps its float dtype).
QUANTIZED_WEIGHT_DTYPES = ("F8_E4M3", "I8")


@dataclass(frozen=True)
class Problem:
    message: str
    file: str = ""
    tensor: str = ""

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.file, f"tensor '{self.tensor}'" if self.tensor else "") if x)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class Declared:
    """What `quantization_config` promises: the format, its spec and its ignore list."""

    format: Format
    spec: QuantSpec
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        kind = "static" if self.spec.static_activations else "weight-only" if self.spec.weight_only else "dynamic"
        return f"{self.format.save_name} {self.spec.type}{self.spec.bits} {self.spec.weight.yaml_name} ({kind})"


@dataclass(frozen=True)
class HeaderEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class VerifyResult:
    path: str
    problems: list[Problem] = field(default_factory=list)
    tensors: int = 0
    quantized_linears: int = 0
    files: int = 0
    format: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "format": self.format, "tensors": self.tensors,
                "quantized_linears": self.quantized_linears, "files": self.files,
                "problems": [asdict(p) | {"text": str(p)} for p in self.problems]}


# --------------------------------------------------------------------------- config.json


def check_config(out: Path, add_problem) -> tuple[dict | None, Declared | None]:
    """Parse config.json and its quantization_config; problems go to `add_problem(msg, file)`."""
    path = out / "config.json"

    def add(msg: str) -> None:
        add_problem(msg, "config.json")

    if not path.is_file():
        add("missing: the run did not finish (config.json is written last) or this is not a checkpoint")
        return None, None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        add(f"not valid JSON: {e}")
        return None, None
    if not isinstance(config, dict):
        add("must be a JSON object")
        return None, None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        add("has no quantization_config block")
        return config, None
    try:
        fmt, spec, ignored = parse_quantization_config(qc)
    except ValueError as e:
        add(str(e))
        return config, None
    return config, Declared(fmt, spec, tuple(ignored))


# --------------------------------------------------------------------------- manifest


def check_manifest(out: Path, add_problem, fast: bool = False) -> None:
    """The run manifest, when present: status complete, and every shard it recorded there
    with its recorded size and (unless `fast`) sha256."""
    from streamq.payload import sha256_file

    path = out / MANIFEST
    if not path.is_file():
        return  # not required: a checkpoint may have been copied without it
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        add_problem(f"not valid JSON: {e}", MANIFEST)
        return
    status = manifest.get("status")
    if status != "complete":
        add_problem(f"run did not finish (status '{status}'); rerun the same quantize command to resume", MANIFEST)
    for key, info in sorted((manifest.get("shards") or {}).items()):
        file = out / str(info.get("file", ""))
        if not file.is_file():
            add_problem(f"shard '{key}' recorded in {MANIFEST} is missing", info.get("file", "?"))
        elif file.stat().st_size != info.get("bytes"):
            add_problem(f"{file.stat().st_size} bytes, {MANIFEST} recorded {info.get('bytes')} for shard '{key}'",
                        file.name)
        elif not fast and sha256_file(file) != info.get("sha256"):
            add_problem(f"sha256 differs from the one {MANIFEST} recorded for shard '{key}' (same size: the "
                        "file was changed or damaged after it was written)", file.name)


# --------------------------------------------------------------------------- index and headers


def load_headers(out: Path, add_problem) -> tuple[dict[str, HeaderEntry], set[str]]:
    """Tensor name -> header entry, checking the index against every shard's header.

    Also returns the names mapped to shards that are missing or unreadable: those are
    reported once, per file, not again as missing tensors.
    """
    index_path = out / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as e:
            add_problem(f"not a valid safetensors index ({type(e).__name__}: {e})", INDEX_FILE)
            return {}, set()
    elif (out / SINGLE_FILE).is_file():
        index, weight_map = None, None
    else:
        add_problem(f"no {INDEX_FILE} or {SINGLE_FILE}", str(out))
        return {}, set()
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    entries: dict[str, HeaderEntry] = {}
    unavailable: set[str] = set()
    data_bytes = file_bytes = 0
    for file in files:
        shard = out / file
        names = sorted(n for n, f in weight_map.items() if f == file) if weight_map is not None else []
        if not shard.is_file():
            add_problem(f"listed in {INDEX_FILE} for {len(names)} tensor(s) (first '{names[0]}') but missing", file)
            unavailable.update(names)
            continue
        try:
            header = read_safetensors_header(shard)
        except StreamqError as e:
            add_problem(str(e).replace(f"{shard}: ", ""), file)
            unavailable.update(names)
            continue
        file_bytes += shard.stat().st_size
        data_bytes += sum(m["data_offsets"][1] - m["data_offsets"][0] for m in header.values())
        if weight_map is not None:
            mapped = {n for n, f in weight_map.items() if f == file}
            for name in sorted(mapped - set(header)):
                add_problem(f"{INDEX_FILE} maps it to this file, but the file does not contain it", file, name)
            for name in sorted(set(header) - mapped):
                where = weight_map.get(name)
                listed = f"maps it to '{where}'" if where else "does not list it"
                add_problem(f"in the file but {INDEX_FILE} {listed}", file, name)
        for name, meta in header.items():
            if weight_map is None or weight_map.get(name) == file:
                entries[name] = HeaderEntry(file, meta["dtype"], tuple(meta["shape"]))
    if index is not None:
        _check_total_size(index, data_bytes, file_bytes, add_problem)
        for stray in sorted(p.name for p in out.glob("*.safetensors") if p.name not in files):
            add_problem(f"not listed in {INDEX_FILE} (a leftover from another run?)", stray)
    return entries, unavailable


def _check_total_size(index: dict, data_bytes: int, file_bytes: int, add_problem) -> None:
    """streamq writes the shards' file sizes; Hugging Face writes tensor data bytes. Accept both."""
    total = (index.get("metadata") or {}).get("total_size")
    if total is None:
        return
    if not isinstance(total, int) or total not in (data_bytes, file_bytes):
        add_problem(f"metadata.total_size is {total!r}; the shards hold {data_bytes} data bytes "
                    f"({file_bytes} bytes on disk)", INDEX_FILE)


# --------------------------------------------------------------------------- quantized tensors


def _same_shape(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Scalar scales may be stored as [] or [1] (AutoFP8 writes [], compressed-tensors [1])."""
    return got == want or (len(got) <= 1 and len(want) <= 1 and math.prod(got) == math.prod(want) == 1)


def quantized_modules(entries: dict[str, HeaderEntry], declared: Declared) -> set[str]:
    """Modules that carry the format's marker tensor (the weight scale)."""
    suffix = "." + declared.format.marker(declared.spec)
    return {n[: -len(suffix)] for n in entries if n.endswith(suffix)}


def check_quantized(entries: dict[str, HeaderEntry], declared: Declared, add_problem) -> list[str]:
    """Per-Linear checks from the headers against the format's specs; returns the scale
    tensor names whose values to read."""
    fmt, spec = declared.format, declared.spec
    roles = {t.suffix: t.role for t in fmt.specs(spec, 1, 1)}
    suffixes = set(roles) | {"input_scale", "weight_scale", "weight_scale_inv", "weight_zero_point"}
    scales: list[str] = []
    modules = quantized_modules(entries, declared)
    for module in sorted(modules):
        shapes = {t.suffix: e.shape for t in fmt.specs(spec, 1, 1)
                  if (e := entries.get(f"{module}.{t.suffix}")) is not None}
        shape = fmt.logical_shape(spec, shapes)
        marker = entries[f"{module}.{fmt.marker(spec)}"]
        if shape is None:
            add_problem(f"has no 2D quantized weight next to it (format {fmt.save_name})", marker.file,
                        f"{module}.{fmt.marker(spec)}")
            continue
        if any(ignore_entry_matches(entry, module) for entry in declared.ignored):
            add_problem("is quantized but quantization_config lists it as ignored", marker.file, module)
        expected = {t.suffix: t for t in fmt.specs(spec, *shape, scale_dtype=marker.dtype)}
        for suffix, t in expected.items():
            name = f"{module}.{suffix}"
            entry = entries.get(name)
            if entry is None:
                if suffix == "input_scale":
                    weight = next(x.suffix for x in expected.values() if x.role == WEIGHT)
                    add_problem("static activations, but this Linear has no input_scale", marker.file,
                                f"{module}.{weight}")
                else:
                    add_problem(f"missing (format {fmt.save_name} stores it for every quantized Linear)",
                                marker.file, name)
                continue
            if entry.dtype != t.dtype or not _same_shape(entry.shape, t.shape):
                what = "a quantized Linear weight must be" if t.role == WEIGHT else "expected"
                add_problem(f"is {entry.dtype} {list(entry.shape)}; {what} {t.dtype} {list(t.shape)} "
                            f"({declared.describe()})", entry.file, name)
            if t.role in (SCALE, INPUT_SCALE):
                scales.append(name)
        for suffix in sorted(suffixes - set(expected)):
            entry = entries.get(f"{module}.{suffix}")
            if entry is not None:
                why = "dynamic activations, but an input_scale is stored" if suffix == "input_scale" else \
                    f"not part of format {fmt.save_name} ({declared.describe()})"
                add_problem(why, entry.file, f"{module}.{suffix}")
    for name, entry in sorted(entries.items()):
        module, _, suffix = name.rpartition(".")
        if module in modules:
            continue
        if suffix in suffixes and roles.get(suffix) != WEIGHT:
            add_problem(f"{suffix} without a quantized weight", entry.file, name)
        elif suffix == "weight" and entry.dtype in QUANTIZED_WEIGHT_DTYPES:
            add_problem(f"is {entry.dtype} but has no {fmt.marker(spec)}", entry.file, name)
    return scales


def check_scale_values(out: Path, entries: dict[str, HeaderEntry], names: list[str], add_problem) -> None:
    """Read the scale tensors: every value finite and > 0."""
    import torch
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(entries[n].file, []).append(n)
    for file, file_names in sorted(by_file.items()):
        try:
            with safe_open(str(out / file), framework="pt", device="cpu") as f:
                for name in file_names:
                    # One vectorized pass: a 4-bit checkpoint of Qwen3-235B-A22B has 18M group
                    # scales per layer, which a per-value Python loop took 1.5 s a layer to check.
                    values = f.get_tensor(name).reshape(-1)
                    bad = ~(torch.isfinite(values) & (values > 0))
                    count = int(bad.sum())
                    if count:
                        first = values[bad.nonzero()[0, 0]].double().item()
                        add_problem(f"scale must be finite and > 0, found {first!r}"
                                    + (f" ({count} of {values.numel()} values)" if values.numel() > 1 else ""),
                                    file, name)
        except (OSError, RuntimeError, SafetensorError) as e:  # SafetensorError: e.g. bytes after the data
            add_problem(f"cannot read scale tensors: {e}", file)


# --------------------------------------------------------------------------- layers and experts


def _num_experts(config: dict) -> int:
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        if isinstance(config.get(key), int):
            return config[key]
    return 0


def _is_moe_layer(config: dict, i: int) -> bool:
    """Qwen-MoE's rule (decoder_sparse_step, mlp_only_layers); all layers when absent."""
    step = config.get("decoder_sparse_step") or 1
    dense_first = config.get("first_k_dense_replace") or 0  # DeepSeek-style dense leading layers
    return (_num_experts(config) > 0 and i >= dense_first and i not in (config.get("mlp_only_layers") or [])
            and (i + 1) % step == 0)


def check_layers(names: set[str], config: dict, add_problem) -> None:
    """Every decoder layer has tensors; every expert of every MoE layer has its three weights.

    `names`: the tensors the checkpoint has (or claims, for shards already reported broken).
    """
    layers: dict[int, str] = {}
    experts: dict[str, set[int]] = {}
    decoder = "model.layers" if any(n.startswith("model.layers.") for n in names) else None  # not mtp.layers
    for name in names:
        m = LAYER_RE.match(name)
        if m and decoder in (None, m.group("prefix")):
            layers[int(m.group("idx"))] = f"{m.group('prefix')}.{m.group('idx')}"
        e = EXPERT_RE.match(name)
        # Any tensor of the projection counts (`weight`, or a packed format's `weight_packed`).
        if e and any(name.split(".")[-2] in p for p in EXPERT_PROJ_NAMES):
            experts.setdefault(f"{e.group('layer')}.{e.group('parent')}", set()).add(int(e.group("idx")))
    declared = config.get("num_hidden_layers")
    if isinstance(declared, int):
        missing = sorted(set(range(declared)) - set(layers))
        if missing:
            add_problem(f"config.json declares {declared} decoder layers; no tensors for layer(s) "
                        f"{_ranges(missing)}", INDEX_FILE)
        prefix = next(iter(layers.values())).rsplit(".", 1)[0] if layers else "model.layers"
        n = _num_experts(config)
        for i in range(declared):
            if i not in layers or not _is_moe_layer(config, i):
                continue
            parents = [p for p in experts if p.startswith(f"{prefix}.{i}.")] or [f"{prefix}.{i}.mlp.experts"]
            for parent in parents:
                found = experts.get(parent, set())
                lost = sorted(set(range(n)) - found)
                if lost:
                    add_problem(f"{len(lost)} of {n} experts missing under '{parent}': {_ranges(lost)}", INDEX_FILE)
    modules = {name.rpartition(".")[0] for name in names}
    for parent, found in sorted(experts.items()):
        for e in sorted(found):
            projs = next((p for p in EXPERT_PROJ_NAMES if f"{parent}.{e}.{p[0]}" in modules), EXPERT_PROJS)
            for proj in projs:
                if f"{parent}.{e}.{proj}" not in modules:
                    add_problem(f"expert {e} of '{parent}' has no {proj}", INDEX_FILE, f"{parent}.{e}.{proj}.weight")


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (long lists of experts stay one readable line)."""
    parts: list[str] = []
    start = prev = None
    for v in values + [None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)


# --------------------------------------------------------------------------- source comparison


def check_against_source(entries: dict[str, HeaderEntry], unavailable: set[str], source: Path,
                         config: dict | None, declared: Declared | None, add_problem) -> None:
    """Every source tensor is in the output (quantized or copied as is), nothing extra."""
    try:
        reader = CheckpointReader(source)
    except StreamqError as e:
        add_problem(f"cannot read the source checkpoint: {e}", str(source))
        return
    expected: set[str] = set()
    modules = quantized_modules(entries, declared) if declared is not None else set()
    for name, info in reader.tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in modules and declared is not None and len(info.shape) == 2:
            specs = declared.format.specs(declared.spec, *info.shape, scale_dtype=info.dtype)
            expected.update(f"{module}.{t.suffix}" for t in specs)
            weight = next(t for t in specs if t.role == WEIGHT)
            got = entries.get(f"{module}.{weight.suffix}")
            if got is not None and not _same_shape(got.shape, weight.shape):
                add_problem(f"quantized weight has shape {list(got.shape)}; from the source's {list(info.shape)} "
                            f"the format stores {list(weight.shape)}", got.file, f"{module}.{weight.suffix}")
            continue
        got = entries.get(name)
        expected.add(name)
        if got is None and name in unavailable:
            continue  # its shard is already reported
        if got is None:
            add_problem(f"in the source ({info.file}) but missing from the output", "", name)
            continue
        if (got.dtype, got.shape) != (info.dtype, info.shape):
            add_problem(f"is {got.dtype} {list(got.shape)}, the source {info.dtype} {list(info.shape)}; "
                        "unquantized tensors must be copied unchanged", got.file, name)
    for name in sorted(set(entries) - expected):
        add_problem("not in the source checkpoint (extra tensor)", entries[name].file, name)
    if config is not None:
        _compare_configs(config, source, add_problem)


def _compare_configs(config: dict, source: Path, add_problem) -> None:
    try:
        src = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # the reader above already complained about an unreadable source
    changed = sorted(k for k in set(src) | set(config)
                     if k != "quantization_config" and src.get(k) != config.get(k))
    if changed:
        add_problem(f"differs from the source's config.json in: {', '.join(changed[:5])}"
                    + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""), "config.json")


# --------------------------------------------------------------------------- entry point


def check_fp8_payloads(out: Path, entries: dict[str, HeaderEntry], add_problem) -> None:
    """Every F8_E4M3 tensor's bytes, in chunks: no NaN codes (0x7F / 0xFF)."""
    from streamq.payload import FP8_E4M3, fp8_nan_counts

    for file in sorted({e.file for e in entries.values() if e.dtype == FP8_E4M3}):
        try:
            found = fp8_nan_counts(out / file)
        except (OSError, ValueError, KeyError, struct.error) as e:
            add_problem(f"cannot scan FP8 data: {e}", file)
            continue
        for name, (nan, total) in sorted(found.items()):
            if entries.get(name) is not None and entries[name].file == file:
                add_problem(f"{nan} of {total} FP8 values are NaN (byte 0x7F/0xFF)", file, name)


def verify_checkpoint(path: str | Path, source: str | Path | None = None, manifest: bool = True,
                      fast: bool = False) -> VerifyResult:
    """All checks; never raises for a bad checkpoint (problems are collected).

    `manifest=False` skips the run manifest (the engine's own end-of-run check, made
    before the manifest says complete). `fast` reads no tensor data beyond the scales:
    shard sizes are checked against the manifest, their sha256 and the FP8 NaN scan are
    skipped.
    """
    out = Path(path)
    result = VerifyResult(str(out))

    def add(message: str, file: str = "", tensor: str = "") -> None:
        result.problems.append(Problem(message, file, tensor))

    if not out.is_dir():
        add("not a directory", str(out))
        return result
    if manifest:
        check_manifest(out, add, fast)
    config, fmt = check_config(out, add)
    entries, unavailable = load_headers(out, add)
    result.tensors = len(entries)
    result.files = len({e.file for e in entries.values()})
    if fmt is not None:
        result.format = fmt.describe()
        scales = check_quantized(entries, fmt, add)
        result.quantized_linears = len(quantized_modules(entries, fmt))
        check_scale_values(out, entries, scales, add)
        if result.quantized_linears == 0 and entries:
            add("quantization_config is set but no tensor is quantized", "config.json")
    if not fast:
        check_fp8_payloads(out, entries, add)
    if config is not None:
        check_layers(set(entries) | unavailable, config, add)
    if source is not None:
        check_against_source(entries, unavailable, Path(source), config, fmt, add)
    return result


def format_result(result: VerifyResult) -> str:
    if result.ok:
        return (f"{result.path}: ok ({result.format}, {result.quantized_linears} quantized Linears, "
                f"{result.tensors} tensors in {result.files} files)")
    lines = [f"{result.path}: {p}" for p in result.problems]
    lines.append(f"{len(result.problems)} problem(s) in {result.path}")
    return "\n".join(lines)


def verify_command(path: str, source: str | None = None, as_json: bool = False, fast: bool = False) -> int:
    """`streamq verify`: print the result; exit code 0 when clean, 1 on any problem."""
    result = verify_checkpoint(path, source, fast=fast)
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
    return 0 if result.ok else 1

"""`streamq verify`: check a finished checkpoint without loading its weights (a CI gate).

Everything is decided from safetensors headers, `config.json`, the index and the run
manifest; the only tensor data read are the scales (a few bytes per Linear). Each
problem is one line naming the file and, where there is one, the tensor.

Checks:
  * `config.json` exists and carries a well-formed `quantization_config` (vLLM `fp8` or
    compressed-tensors `float-quantized`);
  * `streamq_run.json`, when present, says the run is complete and its shard sizes match;
  * the index maps every tensor to an existing, untruncated shard whose header lists
    exactly the tensors mapped to it, and `total_size` matches;
  * every quantized Linear: F8_E4M3 2D weight, F32 scales of the format's shape, finite
    and > 0; `input_scale` present on all of them (static) or on none (dynamic);
  * every decoder layer is there, and every expert of every MoE layer;
  * with a source checkpoint: every source tensor is present (quantized Linears as
    weight + scales of the same shape, everything else with identical dtype and shape)
    and nothing else is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streamq.checkpoint.reader import INDEX_FILE, LAYER_RE, SINGLE_FILE, CheckpointReader, read_safetensors_header
from streamq.errors import StreamqError

MANIFEST = "streamq_run.json"  # streamq.engine.state.MANIFEST, without importing torch-heavy modules
FP8_DTYPE = "F8_E4M3"
SCALE_DTYPE = "F32"
QUANT_SUFFIXES = (".weight_scale", ".input_scale")
EXPERT_RE = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.(?P<parent>.*experts)\.(?P<idx>\d+)\.")
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_PROJ_NAMES = (EXPERT_PROJS, ("w1", "w3", "w2"))  # names on disk: Qwen/DeepSeek style, Mixtral style
# compressed-tensors strategies a float-quantized checkpoint of ours may use.
CT_WEIGHT_STRATEGIES = ("tensor", "channel")
CT_ACTIVATION_STRATEGIES = ("tensor", "token")


@dataclass(frozen=True)
class Problem:
    message: str
    file: str = ""
    tensor: str = ""

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.file, f"tensor '{self.tensor}'" if self.tensor else "") if x)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class QuantFormat:
    """What `quantization_config` promises about the tensors."""

    kind: str  # "fp8" | "compressed-tensors"
    static: bool  # input_scale on every quantized Linear
    weight_strategy: str = "tensor"  # "tensor" | "channel"
    ignored: tuple[str, ...] = ()


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


def _check_fp8_block(qc: dict, add) -> QuantFormat | None:
    scheme = qc.get("activation_scheme")
    if scheme not in ("static", "dynamic"):
        add(f"quantization_config.activation_scheme is {scheme!r}; expected 'static' or 'dynamic'")
        return None
    ignored = qc.get("ignored_layers", [])
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        add("quantization_config.ignored_layers must be a list of module names")
        ignored = []
    extra = sorted(set(qc) - {"quant_method", "activation_scheme", "ignored_layers", "weight_block_size"})
    if qc.get("weight_block_size") is not None:
        add("quantization_config.weight_block_size is set, but streamq writes per-tensor fp8 scales")
    if extra:
        add(f"quantization_config has unexpected keys for quant_method fp8: {', '.join(extra)}")
    return QuantFormat("fp8", scheme == "static", "tensor", tuple(ignored))


def _check_ct_args(args: Any, where: str, strategies: tuple[str, ...], add) -> dict | None:
    if not isinstance(args, dict):
        add(f"{where} must be a mapping")
        return None
    if args.get("num_bits") != 8 or args.get("type") != "float":
        add(f"{where} must have num_bits 8 and type 'float' (got {args.get('num_bits')!r}, {args.get('type')!r})")
    if args.get("strategy") not in strategies:
        add(f"{where}.strategy is {args.get('strategy')!r}; expected one of {', '.join(strategies)}")
    if not isinstance(args.get("dynamic"), bool):
        add(f"{where}.dynamic must be true or false")
    return args


def _check_ct_block(qc: dict, add) -> QuantFormat | None:
    if qc.get("format") != "float-quantized":
        add(f"quantization_config.format is {qc.get('format')!r}; expected 'float-quantized'")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        add("quantization_config.config_groups must be a non-empty mapping")
        return None
    if len(groups) != 1:
        add(f"quantization_config.config_groups has {len(groups)} groups; streamq writes exactly one")
    name, group = next(iter(groups.items()))
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        add(f"{where} must be a mapping")
        return None
    if not isinstance(group.get("targets"), list) or not group["targets"]:
        add(f"{where}.targets must be a non-empty list")
    weights = _check_ct_args(group.get("weights"), f"{where}.weights", CT_WEIGHT_STRATEGIES, add)
    acts = group.get("input_activations")
    static = False
    if acts is not None:
        acts = _check_ct_args(acts, f"{where}.input_activations", CT_ACTIVATION_STRATEGIES, add)
        static = bool(acts) and acts.get("dynamic") is False
        if static and acts.get("strategy") != "tensor":
            add(f"{where}.input_activations: static activations must use strategy 'tensor'")
    if weights and weights.get("dynamic") is not False:
        add(f"{where}.weights.dynamic must be false (weights are quantized offline)")
    ignored = qc.get("ignore", [])
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        add("quantization_config.ignore must be a list of module names or 're:' patterns")
        ignored = []
    strategy = weights.get("strategy") if weights else "tensor"
    return QuantFormat("compressed-tensors", static, strategy if strategy in CT_WEIGHT_STRATEGIES else "tensor",
                       tuple(ignored))


def check_config(out: Path, add_problem) -> tuple[dict | None, QuantFormat | None]:
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
    method = qc.get("quant_method")
    if method == "fp8":
        return config, _check_fp8_block(qc, add)
    if method == "compressed-tensors":
        return config, _check_ct_block(qc, add)
    add(f"quantization_config.quant_method is {method!r}; expected 'fp8' or 'compressed-tensors'")
    return config, None


# --------------------------------------------------------------------------- manifest


def check_manifest(out: Path, add_problem) -> None:
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


def _scale_shapes(fmt: QuantFormat, out_features: int, kind: str) -> list[tuple[int, ...]]:
    """Allowed shapes of a weight_scale / input_scale for this format."""
    if fmt.kind == "fp8":
        return [(), (1,)]
    if kind == "weight_scale" and fmt.weight_strategy == "channel":
        return [(out_features, 1)]
    return [(1,)]


def _ignored(module: str, fmt: QuantFormat) -> bool:
    for entry in fmt.ignored:
        if entry.startswith("re:"):
            try:
                if re.match(entry[3:], module):
                    return True
            except re.error:
                continue
        elif entry == module:
            return True
    return False


def check_quantized(entries: dict[str, HeaderEntry], fmt: QuantFormat, add_problem) -> list[str]:
    """Per-Linear checks from the headers; returns the scale tensor names whose values to read."""
    scales: list[str] = []
    modules = sorted({n[: -len(".weight_scale")] for n in entries if n.endswith(".weight_scale")})
    module_set = set(modules)
    for module in modules:
        weight, scale = entries.get(f"{module}.weight"), entries[f"{module}.weight_scale"]
        if weight is None:
            add_problem(f"has no '{module}.weight' next to it", scale.file, f"{module}.weight_scale")
            continue
        if weight.dtype != FP8_DTYPE or len(weight.shape) != 2:
            add_problem(f"is {weight.dtype} {list(weight.shape)}; a quantized Linear weight must be "
                        f"{FP8_DTYPE} and 2D", weight.file, f"{module}.weight")
        if _ignored(module, fmt):
            add_problem("is quantized but quantization_config lists it as ignored", weight.file, f"{module}.weight")
        out_features = weight.shape[0] if weight.shape else 0
        for kind in ("weight_scale", "input_scale"):
            entry = entries.get(f"{module}.{kind}")
            if entry is None:
                if kind == "input_scale" and fmt.static:
                    add_problem("static activations, but this Linear has no input_scale", weight.file,
                                f"{module}.weight")
                continue
            name = f"{module}.{kind}"
            if kind == "input_scale" and not fmt.static:
                add_problem("dynamic activations, but an input_scale is stored", entry.file, name)
            allowed = _scale_shapes(fmt, out_features, kind)
            if entry.dtype != SCALE_DTYPE or entry.shape not in allowed:
                add_problem(f"is {entry.dtype} {list(entry.shape)}; expected {SCALE_DTYPE} with shape "
                            f"{' or '.join(str(list(s)) for s in allowed)} for {fmt.kind}", entry.file, name)
            scales.append(name)
    for name, entry in sorted(entries.items()):
        if name.endswith(".input_scale") and name[: -len(".input_scale")] not in module_set:
            add_problem("input_scale without a weight_scale", entry.file, name)
        elif name.endswith(".weight") and entry.dtype == FP8_DTYPE and name[: -len(".weight")] not in module_set:
            add_problem(f"is {FP8_DTYPE} but has no weight_scale", entry.file, name)
    return scales


def check_scale_values(out: Path, entries: dict[str, HeaderEntry], names: list[str], add_problem) -> None:
    """Read the (tiny) scale tensors: every value finite and > 0."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(entries[n].file, []).append(n)
    for file, file_names in sorted(by_file.items()):
        try:
            with safe_open(str(out / file), framework="pt", device="cpu") as f:
                for name in file_names:
                    values = f.get_tensor(name).double().reshape(-1).tolist()
                    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
                    if bad:
                        add_problem(f"scale must be finite and > 0, found {bad[0]!r}"
                                    + (f" ({len(bad)} of {len(values)} values)" if len(values) > 1 else ""),
                                    file, name)
        except (OSError, RuntimeError) as e:
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
        if e and name.endswith(".weight") and any(name.split(".")[-2] in p for p in EXPERT_PROJ_NAMES):
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
    for parent, found in sorted(experts.items()):
        for e in sorted(found):
            projs = next((p for p in EXPERT_PROJ_NAMES if f"{parent}.{e}.{p[0]}.weight" in names), EXPERT_PROJS)
            for proj in projs:
                name = f"{parent}.{e}.{proj}.weight"
                if name not in names:
                    add_problem(f"expert {e} of '{parent}' has no {proj}", INDEX_FILE, name)


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
                         config: dict | None, add_problem) -> None:
    """Every source tensor is in the output (quantized or copied as is), nothing extra."""
    try:
        reader = CheckpointReader(source)
    except StreamqError as e:
        add_problem(f"cannot read the source checkpoint: {e}", str(source))
        return
    expected: set[str] = set()
    for name, info in reader.tensors.items():
        got = entries.get(name)
        expected.add(name)
        if got is None and name in unavailable:
            continue  # its shard is already reported
        if got is None:
            add_problem(f"in the source ({info.file}) but missing from the output", "", name)
            continue
        quantized = name.endswith(".weight") and f"{name[: -len('.weight')]}.weight_scale" in entries
        if quantized:
            expected.update(f"{name[: -len('.weight')]}{s}" for s in QUANT_SUFFIXES)
            if got.shape != info.shape:
                add_problem(f"quantized weight has shape {list(got.shape)}, the source {list(info.shape)}",
                            got.file, name)
        elif (got.dtype, got.shape) != (info.dtype, info.shape):
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


def verify_checkpoint(path: str | Path, source: str | Path | None = None) -> VerifyResult:
    """All checks; never raises for a bad checkpoint (problems are collected)."""
    out = Path(path)
    result = VerifyResult(str(out))

    def add(message: str, file: str = "", tensor: str = "") -> None:
        result.problems.append(Problem(message, file, tensor))

    if not out.is_dir():
        add("not a directory", str(out))
        return result
    check_manifest(out, add)
    config, fmt = check_config(out, add)
    entries, unavailable = load_headers(out, add)
    result.tensors = len(entries)
    result.files = len({e.file for e in entries.values()})
    if fmt is not None:
        result.format = f"{fmt.kind} ({'static' if fmt.static else 'dynamic'})"
        scales = check_quantized(entries, fmt, add)
        result.quantized_linears = sum(1 for n in scales if n.endswith(".weight_scale"))
        check_scale_values(out, entries, scales, add)
        if result.quantized_linears == 0 and entries:
            add("quantization_config is set but no tensor is quantized", "config.json")
    if config is not None:
        check_layers(set(entries) | unavailable, config, add)
    if source is not None:
        check_against_source(entries, unavailable, Path(source), config, add)
    return result


def format_result(result: VerifyResult) -> str:
    if result.ok:
        return (f"{result.path}: ok ({result.format}, {result.quantized_linears} quantized Linears, "
                f"{result.tensors} tensors in {result.files} files)")
    lines = [f"{result.path}: {p}" for p in result.problems]
    lines.append(f"{len(result.problems)} problem(s) in {result.path}")
    return "\n".join(lines)


def verify_command(path: str, source: str | None = None, as_json: bool = False) -> int:
    """`streamq verify`: print the result; exit code 0 when clean, 1 on any problem."""
    result = verify_checkpoint(path, source)
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
    return 0 if result.ok else 1

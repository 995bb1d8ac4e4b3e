"""Lazy access to a Hugging Face safetensors checkpoint, one decoder layer at a time.

The headers of every shard are parsed and checked up front (size, offsets, index
consistency), so a truncated or corrupt file fails before any output is touched.
Tensor data is read only when a layer asks for it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.")

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8,
                "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
_ALIGN = 64  # read ranges start on 64-byte boundaries of the layer buffer (dtype views need alignment)
_MAX_GAP = 1 << 20  # tensors closer than this in a file are read as one range (the gap is read too)
_CHUNK = 64 << 20

# Bytes per element of every safetensors dtype (plan.py sizes files with the same table).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the file


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate one shard's header; the error names the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    end = 0
    for name, meta in header.items():
        try:  # valid JSON is not yet a valid header: every entry needs dtype, shape, data_offsets
            begin, stop = meta["data_offsets"]
            expected = DTYPE_BYTES.get(meta["dtype"], 0)
            numel = 1
            for d in meta["shape"]:
                numel *= d
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: entry '{name}' is malformed "
                                  f"({type(e).__name__}: {e})") from None
        if stop - begin != numel * expected:
            raise CheckpointError(f"{path}: tensor '{name}' has inconsistent offsets in the header")
        end = max(end, stop)
    if end > data_len:
        raise CheckpointError(f"{path}: truncated: header needs {end} data bytes, file has {data_len}")
    return header


class CheckpointReader:
    """Index of a checkpoint directory: tensors grouped by decoder layer, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model_path '{self.path}' is not a directory")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path / 'config.json'}: missing; is this a Hugging Face checkpoint?")
        self.tensors: dict[str, TensorInfo] = {}
        self._load_index()
        # The decoder stack is `model.layers` (or, failing that, the largest `*.layers` stack);
        # other stacks (Qwen3-Next's `mtp.layers`) are not decoder layers.
        stacks: dict[str, dict[int, list[str]]] = {}
        self.other: list[str] = []
        for name in self.tensors:
            m = LAYER_RE.match(name)
            if m:
                stacks.setdefault(m.group("prefix"), {}).setdefault(int(m.group("idx")), []).append(name)
            else:
                self.other.append(name)
        self.layer_prefix = "model.layers" if "model.layers" in stacks or not stacks else \
            max(stacks, key=lambda p: sum(len(v) for v in stacks[p].values()))
        self.layers: dict[int, list[str]] = stacks.pop(self.layer_prefix, {})
        self.other += [n for stack in stacks.values() for names in stack.values() for n in names]
        self.carried_layers: dict[int, list[str]] = {}  # decoder-stack indices past the config's layers
        self.bytes_read = 0

    def carry_layers_from(self, num_layers: int) -> list[str]:
        """Layers at or past `num_layers` (DeepSeek-V3 / GLM-4.5 next-token-prediction layers)
        are not decoder layers: they move to the tensors copied as they are. Returns their names."""
        for idx in sorted(i for i in self.layers if i >= num_layers):
            self.carried_layers[idx] = self.layers.pop(idx)
            self.other += self.carried_layers[idx]
        return [n for names in self.carried_layers.values() for n in names]

    def _load_index(self) -> None:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} found")
        for file in files:
            shard = self.path / file
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_FILE} but missing")
            header = read_safetensors_header(shard)  # validates first: the file may be shorter than 8 bytes
            with open(shard, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, meta in header.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index is authoritative about where a tensor lives
                nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
                self.tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), nbytes,
                                                data_start + meta["data_offsets"][0])
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise CheckpointError(f"{index_path}: tensor '{missing[0]}' is mapped to "
                                      f"'{weight_map[missing[0]]}' but that file does not contain it "
                                      f"({len(missing)} missing in all)")

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def layer_bytes(self, idx: int) -> int:
        return sum(self.tensors[n].nbytes for n in self.layers.get(idx, []))

    @property
    def files(self) -> list[str]:
        return sorted({t.file for t in self.tensors.values()})

    def fingerprint(self) -> dict:
        """Identity of the source: file names and sizes (cheap; contents are not hashed)."""
        return {f: (self.path / f).stat().st_size for f in self.files} | {
            "config.json": (self.path / "config.json").stat().st_size}

    def read_size(self, names: list[str]) -> int:
        """Bytes of host buffer `read` needs for these tensors (ranges, gaps, alignment)."""
        return self._placement(names)[2]

    def read(self, names: list[str], device: str | torch.device = "cpu",
             buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Read tensors into one host buffer: one allocation, no intermediate copies.

        `buffer` (uint8, at least `read_size` bytes) is reused when given: faulting in fresh
        pages for every layer costs more than the read itself. Tensors that sit (nearly)
        next to each other in a file are read as one range, in
        64 MiB `readinto` calls. Few, large reads matter: each call releases the GIL, and
        a background reader that needs it back a thousand times per layer (one per MoE
        expert tensor) waits on the busy main thread each time.
        """
        runs, where, total = self._placement(names)
        if buffer is None or buffer.numel() < total:
            buffer = torch.empty(total, dtype=torch.uint8)
        raw = buffer.numpy()
        for run, pos in runs:
            begin, end = run[0].offset, run[-1].offset + run[-1].nbytes
            self._read_range(self.path / run[0].file, begin, raw[pos:pos + end - begin])
        self.bytes_read += sum(self.tensors[n].nbytes for n in names)
        return self._views(names, where, buffer, device)

    def views(self, names: list[str], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors `read(names, buffer=...)` returns, over a buffer another process has
        already read them into (one read per machine, `streamq.engine.prefetch`); no I/O."""
        _, where, total = self._placement(names)
        assert buffer.numel() >= total, (buffer.numel(), total)
        return self._views(names, where, buffer, "cpu")

    def _placement(self, names: list[str]) -> tuple[list[tuple[list[TensorInfo], int]], dict[str, int], int]:
        """Where `read` puts each run and tensor in its buffer: ([(run, buffer offset)],
        tensor name -> buffer offset, bytes)."""
        placed, where, pos = [], {}, 0
        for run in self._runs(names):
            begin, end = run[0].offset, run[-1].offset + run[-1].nbytes
            placed.append((run, pos))
            where.update({t.name: pos + t.offset - begin for t in run})
            pos += -(-(end - begin) // _ALIGN) * _ALIGN
        return placed, where, pos

    def _views(self, names: list[str], where: dict[str, int], buffer: torch.Tensor,
               device: str | torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            info, at = self.tensors[name], where[name]
            dtype = TORCH_DTYPES[info.dtype]
            chunk = buffer[at:at + info.nbytes]
            if at % dtype.itemsize:  # unaligned in the file: a dtype view needs an aligned copy
                chunk = chunk.clone()
            tensor = chunk.view(dtype).reshape(info.shape)
            out[name] = tensor if str(device) == "cpu" else tensor.to(device)
        return out

    def _runs(self, names: list[str]) -> list[list[TensorInfo]]:
        """Group tensors into ranges of one file with gaps of at most _MAX_GAP bytes."""
        infos = sorted((self.tensors[n] for n in names), key=lambda t: (t.file, t.offset))
        runs: list[list[TensorInfo]] = []
        for info in infos:
            last = runs[-1][-1] if runs else None
            if last and last.file == info.file and 0 <= info.offset - (last.offset + last.nbytes) <= _MAX_GAP:
                runs[-1].append(info)
            else:
                runs.append([info])
        return runs

    @staticmethod
    def _read_range(path: Path, offset: int, into) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                view, done = memoryview(into), 0
                while done < len(view):
                    got = f.readinto(view[done:done + _CHUNK])
                    if not got:
                        raise CheckpointError(f"{path}: truncated: {len(view) - done} bytes missing at offset "
                                              f"{offset + done}")
                    done += got
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor data: {e}") from None

    def read_layer(self, idx: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return self.read(self.layers[idx], device)

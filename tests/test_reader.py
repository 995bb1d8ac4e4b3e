"""Damaged source checkpoints fail up front with a CheckpointError naming the file; the CLI
exits 1 and creates no output. A layer split over two shards is read correctly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import SPLIT, copy_model, make_config, read_tensors, run_job, write_yaml
from safetensors.torch import load_file

from streamq.checkpoint.reader import CheckpointReader
from streamq.cli import main as cli_main
from streamq.errors import CheckpointError

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def missing_shard(d: Path) -> str:
    (d / SHARD2).unlink()
    return SHARD2


def truncated_data(d: Path) -> str:
    data = (d / SHARD2).read_bytes()
    (d / SHARD2).write_bytes(data[: len(data) - 1000])  # header intact, tensor data cut short
    return SHARD2


def truncated_in_header(d: Path) -> str:
    data = (d / SHARD1).read_bytes()
    (d / SHARD1).write_bytes(data[: 8 + _header_len(d / SHARD1) // 2])
    return SHARD1


def truncated_to_nothing(d: Path) -> str:
    (d / SHARD1).write_bytes(b"\x00\x01\x02")
    return SHARD1


def corrupt_header_bytes(d: Path) -> str:
    data = bytearray((d / SHARD1).read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    (d / SHARD1).write_bytes(bytes(data))
    return SHARD1


def corrupt_header_length(d: Path) -> str:
    data = bytearray((d / SHARD2).read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    (d / SHARD2).write_bytes(bytes(data))
    return SHARD2


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = _header_len(path)
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))  # same length, so the data offsets stay valid
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])


def header_inconsistent_offsets(d: Path) -> str:
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin, end - 2]

    _rewrite_header(d / SHARD1, edit)
    return SHARD1


def header_not_tensor_entries(d: Path) -> str:
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        del header[name]["data_offsets"]  # valid JSON, not a valid safetensors header

    _rewrite_header(d / SHARD1, edit)
    return SHARD1


def header_not_an_object(d: Path) -> str:
    n = _header_len(d / SHARD2)
    data = (d / SHARD2).read_bytes()
    (d / SHARD2).write_bytes(data[:8] + b"[" + b" " * (n - 2) + b"]" + data[8 + n :])
    return SHARD2


def index_names_absent_tensor(d: Path) -> str:
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = SHARD2  # it lives in shard 1
    (d / INDEX).write_text(json.dumps(index))
    return INDEX


def index_names_unknown_tensor(d: Path) -> str:
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.layers.1.mlp.extra_proj.weight"] = SHARD1
    (d / INDEX).write_text(json.dumps(index))
    return INDEX


def index_not_json(d: Path) -> str:
    (d / INDEX).write_text('{"weight_map": {')
    return INDEX


def missing_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "config.json"


def no_weights_at_all(d: Path) -> str:
    for p in d.glob("*.safetensors"):
        p.unlink()
    (d / INDEX).unlink()
    return "model.safetensors"


DAMAGE = {f.__name__: f for f in (
    missing_shard, truncated_data, truncated_in_header, truncated_to_nothing, corrupt_header_bytes,
    corrupt_header_length, header_inconsistent_offsets, header_not_tensor_entries, header_not_an_object,
    index_names_absent_tensor, index_names_unknown_tensor, index_not_json, missing_config, no_weights_at_all)}


@pytest.fixture
def damaged(tiny_models, tmp_path, request):
    src = copy_model(tiny_models[SPLIT], tmp_path / "src")
    return src, DAMAGE[request.param](src)


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_reader_names_the_file(damaged):
    src, culprit = damaged
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(src)
    assert culprit in str(info.value), str(info.value)
    assert info.value.exit_code == 1


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_cli_exit_1_and_no_output(damaged, tmp_path, capsys):
    src, culprit = damaged
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", make_config(src, out))
    rc = cli_main(["quantize", "-c", str(cfg), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert lines and lines[-1].startswith("streamq: error: ") and culprit in lines[-1], err
    assert "Traceback" not in err
    assert not out.exists()


def test_extra_tensor_in_shard_but_not_in_index_is_ignored(tiny_models, tmp_path):
    """The index is authoritative: a tensor present in a shard but not mapped there is not read."""
    src = copy_model(tiny_models[SPLIT], tmp_path / "src")
    index = json.loads((src / INDEX).read_text())
    del index["weight_map"]["model.layers.0.input_layernorm.weight"]
    (src / INDEX).write_text(json.dumps(index))
    reader = CheckpointReader(src)
    assert "model.layers.0.input_layernorm.weight" not in reader.tensors


def test_layer_split_over_two_files(tiny_models):
    src = tiny_models[SPLIT]
    reader = CheckpointReader(src)
    on_disk = {**load_file(src / SHARD1), **load_file(src / SHARD2)}
    index = json.loads((src / INDEX).read_text())["weight_map"]
    # Layer 1 really is split: attention in shard 1, MLP in shard 2.
    split_files = {index[n] for n in reader.layers[1]}
    assert split_files == {SHARD1, SHARD2}
    assert index["model.layers.1.self_attn.q_proj.weight"] == SHARD1
    assert index["model.layers.1.mlp.down_proj.weight"] == SHARD2
    assert reader.num_layers == 2
    for i in range(2):
        layer = reader.read_layer(i)
        assert sorted(layer) == sorted(n for n in on_disk if n.startswith(f"model.layers.{i}."))
        for name, tensor in layer.items():
            assert tensor.dtype == on_disk[name].dtype and torch.equal(tensor, on_disk[name]), name
            assert reader.tensors[name].file == index[name]
    assert sorted(reader.other) == sorted(n for n in on_disk if not n.startswith("model.layers."))
    assert reader.layer_bytes(1) == sum(on_disk[n].numel() * on_disk[n].element_size() for n in reader.layers[1])


def test_split_checkpoint_quantizes_like_single_file(tiny_models, quantized):
    """Same seed, same weights: the split qwen3 gives exactly the tensors the single-file one does."""
    assert read_tensors(tiny_models[SPLIT]).keys() == read_tensors(tiny_models["qwen3"]).keys()
    a, b = read_tensors(quantized(SPLIT, "fp8")), read_tensors(quantized("qwen3", "fp8"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def test_damage_found_before_output_is_touched(tiny_models, tmp_path):
    """A truncated last shard (holding the last layer) fails before layer 0 is written."""
    src = copy_model(tiny_models[SPLIT], tmp_path / "src")
    truncated_data(src)
    with pytest.raises(CheckpointError, match=SHARD2):
        run_job(make_config(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()

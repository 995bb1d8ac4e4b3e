"""`streamq verify` reads what the manifest recorded (size and sha256 of every shard;
`--fast` sizes only) and finds NaN codes in FP8 payloads, scanning in chunks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config, run_job
from safetensors.torch import save_file

from streamq.cli import main as cli_main
from streamq.payload import count_fp8_nan, fp8_nan_counts
from streamq.verify import verify_checkpoint

LAYER0 = "model-00001-of-00003.safetensors"


@pytest.fixture(scope="module")
def clean(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("payload") / "out"
    run_job(make_config(tiny_models["llama"], out))
    return out


@pytest.fixture
def out(clean, tmp_path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "out"))


def _fp8_weight(out: Path) -> tuple[str, int, int]:
    """(name, absolute byte offset, bytes) of the first F8_E4M3 tensor in layer 0's shard."""
    raw = (out / LAYER0).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name, meta = next((k, v) for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F8_E4M3")
    begin, end = meta["data_offsets"]
    return name, 8 + n + begin, end - begin


def _poke(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


def _verify(capsys, out: Path, *extra: str) -> tuple[int, str]:
    rc = cli_main(["verify", str(out), *extra])
    return rc, capsys.readouterr().out


def test_clean_output_passes(clean, capsys):
    rc, text = _verify(capsys, clean)
    assert rc == 0 and ": ok (" in text, text


def test_nan_code_found_and_checksum_differs(out, capsys):
    name, offset, size = _fp8_weight(out)
    old = (out / LAYER0).read_bytes()[offset + size // 2]
    _poke(out / LAYER0, offset + size // 2, 0xFF if old != 0xFF else 0x7F)
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert f"{LAYER0}: tensor '{name}': 1 of {size} FP8 values are NaN (byte 0x7F/0xFF)" in text, text
    assert f"{LAYER0}: sha256 differs from the one streamq_run.json recorded for shard 'layer-0'" in text, text
    rc, text = _verify(capsys, out, "--fast")  # sizes only: the same size passes
    assert rc == 0, text


def test_checksum_only_damage(out, capsys):
    """A changed byte that is not a NaN code: only the checksum can tell."""
    _, offset, _ = _fp8_weight(out)
    old = (out / LAYER0).read_bytes()[offset]
    _poke(out / LAYER0, offset, 0x01 if old != 0x01 else 0x02)
    rc, text = _verify(capsys, out)
    assert rc == 1 and "sha256 differs" in text and "NaN" not in text, text


def test_size_checked_even_when_fast(out, capsys):
    with open(out / LAYER0, "ab") as f:
        f.write(b"\0" * 8)
    rc, text = _verify(capsys, out, "--fast")
    assert rc == 1 and "streamq_run.json recorded" in text and "bytes" in text, text


def test_nan_scan_without_manifest(out):
    (out / "streamq_run.json").unlink()
    name, offset, _ = _fp8_weight(out)
    _poke(out / LAYER0, offset, 0x7F)
    problems = [str(p) for p in verify_checkpoint(out).problems]
    assert any(name in p and "are NaN" in p for p in problems), problems
    assert verify_checkpoint(out, fast=True).ok


def test_count_fp8_nan_exactly_two_codes():
    every_byte = bytes(range(256))
    assert count_fp8_nan(every_byte) == 2
    codes = torch.tensor(list(every_byte), dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert int(torch.isnan(codes).sum()) == 2  # torch agrees on which codes are NaN


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_scan_counts_every_nan(tmp_path, chunk):
    raw = torch.zeros(1000, dtype=torch.uint8)
    raw[[0, 499, 500, 999]] = torch.tensor([0x7F, 0xFF, 0x7F, 0xFF], dtype=torch.uint8)
    save_file({"a.weight": raw.view(torch.float8_e4m3fn).reshape(10, 100),
               "b.weight": torch.zeros(10, 100, dtype=torch.float8_e4m3fn),
               "c.bias": torch.full((7,), float("nan"))}, str(tmp_path / "s.safetensors"))
    assert fp8_nan_counts(tmp_path / "s.safetensors", chunk=chunk) == {"a.weight": (4, 1000)}

"""The shard writer: safetensors bytes identical to the library's, checksum from memory."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamq.checkpoint.writer import atomic_save_tensors, write_safetensors


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    return {
        "model.layers.0.mlp.down_proj.weight": (w * 10).clamp(-400, 400).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale": torch.tensor(0.037, dtype=torch.float32),
        "model.layers.0.mlp.down_proj.input_scale": torch.tensor([0.5], dtype=torch.float32),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.rand(48, 1, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(40, generator=g).to(torch.bfloat16),
        "model.layers.0.a_half": torch.randn(3, 5, generator=g).to(torch.float16),
        "model.layers.0.empty": torch.zeros(0, 4, dtype=torch.float32),
        "model.layers.0.ids": torch.arange(7, dtype=torch.int64),
        "model.layers.0.mask": torch.tensor([True, False, True]),
        "model.layers.0.transposed": torch.randn(6, 9, generator=g).to(torch.bfloat16).t(),  # not contiguous
    }


def test_bytes_match_safetensors_save_file(tmp_path):
    tensors = _mixed_tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    size, digest = write_safetensors(ours, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()
    assert size == ours.stat().st_size
    assert digest == hashlib.sha256(ours.read_bytes()).hexdigest()
    loaded = load_file(str(ours))
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), raw), name


def test_views_into_one_buffer_are_written_from_their_own_bytes(tmp_path):
    """Outputs staged in one pinned arena are slices of one tensor; each must be written alone."""
    arena = torch.arange(64, dtype=torch.uint8)
    tensors = {"b": arena[8:24].view(torch.bfloat16).view(2, 4), "a": arena[32:48].view(torch.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(loaded["b"].view(torch.uint8), arena[8:24].view(2, 8))
    assert torch.equal(loaded["a"].view(torch.uint8), arena[32:48])


def test_atomic_save_leaves_no_temporary_and_honours_umask(tmp_path):
    path = tmp_path / "model-00001-of-00002.safetensors"
    atomic_save_tensors(path, {"x": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(ValueError, match="'z'.*complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_arenas_alternate_and_wait_for_the_write_that_reads_them():
    from concurrent.futures import Future

    from streamq.engine.staging import OutputArenas, output_arena_bytes

    # FP8 weight + per-channel scale, a copied bf16 norm, FP8 weight + scale + input scale
    need = output_arena_bytes([48 * 40, 48 * 4, 80, 48 * 40, 48 * 4, 4])
    arenas = OutputArenas(pin=False)
    a = arenas.begin(need)
    w = a.take((48, 40), torch.float8_e4m3fn)
    s = a.take((48, 1), torch.float32)
    n = a.take((40,), torch.bfloat16)
    w2 = a.take((48, 40), torch.float8_e4m3fn)
    a.take((48, 1), torch.float32), a.take((1,), torch.float32)
    assert a.used <= need  # the bound holds every output, per-channel scales included
    views = [w, s, n, w2]
    starts = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(starts, starts[1:], strict=False))  # disjoint
    assert all(v.data_ptr() % 64 == 0 for v in views)
    done: Future = Future()
    a.busy = done
    b = arenas.begin(need)
    assert b is not a
    done.set_result(1.0)
    assert arenas.begin(need) is a and a.used == 0 and a.busy is None
    over = a.take((need + 1,), torch.uint8)  # full: a fresh tensor, not a view past the end
    assert over.numel() == need + 1 and over.data_ptr() != a.buffer.data_ptr()


def test_pinned_cache_chunks_hold_batches_apart_and_match_the_planners_count(monkeypatch):
    from streamq.calib import cache

    monkeypatch.setattr(cache, "CHUNK_BYTES", 4096)
    chunks = cache._PinnedChunks()
    shapes = [(3, 100), (3, 100), (2, 500), (1, 1100), (4, 7), (3, 100)]  # float32: 1200, 1200, 4000, 4400, ...
    views = [chunks.take(s, torch.float32) for s in shapes]
    for k, v in enumerate(views):
        v.fill_(k)
    assert all(bool((v == k).all()) for k, v in enumerate(views))  # no batch overwrote another
    taken = sum(b.numel() for b, _ in chunks.buffers)
    assert taken == cache.pinned_cache_bytes([4 * s[0] * s[1] for s in shapes])
    chunks.close()
    assert chunks.buffers == []


def test_one_reserved_arena_when_processes_take_turns_writing():
    from concurrent.futures import Future

    from streamq.engine.staging import OutputArenas

    arenas = OutputArenas(count=1, pin=False)
    arenas.reserve(4096)
    reserved = arenas.arenas[0]
    assert reserved is not None and reserved.buffer.numel() == 4096
    a = arenas.begin(1000)
    assert a is reserved  # sized ahead: no allocation in the layer loop
    done: Future = Future()
    a.busy = done
    done.set_result(1.0)
    assert arenas.begin(4096) is a  # the only arena, once its write is done
    assert arenas.begin(8192) is not a  # a larger layer than reserved still gets room

"""The floors streamq is measured against, and the page-cache state they are measured in.

I/O floor: a plain sequential read of the source files (large chunks into one
preallocated buffer, no parsing) plus a plain write of as many bytes as the quantized
output has (write, fsync, delete). Compute floor: the forward of every decoder layer over
the calibration batches, weights already on the device, no observers, only the forwards
timed. streamq can beat the serial I/O floor slightly because it overlaps reads and
writes in background threads; `max(read, write)` is the bound with perfect overlap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CHUNK_BYTES = 64 * 2**20


def drop_page_cache() -> str | None:
    """Flush dirty pages and drop the page cache; None on success, else why it failed.

    Needs root (and a kernel that lets this namespace write /proc/sys/vm/drop_caches).
    """
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{DROP_CACHES}: {e.strerror or e}"
    return None


def _read_file(path: Path, buf: memoryview) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def read_files(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Sequentially read every file into one preallocated buffer; the read I/O floor."""
    buf = memoryview(bytearray(chunk_bytes))
    t0 = time.perf_counter()
    total = sum(_read_file(p, buf) for p in paths)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": total, "files": len(paths), "chunk_bytes": chunk_bytes,
            "gbps": total / seconds / 1e9 if seconds > 0 else float("inf")}


def write_bytes(directory: Path, nbytes: int, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Write `nbytes` to one new file in `directory` (write + fsync), then delete it.

    The data is random (a filesystem that compresses or dedups must not make it free).
    Dirty pages of earlier work are flushed before the clock starts.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".bench-write-floor.tmp"
    chunk = memoryview(os.urandom(min(chunk_bytes, max(nbytes, 1))))
    os.sync()
    try:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                left -= f.write(chunk[: min(left, len(chunk))])
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t0
        written = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    return {"seconds": seconds, "bytes": written, "chunk_bytes": len(chunk),
            "gbps": written / seconds / 1e9 if seconds > 0 else float("inf")}


def compute_floor(config) -> dict:
    """Forward time of every decoder layer over the calibration batches, nothing else.

    Same job as `quantize` (prepare, same batches, same layer kwargs); each layer is
    materialized with `materialize_layer` and the cached hidden states run through it
    batch by batch, outputs feeding the next layer, exactly as `_Calibrator.run_layer`
    does but without observers (the layer's own forward, so MoE experts run transformers'
    configured experts implementation rather than streamq's observed loop). Reading,
    materializing, kwargs and cache transfers are outside the clock; CUDA is synchronized
    around each forward.
    """
    import torch

    from streamq.engine.job import prepare
    from streamq.model import capture as capture_mod
    from streamq.model.layer import materialize_layer, release_layer
    from streamq.model.skeleton import decoder_layers, materialize_outside_layers, release_outside_layers

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    job = prepare(config)
    device, skeleton = job.device, job.skeleton
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reader = job.reader
    outside = reader.read([n for n in reader.other if n.startswith("model.") and not n.startswith("model.layers.")])
    materialize_outside_layers(skeleton, outside, device)
    del outside
    kwargs = capture_mod.LayerKwargs(skeleton, job.hf_config.hidden_size, job.dtype, device)

    elem = torch.finfo(job.dtype).bits // 8
    need = sum(b.input_ids.numel() for b in job.batches) * job.hf_config.hidden_size * elem
    on_device = device.type != "cuda" or need < 0.4 * torch.cuda.mem_get_info(device)[0]
    home = device if on_device else torch.device("cpu")
    cache: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in job.batches:
            hidden, _ = capture_mod.capture(skeleton, input_ids=batch.input_ids.to(device),
                                            attention_mask=batch.attention_mask.to(device))
            cache.append(hidden.to(home))
    per_layer = []
    layers = decoder_layers(skeleton)
    try:
        with torch.no_grad():
            for layout in job.layouts:
                layer = layers[layout.index]
                materialize_layer(layer, layout, reader.read_layer(layout.index), device)
                seconds = 0.0
                for b, batch in enumerate(job.batches):
                    mask = batch.attention_mask.to(device)
                    layer_kwargs = kwargs.for_batch(b, mask)[layout.index]
                    hidden = cache[b].to(device)
                    sync()
                    t0 = time.perf_counter()
                    out = layer(hidden, **layer_kwargs)
                    sync()
                    seconds += time.perf_counter() - t0
                    cache[b] = (out[0] if isinstance(out, tuple) else out).to(home)
                release_layer(layer)
                per_layer.append(seconds)
    finally:
        release_outside_layers(skeleton)
    experts = getattr(job.hf_config, "_experts_implementation", None) if any(lay.experts for lay in job.layouts) \
        else None
    return {
        "seconds": sum(per_layer),
        "per_layer": per_layer,
        "device": str(device),
        "hidden_states_on": "device" if on_device else "host (transfers not timed)",
        "batches": len(job.batches),
        "tokens": sum(int(b.attention_mask.sum()) for b in job.batches),
        "experts_implementation": experts if isinstance(experts, str) else None,
        "attn_implementation": getattr(job.hf_config, "_attn_implementation", None),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
    }

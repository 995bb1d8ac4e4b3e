"""The layer loop: read a layer, calibrate it, transform, quantize, write, move on.

It orders the hooks of a scheme (`streamq.schemes`) and a format (`streamq.formats`)
and names neither an algorithm nor a layout. Schemes that need calibration first capture
the hidden states entering layer 0 for every calibration batch; each layer then replays
them with the scheme's observers on its Linears, and replaces them with its
(unquantized) outputs for the next layer. Calibration-free schemes run
read -> quantize -> write.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamq import faults
from streamq.calib.cache import (
    HiddenStateCache,
    checkpoint_dirs,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    start_checkpoint,
    write_checkpoint_batches,
)
from streamq.calib.checks import check_activation_stats
from streamq.calib.observers import LayerObserver
from streamq.checkpoint.writer import (
    atomic_save_tensors,
    atomic_write_json,
    copy_aux_files,
    shard_name,
    write_config,
    write_index,
)
from streamq.config import JobConfig
from streamq.engine.dist import (
    MODULES,
    SAMPLES,
    Dist,
    UnitTimes,
    assign_units,
    calibration_split,
    expected_solves,
    replay_split,
    timed_units,
)
from streamq.engine.job import Job, prepare
from streamq.engine.plan import ModelShape, make_plan
from streamq.engine.prefetch import Prefetcher, open_prefetcher
from streamq.engine.progress import LayerProgress, current_host_rss, fmt_bytes, peak_gpu_bytes, peak_host_rss
from streamq.engine.staging import Arena, OutputArenas, output_arena_bytes
from streamq.engine.state import CACHE_DIR, RunState, attach_run, open_run, output_files, rank_manifest
from streamq.errors import BudgetError, CheckpointError, OutputError, StreamqError
from streamq.formats.base import INPUT_SCALE, SCALE
from streamq.hostmem import trim_heap
from streamq.model import capture as capture_mod
from streamq.model.fused import fused_group_key
from streamq.model.layer import layer_weight_views, materialize_layer, release_layer
from streamq.model.layout import LayerLayout, fused_expert_modules
from streamq.model.moe import capture_experts, instrument_experts, observe_expert_hessians, restore_experts
from streamq.model.skeleton import (
    decoder_layers,
    materialize_outside_layers,
    release_outside_layers,
)
from streamq.paths import calibration_file, check_save_path
from streamq.schemes.base import LayerStats, QuantizedLinear
from streamq.verify import verify_checkpoint

log = logging.getLogger("streamq")
REPORT_FILE = "streamq_report.json"
REST_KEY = "rest"  # the shard of the non-layer tensors, written first, named last


@dataclass
class Report:
    wall_s: float = 0.0
    layers: int = 0
    layers_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_gpu_bytes: int = 0
    peak_host_bytes: int = 0
    planned_gpu_bytes: int = 0  # the plan's predictions of the two peaks, for the summary
    planned_host_bytes: int = 0
    cache_location: str = ""
    uncovered_experts: int = 0
    rtn_fallbacks: list[str] = field(default_factory=list)  # modules a solver quantized round-to-nearest instead
    work_split: list[dict] = field(default_factory=list)  # several processes: each layer's solves per rank
    stages: list[dict] = field(default_factory=list)  # per layer: seconds per stage
    phases: dict[str, float] = field(default_factory=dict)  # seconds of the whole run, in order
    layer_gpu_bytes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"done in {self.wall_s:.1f}s: {self.layers} layers ({self.layers_skipped} resumed), "
                 f"read {fmt_bytes(self.bytes_read)}, wrote {fmt_bytes(self.bytes_written)}",
                 f"peak host RSS {fmt_bytes(self.peak_host_bytes)} (plan {fmt_bytes(self.planned_host_bytes)}), "
                 f"peak GPU {fmt_bytes(self.peak_gpu_bytes)} (plan {fmt_bytes(self.planned_gpu_bytes)})"]
        if self.cache_location:
            lines.append(f"hidden-state cache: {self.cache_location}; MoE experts no calibration token reached: "
                         f"{self.uncovered_experts}")
        lines.append(self.stage_line())
        if self.rtn_fallbacks:
            lines.append(f"modules quantized round-to-nearest instead of solved: {len(self.rtn_fallbacks)} "
                         "(rtn_fallbacks in the report)")
        return "\n".join(lines)

    def stage_line(self) -> str:
        """Seconds per stage of the layer loop, summed over layers (read: the background reads)."""
        totals: dict[str, float] = {}
        for stages in self.stages:
            for k, v in stages.items():
                if k != "layer":
                    totals[k] = totals.get(k, 0.0) + v
        return "layer stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items())


class _Calibrator:
    """Static schemes: the hidden-state cache and the per-layer replay with observers."""

    def __init__(self, job: Job, location: str, disk_dir: Path, dist: Dist | None = None, split: str | None = None,
                 writers: list[int] | None = None):
        self.job = job
        self.dist, self.split = dist, split  # several processes: how they share the calibration
        # Several processes: the ranks taking turns writing layers (`Dist.writers`; default all).
        self.writers = writers if writers is not None or dist is None else list(range(dist.world))
        self.ids = job.my_batches  # the batches whose hidden states this process keeps
        self.mine = set(self.ids)
        self.top_k = ModelShape.from_config(job.hf_config).top_k
        self.owned: set[str] | None = None  # MODULES: this process's modules of the current layer
        self.unit_of: dict[str, tuple] = {}  # MODULES: module -> its work unit's signature (UnitTimes)
        self.unit_times = UnitTimes()  # the solves of earlier layers, for balancing the next
        self.rank_of: dict[tuple, int] = {}  # the current layer's unit -> its rank
        self.predicted: list[float] = []  # the current layer's solve seconds per rank, as assigned
        self.work_split: list[dict] = []  # per layer: solve seconds per rank, predicted and measured
        self.split_replay = False  # the last statistics replay ran each batch on its holder only
        self.cache = HiddenStateCache(location, job.device, disk_dir)
        tensors = job.reader.read([n for n in job.reader.other if n.startswith("model.")
                                   and not n.startswith("model.layers.")])
        materialize_outside_layers(job.skeleton, tensors, job.device)
        self.kwargs = capture_mod.LayerKwargs(job.skeleton, job.hf_config.hidden_size, job.dtype, job.device)
        # On the device once, not per batch and layer: a pageable copy would synchronize.
        # Every batch's, not only this process's: with the work units split, every process
        # adds every batch to its statistics (AWQ's recorded blocks index them by batch).
        self.masks = [b.attention_mask.to(job.device).bool() for b in job.batches]
        self.uncovered = 0
        self.fallbacks: list[str] = []  # "layer i: <module>: <why>", from the scheme
        self.last_checkpoint = time.monotonic()

    def capture_inputs(self) -> None:
        """Hidden states entering layer 0 for every batch (embedding lookup, model stem)."""
        capture_mod.capture_batches(self.job.skeleton, self.job.batches, self.cache, self.job.device, self.ids)

    def share(self, layout: LayerLayout, layer: nn.Module) -> set[str] | None:
        """MODULES: the layer's work units (`Scheme.work_units`) assigned to ranks by cost;
        returns (and remembers for the replay) this rank's modules. None otherwise."""
        if self.split != MODULES:
            self.owned = None
            return None
        infos, scheme = self.job.reader.tensors, self.job.config.scheme
        shapes = {m: tuple(infos[n].shape) for m, n in layout.quantized.items()}
        units = scheme.work_units(shapes, layout.experts, self.job.config.quant.moe_calibrate_all_experts,
                                  layer=layer, layout=layout, top_k=self.top_k)
        tokens = sum(b.input_ids.numel() for b in self.job.batches)  # each unit's statistics see every batch
        signatures = [UnitTimes.signature(u, layout.prefix) for u in units]
        self.unit_of = {m: sig for u, sig in zip(units, signatures, strict=True) for m in u.modules}
        solves = [self.unit_times.solve_seconds(sig) for sig in signatures]
        # Rank 0's assignment for all (cost models and clocks differ between machines), and
        # computed there only: every process waits for it anyway.
        owners = self.dist.agree(assign_units(units, self.dist.world, self.job.device.type, tokens, solves)
                                 if self.dist.leader else None)
        self.rank_of = dict(zip(signatures, owners, strict=True))
        expected = expected_solves(units, self.job.device.type, solves)
        self.predicted = [round(sum(s for s, r in zip(expected, owners, strict=True) if r == rank), 3)
                          for rank in range(self.dist.world)]
        self.owned = {m for u, r in zip(units, owners, strict=True) if r == self.dist.rank for m in u.modules}
        return self.owned

    def solved(self, index: int, seconds: dict[tuple, float]) -> None:
        """Every process's measured solves of layer `index` (`timed_units`): kept to balance
        the next layers, and reported against what the assignment expected."""
        self.unit_times.record(seconds)
        measured = [0.0] * self.dist.world
        for unit, s in seconds.items():
            measured[self.rank_of[unit]] += s
        self.work_split.append({"layer": index, "predicted_solve_s": self.predicted,
                                "measured_solve_s": [round(s, 3) for s in measured],
                                # where the statistics' forward ran: split, or every batch on every process
                                "statistics_forward": "own batches" if self.split_replay else "every batch"})

    def writes(self, index: int) -> bool:
        """Whether this process writes layer `index` (every process calibrates every layer)."""
        return self.dist is None or self.writers[index % len(self.writers)] == self.dist.rank

    def checkpoint_due(self, index: int) -> bool:
        every = self.job.config.cache_checkpoint_layers
        minutes = self.job.config.cache_checkpoint_minutes
        due = (every > 0 and (index + 1) % every == 0) or \
            (minutes > 0 and time.monotonic() - self.last_checkpoint > 60 * minutes)
        if due:
            self.last_checkpoint = time.monotonic()
        return due

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, layout: LayerLayout, observe: bool, advance: bool = True
                  ) -> LayerStats | None:
        """Replay the calibration batches through the layer with the scheme's observers
        (this process's; every process's for statistics kept whole by their work unit's owner:
        gathered, `_inputs`, or split, `_replay_split`); with `advance` the outputs of this
        process's batches become the next layer's inputs. Returns the statistics by full module
        name (modules sharing an input, a fused group, share one observer)."""
        scheme = self.job.config.scheme
        obs = LayerObserver()
        fused = fused_expert_modules(layer)
        kind = scheme.observer_kind()
        shared: dict[str, str] = {}  # module -> the module whose observer it shares
        blocks: dict[str, list[tuple]] = {}
        split_replay = False  # several processes: each replays its own batches, inputs travel
        if observe:
            watch = {}
            reps: list[str] = []  # every group's observed Linear (relative), whoever owns it
            if kind is not None:
                for m in layout.quantized:
                    if m not in layout.experts:
                        rep = next(x for x in layout.quantized if fused_group_key(x) == fused_group_key(m))
                        if layout.rel(rep) not in reps:
                            reps.append(layout.rel(rep))
                        if self.owned is None or m in self.owned:
                            shared[m] = rep
                            watch[layout.rel(rep)] = kind
            smoothing = scheme.smoothing_kind()
            if smoothing is not None:
                for name in scheme.smoothing_inputs(layer, layout):
                    watch[name] = smoothing
            blocks = {name: [] for name in scheme.recorded_blocks(layer, layout, self.owned)}
            # Decided from the scheme alone, alike on every process (they meet in its collectives).
            split_replay = self.split == MODULES and replay_split(scheme)
            if split_replay and blocks:
                raise CheckpointError(f"{scheme.name} records blocks, which a split replay does not feed; "
                                      "streamq.engine.dist.replay_split must not hold for it")
            self.split_replay = split_replay
            obs.watch_linears(layer, watch, hooked=not split_replay)
            for name, records in blocks.items():
                def record(_mod, args, kwargs, output, _records=records):
                    _records.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs),
                                     output.detach() if torch.is_tensor(output) else output))
                obs._handles.append(layer.get_submodule(name).register_forward_hook(record, with_kwargs=True))
            if kind is not None:
                obs.expert_kind = kind
                if self.owned is not None:
                    for m in self.owned & set(layout.experts):
                        ref = layout.experts[m]
                        key = f"{ref.parent}.{ref.kind}"
                        obs.owned_experts.setdefault(key, set()).add(ref.index)
                    for parent in fused:  # a parent none of whose experts are ours: accumulate none
                        for key in (f"{parent}.gate_up", f"{parent}.down"):
                            obs.owned_experts.setdefault(key, set())
                for parent, module in fused.items():
                    if not split_replay:
                        instrument_experts(module, parent, obs, self.job.config.quant.moe_calibrate_all_experts,
                                           outputs_used=advance or bool(blocks))  # blocks record outputs
        try:
            if split_replay:
                self._replay_split(layer, layout, obs, fused, reps, advance)
            for b, hidden in () if split_replay else self._inputs(gather=observe and self.split == MODULES):
                batch = self.job.batches[b]
                obs.token_mask = self.masks[b]
                kwargs = self.kwargs.for_batch(b, batch.attention_mask)[layout.index]
                out = layer(hidden, **kwargs)
                if advance and b in self.mine:  # each process keeps (and advances) its own batches only
                    self.cache.put(b, out[0] if isinstance(out, tuple) else out)
                del out, hidden
                faults.checkpoint("calibrate-batch")
        finally:
            obs.close()
            for module in fused.values():
                restore_experts(module)
            if advance:
                self.cache.sync()
        if not observe:
            return None
        if self.split == SAMPLES:
            self._merge_ranges(obs)
        values = {layout.prefix + name: o.result() for name, o in obs.observers.items()}
        values.update({m: values[rep] for m, rep in shared.items()})
        if kind == "hessian":
            values.update(self._expert_hessians(obs, layout))
        elif kind is not None:
            values.update(self._expert_stats(obs, layout))
        for module in shared:
            if values.get(module) is None:
                raise CheckpointError(f"Linear '{module}' received no input during calibration")
        return LayerStats(values, blocks, self.masks)

    def _replay_split(self, layer: nn.Module, layout: LayerLayout, obs: LayerObserver, fused: dict[str, nn.Module],
                      reps: list[str], advance: bool) -> None:
        """MODULES, statistics that are Hessians of module inputs (`dist.replay_split`):
        each process runs the layer on its own batches only (with `advance`, keeping their
        outputs as the next layer's inputs, as every replay does); the
        inputs of every observed module (each fused group's Linear, each experts module's
        hidden states and routing) travel to every process (`Dist.exchange`, one step of one
        batch per process at a time), and each adds those of its own work units, batch after
        batch in batch order: the same sums, byte for byte, as one process's replay. Each
        process runs 1 / world of the layer's forward (before, every process ran every
        batch's); what it still does for every batch is its experts' share of the statistics:
        the routing, and the gated intermediates of every routed row where it owns any
        expert's down projection (`moe._observe_hessians`). Observers are fed as the hooks of
        a local replay would (`watch_linears`, `moe.observe_expert_hessians`).

        A captured input is read after the rest of the forward ran: one changed in place
        later in the forward (its `_version` moved) is refused rather than sent changed."""
        captured: dict[str, list[tuple[torch.Tensor, int]]] = {name: [] for name in reps}

        def capture(_mod: nn.Module, args: tuple, kwargs: dict, _name: str) -> None:
            x = args[0] if args else kwargs.get("input")
            if not torch.is_tensor(x):
                raise CheckpointError(f"layer {layout.index}: '{_name}' was called without its input tensor; "
                                      "the split replay cannot capture it")
            captured[_name].append((x.detach(), x._version))

        def unchanged(name: str, x: torch.Tensor, version: int) -> torch.Tensor:
            if x._version != version:
                raise CheckpointError(f"layer {layout.index}: the input of '{name}' was changed in place later in "
                                      "the layer's forward, so it cannot be sent to the processes that own its "
                                      "statistics; run this model with one process")
            return x

        for name in reps:
            obs._handles.append(layer.get_submodule(name).register_forward_pre_hook(
                functools.partial(capture, _name=name), with_kwargs=True))
        sinks: dict[str, list] = {parent: [] for parent in fused}
        for parent, module in fused.items():
            capture_experts(module, parent, sinks[parent], outputs_used=advance)
        all_experts = self.job.config.quant.moe_calibrate_all_experts
        count, world = len(self.job.batches), self.dist.world
        for first in range(0, count, world):
            step = range(first, min(first + world, count))
            mine: dict[str, torch.Tensor] = {}
            for b in (b for b in step if b in self.mine):  # one at most: rank r holds b = r mod world
                kwargs = self.kwargs.for_batch(b, self.job.batches[b].attention_mask)[layout.index]
                out = layer(self.cache.get(b), **kwargs)
                if advance:
                    self.cache.put(b, out[0] if isinstance(out, tuple) else out)
                del out
                for name, calls in captured.items():
                    mine.update({f"{b}|linear|{name}|{j}": unchanged(name, x, v) for j, (x, v) in enumerate(calls)})
                    calls.clear()
                for parent, calls in sinks.items():
                    for j, (hidden, hidden_version, top_k) in enumerate(calls):
                        mine[f"{b}|experts|{parent}|{j}|hidden"] = unchanged(parent, hidden, hidden_version)
                        mine[f"{b}|experts|{parent}|{j}|top_k"] = top_k
                    calls.clear()
            everything = self.dist.exchange(mine, self.job.device)
            del mine
            for b in step:  # in batch order; a batch's keys in the order its forward captured them
                obs.token_mask = self.masks[b]
                for key, x in everything.items():
                    at, what, name, *call = key.split("|")
                    if int(at) != b:
                        continue
                    if what == "linear" and name in obs.observers:  # this process's unit
                        obs.observers[name].update(x, obs.token_mask)
                    elif what == "experts" and call[-1] == "top_k":
                        observe_expert_hessians(fused[name], everything[key.removesuffix("top_k") + "hidden"], x,
                                                obs, name, all_experts)
                faults.checkpoint("calibrate-batch")
            del everything

    def _inputs(self, gather: bool):
        """(batch, hidden states entering the layer) to replay, in batch order: this process's
        batches, or with `gather` every batch. Gathered, each step brings every process's next
        batch (rank r holds batches r, r + world, ...; `Dist.batches`) by one broadcast from
        the process holding it, so a statistic that is a sum (AWQ's means and recorded blocks;
        GPTQ's Hessians take `_replay_split`), kept whole by its work unit's owner, adds every batch in the order
        one process does: the same bytes. Only the hidden states travel (one [rows, seq,
        hidden] tensor per batch, its shape known to all), and each process keeps only its
        own share of the cache."""
        if not gather:
            for b in self.ids:
                yield b, self.cache.get(b)
            return
        count, world, hidden_size = len(self.job.batches), self.dist.world, self.job.hf_config.hidden_size
        for first in range(0, count, world):
            for b in range(first, min(first + world, count)):
                shape = (*self.job.batches[b].input_ids.shape, hidden_size)
                if b in self.mine:
                    hidden = self.cache.get(b).contiguous()
                    assert tuple(hidden.shape) == shape and hidden.dtype == self.job.dtype, \
                        (b, tuple(hidden.shape), hidden.dtype)
                else:
                    hidden = torch.empty(shape, dtype=self.job.dtype, device=self.job.device)
                self.dist.broadcast(hidden, b % world)
                yield b, hidden
                hidden = None  # not held while the next batch arrives

    def _merge_ranges(self, obs: LayerObserver) -> None:
        """SAMPLES: every rank's ranges become the max over all ranks' samples, in place."""
        values = [(name, o.value) for name, o in sorted(obs.observers.items())]
        values += sorted(obs.absmax.items())
        # Every rank learns of a gap before any waits in the reduction, and all stop together.
        missing = [name for share in self.dist.gather([name for name, v in values if v is None]) for name in share]
        if missing:
            raise CheckpointError(f"'{missing[0]}' received no calibration input in one process's share of the "
                                  "samples; use more samples per process, or fewer processes")
        self.dist.max_([v for _, v in values])

    def _expert_hessians(self, obs: LayerObserver, layout: LayerLayout) -> dict[str, torch.Tensor]:
        out = {}
        for key, acc in obs.expert_hessians.items():
            out[layout.prefix + key] = acc.result()
            if getattr(acc, "owned", None) is not None:  # only some experts' Hessians, in this order
                out[f"{layout.prefix}{key}.experts"] = torch.tensor(acc.held, dtype=torch.int64)
            count = getattr(acc, "count", None)
            if count is not None and count.ndim == 1:
                out[f"{layout.prefix}{key}.count"] = count.cpu()
                if key.endswith(".gate_up"):
                    self.uncovered += int((count == 0).sum())
        return out

    def _expert_stats(self, obs: LayerObserver, layout: LayerLayout) -> dict[str, torch.Tensor]:
        stats = {}
        experts_fixed: dict[str, dict[str, torch.Tensor]] = {}
        for module, ref in layout.experts.items():
            if module not in layout.quantized:
                continue
            if ref.parent not in experts_fixed:
                experts_fixed[ref.parent] = self._cover_experts(obs, ref.parent)
            kind = ref.kind
            stats[module] = experts_fixed[ref.parent][kind][ref.index]
        return stats

    def _cover_experts(self, obs: LayerObserver, parent: str) -> dict[str, torch.Tensor]:
        """Experts no real token reached get the largest scale among the layer's experts."""
        gate_up, down = obs.absmax[f"{parent}.gate_up"], obs.absmax[f"{parent}.down"]
        missed = gate_up == 0
        self.uncovered += int(missed.sum())
        return {"gate_up": torch.where(missed, gate_up.max(), gate_up), "down": torch.where(missed, down.max(), down)}


class _Writer:
    """Writes finished shards in a background thread; a shard is recorded once renamed."""

    def __init__(self, state: RunState, out_dir: Path):
        self.state, self.out_dir = state, out_dir
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-write")
        self.pending: list[Future] = []
        self.bytes_written = 0
        self._packer: ThreadPoolExecutor | None = None  # `pack_beside`, created on first use
        self._pack_stream: torch.cuda.Stream | None = None

    def pack_beside(self, fn: Callable[[], Any], device: torch.device) -> Future:
        """Run `fn` (a layer's packing into its output arena: kernels and asynchronous copies)
        in a thread of its own, on CUDA on a stream of its own after what the caller's stream
        has queued so far, so the layer's propagation overlaps it on the host and the device. The
        caller waits for the future and synchronizes the device before reading what it made.
        The thread never synchronizes the device: a graph capture on the caller's thread
        would fail (`streamq.quant.gptq._GraphedBlock`); the caller joins (`join_packing`)
        before the next layer's solves start, and keeps what `fn` reads referenced until then
        (freed earlier, the caller's stream could reuse its memory under the packing)."""
        if self._packer is None:
            self._packer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-pack")
            self._pack_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        stream = self._pack_stream
        if stream is None:
            return self._packer.submit(torch.no_grad()(fn))
        stream.wait_stream(torch.cuda.current_stream(device))

        def run() -> Any:
            torch.cuda.set_device(device)  # a thread starts on GPU 0; this process's GPU is its own
            with torch.cuda.stream(stream), torch.no_grad():
                return fn()

        return self._packer.submit(run)

    def join_packing(self, packing: Future, device: torch.device) -> None:
        """Wait for `pack_beside`'s thread (raising what it raised), then order the caller's
        stream after the packing's kernels and copies."""
        try:
            packing.result()
        finally:
            if self._pack_stream is not None:
                torch.cuda.current_stream(device).wait_stream(self._pack_stream)

    def abandon_packing(self, packing: Future) -> None:
        """A layer that failed after `pack_beside`: wait for the thread and its stream (they
        read the layer's tensors and write its arena), whatever the packing's outcome."""
        futures_wait([packing])
        if self._pack_stream is not None:
            self._pack_stream.synchronize()

    def submit(self, key: str, file: str, tensors: dict[str, torch.Tensor], arena: Arena | None = None) -> Future:
        future = self.pool.submit(self._write, key, file, tensors)
        self.pending.append(future)
        if arena is not None:
            arena.busy = future
        return future

    def _write(self, key: str, file: str, tensors: dict[str, torch.Tensor]) -> float:
        t0 = time.monotonic()
        try:
            size, digest = atomic_save_tensors(self.out_dir / file, tensors)
        except OSError as e:
            raise OutputError(f"writing {self.out_dir / file} failed: {e}. Free space (or fix the problem) "
                              "and rerun the same command to resume") from None
        self.state.record(key, file, size, digest, sorted(tensors))
        self.bytes_written += size
        faults.checkpoint("layer-recorded")
        return time.monotonic() - t0

    def wait(self, max_pending: int = 0) -> float:
        """Block until at most `max_pending` writes are in flight; returns seconds waited."""
        t0 = time.monotonic()
        while len(self.pending) > max_pending:
            self.pending.pop(0).result()
        return time.monotonic() - t0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._packer is not None:
            self._packer.shutdown(wait=True, cancel_futures=True)
            if self._pack_stream is not None:  # its copies land before the arenas are let go
                self._pack_stream.synchronize()


def quantize(config: JobConfig, overwrite: bool = False, show_progress: bool = True, dist: Dist | None = None
             ) -> Report:
    """Run a whole job; returns the report (also written to the output directory).

    `dist` (several processes under torchrun, `streamq.engine.dist`): calibration-free
    schemes split whole layers across ranks; calibrated ones split the samples or the
    layer's work units (`dist.calibration_split`), and the processes that do not read the
    layers take turns writing them (`Dist.writers`); rank 0 opens the output, writes the
    non-layer shard and finishes the checkpoint. The output
    bytes are the single-process run's.
    """
    start = time.monotonic()
    check_save_path(config.save_path, config.model.model_path, calibration_file(config))  # before anything
    split = None
    if dist is not None:
        if config.scheme.needs_calibration:
            split = calibration_split(config.scheme)  # ConfigError for a scheme that cannot split yet
        config.device = dist.device(config.device)
    job = prepare(config)
    if dist is not None:
        dist.check_same({"config": config.job_hash(), "source checkpoint": job.reader.fingerprint(),
                         "calibration data": _batches_digest(job.batches)})
    if split is not None:  # the plan sizes this process's share of the cache
        # Ranges need a batch on every process; sums see every batch on every process.
        job.batch_ids = dist.batches(len(job.batches), allow_none=split == MODULES)
    if split == MODULES:
        job.work_ranks = dist.world  # the plan times this process's share of the solves
    # Calibrated schemes: every process needs every layer, so a machine reads each once
    # (collective, so before any process may stop alone).
    node = dist.node_group() if split is not None else None
    job.received_layers = node is not None and job.device.type == "cuda"
    job.reads_layers = node is None or node.leader or job.device.type != "cuda"  # gloo receives into host buffers
    job.writes_rest = dist is None or dist.leader
    # Calibrated schemes: the processes that do not read take turns writing layers.
    writers = dist.writers(node) if split is not None else None
    job.write_turns = len(writers) if writers is not None else 1
    job.writes_layers = writers is None or dist.rank in writers
    job.reserves_arenas = writers is not None and job.writes_layers
    prepared = time.monotonic()
    out_dir = Path(config.save_path)
    failed: StreamqError | None = None
    try:
        plan = make_plan(job, startup_seconds=prepared - start)  # BudgetError (exit 3): nothing written yet
    except StreamqError as e:
        if dist is None:
            raise
        failed = e
    if dist is not None:  # each process plans its own share: all stop if any cannot run
        dist.share_failure(failed)
    for note in plan.notes:
        if note.startswith("warning: "):
            log.warning("%s", note)
    leader = dist is None or dist.leader
    opened: BaseException | None = None
    if leader:
        try:
            _check_disk_space(plan.disk_needed, out_dir)
            state = open_run(out_dir, config.job_hash(), job.reader.fingerprint(), overwrite, config.job_identity())
            state.expect(output_files(job.reader.path, job.num_layers + 1))  # listed before written
            (out_dir / "config.json").unlink(missing_ok=True)  # until the end, nothing looks finished
            state.status = "running"
            state.save()
        except StreamqError as e:
            opened = e
            if dist is None:
                raise
    if dist is not None:
        dist.share_failure(opened)  # rank 0 alone opened the output
        if not leader:
            state = attach_run(out_dir, dist.rank)
    report = Report()
    clock = _PhaseClock(report.phases, start)
    clock.mark("prepare", prepared)
    clock.mark("plan and open output")
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
        clock.mark("CUDA init")
    n = job.num_layers
    done = [state.shard_ok(f"layer-{i}") for i in range(n)]
    first_todo = next((i for i in range(n) if not done[i]), n)
    if state.resumed:
        log.info("resuming %s: %d of %d layers already done", out_dir, sum(done), n)
    calib, begin = None, 0
    cache_root = out_dir / CACHE_DIR
    if config.scheme.needs_calibration:
        report.cache_location = plan.cache_location
        live = cache_root / ("live" if dist is None else f"live.rank{dist.rank}")
        calib = _Calibrator(job, report.cache_location, live, dist, split, writers)
        found = latest_checkpoint(cache_root, first_todo)
        if found is not None:
            begin = found[0]
            log.info("calibration resumes at layer %d from its hidden-state checkpoint (%s)", begin, found[1].name)
            load_checkpoint(calib.cache, len(job.batches), found[1], calib.ids)
        else:
            calib.capture_inputs()
        clock.mark("calibration inputs")
    todo = [i for i in range(n) if not done[i]] if calib is None else list(range(begin, n))
    report.layers_skipped = n - sum(1 for i in todo if not done[i])  # resumed: finished before this run
    if dist is not None and calib is None:
        todo = dist.mine(todo)  # whole layers per rank; calibrated schemes: every rank every layer
    progress = LayerProgress(len(todo), f"{config.quant.name} {job.reader.path.name}", show_progress)
    prefetch = open_prefetcher(job.reader, job.device.type == "cuda", job.device, node if todo else None)
    writer = _Writer(state, out_dir)
    turns = job.write_turns > 1  # processes take turns writing layers
    arenas = _output_arenas(job, turns) if job.writes_layers else None
    try:
        if leader and not state.shard_ok(REST_KEY):
            # The non-layer tensors (embeddings, final norm, lm_head) go first: their write
            # overlaps the first layer instead of adding to the end of the run.
            writer.submit(REST_KEY, shard_name(n, n + 1), job.reader.read(sorted(job.reader.other)))
        if todo:
            prefetch.schedule(todo[0])  # first, so the next layer's read queues behind it
        writes = [i for i in todo if not done[i] and calib.writes(i)] if job.reserves_arenas else []
        if arenas is not None and writes:  # every writing process at once, while the first layer is read
            arenas.reserve(max(_output_arena_bytes(job, i) for i in writes))
        for pos, i in enumerate(todo):
            if pos + 1 < len(todo):
                prefetch.schedule(todo[pos + 1])
            stages = _process_layer(job, i, done[i], calib, prefetch, writer, arenas, progress)
            report.stages.append(stages)
            report.layer_gpu_bytes.append(peak_gpu_bytes(job.device))
            _enforce_budget(job, i)
            if calib is not None and i + 1 < n and _checkpoint_due(calib, i, dist):
                writer.wait()
                _save_cache_checkpoint(calib, i + 1, cache_root, dist)
            if job.device.type == "cpu":
                trim_heap()  # varying expert batch sizes fragment the heap (streamq.hostmem)
            progress.layer_done(i, job.reader.layer_bytes(i),
                                "(replayed)" if done[i] else f"host {fmt_bytes(current_host_rss())}")
        clock.mark("layers")
        writer.wait()
        clock.mark("last write")
        progress.close()
        if dist is not None:
            records = dist.gather((state.shards, state.files))
            if leader:
                for shards, files in records[1:]:
                    state.absorb(shards, files)
        if leader:
            weight_map = {t: info["file"] for info in state.shards.values() for t in info["tensors"]}
            _finish(job, state, out_dir, n + 1, weight_map)
            if dist is not None:
                for r in range(1, dist.world):
                    (out_dir / rank_manifest(r)).unlink(missing_ok=True)
            shutil.rmtree(cache_root, ignore_errors=True)
        clock.mark("index and config")
    finally:
        progress.close()
        prefetch.close()
        writer.close()
        if arenas is not None:
            arenas.close()
        if calib is not None:
            report.uncovered_experts = calib.uncovered
            report.rtn_fallbacks = calib.fallbacks
            report.work_split = calib.work_split
            calib.cache.close()
            release_outside_layers(job.skeleton)
    clock.mark("teardown")
    report.bytes_written += writer.bytes_written
    report.wall_s = time.monotonic() - start
    report.layers = n
    report.bytes_read = job.reader.bytes_read
    report.peak_gpu_bytes = peak_gpu_bytes(job.device)
    report.peak_host_bytes = peak_host_rss()
    report.planned_gpu_bytes = plan.predicted_peak_gpu_bytes
    report.planned_host_bytes = plan.predicted_peak_host_bytes
    report.notes = config.notes + job.notes
    if dist is not None:
        wrote = todo if calib is None else [i for i in todo if calib.writes(i) and not done[i]]
        report.notes.append(f"{dist.world} processes (torchrun); this report is rank {dist.rank}'s, "
                            f"which wrote layers {wrote[:3]}{'...' if len(wrote) > 3 else ''}")
    if leader:
        atomic_write_json(out_dir / REPORT_FILE, {"job": config.effective_dict(), "plan": plan.to_dict(),
                                                  "report": report.__dict__})
    return report


def _checkpoint_due(calib: _Calibrator, index: int, dist: Dist | None) -> bool:
    """Whether to checkpoint the hidden states after layer `index`: rank 0's clock decides for all."""
    due = calib.checkpoint_due(index) if dist is None or dist.leader else False
    return due if dist is None else dist.agree(due)


def _save_cache_checkpoint(calib: _Calibrator, next_layer: int, root: Path, dist: Dist | None) -> None:
    """The hidden states entering `next_layer`, for a resume. Several processes: each writes
    the batches it alone holds; rank 0 starts and commits, so the checkpoint appears whole or
    not at all."""
    if dist is None:
        save_checkpoint(calib.cache, len(calib.job.batches), next_layer, root)
        return
    if dist.leader:
        start_checkpoint(root, next_layer)
    dist.barrier()
    tmp, _ = checkpoint_dirs(root, next_layer)
    write_checkpoint_batches(calib.cache, calib.ids, tmp)
    dist.barrier()
    if dist.leader:
        commit_checkpoint(root, next_layer)
    dist.barrier()


class _PhaseClock:
    """Seconds between successive marks, for the report's breakdown of the whole run."""

    def __init__(self, phases: dict[str, float], start: float):
        self.phases, self.last = phases, start

    def mark(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def _recycle(job: Job, prefetch: Prefetcher, buffer: torch.Tensor) -> None:
    _settle(job)  # asynchronous copies out of the buffer have landed
    prefetch.recycle(buffer)


def _settle(job: Job) -> None:
    if job.device.type == "cuda":
        torch.cuda.synchronize(job.device)


def _settle_stream(job: Job) -> None:
    """Wait for this thread's CUDA stream only (not another thread's, as `_settle` would)."""
    if job.device.type == "cuda":
        torch.cuda.current_stream(job.device).synchronize()


def _let_go(job: Job, prefetch: Prefetcher, buffer: torch.Tensor, layer: nn.Module | None) -> None:
    """A layer this process does not write: its materialized weights and read buffer go back."""
    if layer is not None:
        release_layer(layer)
    _recycle(job, prefetch, buffer)


def _output_arenas(job: Job, turns: bool) -> OutputArenas | None:
    """Page-locked output arenas on CUDA (one per process when processes take turns writing
    layers, else two); None on the CPU, where results already are host tensors."""
    return OutputArenas(count=1 if turns else 2) if job.device.type == "cuda" else None


def _output_arena_bytes(job: Job, i: int) -> int:
    layout, infos, config = job.layouts[i], job.reader.tensors, job.config
    quantized = set(layout.quantized.values())
    sizes = []
    for n in job.reader.layers[i]:
        if n in quantized:
            sizes.extend(t.nbytes for t in config.format.specs(config.scheme.spec, *infos[n].shape,
                                                                 scale_dtype=infos[n].dtype))
        else:
            sizes.append(infos[n].nbytes)
    return output_arena_bytes(sizes)


@dataclass
class LayerContext:
    """One layer as a scheme's transform sees it: the Linear weights to quantize (module ->
    [out, in] on the device, source values) and the source tensors by name."""

    layout: LayerLayout
    layer: nn.Module | None
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    device: torch.device
    # Several processes splitting the transform's work units ("transform" `work_stage`): this
    # process's modules, and the exchange that gives every process every process's results
    # (name -> tensor, names unique across processes). One process: None and the identity.
    owned: set[str] | None = None
    share: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict


def _source_weights(job: Job, layout: LayerLayout, tensors: dict[str, torch.Tensor],
                    layer: nn.Module | None) -> dict[str, torch.Tensor]:
    """The weights to quantize, with the source's values: views into the materialized layer
    when it holds them exactly (same dtype), else the source tensors moved to the device,
    so a float32 source calibrated in bf16 is not rounded twice."""
    if layer is not None and all(tensors[n].dtype == job.dtype for n in layout.quantized.values()):
        return layer_weight_views(layer, layout)
    return {m: tensors[n].to(job.device, non_blocking=True) for m, n in layout.quantized.items()}


def _process_layer(job: Job, i: int, already_written: bool, calib: _Calibrator | None, prefetch: Prefetcher,
                   writer: _Writer, arenas: OutputArenas | None, progress: LayerProgress) -> dict[str, float]:
    """One layer: read (prefetched), calibrate, quantize, hand to the writer. Returns stage seconds."""
    layout, config = job.layouts[i], job.config
    stages: dict[str, float] = {"layer": i}
    t = time.monotonic()
    progress.step("read")
    tensors, stages["read"], buffer = prefetch.get(i)
    stages["wait_read"] = time.monotonic() - t
    scheme, fmt = config.scheme, config.format
    # A scheme whose next layer sees the quantized outputs must redo a finished layer
    # (deterministically, nothing written) to advance the hidden states.
    redo = already_written and scheme.propagates_quantized
    # Whether this process writes the layer (several processes: they take turns).
    emit = not already_written and (calib is None or calib.writes(i))
    stats, layer, owned = None, None, None
    if calib is not None:
        layer = decoder_layers(job.skeleton)[i]
        t = time.monotonic()
        progress.step("calibrate")
        materialize_layer(layer, layout, tensors, job.device, job.skeleton)
        stages["to_device"] = time.monotonic() - t
        t = time.monotonic()
        owned = calib.share(layout, layer)
        stats = calib.run_layer(layer, layout, observe=not already_written or redo,
                                advance=not scheme.propagates_quantized)
        if stats is not None:
            # Non-finite or all-zero inputs: stop before anything of the layer is written.
            check_activation_stats(i, {m: v for m, v in stats.values.items()
                                       if m in layout.quantized and torch.is_tensor(v)}, job.dtype)
        stages["calibrate"] = time.monotonic() - t
    if not emit and not scheme.propagates_quantized and (owned is None or already_written):
        # Replayed only to advance the hidden states, or another process writes it (with
        # work units split, every process still solves its share for the writer).
        _let_go(job, prefetch, buffer, layer)
        return stages
    t = time.monotonic()
    ctx = LayerContext(layout, layer, _source_weights(job, layout, tensors, layer), tensors, job.device)
    split_transform = owned is not None and scheme.work_stage == "transform"
    if split_transform:
        ctx.owned, ctx.share = owned, lambda mine: calib.dist.exchange(mine, job.device)
    stages["to_device"] = stages.get("to_device", 0.0) + time.monotonic() - t
    t = time.monotonic()
    progress.step("quantize")
    changed = scheme.transform(ctx, stats) if stats is not None else {}
    earlier: list[str] = []  # the transform's notes, every process's
    if split_transform:
        earlier = [note for share in calib.dist.gather(list(scheme.fallbacks)) for note in share]
        if not emit and not scheme.propagates_quantized:  # every process searched its share; one writes
            _note_fallbacks(calib, i, earlier)
            ctx.weights.clear()
            _let_go(job, prefetch, buffer, layer)
            return stages
    produced: dict[str, dict[str, torch.Tensor]] = {}
    checks: list[tuple[str, torch.Tensor]] = []
    roles = {ts.suffix: ts.role for ts in fmt.specs(scheme.spec, 1, 1)}
    targets = layer_weight_views(layer, layout) if scheme.propagates_quantized else {}
    split_quantize = owned is not None and scheme.work_stage == "quantize"
    beside = split_quantize and emit and arenas is not None and scheme.propagates_quantized  # `pack_beside`
    # CUDA: results are copied (asynchronously) into a page-locked arena that the writer
    # serializes from; on the CPU they already are host tensors. An arena is free once the
    # write that read it is done: packing beside the propagation, it is taken there, so
    # that wait too is off the path every process waits on (processes taking turns writing
    # hold one arena each, and a 235B layer's shard took longer than the two layers between).
    arena = arenas.begin(_output_arena_bytes(job, i)) if arenas is not None and emit and not beside else None
    weights = ctx.weights if not split_quantize else {m: w for m, w in ctx.weights.items() if m in owned}
    results = scheme.quantize(weights, stats, layout) if weights or not split_quantize else iter(())
    fallbacks = scheme.fallbacks if weights or not split_quantize else []
    if split_quantize:  # every process solved its share: exchange, so each holds the whole layer
        mine, seconds = timed_units(results, calib.unit_of, job.device)  # runs the solves; fills `fallbacks`
        exchanged = time.monotonic()
        results, fallbacks, seconds = _exchange_quantized(calib.dist, mine, list(fallbacks), seconds, layout,
                                                          job.device)
        calib.solved(i, seconds)  # every process's solves balance the next layers
        # Waiting for the slowest process's share, then the transfer.
        stages["exchange"] = time.monotonic() - exchanged
    elif split_transform:
        fallbacks = earlier

    def pack(module: str, q: QuantizedLinear) -> None:
        tensors_out = fmt.pack(module, q, scheme.spec)
        for name, value in tensors_out.items():
            if roles.get(name.rpartition(".")[2]) in (SCALE, INPUT_SCALE):
                checks.append((name, (torch.isfinite(value) & (value > 0)).all()))
        produced[module] = tensors_out if arena is None else {k: arena.to_host(v) for k, v in tensors_out.items()}

    # Packed beside the propagation (`beside`), by a thread; referenced until it is joined.
    done: list[tuple[str, QuantizedLinear]] = []
    for module, q in results:
        if module in targets:  # the layer computes with its quantized weights from now on
            targets[module].copy_(scheme.dequantize(q, targets[module].dtype))
        if beside:
            done.append((module, q))
        elif emit:  # off the device one at a time: the layer's quantized copy never sits on the GPU whole
            pack(module, q)
    del results
    packing: Future | None = None
    if beside:
        # Every process holds the whole quantized layer already (the exchange): the writer
        # packs it beside the propagation, which needs only the dequantized weights, so
        # packing costs the writer no time the other processes wait for.
        def pack_all() -> None:
            nonlocal arena
            arena = arenas.begin(_output_arena_bytes(job, i))
            for m, q in done:
                pack(m, q)

        packing = writer.pack_beside(pack_all, job.device)
    _note_fallbacks(calib, i, fallbacks)
    if scheme.propagates_quantized:
        stages["quantize"] = time.monotonic() - t
        t = time.monotonic()
        progress.step("propagate")
        try:
            calib.run_layer(layer, layout, observe=False, advance=True)
        except BaseException:
            if packing is not None:
                writer.abandon_packing(packing)
            raise
        # The stage's time is the device's, not only the launches'; the packing's stream
        # is left to run on.
        if packing is None:
            _settle(job)
        else:
            _settle_stream(job)
        stages["propagate"] = time.monotonic() - t
        t = time.monotonic()
    if packing is not None:
        writer.join_packing(packing, job.device)  # `arena` is set from here on
        del done
    if not emit:
        ctx.weights.clear()
        _let_go(job, prefetch, buffer, layer)
        return stages
    ctx.weights.clear()
    _check_scales(i, checks)
    _settle(job)  # the asynchronous copies must land before the writer reads them
    out: dict[str, torch.Tensor] = {}
    for name in job.reader.layers[i]:  # source order: quantized tensors where their weight was
        module = name[: -len(".weight")]
        if module in layout.quantized:
            out.update(produced[module])
            continue
        # A copy, not a view: the read buffer is reused for a later layer while the
        # writer may still be serializing this shard. A tensor the transform changed
        # (a rescaled norm) is written as the transform left it.
        src = changed.get(name, tensors[name])
        out[name] = src.to("cpu").clone() if arena is None else arena.take(src.shape, src.dtype).copy_(src)
    if calib is not None:
        release_layer(decoder_layers(job.skeleton)[i])
    stages["quantize"] = stages.get("quantize", 0.0) + time.monotonic() - t
    progress.step("write")
    # The previous shard must be on disk before this one is queued: one pending output
    # overlaps the next layer's compute, a second would only hold more host memory.
    del tensors
    _recycle(job, prefetch, buffer)
    stages["wait_write"] = writer.wait(max_pending=0)
    writer.submit(f"layer-{i}", shard_name(i, job.num_layers + 1), out, arena)
    return stages


def _note_fallbacks(calib: _Calibrator | None, i: int, notes: list[str]) -> None:
    """The scheme's notes on layer `i` (modules it could not treat as its algorithm says),
    logged by the process that writes the layer and kept for every process's report."""
    for note in notes:
        if calib is None or calib.writes(i):  # several processes: one of them says it
            log.warning("layer %d: %s", i, note)
        if calib is not None:
            calib.fallbacks.append(f"layer {i}: {note}")


_Q_FIELDS = tuple(f.name for f in fields(QuantizedLinear))


def _exchange_quantized(dist: Dist, mine: list[tuple[str, QuantizedLinear]], fallbacks: list[str],
                        seconds: dict[tuple, float], layout: LayerLayout, device: torch.device
                        ) -> tuple[list[tuple[str, QuantizedLinear]], list[str], dict[tuple, float]]:
    """MODULES: every process's quantized Linears to every process, in the layer's module
    order, with every process's fallback notes and work units' seconds (`timed_units`)."""
    flat = {f"{m}|{f}": getattr(q, f) for m, q in mine for f in _Q_FIELDS if getattr(q, f) is not None}
    everything = dist.exchange(flat, device)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in everything.items():
        module, _, name = key.rpartition("|")
        by_module.setdefault(module, {})[name] = value
    missing = [m for m in layout.quantized if m not in by_module]
    if missing:
        raise CheckpointError(f"'{missing[0]}' was quantized by no process ({len(missing)} module(s)); "
                              "the processes disagree on the layer's work split")
    shares = dist.gather((fallbacks, seconds))
    notes = [note for share, _ in shares for note in share]
    measured = {unit: s for _, times in shares for unit, s in times.items()}
    return [(m, QuantizedLinear(**by_module[m])) for m in layout.quantized], notes, measured


def _finish(job: Job, state: RunState, out_dir: Path, total_shards: int, weight_map: dict[str, str]) -> None:
    """Aux files, the index, and config.json last, once every shard is recorded."""
    copy_aux_files(job.reader.path, out_dir)
    total = sum((out_dir / info["file"]).stat().st_size for info in state.shards.values())
    expected = {shard_name(i, total_shards) for i in range(total_shards)}
    missing = expected - {info["file"] for info in state.shards.values()}
    if missing:
        raise OutputError(f"{out_dir}: shards {sorted(missing)} were not written; not marking the run complete")
    write_index(out_dir, weight_map, total)
    faults.checkpoint("before-config")
    write_config(job.reader.path, out_dir, job.config.format.config_block(job.config.scheme.spec, job.ignored))
    # The same checks `streamq verify --source` makes (the run's own bookkeeping aside):
    # a run never ends with success for an output it would reject.
    # fast: re-reading every output byte (NaN scan) would double the run's I/O; scales are
    # checked before each layer is written.
    result = verify_checkpoint(out_dir, job.reader.path, manifest=False, fast=True)
    if not result.ok:
        (out_dir / "config.json").unlink(missing_ok=True)
        shown = "; ".join(str(p) for p in result.problems[:3])
        raise OutputError(f"{out_dir}: the output fails verification ({len(result.problems)} problem(s): {shown}); "
                          "the run is not marked complete")
    state.status = "complete"
    state.save()


def _check_scales(index: int, checks: list[tuple[str, torch.Tensor]]) -> None:
    """Every scale finite and > 0 before the layer is written (one synchronization)."""
    if not checks:
        return
    ok = torch.stack([c for _, c in checks]).cpu()
    if not bool(ok.all()):
        bad = checks[int((~ok).nonzero()[0])][0]
        raise CheckpointError(f"layer {index}: '{bad}' is not finite and positive; nothing of this layer was "
                              "written. Check the source weights and calibration data (for float16 overflow, "
                              "set model.torch_dtype to bfloat16 or float32), then rerun to resume")


def _batches_digest(batches: list) -> str:
    """sha256 of the calibration tokens and masks, so processes on several machines agree on them."""
    digest = hashlib.sha256(str(len(batches)).encode())
    for b in batches:
        for t in (b.input_ids, b.attention_mask):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_disk_space(need: int, out_dir: Path) -> None:
    """Refuse up front if the output cannot fit on its filesystem."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OutputError(f"{probe}: {fmt_bytes(free)} free, the output needs about {fmt_bytes(need)}")


def _enforce_budget(job: Job, index: int) -> None:
    """Stop cleanly (finished layers stay; rerun resumes) if a measured peak broke the budget."""
    config = job.config
    gpu = peak_gpu_bytes(job.device)
    if config.max_gpu_memory and gpu > config.max_gpu_memory:
        raise BudgetError(f"layer {index}: peak GPU memory {fmt_bytes(gpu)} exceeded the budget "
                          f"{fmt_bytes(config.max_gpu_memory)}; finished layers are kept, rerun with a larger "
                          "--max-gpu-memory to resume")
    host = current_host_rss()
    if config.max_cpu_memory and host > config.max_cpu_memory:
        raise BudgetError(f"layer {index}: host memory {fmt_bytes(host)} exceeded the budget "
                          f"{fmt_bytes(config.max_cpu_memory)}; finished layers are kept, rerun with a larger "
                          "--max-cpu-memory to resume")

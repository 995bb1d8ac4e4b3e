"""Memory and time plan of a job, from shapes alone: no weight is read.

Everything comes from what `streamq.engine.job.prepare` already has: the safetensors
headers (name, dtype, shape of every tensor, grouped by layer), the layer layouts
(which tensors are quantized), the transformers config and the calibration batches.

The memory model follows what `engine/run.py` allocates, phase by phase; the plan's
peak is the largest phase (`_host_phases`, `_gpu_phases`):

GPU (device = cuda)
  dynamic   the layer's quantized weights in their source dtype (moved at once), then
            per weight: the fp32 temporaries of `quantize_fp8` + the previous FP8 result.
  static    the embedding (materialized for the input capture, kept all run), the layer
            in the compute dtype, one batch's activations (hidden states in/out, q/k/v,
            MLP or MoE intermediates, padding mask), the hidden cache if on the device.
  scheme    what `Scheme.statistics_bytes` names (GPTQ): statistics (Hessians) in both the
            replay and the quantize phase, and the solve's working set in place of the
            per-weight quantize temporaries; on CPU the same on the host. A scheme that
            propagates quantized outputs replays every layer twice (time).
  torchrun  (calibrated, several processes) each process's share of the hidden cache; the
            layer as received from the machine's reading process; with the work units split,
            the activations of the widest of every process's batches (all are replayed), a
            batch's hidden states in and out, the process's own quantized Linears until
            the exchange, then every process's.
HOST
  baseline  the process RSS after imports and `prepare` (measured when planning), plus
            what CUDA adds (context, kernels, cuBLAS).
  per layer the layer as read (one buffer), the next one (prefetched meanwhile), the
            output dict (FP8 + scales + copied tensors), the outputs of earlier layers
            still waiting for the writer; on CPU also the layer in the compute dtype and
            the quantize temporaries. On CUDA the two read buffers and the two output
            arenas of `engine/staging.py` instead: page-locked once, reused, kept to the end.
  last      the non-layer tensors (embeddings, lm_head) read for the last shard.

A plan is for budgeting: where the engine's timing decides (a write still pending
while the next layer computes) it counts the worst case.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from streamq.calib.cache import pinned_cache_bytes
from streamq.checkpoint.reader import DTYPE_BYTES
from streamq.checkpoint.writer import SAFETENSORS_METADATA, safetensors_header
from streamq.engine import tp_check
from streamq.engine.dist import replay_split
from streamq.engine.staging import output_arena_bytes
from streamq.errors import BudgetError
from streamq.schemes.base import GPU_COSTS, DeviceCosts, device_costs

GiB = 2**30
MiB = 2**20

# --- Assumed throughputs for the time estimate (override through `Assumptions`) ---------
# Source read + (CUDA) page-locked copy, as runs measured it (the "read" stage of
# streamq_report.json): 3.4-4.3 GB/s on an H200 host from the page cache, 1.6 GB/s on a CPU VM.
DISK_READ_BPS = 3.0e9
DISK_WRITE_BPS = 1.0e9  # output shards (and a disk cache), including fsync
PCIE_BPS = 20e9  # host <-> GPU copies from pinned memory (PCIe 4 x16 in practice)
GPU_MATMUL_FLOPS = 300e12  # sustained bf16 matmul of calibration forwards (H100/H200 class)
GPU_ELEMENTWISE_BPS = 300e9  # source bytes quantized per second on the GPU (several fp32 passes)
# CPU figures per core, measured on a 2-core VM (bf16 matmul without AMX, fp32 elementwise).
CPU_MATMUL_FLOPS_PER_CORE = 2e9
CPU_ELEMENTWISE_BPS_PER_CORE = 30e6

# --- What the engine allocates (engine/run.py, quant/fp8.py, calib/cache.py) ------------
FP32 = 4
INT64 = 8
# quantize_fp8: `x.to(float32) / scale` holds two fp32 copies of the weight at once.
QUANT_TEMP_BYTES_PER_ELEM = 2 * FP32
# MLP forward: act(gate), up and their product are alive together.
MLP_LIVE_INTERMEDIATES = 3
# MoE statistics pass, per routed row: gate/up output (2 x moe_intermediate), act(gate) * up
# and its absolute value (1 each).
MOE_STATS_INTERMEDIATES = 4
# RMSNorm computes in float32: the upcast input and the normalized copy.
NORM_FP32_COPIES = 2
# The decoder layer keeps the residual and the normalized input next to the sub-block.
LAYER_LIVE_HIDDEN = 2
# q, k, v as projected and again after the rotary embedding.
QKV_COPIES = 2
# Fit margin for a GPU budget: caching-allocator fragmentation, cuBLAS workspaces.
GPU_HEADROOM = 0.05
# Host RSS a CUDA run adds to the CPU-only baseline, measured on an H100 (torch 2.11, CUDA 13):
# context creation and the elementwise kernels of quantization ~190 MiB; cuBLAS and the
# attention kernels that calibration forwards load ~220 MiB more.
CUDA_CONTEXT_HOST_BYTES = 200 * MiB
CUDA_FORWARD_LIBS_HOST_BYTES = 220 * MiB
# Order of the safetensors dtype enum decides tensor order in a file header.
LOCATIONS = ("device", "host", "disk")

# Features the planner may choose that the engine must implement to honour them. The
# lead flips these when `_process_layer` splits batches / experts; until then a plan
# never asks for them (a budget that needs them is reported as such).
ENGINE_SUPPORTS_MICRO_BATCH = False
ENGINE_SUPPORTS_EXPERT_GROUPS = False


@dataclass(frozen=True)
class Assumptions:
    """Throughputs behind the time estimate; every figure in bytes or FLOP per second."""

    disk_read_bps: float = DISK_READ_BPS
    disk_write_bps: float = DISK_WRITE_BPS
    pcie_bps: float = PCIE_BPS
    gpu_flops: float = GPU_MATMUL_FLOPS
    gpu_elementwise_bps: float = GPU_ELEMENTWISE_BPS
    cpu_flops: float = CPU_MATMUL_FLOPS_PER_CORE * (os.cpu_count() or 1)
    cpu_elementwise_bps: float = CPU_ELEMENTWISE_BPS_PER_CORE * (os.cpu_count() or 1)
    # Solvers with work units (GPTQ): column steps, float32 arithmetic (`WorkUnit.seconds`).
    gpu_units: DeviceCosts = GPU_COSTS
    cpu_units: DeviceCosts = field(default_factory=lambda: device_costs("cpu"))


# ======================================================================================
# Shapes: tensors, layers, the model
# ======================================================================================


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class LayerSizes:
    """Byte counts of one decoder layer, from the headers and the layout."""

    index: int
    source_bytes: int  # every tensor of the layer as stored
    param_bytes: int  # the layer materialized in the compute dtype
    expert_param_bytes: int  # the part of param_bytes held by MoE experts
    quantized_source_bytes: int  # the quantized weights as stored (dynamic moves these to the device)
    copied_bytes: int  # tensors written unchanged (cloned into the output)
    fp8_bytes: int  # FP8 weights + scales produced for the layer
    arena_bytes: int  # the page-locked output arena the engine sizes for the layer (CUDA)
    out_file_bytes: int  # the layer's output shard on disk (header included)
    quant_numels: tuple[int, ...]  # elements of each quantized weight, in the engine's order
    source_elem: int  # bytes per element of the quantized weights as stored
    # What the scheme holds on the compute device besides the layer and the activations
    # (`Scheme.statistics_bytes`, e.g. GPTQ): statistics alive from the replay through the
    # solve, and the solve's own working set (by label, for the breakdown).
    statistics: tuple[tuple[str, int], ...] = ()
    solve: tuple[tuple[str, int], ...] = ()
    # Time of a scheme with work units (GPTQ): its solves and their statistics (`Scheme.work_units`).
    solve_units: tuple = ()
    own_codes: int = 0  # several processes splitting the solves: the most int8 codes one holds
    # Several processes splitting the replay (`dist.replay_split`): bytes per token of the
    # observed modules' inputs that travel from the process that ran the batch.
    captured_per_token: int = 0
    result_factor: float = 1.0  # bytes a quantized weight's result takes: its code, its share of scales and zeros

    def output_bytes(self) -> int:
        """The output dict handed to the writer: FP8 weights, scales, copied tensors."""
        return self.fp8_bytes + self.copied_bytes

    @property
    def max_quant_numel(self) -> int:
        return max(self.quant_numels, default=0)

    def quantize_transient(self, device_holds_outputs: bool) -> int:
        """Peak of the per-weight loop: fp32 temporaries of one weight + FP8 results alive.

        On the GPU only the previous FP8 tensor is still referenced (each is moved to the
        host right away); on the host every FP8 result made so far stays in the output.
        """
        peak, done, prev = 0, 0, 0
        for n in self.quant_numels:
            held = done if device_holds_outputs else prev
            peak = max(peak, held + QUANT_TEMP_BYTES_PER_ELEM * n)
            done, prev = done + n, n
        return peak

    @property
    def absmax_transient(self) -> int:
        """`weight.abs()` of the largest weight, taken for every weight before quantizing."""
        return self.max_quant_numel * self.source_elem


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    qk_norm: bool

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        get = (lambda k, d=0: cfg.get(k, d) or d) if isinstance(cfg, dict) else (lambda k, d=0: getattr(cfg, k, d) or d)
        hidden, heads = get("hidden_size"), get("num_attention_heads", 1)
        return cls(hidden=hidden, heads=heads, kv_heads=get("num_key_value_heads", heads),
                   head_dim=get("head_dim", hidden // max(heads, 1)), intermediate=get("intermediate_size"),
                   num_experts=get("num_experts") or get("num_local_experts") or get("n_routed_experts"),
                   top_k=get("num_experts_per_tok", 1), moe_intermediate=get("moe_intermediate_size"),
                   qk_norm=get("model_type", "") in ("qwen3", "qwen3_moe"))


@dataclass(frozen=True)
class BatchShape:
    rows: int
    seq_len: int
    padded: bool

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


def safetensors_file_bytes(tensors: Iterable[Tensor], metadata: dict | None = None) -> int:
    """Exact size of the safetensors file the writer makes for these tensors."""
    tensors = list(tensors)
    header, _ = safetensors_header(((t.name, t.dtype, t.shape, t.nbytes) for t in tensors), metadata)
    return len(header) + sum(t.nbytes for t in tensors)


def layer_output_tensors(source: list[Tensor], quantized: dict[str, str], fmt: Any, spec: Any) -> list[Tensor]:
    """The tensors a layer's output shard holds: each quantized weight replaced by what the
    format writes for it (`Format.specs`), everything else as stored."""
    weights = set(quantized.values())
    out: list[Tensor] = []
    for t in source:
        if t.name not in weights:
            out.append(t)
            continue
        module = t.name[: -len(".weight")]
        out.extend(Tensor(f"{module}.{ts.suffix}", ts.dtype, ts.shape)
                   for ts in fmt.specs(spec, *t.shape, scale_dtype=t.dtype))
    return out


def measure_layer(index: int, source: list[Tensor], quantized: dict[str, str], experts: Iterable[str],
                  compute_elem: int, fmt: Any, spec: Any) -> LayerSizes:
    by_name = {t.name: t for t in source}
    qtensors = [by_name[n] for n in quantized.values()]
    outputs = layer_output_tensors(source, quantized, fmt, spec)
    copied = {t.name for t in source} - set(quantized.values())
    expert_numel = sum(by_name[quantized[m]].numel for m in experts if m in quantized)
    return LayerSizes(
        index=index,
        source_bytes=sum(t.nbytes for t in source),
        param_bytes=sum(t.numel for t in source) * compute_elem,
        expert_param_bytes=expert_numel * compute_elem,
        quantized_source_bytes=sum(t.nbytes for t in qtensors),
        copied_bytes=sum(t.nbytes for t in source if t.name in copied),
        fp8_bytes=sum(t.nbytes for t in outputs if t.name not in copied),
        arena_bytes=output_arena_bytes(t.nbytes for t in outputs),
        out_file_bytes=safetensors_file_bytes(outputs, SAFETENSORS_METADATA),
        quant_numels=tuple(t.numel for t in qtensors),
        source_elem=max((DTYPE_BYTES[t.dtype] for t in qtensors), default=2),
    )


# ======================================================================================
# Activations of one calibration batch through one decoder layer
# ======================================================================================


def activation_bytes(m: ModelShape, batch: BatchShape, elem: int, all_experts: bool = False,
                     grouped_gemm: bool = True) -> dict[str, int]:
    """Peak bytes one batch allocates inside a decoder layer forward (output included).

    MoE (streamq.model.moe): the model's experts forward, then a statistics pass that
    gathers every routed row (tokens x top_k) and computes its gate/up projection, the
    activation and its absmax at once; without a grouped GEMM (CPU) the per-expert
    results are concatenated, so they exist twice.
    """
    n = batch.tokens
    hidden = n * m.hidden * elem
    live = LAYER_LIVE_HIDDEN * hidden + NORM_FP32_COPIES * n * m.hidden * FP32
    q, kv = n * m.heads * m.head_dim * elem, n * m.kv_heads * m.head_dim * elem
    attention = QKV_COPIES * (q + 2 * kv) + q
    if m.qk_norm:
        attention += (q + kv) // elem * FP32
    if batch.padded and m.kv_heads < m.heads:
        attention += 2 * q  # repeat_kv: sdpa gets a mask, so k/v are expanded to every head
    mask = batch.rows * batch.seq_len * batch.seq_len if batch.padded else 0
    if m.num_experts:
        e, k = m.num_experts, max(m.top_k, 1)
        routed = n * k
        router = n * e * (elem + 2 * FP32) + routed * (e + 1) * INT64  # logits, softmax, one_hot mask
        stats = routed * (m.hidden + MOE_STATS_INTERMEDIATES * m.moe_intermediate) * elem
        if not grouped_gemm:
            stats += routed * 2 * m.moe_intermediate * elem
        mlp = router + hidden + stats  # the experts' output + the statistics pass
        if all_experts:
            mlp += n * (m.hidden + MLP_LIVE_INTERMEDIATES * m.moe_intermediate) * elem
    else:
        mlp = MLP_LIVE_INTERMEDIATES * n * m.intermediate * elem
    inner = max(attention + mask, mlp)
    return {"hidden states out": hidden, "residual and norm": live, "attention/MLP intermediates": inner}


# ======================================================================================
# The plan
# ======================================================================================


@dataclass
class Inputs:
    """What a plan is computed from (built from a prepared Job by `inputs_from_job`)."""

    device_type: str  # "cpu" | "cuda"
    static: bool
    fmt: str
    compute_elem: int
    shape: ModelShape
    layers: list[LayerSizes]
    other_bytes: int  # non-layer tensors (embeddings, final norm, lm_head)
    other_file_bytes: int  # their shard on disk
    stem_param_bytes: int  # model.* non-layer params materialized for input capture (static)
    stem_read_bytes: int  # what the input capture reads
    aux_bytes: int  # tokenizer and side files copied as they are
    batches: list[BatchShape] = field(default_factory=list)
    hidden_cache: str = "auto"
    all_experts: bool = False
    checkpoint_layers: int = 0  # static: the cache is saved every N layers (global.cache_checkpoint_layers)
    checkpoint_minutes: float = 0.0  # ... and every T minutes (global.cache_checkpoint_minutes)
    model_path: str = ""
    algorithm: str = ""
    startup_seconds: float = 0.0  # imports and `prepare`, as the planning process measured them
    propagate_quantized: bool = False  # a second replay per layer (GPTQ's quantized outputs)
    ranks: int = 1  # processes splitting each layer's work units (torchrun: GPTQ, AWQ)
    received_layers: bool = False  # each layer arrives as one device buffer (one read per machine)
    write_turns: int = 1  # processes taking turns writing layers: one output arena each, not two
    writes_layers: bool = True  # False: other processes write every layer (torchrun: the machine's reader)
    reserves_arenas: bool = False  # the output arenas are sized for the largest layer before the loop (torchrun)
    reads_layers: bool = True  # False: another process of the machine reads (and broadcasts) the layers
    writes_rest: bool = True  # False: another process writes the non-layer shard (torchrun: rank 0)
    every_batch: list[BatchShape] = field(default_factory=list)  # every process's batches (torchrun)
    split_replay: bool = False  # several processes run the statistics forward on their own batches only


@dataclass
class Plan:
    model_path: str
    algorithm: str
    format: str
    device: str
    layers: int
    bytes_to_read: int
    bytes_to_write: int
    disk_needed: int
    cache_location: str  # "device" | "host" | "disk" | "none" (dynamic)
    cache_bytes: int
    calib_batches: int
    calib_tokens: int
    micro_batch: int  # rows per forward (the calibration batch size unless split to fit)
    expert_groups: int
    baseline_host_bytes: int
    predicted_peak_gpu_bytes: int
    predicted_peak_host_bytes: int
    gpu_breakdown: dict[str, int]
    host_breakdown: dict[str, int]
    gpu_budget: int | None
    host_budget: int | None
    estimated_seconds: float
    time_breakdown: dict[str, float]
    assumptions: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"plan: {self.algorithm} ({self.format}) of {self.model_path} on {self.device}",
            f"  layers            {self.layers}",
            f"  read              {fmt_size(self.bytes_to_read)}",
            f"  write             {fmt_size(self.bytes_to_write)}",
            f"  disk needed       {fmt_size(self.disk_needed)}",
        ]
        if self.cache_location != "none":
            lines.append(f"  hidden cache      {self.cache_location}, {fmt_size(self.cache_bytes)} "
                         f"({self.calib_batches} batches, {self.calib_tokens} tokens, micro-batch {self.micro_batch})")
        if self.expert_groups > 1:
            lines.append(f"  expert groups     {self.expert_groups}")
        lines.append(f"  peak GPU          {fmt_size(self.predicted_peak_gpu_bytes)}"
                     + (f" of {fmt_size(self.gpu_budget)}" if self.gpu_budget else "")
                     + (f"  ({describe(self.gpu_breakdown)})" if self.gpu_breakdown else ""))
        lines.append(f"  peak host RSS     {fmt_size(self.predicted_peak_host_bytes)}"
                     + (f" of {fmt_size(self.host_budget)}" if self.host_budget else "")
                     + f"  ({describe(self.host_breakdown)})")
        lines.append(f"  time              ~{fmt_seconds(self.estimated_seconds)}  ("
                     + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in self.time_breakdown.items()) + ")")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_size(n: float | None, round_up: bool = False) -> str:
    """1.5 GiB; `round_up` for a minimum, so that the printed budget is enough."""
    if n is None:
        return "unlimited"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = math.ceil(n / scale * 10) / 10 if round_up else n / scale
            return f"{value:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def describe(parts: dict[str, int]) -> str:
    return " + ".join(f"{k} {fmt_size(v)}" for k, v in parts.items() if v > 0)


@dataclass(frozen=True)
class _Choice:
    location: str
    micro_batch: int
    expert_groups: int


# --------------------------------------------------------------------------- phases


def _cache_bytes(inputs: Inputs, pinned: bool) -> int:
    per = [b.tokens * inputs.shape.hidden * inputs.compute_elem for b in inputs.batches]
    return pinned_cache_bytes(per) if pinned else sum(per)


def _micro(batch: BatchShape, rows: int) -> BatchShape:
    return replace(batch, rows=min(rows, batch.rows))


def _replayed(inputs: Inputs) -> list[BatchShape]:
    """The batches the statistics pass runs: every process's when the work units are split
    (each replays every batch, or with `split_replay` adds every batch's module inputs to its
    statistics: the activations of that pass are sized for every batch alike), else this
    process's."""
    return inputs.every_batch if inputs.ranks > 1 and inputs.every_batch else inputs.batches


def _largest_activation(inputs: Inputs, micro_batch: int) -> dict[str, int]:
    best: dict[str, int] = {}
    for b in _replayed(inputs):
        act = activation_bytes(inputs.shape, _micro(b, micro_batch), inputs.compute_elem, inputs.all_experts,
                               grouped_gemm=inputs.device_type == "cuda" and inputs.compute_elem == 2)
        if sum(act.values()) > sum(best.values()):
            best = act
    return best


def _gathered_bytes(inputs: Inputs, lay: LayerSizes) -> dict[str, int]:
    """Several processes each replaying every batch on its own share of the hidden states
    (`_Calibrator._inputs`): a batch received from another process. Splitting the replay
    (`_Calibrator._replay_split`): the observed modules' inputs of one step, one batch from
    each process, plus this process's own twice (as captured, and in its send buffer)."""
    if inputs.ranks <= 1 or not _replayed(inputs):
        return {}
    n = max(b.tokens for b in _replayed(inputs))
    if inputs.split_replay:
        return {"module inputs of one step (a batch from each process)":
                (inputs.ranks + 1) * n * lay.captured_per_token}
    return {"hidden states from another process (a batch)": n * inputs.shape.hidden * inputs.compute_elem}


def _max_phase(phases: list[dict[str, int]]) -> dict[str, int]:
    return max(phases, key=lambda p: sum(p.values()), default={})


def _gpu_phases(inputs: Inputs, choice: _Choice) -> dict[str, int]:
    """The largest set of allocations alive at once on the GPU (empty on CPU)."""
    if inputs.device_type != "cuda":
        return {}
    phases: list[dict[str, int]] = []
    for lay in inputs.layers:
        if not inputs.static:
            phases.append({"layer weights (source dtype)": lay.quantized_source_bytes,
                           "quantize temporaries": max(lay.quantize_transient(False), lay.absmax_transient)})
            continue
        params = lay.param_bytes - lay.expert_param_bytes + lay.expert_param_bytes // choice.expert_groups
        fixed = {"embedding": inputs.stem_param_bytes,
                 "hidden cache": _cache_bytes(inputs, False) if choice.location == "device" else 0,
                 "layer (compute dtype)": params,
                 "layer as received (one read per machine)": lay.source_bytes if inputs.received_layers else 0}
        act = _largest_activation(inputs, choice.micro_batch)
        if choice.location != "device":
            act = {"hidden states in": (max(b.tokens for b in _replayed(inputs)) * inputs.shape.hidden
                                        * inputs.compute_elem)} | act
        stats = dict(lay.statistics)
        phases.append(fixed | stats | act | _gathered_bytes(inputs, lay))
        if lay.solve:  # the scheme's solve replaces the per-weight quantize temporaries
            split = inputs.ranks > 1 and bool(lay.solve_units)  # solves split (GPTQ), not searches (AWQ)
            codes = sum(lay.quant_numels)
            # Several processes splitting the solves: each keeps its results (int8 codes, a byte
            # per weight) until all are exchanged, so its last solve runs beside most of its share.
            own = lay.own_codes  # the largest share (`_with_scheme_memory`)
            held = {"own quantized Linears (until the exchange)": int(own * lay.result_factor)} if split else {}
            phases.append(fixed | stats | dict(lay.solve) | held)
            if split:
                # After the solves each holds every process's quantized Linears (`Dist.exchange`),
                # plus its own share twice (its results and its send buffer); the statistics live.
                # The writer packs them beside the propagation (`_Writer.pack_beside`), whose
                # activations are then alive too.
                exchanged = {"exchanged quantized layer": int((codes + 2 * own) * lay.result_factor)}
                phases.append(fixed | stats | exchanged | (act if inputs.propagate_quantized else {}))
        else:
            phases.append(fixed | stats | {"quantize temporaries": max(lay.quantize_transient(False),
                                                                         lay.absmax_transient)})
    return _max_phase(phases)


def _pending_writes(inputs: Inputs, times: _LayerTimes, i: int) -> list[LayerSizes]:
    """Earlier layers whose output may still be alive (being written) while layer i computes.

    The writer thread takes one shard at a time and the loop only waits when two are
    pending, so when writing a layer takes longer than computing one (writer-bound) the
    two previous layers' outputs are alive for all of layer i; otherwise the previous
    one may be. Timing decides whether that happens; a budget must hold when it does,
    so the plan counts them for the whole layer.
    """
    writer_bound = i > 0 and times.write[i - 1] > times.compute[i]
    return inputs.layers[max(0, i - (2 if writer_bound else 1)):i]


def _host_phases(inputs: Inputs, choice: _Choice, baseline: int, times: _LayerTimes) -> dict[str, int]:
    """The largest set of host allocations alive at once, baseline included."""
    cuda = inputs.device_type == "cuda"
    fixed = {"baseline": baseline}
    if cuda:
        fixed["CUDA context"] = CUDA_CONTEXT_HOST_BYTES + (CUDA_FORWARD_LIBS_HOST_BYTES if inputs.static else 0)
    if inputs.static and (choice.location == "host" or (choice.location == "device" and not cuda)):
        fixed["hidden cache"] = _cache_bytes(inputs, pinned=cuda)
    if inputs.static and not cuda:
        fixed["embedding"] = inputs.stem_param_bytes
    phases = []
    for i, lay in enumerate(inputs.layers):
        nxt = inputs.layers[i + 1] if i + 1 < len(inputs.layers) else None
        # The non-layer shard is written first; it may be pending all through layer 0.
        first = {"non-layer tensors (first shard, write pending)": inputs.other_bytes} \
            if i == 0 and inputs.writes_rest else {}
        if cuda:  # outputs pending a write live in the arenas; a process that receives the layers reads none
            reads = inputs.reads_layers
            phases.append(fixed | first | {"layer (page-locked read buffer)": lay.source_bytes if reads else 0,
                                           "next layer (page-locked read buffer)": nxt.source_bytes if nxt and reads
                                           else 0,
                                           "output arenas (page-locked)": _arenas_in_use(inputs, i)})
        else:
            held = sum(p.output_bytes() for p in _pending_writes(inputs, times, i))
            prefetched = {"next layer (prefetched)": nxt.source_bytes if nxt else 0}
            phases += _host_cpu_layer(inputs, choice, lay,
                                      fixed | first | {"earlier outputs (write pending)": held} | prefetched)
    last: dict[str, int] = {}
    if cuda:  # the buffers are released when the run ends, after the last shard
        sources = sorted((x.source_bytes for x in inputs.layers), reverse=True)
        last["page-locked buffers kept"] = sum(sources[:2]) * inputs.reads_layers + \
            _arenas_in_use(inputs, len(inputs.layers) - 1)
    phases.append(fixed | last)
    return _max_phase(phases)


def _arenas_in_use(inputs: Inputs, i: int) -> int:
    """The output arenas once layer i has begun: one process alternates two, each grown to
    the largest layer it has held (`staging.OutputArenas`). Processes of a torchrun job size
    theirs for the largest layer before the loop: one each where several take turns writing
    layers, two for a sole writer. A process that writes no layer holds none."""
    if not inputs.writes_layers:
        return 0
    if inputs.reserves_arenas:
        return (1 if inputs.write_turns > 1 else 2) * max(x.arena_bytes for x in inputs.layers)
    sizes = [x.arena_bytes for x in inputs.layers[:i + 1]]
    return max(sizes[0::2], default=0) + max(sizes[1::2], default=0)


def _host_cpu_layer(inputs: Inputs, choice: _Choice, lay: LayerSizes, fixed: dict[str, int]) -> list[dict[str, int]]:
    """CPU: the source pages touched, the layer in compute dtype, FP8 results and temporaries."""
    source = {"layer (source)": lay.source_bytes}
    quant = {"quantized output + quantize temporaries": max(lay.quantize_transient(True), lay.absmax_transient)}
    if not inputs.static:
        return [fixed | source | quant]
    act = _largest_activation(inputs, choice.micro_batch)
    # glibc keeps freed blocks under its mmap threshold: a batch's activations stay resident.
    retained = {"activations (kept by malloc)": sum(act.values())}
    layer = source | {"layer (compute dtype)": lay.param_bytes} | dict(lay.statistics) | _gemm_caches(inputs, choice)
    if lay.solve:
        quant = {"quantized output": lay.fp8_bytes} | dict(lay.solve)
    return [fixed | layer | act, fixed | layer | retained | quant]


def _gemm_caches(inputs: Inputs, choice: _Choice) -> dict[str, int]:
    """oneDNN's per-shape GEMM caches, bounded by `streamq.hostmem`: about one float32
    [batch tokens, hidden] scratch per cached shape (measured on the tiny models at 2,048 and
    4,096 tokens per batch: 11 to 45 MiB). A dense layer has a handful of shapes; MoE experts
    see new ones every batch, so their caches fill."""
    from streamq.hostmem import CPU_KERNEL_CACHE_ENTRIES

    entries = CPU_KERNEL_CACHE_ENTRIES if inputs.shape.num_experts else min(CPU_KERNEL_CACHE_ENTRIES, 8)
    tokens = max(_micro(b, choice.micro_batch).tokens for b in _replayed(inputs))
    return {"CPU GEMM caches": entries * tokens * inputs.shape.hidden * 4}


# --------------------------------------------------------------------------- time


@dataclass
class _LayerTimes:
    read: list[float]
    write: list[float]
    compute: list[float]


def _layer_times(inputs: Inputs, a: Assumptions, choice: _Choice) -> _LayerTimes:
    cuda = inputs.device_type == "cuda"
    flops = a.gpu_flops if cuda else a.cpu_flops
    elementwise = a.gpu_elementwise_bps if cuda else a.cpu_elementwise_bps
    tokens = sum(b.tokens for b in inputs.batches) if inputs.static else 0
    # The statistics pass's forward: every batch on every process, or split (`split_replay`).
    forwarded = inputs.batches if inputs.split_replay else _replayed(inputs)
    replayed = sum(b.tokens for b in forwarded) if inputs.static else 0
    every = sum(b.tokens for b in inputs.every_batch) or tokens  # what each work unit's statistics see
    cache = _cache_bytes(inputs, False) if inputs.static else 0
    cache_traffic = {"host": 2 * cache / a.pcie_bps if cuda else 0.0,
                     "disk": cache / a.disk_read_bps + cache / a.disk_write_bps}.get(choice.location, 0.0)
    t = _LayerTimes([], [], [])
    for lay in inputs.layers:
        transfer = (lay.source_bytes + lay.fp8_bytes) / a.pcie_bps if cuda else 0.0
        calibrate = 0.0
        if inputs.static:
            # Several processes splitting the work units replay every batch for the statistics
            # (their own share of the hidden states, and the others'), unless the replay is split
            # (GPTQ: own batches, the module inputs travel), and only their own batches to
            # propagate; each accumulates and solves its share of the units.
            replay = 2 * _active_params(inputs, lay) / flops
            calibrate = replay * replayed + cache_traffic * choice.expert_groups
            m = inputs.shape
            if inputs.split_replay and m.num_experts and lay.expert_param_bytes and not inputs.all_experts:
                # ... and, for the experts' down Hessians, the gate/up GEMM of every batch's routed rows
                calibrate += 2 * every * m.top_k * m.hidden * 2 * m.moe_intermediate / flops
            if inputs.propagate_quantized:  # the quantized layer is replayed once more
                calibrate += replay * tokens + cache_traffic * choice.expert_groups
            units = a.gpu_units if cuda else a.cpu_units
            calibrate += _busiest_rank_seconds([u.seconds(units, every) for u in lay.solve_units], inputs.ranks)
        t.read.append(lay.source_bytes / a.disk_read_bps)
        t.write.append(lay.out_file_bytes / a.disk_write_bps)
        t.compute.append(transfer + calibrate + lay.quantized_source_bytes / elementwise)
    return t


def _busiest_rank_seconds(seconds: list[float], ranks: int) -> float:
    """The largest per-rank sum when `streamq.engine.dist.assign` spreads these units over ranks."""
    from streamq.engine.dist import assign

    load = [0.0] * ranks
    for s, r in zip(seconds, assign(seconds, ranks), strict=True):
        load[r] += s
    return max(load, default=0.0)


def _active_params(inputs: Inputs, lay: LayerSizes) -> float:
    """Parameters one token multiplies with (routed experts: top_k of num_experts)."""
    params = (lay.param_bytes - lay.expert_param_bytes) / inputs.compute_elem
    if lay.expert_param_bytes and inputs.shape.num_experts:
        share = 1.0 if inputs.all_experts else inputs.shape.top_k / inputs.shape.num_experts
        params += lay.expert_param_bytes / inputs.compute_elem * share
    return params


def _total_time(inputs: Inputs, a: Assumptions, times: _LayerTimes) -> dict[str, float]:
    """Read, compute and write overlap (prefetch and writer threads): the slowest sets the pace.

    The first layer waits for two reads: the loop schedules layer 1 before it asks for layer 0.
    """
    n = len(inputs.layers)
    pipeline = sum(max(times.read[i + 1] if i + 1 < n else 0.0, times.compute[i], times.write[i])
                   for i in range(n))
    first = times.read[0] + (times.read[1] if n > 1 else 0.0) if n else 0.0
    rest = (inputs.other_bytes + inputs.stem_read_bytes) / a.disk_read_bps + inputs.other_file_bytes / a.disk_write_bps
    return {"startup": inputs.startup_seconds, "first read": first, "layers": pipeline, "last shard": rest}


# --------------------------------------------------------------------------- search


def _candidates(inputs: Inputs, allow_micro_batch: bool, allow_expert_groups: bool) -> list[_Choice]:
    if not inputs.static:
        return [_Choice("none", 0, 1)]
    if inputs.hidden_cache != "auto":
        locations = [inputs.hidden_cache]
    else:
        locations = ["device", "host", "disk"] if inputs.device_type == "cuda" else ["host", "disk"]
    rows = max(b.rows for b in _replayed(inputs))
    micro = [rows]
    while allow_micro_batch and micro[-1] > 1:
        micro.append((micro[-1] + 1) // 2)
    groups = [1]
    experts = inputs.shape.num_experts
    while allow_expert_groups and experts and groups[-1] * 2 <= experts and inputs.device_type == "cuda":
        groups.append(groups[-1] * 2)
    return [_Choice(loc, mb, g) for loc in locations for g in groups for mb in micro]


@dataclass
class _Evaluated:
    choice: _Choice
    gpu: dict[str, int]
    host: dict[str, int]
    seconds: dict[str, float]

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_needed(self) -> int:
        """The smallest GPU budget this choice fits in (headroom included)."""
        return math.ceil(self.gpu_peak / (1 - GPU_HEADROOM))

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _evaluate(inputs: Inputs, choice: _Choice, baseline: int, a: Assumptions) -> _Evaluated:
    times = _layer_times(inputs, a, choice)
    return _Evaluated(choice, _gpu_phases(inputs, choice), _host_phases(inputs, choice, baseline, times),
                      _total_time(inputs, a, times))


def _fits(e: _Evaluated, gpu_budget: int | None, host_budget: int | None) -> bool:
    return (gpu_budget is None or e.gpu_needed <= gpu_budget) and (host_budget is None or e.host_peak <= host_budget)


def _preference(e: _Evaluated) -> tuple:
    """Fastest first; ties: whole experts, whole batches, the cache nearest the device."""
    loc = LOCATIONS.index(e.choice.location) if e.choice.location in LOCATIONS else 0
    return (round(e.total_seconds, 3), e.choice.expert_groups, -e.choice.micro_batch, loc)


def _budget_error(options: list[_Evaluated], gpu_budget: int | None, host_budget: int | None,
                  gpu_label: str, host_label: str) -> BudgetError:
    """Name the smallest budget that would work: host first, else GPU among host-fitting choices.

    The error carries `resource` ("host" | "gpu") and `needed_bytes` for callers.
    """
    host_ok = [e for e in options if host_budget is None or e.host_peak <= host_budget]
    best = min(options, key=lambda e: e.host_peak) if not host_ok else min(host_ok, key=lambda e: e.gpu_needed)
    where = f" with the hidden cache on {best.choice.location}" if best.choice.location in LOCATIONS else ""
    if not host_ok:
        resource, needed = "host", best.host_peak
        text = f"{fmt_size(needed, True)} of host memory{where} ({describe(best.host)}); {host_label}"
    else:
        resource, needed = "gpu", best.gpu_needed
        text = (f"{fmt_size(needed, True)} of GPU memory{where} ({describe(best.gpu)}, "
                f"+{GPU_HEADROOM:.0%} headroom); {gpu_label}")
    error = BudgetError(f"the job does not fit the memory budget: needs at least {text}")
    error.resource, error.needed_bytes = resource, needed
    return error


def choose(inputs: Inputs, gpu_budget: int | None, host_budget: int | None, baseline: int,
           assumptions: Assumptions, gpu_label: str = "", host_label: str = "",
           allow_micro_batch: bool = ENGINE_SUPPORTS_MICRO_BATCH,
           allow_expert_groups: bool = ENGINE_SUPPORTS_EXPERT_GROUPS) -> _Evaluated:
    """The preferred placement that fits both budgets; BudgetError naming the minimum if none."""
    options = [_evaluate(inputs, c, baseline, assumptions)
               for c in _candidates(inputs, allow_micro_batch, allow_expert_groups)]
    fitting = [e for e in options if _fits(e, gpu_budget, host_budget)]
    if not fitting:
        raise _budget_error(options, gpu_budget, host_budget, gpu_label or f"{fmt_size(gpu_budget)} available",
                            host_label or f"{fmt_size(host_budget)} available")
    return min(fitting, key=_preference)


# ======================================================================================
# From a prepared job
# ======================================================================================


def _tensors(reader: Any, names: Iterable[str]) -> list[Tensor]:
    return [Tensor(n, reader.tensors[n].dtype, tuple(reader.tensors[n].shape)) for n in names]


def inputs_from_job(job: Any, device_type: str | None = None) -> Inputs:
    """Everything the plan needs from a `streamq.engine.job.Job` (no weight is read)."""
    from streamq.model.skeleton import decoder_layers

    config, reader = job.config, job.reader
    static = config.scheme.needs_calibration
    elem = _elem(job.dtype)
    fmt = config.quant.save_name
    layers = [measure_layer(lay.index, _tensors(reader, reader.layers[lay.index]), lay.quantized, lay.experts,
                            elem, config.format, config.scheme.spec) for lay in job.layouts]
    top_k = ModelShape.from_config(job.hf_config).top_k
    # Every batch's tokens, not this process's share: a statistic kept by one process (a
    # Hessian, AWQ's recorded blocks) sees every batch (`run._Calibrator._inputs`, `_replay_split`).
    every_batch = _batch_shapes(job, every=True) if static else []
    tokens = sum(b.tokens for b in every_batch)
    layer_modules = decoder_layers(job.skeleton)
    layers = [_with_scheme_memory(config, reader, lay, sizes, top_k, layer=layer_modules[lay.index], tokens=tokens,
                                  elem=elem, ranks=getattr(job, "work_ranks", 1),
                                  device_type=device_type or job.device.type)
              for lay, sizes in zip(job.layouts, layers, strict=True)]
    other = _tensors(reader, sorted(reader.other))
    stem = [t for t in other if t.name.startswith("model.") and not t.name.startswith("model.layers.")]
    return Inputs(
        device_type=device_type or job.device.type, static=static, fmt=fmt,
        compute_elem=elem, shape=ModelShape.from_config(job.hf_config), layers=layers,
        other_bytes=sum(t.nbytes for t in other),
        other_file_bytes=safetensors_file_bytes(other, SAFETENSORS_METADATA),
        stem_param_bytes=sum(t.numel for t in stem) * elem if static else 0,
        stem_read_bytes=sum(t.nbytes for t in stem) if static else 0,
        aux_bytes=_aux_bytes(reader.path),
        batches=_batch_shapes(job) if static else [],
        hidden_cache=config.quant.hidden_cache,
        all_experts=config.quant.moe_calibrate_all_experts,
        checkpoint_layers=int(getattr(config, "cache_checkpoint_layers", 0) or 0),
        checkpoint_minutes=float(getattr(config, "cache_checkpoint_minutes", 0) or 0),
        model_path=str(reader.path), algorithm=config.quant.name,
        propagate_quantized=static and config.scheme.propagates_quantized,
        ranks=getattr(job, "work_ranks", 1),
        every_batch=every_batch,
        split_replay=static and getattr(job, "work_ranks", 1) > 1 and replay_split(config.scheme),
        received_layers=bool(getattr(job, "received_layers", False)),
        write_turns=getattr(job, "write_turns", 1),
        writes_layers=getattr(job, "writes_layers", True),
        reserves_arenas=getattr(job, "reserves_arenas", False),
        reads_layers=getattr(job, "reads_layers", True),
        writes_rest=getattr(job, "writes_rest", True),
    )


def _with_scheme_memory(config: Any, reader: Any, layout: Any, sizes: LayerSizes, top_k: int = 1, *,
                        layer: Any = None, tokens: int = 0, elem: int = 2, ranks: int = 1,
                        device_type: str = "cuda") -> LayerSizes:
    """The scheme's statistics and solve memory for one layer (`statistics_bytes`: GPTQ's
    Hessians, AWQ's recorded blocks), from the quantized Linears' shapes, the (meta) layer and
    the calibration tokens, and its solves' time inputs."""
    method = getattr(config.scheme, "statistics_bytes", None)
    if method is None or not config.scheme.needs_calibration:
        return sizes
    shapes = {m: tuple(reader.tensors[n].shape) for m, n in layout.quantized.items()}
    all_experts = config.quant.moe_calibrate_all_experts
    stats, solve = method(shapes, layout.experts, all_experts, layer=layer, layout=layout, tokens=tokens, elem=elem,
                          top_k=top_k)
    sizes = replace(sizes, statistics=tuple(stats.items()), solve=tuple(solve.items()))
    # Solves are timed from their work units; searches (AWQ) are not modelled in time yet.
    if getattr(config.scheme, "work_stage", None) == "quantize":
        units = config.scheme.work_units(shapes, layout.experts, all_experts, top_k=top_k)
        sizes = replace(sizes, solve_units=tuple(units))
        if ranks > 1:  # each process holds only its own units' statistics and results: plan the largest shares
            from streamq.engine.dist import holdings_cap, largest_holdings, modelled_assignment

            owners = modelled_assignment(units, ranks, device_type, tokens)
            # The run's assignments never hold more than `holdings_cap`: the modelled largest
            # share and room for the largest unit more, of statistics and of results.
            cap = holdings_cap(units, owners, ranks)
            # Each code comes with its group's scale (model dtype) and, asymmetric, zero point (int32).
            spec = config.scheme.spec
            group = getattr(spec.weight, "size", 0)
            per_group = elem + (0 if spec.symmetric else 4)
            sizes = replace(sizes, own_codes=cap[1], result_factor=1.0 + (per_group / group if group > 0 else 0.0))
            shares = [method(shapes, layout.experts, all_experts, layout=layout, owned={
                m for u, o in zip(units, owners, strict=True) if o == r for m in u.modules})[0] for r in range(ranks)]
            largest = max(shares, key=lambda d: sum(d.values()))
            room = {"statistics of a unit moved by balancing": cap[0] - largest_holdings(units, owners, ranks)[0]}
            sizes = replace(sizes, statistics=tuple((largest | room).items()))
            if replay_split(config.scheme):
                sizes = replace(sizes, captured_per_token=_captured_per_token(shapes, layout, elem, top_k))
    return sizes


def _captured_per_token(shapes: dict[str, tuple[int, ...]], layout: Any, elem: int, top_k: int) -> int:
    """Bytes per token of what `_Calibrator._replay_split` sends from a batch's forward: the
    input of each fused group's Linear (one per group: q/k/v share theirs) and, per experts
    module, its hidden states and routing (int64 expert ids)."""
    from streamq.model.fused import fused_group_key

    groups = {fused_group_key(m): shape[1] for m, shape in shapes.items() if m not in layout.experts}
    per_parent = {}
    for m, ref in layout.experts.items():
        if m in shapes and ref.kind == "gate_up":
            per_parent[ref.parent] = shapes[m][1] * elem + top_k * 8
    return sum(groups.values()) * elem + sum(per_parent.values())


def _elem(dtype: Any) -> int:
    import torch

    return torch.finfo(dtype).bits // 8


def _aux_bytes(path: Any) -> int:
    from streamq.checkpoint.writer import AUX_FILES

    return sum((path / n).stat().st_size for n in AUX_FILES if (path / n).is_file())


def _batch_shapes(job: Any, every: bool = False) -> list[BatchShape]:
    """The calibration batches as prepared (this process's share when several split the
    samples, unless `every`); from the dataset section when none are loaded."""
    if job.batches:
        ids = range(len(job.batches)) if every else job.my_batches
        return [BatchShape(int(b.input_ids.shape[0]), int(b.input_ids.shape[1]), bool((b.attention_mask == 0).any()))
                for b in (job.batches[i] for i in ids)]
    d = job.config.dataset
    full, last = divmod(d.num_samples, d.batch_size)
    shapes = [BatchShape(d.batch_size, d.max_seq_length, True)] * full
    return shapes + ([BatchShape(last, d.max_seq_length, True)] if last else [])


def process_baseline() -> int:
    """Resident memory of this process now, or its peak so far if higher (VmHWM)."""
    from streamq.engine.progress import current_host_rss, peak_host_rss

    return max(current_host_rss(), peak_host_rss())


def _gpu_budget(job: Any, device_type: str, max_gpu_memory: int | None) -> tuple[int | None, str]:
    if device_type != "cuda":
        return None, ""
    if max_gpu_memory is not None:
        return max_gpu_memory, f"--max-gpu-memory {fmt_size(max_gpu_memory)} given"
    import torch

    if job.device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(job.device)
        return free, f"{fmt_size(free)} free on {job.device}"
    return None, ""


def _host_budget(max_cpu_memory: int | None, baseline: int) -> tuple[int, str]:
    if max_cpu_memory is not None:
        return max_cpu_memory, f"--max-cpu-memory {fmt_size(max_cpu_memory)} given"
    import psutil

    available = psutil.virtual_memory().available + baseline
    return available, f"{fmt_size(available)} available"


def make_plan(job: Any, max_gpu_memory: int | None = None, max_cpu_memory: int | None = None, *,
              device_type: str | None = None, baseline_host_bytes: int | None = None,
              assumptions: Assumptions | None = None, startup_seconds: float = 0.0,
              allow_micro_batch: bool = ENGINE_SUPPORTS_MICRO_BATCH,
              allow_expert_groups: bool = ENGINE_SUPPORTS_EXPERT_GROUPS) -> Plan:
    """Plan a prepared job (`streamq.engine.job.prepare(config)`); raises BudgetError if nothing fits.

    Budgets default to the config's (`global.max_gpu_memory` / `max_cpu_memory`), then to
    what the machine has free. `device_type` plans for another device than the job's
    (a CUDA run planned on a machine without one). The host baseline is this process's
    RSS unless given: call it where the run will start, after `prepare`. `startup_seconds`
    (imports and prepare) is added to the time estimate.
    """
    a = assumptions or Assumptions()
    inputs = inputs_from_job(job, device_type)
    inputs.startup_seconds = startup_seconds
    baseline = baseline_host_bytes if baseline_host_bytes is not None else process_baseline()
    gpu_budget, gpu_label = _gpu_budget(job, inputs.device_type, max_gpu_memory or job.config.max_gpu_memory)
    host_budget, host_label = _host_budget(max_cpu_memory or job.config.max_cpu_memory, baseline)
    best = choose(inputs, gpu_budget, host_budget, baseline, a, gpu_label, host_label,
                  allow_micro_batch, allow_expert_groups)
    plan = _to_plan(inputs, best, baseline, gpu_budget, host_budget, a)
    plan.notes.extend(f"warning: {w}" for w in tp_check.plan_warnings(job))  # block FP8 vs vLLM's TP splits
    return plan


def _to_plan(inputs: Inputs, best: _Evaluated, baseline: int, gpu_budget: int | None, host_budget: int | None,
             a: Assumptions) -> Plan:
    c = best.choice
    cache = _cache_bytes(inputs, False) if inputs.static else 0
    layer_files = sum(lay.out_file_bytes for lay in inputs.layers)
    write = layer_files + inputs.other_file_bytes
    disk = write + inputs.aux_bytes + (cache if c.location == "disk" else 0)
    notes = []
    checkpoints = inputs.checkpoint_layers > 0 and len(inputs.layers) > inputs.checkpoint_layers or \
        inputs.checkpoint_minutes > 0 and best.total_seconds > 60 * inputs.checkpoint_minutes
    if inputs.static and checkpoints:
        disk += 2 * cache  # a cache checkpoint for resume, and its replacement while it is written
        notes.append("disk includes two hidden-cache checkpoints (global.cache_checkpoint_*)")
    if inputs.device_type == "cuda" and gpu_budget is None:
        notes.append("no GPU visible: the GPU budget is not checked")
    return Plan(
        model_path=inputs.model_path, algorithm=inputs.algorithm, format=inputs.fmt, device=inputs.device_type,
        layers=len(inputs.layers),
        bytes_to_read=sum(lay.source_bytes for lay in inputs.layers) + inputs.other_bytes + inputs.stem_read_bytes,
        bytes_to_write=write, disk_needed=disk, cache_location=c.location, cache_bytes=cache,
        calib_batches=len(inputs.batches), calib_tokens=sum(b.tokens for b in inputs.batches),
        micro_batch=c.micro_batch, expert_groups=c.expert_groups, baseline_host_bytes=baseline,
        predicted_peak_gpu_bytes=best.gpu_peak, predicted_peak_host_bytes=best.host_peak,
        gpu_breakdown=best.gpu, host_breakdown=best.host, gpu_budget=gpu_budget, host_budget=host_budget,
        estimated_seconds=best.total_seconds, time_breakdown=best.seconds, assumptions=asdict(a), notes=notes,
    )


def plan_command(config_path: str, overrides: dict[str, Any], as_json: bool = False) -> int:
    """`streamq plan`: prepare the job (no weights read), plan it, print the plan.

    A CUDA job is planned on a machine without a GPU too: prepared for the CPU, planned
    for CUDA (the GPU budget is then only checked against --max-gpu-memory).
    """
    import time

    import psutil
    import torch

    from streamq.config import load_config
    from streamq.engine.job import prepare

    config = load_config(config_path, overrides)
    target = None
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        target, config.device = "cuda", "cpu"
    # The calibration file is not needed to plan. When it is there it is loaded as a run
    # would (real batch shapes; the tokenizer's memory is in the measured baseline).
    from streamq.paths import calibration_file

    data = calibration_file(config)
    load_data = data is None or Path(data).is_file()
    job = prepare(config, load_data=load_data)
    startup = time.time() - psutil.Process().create_time()  # imports + prepare, as a run will spend them
    plan = make_plan(job, device_type=target, startup_seconds=startup)
    if not load_data and plan.cache_location != "none" and config.dataset is not None:
        d = config.dataset
        plan.notes.append(f"hidden cache sized from dataset.num_samples x dataset.max_seq_length ({d.num_samples} x "
                          f"{d.max_seq_length}, every sample at full length); the calibration file is not read, "
                          "so the host baseline lacks the tokenizer")
    print(json.dumps(plan.to_dict(), indent=2) if as_json else plan.summary())
    return 0

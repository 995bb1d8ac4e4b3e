"""A quantization algorithm as a plug-in: settings, statistics, transform, quantize.

A scheme is registered by its YAML `compression.quantization.name`. The layer loop asks it
(and nothing else) what to do with a layer, in this order:

    needs_calibration        replay the calibration set through the layer?
    observers(layout)        which statistic each quantized Linear's input feeds
    transform(...)           rescale the layer before quantizing (SmoothQuant, AWQ); optional
    quantize(weights, stats) a pure function of the weights and statistics, one Linear at a time
    propagates_quantized     replay the quantized layer so the next one sees its outputs (GPTQ)

Settings are validated here, torch-free (a bad config fails before torch is imported);
the tensor math lives in `streamq.quant` and is imported when a layer is quantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from streamq.errors import ConfigError
from streamq.formats.base import QuantSpec

if TYPE_CHECKING:
    import torch

Q = "compression.quantization"


@dataclass
class QuantizedLinear:
    """What a scheme makes of one Linear, before a format lays it out.

    weight: codes, [out, in] (float8_e4m3fn, or int8 holding 8- or 4-bit codes)
    weight_scale: float32, shape by granularity ([], [out, 1], [out, in/g], [ceil(out/r), ceil(in/c)])
    input_scale: float32 [] for static activations, else None
    zero_point: int32 [out, in/g] for asymmetric weights, else None
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


@dataclass(frozen=True)
class DeviceCosts:
    """What a solve's pieces cost on one kind of device (`WorkUnit.seconds`)."""

    column_step_s: float  # one step of a column loop, whatever its size (launches, or a graph's share)
    row_column_s: float  # per row the step updates (memory traffic beyond the launches)
    flops_per_s: float  # float32 multiply-adds of a solve (Cholesky, lazy updates)
    token_flops_per_s: float  # multiply-adds of the statistics (Hessian updates, AWQ's re-runs)


# An H200, measured with scripts/time_gptq_units.py, the column loop replayed as CUDA graphs
# (streamq.quant.gptq._GraphedBlock): one solve each of a Qwen3-235B-A22B layer's q/k/v stack
# (0.15 s; this model 0.14), o_proj (0.30; 0.31), 24 experts' gate/up (0.69; 0.69) and 90 experts'
# down (0.59; 0.59), fitted by least squares. Eager, the steps were launch-bound at 0.13-0.16 ms
# (0.62, 1.33, 1.01, 0.62 s). The solve's arithmetic is mostly batched float32 GEMMs with a
# 128-wide inner dimension (the lazy updates), far below the GPU's peak.
# Hessian updates: 1.3e14 multiply-adds/s with bfloat16 activations on the tensor cores
# (streamq.calib.hessian.add_gram; 2.1e13 as float32 GEMMs, which took 2.7 s of a layer's
# 3.3 s replay for the statistics at 128 x 2048 tokens, about 7e13 multiply-adds).
GPU_COSTS = DeviceCosts(column_step_s=21e-6, row_column_s=0.7e-9, flops_per_s=7.3e12, token_flops_per_s=1.3e14)
# Per CPU core (the 2-core VM this project's CI runs on): a step costs little beyond its arithmetic.
CPU_COSTS_PER_CORE = DeviceCosts(column_step_s=20e-6, row_column_s=0.0, flops_per_s=2e9, token_flops_per_s=2e9)


def device_costs(device_type: str, cores: int | None = None) -> DeviceCosts:
    """The costs of "cuda" (GPU_COSTS) or the CPU with `cores` cores (default: this machine's)."""
    import os

    if device_type == "cuda":
        return GPU_COSTS
    n = cores or os.cpu_count() or 1
    return DeviceCosts(CPU_COSTS_PER_CORE.column_step_s, 0.0, CPU_COSTS_PER_CORE.flops_per_s * n,
                       CPU_COSTS_PER_CORE.token_flops_per_s * n)


@dataclass(frozen=True)
class WorkUnit:
    """One independent piece of a layer's work (`Scheme.work_units`): the modules done
    together and what it costs. A solve (GPTQ): `columns` steps of a column loop, each
    updating `rows` rows (all experts of the unit), `flops` multiply-adds of arithmetic;
    `token_flops`: multiply-adds per calibration token of the statistics it alone needs
    (its Hessian updates), which the process that owns the unit accumulates, and
    `statistics_bytes` it alone holds (its Hessians). A search (AWQ) has no column loop:
    its cost is all per token (`token_flops`). `shared`: a group of units whose statistics
    need work every owner of one of them does once, whatever how many it owns
    (`shared_token_flops` multiply-adds per calibration token: the experts' gate/up GEMM of
    every routed row, for their down Hessians); `streamq.engine.dist.assign_units` counts it."""

    modules: tuple[str, ...]
    columns: int
    flops: float
    rows: int = 0
    token_flops: float = 0.0
    statistics_bytes: int = 0
    shared: str = ""
    shared_token_flops: float = 0.0

    def seconds(self, costs: DeviceCosts, tokens: int = 0) -> float:
        return self.columns * (costs.column_step_s + self.rows * costs.row_column_s) + \
            self.flops / costs.flops_per_s + self.token_flops * tokens / costs.token_flops_per_s


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer's replay, by full module name (what `observers` asked for).

    blocks: relative module name -> one (args, kwargs, output) per calibration batch, for
    the modules `recorded_blocks` named (a search that reruns a block on its own inputs);
    masks: bool [B, T] real-token mask per batch, in the same order.
    """

    values: dict[str, Any]
    blocks: dict[str, list[tuple]] = field(default_factory=dict)
    masks: list = field(default_factory=list)


class Scheme:
    """Base class. Subclasses are frozen dataclasses of their settings."""

    name: ClassVar[str]
    bits: ClassVar[int]
    default_format: ClassVar[str]
    # YAML keys under compression.quantization (besides the common ones) and under
    # compression.quantization.quant_method, with their Python types.
    keys: ClassVar[dict[str, tuple[type, ...]]] = {}
    method_keys: ClassVar[dict[str, tuple[type, ...]]] = {"weight": (str,), "activation": (str,)}
    # Keys accepted for AngelSlim compatibility that change nothing here, with the reason.
    noted_keys: ClassVar[dict[str, str]] = {}
    # Modules the last `quantize` call could not treat as the algorithm says (e.g. GPTQ fell
    # back to round-to-nearest), one line each, for the log and the report.
    fallbacks: ClassVar[tuple[str, ...]] = ()
    # A scheme whose statistics are floating-point sums declares `work_units(linears, experts,
    # all_experts, *, layer, layout, top_k) -> list[WorkUnit]`, the independent pieces of a
    # layer's work, so several processes can split them (`streamq.engine.dist`); `work_stage`
    # says where that work happens: "quantize" (solves; the processes exchange the quantized
    # Linears) or "transform" (searches; the transform exchanges its results through
    # `LayerContext.share` and every process quantizes).
    work_stage: ClassVar[str | None] = None

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        """Validate `compression.quantization` for this scheme; ConfigError names the key."""
        raise NotImplementedError

    @property
    def spec(self) -> QuantSpec:
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return self.spec.static_activations

    @property
    def propagates_quantized(self) -> bool:
        """The next layer sees this layer's quantized outputs: after `quantize`, the engine
        writes each yielded module's `dequantize`d weight into the layer and replays it.
        `quantize` must therefore read a module's weight before yielding it, never after."""
        return False

    @property
    def shares_fused_weight_scale(self) -> bool:
        return False

    def observer_kind(self) -> str | None:
        """The statistic every quantized Linear's input feeds ("absmax"), or None."""
        return "absmax" if self.needs_calibration else None

    def smoothing_kind(self) -> str | None:
        """A per-channel statistic the transform needs on the smoothing groups' inputs, or None."""
        return None

    def smoothing_inputs(self, layer: Any, layout: Any) -> list[str]:
        """Modules of the layer (relative names) whose inputs feed `smoothing_kind` statistics;
        default: the SmoothQuant groups' (`streamq.model.smoothing.smoothing_groups`)."""
        from streamq.model.smoothing import smoothing_groups

        return [g.observed for g in smoothing_groups(layer, layout)]

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse (ConfigError, before any output exists) weights this scheme cannot quantize;
        `shapes`: module name -> its weight's shape on disk. Default: any 2D weight."""

    def recorded_blocks(self, layer: Any, layout: Any, owned: set[str] | None = None) -> list[str]:
        """Modules of the layer (relative names) whose inputs and outputs of every
        calibration batch the transform needs (AWQ's per-block loss); default none. `owned`:
        this process's modules when several split the work units (record only for them)."""
        return []

    def transform(self, layer_ctx: Any, stats: LayerStats) -> dict[str, torch.Tensor]:
        """Rescale the layer before quantizing; returns the non-quantized tensors it changed
        (by tensor name, in the source dtype) and updates `layer_ctx.weights` in place."""
        return {}

    def quantize(self, weights: dict[str, torch.Tensor], stats: LayerStats | None, layout: Any = None
                 ) -> Iterator[tuple[str, QuantizedLinear]]:
        """Quantize the Linears of one layer (module -> [out, in], source values), one at a
        time. `layout` (a `streamq.model.layout.LayerLayout`) says which are MoE experts."""
        raise NotImplementedError

    def dequantize(self, q: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        """The weight a loader reconstructs from `q`, [out, in] in `dtype` (propagation)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Settings that change the output bytes (for the job hash)."""
        from dataclasses import fields

        # Fields declared with compare=False are bookkeeping of the last call, not settings.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}


def require_finite(values: dict[str, torch.Tensor]) -> None:
    """Raise naming the first module whose statistic (a weight's absmax or scale) is NaN or
    Inf. NaN propagates through max and Inf is its own max, so checking a weight's absmax
    checks the weight. One host synchronization for the whole layer, not one per tensor."""
    import torch

    from streamq.errors import CheckpointError

    if not values:
        return
    finite = torch.stack([torch.isfinite(v).all() for v in values.values()]).cpu()
    if not bool(finite.all()):
        bad = list(values)[int((~finite).nonzero()[0])]
        raise CheckpointError(f"tensor '{bad}.weight' contains NaN or Inf values; refusing to quantize it")


SCHEMES: dict[str, type[Scheme]] = {}
# Names AngelSlim configs use that no module implements yet.
PLANNED: tuple[str, ...] = ()


def register(cls: type[Scheme]) -> type[Scheme]:
    assert cls.name not in SCHEMES, f"scheme '{cls.name}' registered twice"
    SCHEMES[cls.name] = cls
    return cls


def get_scheme(name: str, source: str = "<config>") -> type[Scheme]:
    _load_builtin()
    if name not in SCHEMES:
        planned = [p for p in PLANNED if p not in SCHEMES]
        if name in planned:
            raise ConfigError(f"{source}: '{Q}.name' is '{name}', which streamq does not support yet; "
                              f"supported: {', '.join(sorted(SCHEMES))}")
        raise ConfigError(f"{source}: '{Q}.name' is '{name}'; allowed: {', '.join(sorted(SCHEMES))}")
    return SCHEMES[name]


def scheme_names() -> list[str]:
    _load_builtin()
    return sorted(SCHEMES)


def setting(q: dict[str, Any], key: str, default: Any) -> Any:
    """A scheme setting, YAML's null meaning the default (the config walker lets null through)."""
    value = q.get(key)
    return default if value is None else value


def one_of(value: Any, allowed: tuple, key: str, source: str) -> Any:
    if value not in allowed:
        raise ConfigError(f"{source}: '{key}' is {value!r}; allowed: {', '.join(str(a) for a in allowed)}")
    return value


def check_bits(cls: type[Scheme], q: dict[str, Any], source: str) -> None:
    if q.get("bits") != cls.bits:
        raise ConfigError(f"{source}: '{Q}.bits' is {q.get('bits')}, but {cls.name} needs bits: {cls.bits}")


def _load_builtin() -> None:
    # The built-in schemes register themselves on import.
    from streamq.schemes import awq, fp8, int4, int8  # noqa: F401

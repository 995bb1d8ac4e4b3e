"""W4A16 schemes: int4_gptq (GPTQ, Frantar et al. 2022) and int4_rtn (round-to-nearest,
the baseline GPTQ must beat). Weights 4-bit per group of input columns, symmetric
(scale = absmax / 7.5) or asymmetric (scale = (max - min) / 15, integer zero point);
activations stay in the model dtype. Math: `streamq.quant.int4`, `streamq.quant.gptq`.

GPTQ needs a Hessian H = 2 X^T X / n of every distinct Linear input from the calibration
replay: q/k/v share one, a dense MLP's gate/up share one, and each MoE expert gets its own
from the tokens routed to it (one shared gate/up Hessian with all-experts calibration).
The experts of a layer are solved as one batched problem. By default the next layer sees
this layer's quantized outputs (`propagate: quantized`), as llm-compressor, GPTQModel and
AngelSlim do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamq.errors import ConfigError
from streamq.formats.base import QuantSpec
from streamq.quant.granularity import PerGroup
from streamq.schemes.base import (
    Q,
    QuantizedLinear,
    Scheme,
    WorkUnit,
    check_bits,
    one_of,
    register,
    require_finite,
    setting,
)

# Bytes the batched expert solve may hold at once (`solve_bytes`): on Qwen3-235B-A22B, 24
# experts' gate/up (6 chunks) and 90 experts' down (2 chunks) at a time; fewer, larger
# column loops keep the GPU busier per column.
EXPERT_SOLVE_BYTES = 12 << 30

# What one `streamq.quant.gptq.gptq_quantize` call allocates, in copies of its float32 weight
# stack [E, out, in] and of its Hessians [E or 1, in, in] (the planner's model; measured on an
# H200 within 6% for Qwen3-235B-A22B shapes, tests/test_gptq_memory_gpu.py):
# - column loop: the stack, the working copy, the per-column scales and the lazy-update
#   product (float32), the per-column zero points (int32, asymmetric), the codes, the RTN
#   codes and their final selection (int8); the Hessian's clone and its inverse factor;
# - Cholesky (before the loop, the peak when each expert has its own Hessian): the stack,
#   the working copy, the RTN codes; the Hessian's clone, the factor, two live temporaries of
#   the damped / Cholesky / inverse / upper chain (each freed when the next exists) and the
#   selection of the good factors (5 copies; one more with actorder's permuted copy), plus
#   one identity [in, in].
SOLVE_LOOP_WEIGHT_COPIES = 4
SOLVE_LOOP_HESSIAN_COPIES = 2
SOLVE_FACTOR_WEIGHT_COPIES = 2
SOLVE_FACTOR_HESSIAN_COPIES = 5
# On CUDA the column loop's graph (streamq.quant.gptq._GraphedBlock) holds about eight
# block-wide slices [experts, rows, block] beside the loop (five static inputs and outputs,
# about three captured temporaries) from the second block on, when the lazy-update product
# the loop counts is two blocks narrower than a weight copy and the eager loop's own block
# temporaries are gone: net, about two. Measured peaks within 6% of the model
# (tests/test_gptq_memory_gpu.py).
SOLVE_GRAPH_BLOCK_SLICES = 2



def _problems(linears: dict[str, tuple[int, int]], experts: dict[str, Any]
              ) -> tuple[list[list[str]], dict[tuple[str, str], dict[int, list[str]]]]:
    """The quantized Linears (module -> [out, in]) as GPTQ solves them: stacks of dense
    modules sharing one input (one Hessian), and per fused experts module and kind
    ("gate_up" | "down") each expert's modules, by expert index."""
    from streamq.model.fused import fused_group_key

    stacks: dict[str, list[str]] = {}
    groups: dict[tuple[str, str], dict[int, list[str]]] = {}
    for module in linears:
        ref = experts.get(module)
        if ref is None:
            stacks.setdefault(fused_group_key(module), []).append(module)
        else:
            groups.setdefault((ref.parent, ref.kind), {}).setdefault(ref.index, []).append(module)
    return list(stacks.values()), groups


def _rows_cols(linears: dict[str, tuple[int, int]], names: list[str]) -> tuple[int, int]:
    """Rows of the stacked problem (the modules' outputs) and its input columns."""
    return sum(linears[n][0] for n in names), linears[names[0]][1]


def expert_chunk(rows: int, cols: int, num: int, per_expert_hessian: bool, block_size: int = 128) -> int:
    """Experts solved at once: the most whose solve (`solve_bytes`) fits EXPERT_SOLVE_BYTES."""
    per_expert = solve_bytes(1, rows, cols, 1 if per_expert_hessian else 0, block_size=block_size)
    return max(1, min(num, EXPERT_SOLVE_BYTES // max(per_expert, 1)))


def solve_bytes(experts: int, rows: int, cols: int, hessians: int, symmetric: bool = True,
                actorder: bool = False, block_size: int = 128) -> int:
    """Peak bytes of one gptq_quantize call on [experts, rows, cols] weights with `hessians`
    (1 shared, or one per expert) [cols, cols] float32 Hessians: the weight stack included,
    the caller's Hessians not (they are the statistics)."""
    weight, hessian = experts * rows * cols, hessians * cols * cols
    loop = 4 * (SOLVE_LOOP_WEIGHT_COPIES + (0 if symmetric else 1)) * weight + 3 * weight \
        + 4 * SOLVE_LOOP_HESSIAN_COPIES * hessian \
        + 4 * SOLVE_GRAPH_BLOCK_SLICES * experts * rows * min(block_size, cols)
    factor_copies = SOLVE_FACTOR_HESSIAN_COPIES + (1 if actorder else 0)
    factor = 4 * SOLVE_FACTOR_WEIGHT_COPIES * weight + weight + 4 * factor_copies * hessian + 4 * cols * cols
    return max(loop, factor)


def _group_size(q: dict[str, Any], source: str) -> int:
    method = q.get("quant_method") or {}
    if method.get("weight", "per-group") != "per-group":
        raise ConfigError(f"{source}: '{Q}.quant_method.weight' is {method['weight']!r}; W4A16 quantizes weights "
                          "per-group (allowed: per-group)")
    size = setting(method, "group_size", 128)
    if size == -1:
        return 128  # AngelSlim's -1: the default group
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 8:
        raise ConfigError(f"{source}: '{Q}.quant_method.group_size' is {size!r}; allowed: a positive multiple "
                          "of 8 (e.g. 128), or -1 for 128")
    return size


def _scale_dtype(w):
    import torch

    # Scales are stored in the model dtype; rounding them there before the codes are
    # chosen keeps codes and stored scales consistent.
    return w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32


@dataclass(frozen=True)
class _W4A16(Scheme):
    group_size: int = 128
    sym: bool = True

    bits = 4
    default_format = "compressed-tensors"
    method_keys = {"weight": (str,), "group_size": (int,)}

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("int", 4, PerGroup(self.group_size), self.sym, None, False)

    @property
    def needs_calibration(self) -> bool:
        return False

    def observer_kind(self) -> str | None:
        return None

    def dequantize(self, q: QuantizedLinear, dtype):
        from streamq.quant import int4

        return int4.dequantize(q.weight, q.weight_scale.float(), q.zero_point, self.group_size, dtype)

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        bad = [(m, shape) for m, shape in shapes.items() if shape[-1] % self.group_size]
        if bad:
            m, shape = bad[0]
            raise ConfigError(f"'{Q}.quant_method.group_size' is {self.group_size}, but '{m}.weight' has "
                              f"{shape[-1]} input columns ({len(bad)} such Linear(s)); choose a group size that "
                              "divides them, or list the modules in ignore_layers")

    def _check_shape(self, name: str, w) -> None:
        from streamq.errors import CheckpointError

        if w.shape[-1] % self.group_size:
            raise CheckpointError(f"'{name}.weight' has {w.shape[-1]} input columns, not a multiple of "
                                  f"group_size {self.group_size}; choose a group size that divides it, or list "
                                  "the module in ignore_layers")


@register
@dataclass(frozen=True)
class Int4Rtn(_W4A16):
    """Round-to-nearest W4A16: the baseline, calibration-free."""

    name = "int4_rtn"
    keys = {"sym": (bool,)}

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        return cls(_group_size(q, source), bool(setting(q, "sym", True)))

    def quantize(self, weights, stats, layout=None):
        from streamq.quant import int4

        require_finite({name: w.abs().amax() for name, w in weights.items()})
        for name, w in weights.items():
            self._check_shape(name, w)
            dtype = self._storage_dtype(name, w)
            codes, scale, zp = int4.quantize_rtn(w, self.group_size, self.sym, dtype)
            yield name, QuantizedLinear(codes, scale.to(dtype), zero_point=zp)

    def _storage_dtype(self, name: str, w):
        """The dtype the scale of module `name` is stored in (the model dtype)."""
        return _scale_dtype(w)


@register
@dataclass(frozen=True)
class Int4Gptq(_W4A16):
    actorder: bool = False  # static: columns in decreasing diag(H) order, groups unchanged
    damp_percent: float = 0.01
    block_size: int = 128
    propagate: str = "quantized"
    min_expert_tokens: int = 1
    # Modules that fell back to round-to-nearest in the last quantize call (for the report).
    fallbacks: list = field(default_factory=list, compare=False, repr=False)

    name = "int4_gptq"
    keys = {"actorder": (str, bool), "sym": (bool,), "damp_percent": (float, int), "block_size": (int,),
            "propagate": (str,), "min_expert_tokens": (int,)}
    noted_keys = {"dequant_to_bf16": "streamq writes packed 4-bit weights; loaders dequantize as they need"}

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        actorder = q.get("actorder", False)
        if actorder == "group":
            raise ConfigError(f"{source}: '{Q}.actorder' is 'group', which vLLM refuses; allowed: static, false")
        # null / false: column order; static / weight (llm-compressor's names) / true: decreasing diag(H)
        one_of(actorder, (None, False, True, "static", "weight"), f"{Q}.actorder", source)
        damp = setting(q, "damp_percent", 0.01)
        if not 0 < float(damp) < 1:
            raise ConfigError(f"{source}: '{Q}.damp_percent' is {damp}; allowed: a number in (0, 1), e.g. 0.01")
        block = setting(q, "block_size", 128)
        if block <= 0:
            raise ConfigError(f"{source}: '{Q}.block_size' is {block}; allowed: a positive integer, e.g. 128")
        propagate = one_of(setting(q, "propagate", "quantized"), ("quantized", "original"), f"{Q}.propagate", source)
        min_tokens = setting(q, "min_expert_tokens", 1)
        if min_tokens < 0:
            raise ConfigError(f"{source}: '{Q}.min_expert_tokens' is {min_tokens}; allowed: 0 or more")
        return cls(_group_size(q, source), bool(setting(q, "sym", True)), actorder in ("static", "weight", True),
                   float(damp), block, propagate, min_tokens)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec("int", 4, PerGroup(self.group_size), self.sym, None, False,
                         "static" if self.actorder else None)

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def propagates_quantized(self) -> bool:
        return self.propagate == "quantized"

    def observer_kind(self) -> str | None:
        return "hessian"

    def statistics_bytes(self, linears: dict[str, tuple[int, int]], experts: dict[str, Any],
                         all_experts: bool = False, *, owned: set[str] | None = None,
                         **_layer: Any) -> tuple[dict[str, int], dict[str, int]]:
        """Device bytes one layer's statistics and solve hold besides the layer and its
        activations (for the planner), from the quantized Linears' [out, in] shapes by module
        name; `experts` maps the fused experts' members to their `ExpertRef`. Returns
        (statistics, solve working set), each by label.

        "Hessians (float32)": one [in, in] per distinct input, alive from the replay through
        the solve: q/k/v share one, a dense gate/up one; per expert gate/up [E, H, H] and down
        [E, I, I], or one gate/up [H, H] for all experts with all-experts calibration.
        "GPTQ solve": the largest single solve (`solve_bytes`): a stack of modules sharing a
        Hessian, or one chunk of experts plus that chunk's Hessians copied for experts that
        fall back to round-to-nearest (counted always: a budget must hold when it happens).
        `owned` (a process's share of the work units, several processes): only the Hessians
        of its units (`WorkUnit.statistics_bytes`), as `ExpertHessianAccumulator(owned=...)`
        and the replay's watch list allocate them.
        """
        hessians = solve = 0
        stacks, groups = _problems(linears, experts)
        for names in stacks:
            cols = linears[names[0]][1]
            hessians += 4 * cols * cols
            solve = max(solve, solve_bytes(1, sum(linears[n][0] for n in names), cols, 1, self.sym, self.actorder,
                                           self.block_size))
        for (_, kind), members in groups.items():
            num = 1 + max(members)
            rows, cols = _rows_cols(linears, members[max(members)])
            shared = all_experts and kind == "gate_up"
            hessians += 4 * cols * cols * (1 if shared else num)
            chunk = expert_chunk(rows, cols, num, not shared, self.block_size)
            fallback_copy = 0 if shared else 4 * chunk * cols * cols
            solve = max(solve, solve_bytes(chunk, rows, cols, 1 if shared else chunk, self.sym, self.actorder,
                                           self.block_size)
                        + fallback_copy)
        if owned is not None:
            units = self.work_units(linears, experts, all_experts)
            hessians -= sum(u.statistics_bytes for u in units if u.modules[0] not in owned)
        return {"Hessians (float32)": hessians}, {"GPTQ solve": solve}

    work_stage = "quantize"

    def work_units(self, linears: dict[str, tuple[int, int]], experts: dict[str, Any],
                   all_experts: bool = False, *, top_k: int = 1, **_layer: Any) -> list[WorkUnit]:
        """The independent solves `quantize` makes of one layer (stacks sharing one Hessian,
        and chunks of a fused experts module's experts, chunked as `quantize` chunks them),
        for several processes to split (`streamq.engine.dist`) and the planner to time.
        `quantize` given the weights of whole units solves exactly what it solves for them
        in a full call, so a split changes no byte. Multiply-adds: the column loop's
        rows * in^2 and the Cholesky's in^3 per problem; per calibration token, in^2 per
        Hessian update (an expert sees top_k / num_experts of the tokens, every token with
        all-experts calibration; the gate/up Hessian those share is spread over its chunks)."""
        units: list[WorkUnit] = []
        stacks, groups = _problems(linears, experts)
        for names in stacks:
            rows, cols = _rows_cols(linears, names)
            units.append(WorkUnit(tuple(names), cols, float(rows * cols * cols + cols ** 3), rows, float(cols * cols),
                                  4 * cols * cols))
        from streamq.model.layout import experts_per_parent

        nums = experts_per_parent(experts.values())  # as `quantize` counts them: every expert of the parent
        for (parent, kind), members in groups.items():
            num = nums[parent]
            rows, cols = _rows_cols(linears, members[max(members)])
            shared = all_experts and kind == "gate_up"
            chunk = expert_chunk(rows, cols, num, not shared, self.block_size)
            for e0 in range(0, num, chunk):
                names = [m for e in range(e0, min(num, e0 + chunk)) for m in members.get(e, [])]
                if names:
                    n = min(chunk, num - e0)
                    seen = n / num if shared else n * (1.0 if all_experts else min(1.0, top_k / num))
                    # The down Hessians need every routed row's gated intermediate: one GEMM
                    # (hidden x 2 intermediate a row) that each owner of any down chunk runs
                    # (`streamq.model.moe._observe_hessians`); all-experts calibration computes
                    # each expert's on its own.
                    joint = kind == "down" and not all_experts
                    units.append(WorkUnit(tuple(names), cols, float(n * (rows * cols * cols + cols ** 3)), n * rows,
                                          seen * cols * cols, 0 if shared else 4 * n * cols * cols,
                                          f"{parent}.down" if joint else "",
                                          min(top_k, num) * rows * 2 * cols if joint else 0.0))
        return units

    def _solve(self, w, h, scale_dtype):
        """w float32 [E, out, in]; `scale_dtype` the dtype the scales are stored in (the source
        weight's, not w's float32), so codes are chosen against the scale a loader reads."""
        from streamq.quant.gptq import gptq_quantize

        return gptq_quantize(w, h, self.group_size, self.sym, self.actorder, self.damp_percent, self.block_size,
                             scale_dtype=scale_dtype)

    def quantize(self, weights, stats, layout=None):
        """GPTQ every Linear of the layer. `stats.values`: module -> H float32 [in, in] for
        plain Linears; "<parent>.gate_up" / "<parent>.down" -> [E, in, in] (or [in, in]
        shared) and "<...>.count" -> int64 [E] tokens per expert for fused experts; with
        several processes "<...>.experts" -> int64 [k], the experts whose Hessians [k, in, in]
        this process holds (its share of the work units).

        A module's weight is read before the module is yielded and never after, so the
        engine may write its dequantized weight into the layer at once (propagation)."""
        import torch

        self.fallbacks.clear()
        require_finite({name: w.abs().amax() for name, w in weights.items()})
        experts = {} if layout is None else {m: ref for m, ref in layout.experts.items() if m in weights}
        # Modules with one Hessian (q/k/v, a dense gate/up) are solved as one stack of rows:
        # GPTQ treats every output row on its own, so stacking changes no code, only the
        # number of launch-bound column loops.
        stacks: dict[int, list[str]] = {}
        for name in weights:
            if name not in experts:
                self._check_shape(name, weights[name])
                stacks.setdefault(id(stats.values[name]), []).append(name)
        for names in stacks.values():
            rows = [weights[n].shape[0] for n in names]
            w = torch.cat([weights[n] for n in names]).to(torch.float32).unsqueeze(0)
            r = self._solve(w, stats.values[names[0]], _scale_dtype(weights[names[0]]))
            del w
            if bool(r.rtn[0]):
                self.fallbacks.append(f"{', '.join(names)}: {r.reasons[0]}")
            start = 0
            for n, count in zip(names, rows, strict=True):
                sl = slice(start, start + count)
                start += count
                zp = None if r.zero_point is None else r.zero_point[0, sl]
                yield n, QuantizedLinear(r.codes[0, sl], r.scale[0, sl].to(_scale_dtype(weights[n])), zero_point=zp)
        from streamq.model.layout import experts_per_parent

        by_parent: dict[str, dict[tuple[int, str], str]] = {}
        for module, ref in experts.items():
            by_parent.setdefault(ref.parent, {})[(ref.index, ref.proj)] = module
        # From the layout, not `weights`: this process may hold a share of the experts.
        nums = experts_per_parent(layout.experts.values()) if layout is not None else {}
        for parent, members in by_parent.items():
            yield from self._solve_experts(layout.prefix + parent, members, weights, stats, nums[parent])

    def _solve_experts(self, parent, members, weights, stats, num):
        """Gate and up of each expert stacked into one [E, 2I, in] problem, down into
        [E, out, I]; chunks of experts sized to EXPERT_SOLVE_BYTES. `members` may be whole
        chunks of the `num` experts (`work_units`): only chunks with members are solved."""
        import torch

        for kind, projs in (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
            present = sorted(e for e, p in members if p == projs[0])
            if not present:
                continue
            h_all = stats.values[f"{parent}.{kind}"]
            count = stats.values.get(f"{parent}.{kind}.count")
            # Several processes: h_all holds only this process's experts, in this order.
            held = stats.values.get(f"{parent}.{kind}.experts")
            at = {e: i for i, e in enumerate(held.tolist())} if held is not None else None
            sample = weights[members[(present[0], projs[0])]]
            rows, cols = sample.shape[0] * len(projs), sample.shape[1]
            self._check_shape(members[(present[0], projs[0])], sample)
            chunk = expert_chunk(rows, cols, num, h_all.ndim == 3, self.block_size)
            few: list[int] = []
            if count is not None and h_all.ndim == 3:
                few = (count < self.min_expert_tokens).nonzero().flatten().tolist()
                for e in few if kind == "gate_up" else ():
                    if (e, projs[0]) in members:
                        self.fallbacks.append(f"{parent}.{e}: {int(count[e])} calibration tokens < "
                                              f"min_expert_tokens {self.min_expert_tokens}, quantized "
                                              "round-to-nearest")
            for e0 in range(0, num, chunk):
                es = range(e0, min(num, e0 + chunk))
                if not any((e, projs[0]) in members for e in es):
                    continue  # another process's chunk
                out_dtype = _scale_dtype(weights[members[(e0, projs[0])]])
                w = torch.stack([torch.cat([weights[members[(e, p)]] for p in projs]) for e in es]).to(torch.float32)
                first = e0 if at is None else at[e0]  # a chunk is owned whole, so its experts are adjacent
                h = h_all if h_all.ndim == 2 else h_all[first:first + len(es)]
                low = [e - e0 for e in few if e in es]
                if low:  # H = 0: the solve quantizes these round-to-nearest, never zeros
                    h = h.clone()  # this chunk's only: a copy of every expert's Hessian would be GiBs
                    h[low] = 0
                r = self._solve(w, h, out_dtype)
                del w
                for j, e in enumerate(es):
                    if bool(r.rtn[j]) and (count is None or int(count[e]) >= self.min_expert_tokens):
                        self.fallbacks.append(f"{parent}.{e}.{kind}: {r.reasons[j]}")
                    for k, p in enumerate(projs):
                        sl = slice(k * sample.shape[0], (k + 1) * sample.shape[0])
                        zp = None if r.zero_point is None else r.zero_point[j, sl]
                        yield members[(e, p)], QuantizedLinear(r.codes[j, sl], r.scale[j, sl].to(out_dtype),
                                                               zero_point=zp)

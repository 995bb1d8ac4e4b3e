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
from streamq.schemes.base import Q, QuantizedLinear, Scheme, check_bits, one_of, register

# Bytes of float32 work the batched expert solve may hold at once (weights, Hessians and
# their factors, about four copies of the chunk's weights and two of its Hessians).
EXPERT_SOLVE_BYTES = 4 << 30


def _group_size(q: dict[str, Any], source: str) -> int:
    method = q.get("quant_method") or {}
    if method.get("weight", "per-group") != "per-group":
        raise ConfigError(f"{source}: '{Q}.quant_method.weight' is {method['weight']!r}; W4A16 quantizes weights "
                          "per-group (allowed: per-group)")
    size = method.get("group_size", 128)
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
        return cls(_group_size(q, source), bool(q.get("sym", True)))

    def quantize(self, weights, stats, layout=None):
        from streamq.quant import int4

        for name, w in weights.items():
            self._check_shape(name, w)
            codes, scale, zp = int4.quantize_rtn(w, self.group_size, self.sym, _scale_dtype(w))
            yield name, QuantizedLinear(codes, scale.to(_scale_dtype(w)), zero_point=zp)


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
        one_of(actorder, (False, "static", True), f"{Q}.actorder", source)
        if actorder == "group":
            raise ConfigError(f"{source}: '{Q}.actorder' is 'group', which vLLM refuses; allowed: static, false")
        damp = q.get("damp_percent", 0.01)
        if not 0 < float(damp) < 1:
            raise ConfigError(f"{source}: '{Q}.damp_percent' is {damp}; allowed: a number in (0, 1), e.g. 0.01")
        block = q.get("block_size", 128)
        if block <= 0:
            raise ConfigError(f"{source}: '{Q}.block_size' is {block}; allowed: a positive integer, e.g. 128")
        propagate = one_of(q.get("propagate", "quantized"), ("quantized", "original"), f"{Q}.propagate", source)
        min_tokens = q.get("min_expert_tokens", 1)
        if min_tokens < 0:
            raise ConfigError(f"{source}: '{Q}.min_expert_tokens' is {min_tokens}; allowed: 0 or more")
        return cls(_group_size(q, source), bool(q.get("sym", True)), actorder in ("static", True), float(damp),
                   block, propagate, min_tokens)

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

    def identity(self) -> dict[str, Any]:
        d = super().identity()
        d.pop("fallbacks", None)
        return d

    def _solve(self, w, h):
        from streamq.quant.gptq import gptq_quantize

        return gptq_quantize(w, h, self.group_size, self.sym, self.actorder, self.damp_percent, self.block_size,
                             scale_dtype=_scale_dtype(w))

    def quantize(self, weights, stats, layout=None):
        """GPTQ every Linear of the layer. `stats.values`: module -> H float32 [in, in] for
        plain Linears; "<parent>.gate_up" / "<parent>.down" -> [E, in, in] (or [in, in]
        shared) and "<...>.count" -> int64 [E] tokens per expert for fused experts.

        A module's weight is read before the module is yielded and never after, so the
        engine may write its dequantized weight into the layer at once (propagation)."""
        import torch

        self.fallbacks.clear()
        experts = {} if layout is None else {m: ref for m, ref in layout.experts.items() if m in weights}
        for name, w in weights.items():
            if name in experts:
                continue
            self._check_shape(name, w)
            out_dtype = _scale_dtype(w)
            r = self._solve(w.to(torch.float32).unsqueeze(0), stats.values[name])
            if bool(r.rtn[0]):
                self.fallbacks.append(f"{name}: {r.reasons[0]}")
            zp = None if r.zero_point is None else r.zero_point[0]
            yield name, QuantizedLinear(r.codes[0], r.scale[0].to(out_dtype), zero_point=zp)
        by_parent: dict[str, dict[tuple[int, str], str]] = {}
        for module, ref in experts.items():
            by_parent.setdefault(layout.prefix + ref.parent, {})[(ref.index, ref.proj)] = module
        for parent, members in by_parent.items():
            yield from self._solve_experts(parent, members, weights, stats)

    def _solve_experts(self, parent, members, weights, stats):
        """Gate and up of each expert stacked into one [E, 2I, in] problem, down into
        [E, out, I]; chunks of experts sized to EXPERT_SOLVE_BYTES."""
        import torch

        num = 1 + max(e for e, _ in members)
        for kind, projs in (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
            h_all = stats.values[f"{parent}.{kind}"]
            count = stats.values.get(f"{parent}.{kind}.count")
            sample = weights[members[(0, projs[0])]]
            rows, cols = sample.shape[0] * len(projs), sample.shape[1]
            self._check_shape(members[(0, projs[0])], sample)
            per_expert = 4 * (4 * rows * cols + (2 * cols * cols if h_all.ndim == 3 else 0))
            chunk = max(1, min(num, EXPERT_SOLVE_BYTES // max(per_expert, 1)))
            if count is not None and h_all.ndim == 3:
                few = (count < self.min_expert_tokens).nonzero().flatten().tolist()
                for e in few if kind == "gate_up" else ():
                    self.fallbacks.append(f"{parent}.{e}: {int(count[e])} calibration tokens < min_expert_tokens "
                                          f"{self.min_expert_tokens}, quantized round-to-nearest")
                if few:  # H = 0: the solve quantizes these round-to-nearest, never zeros
                    h_all = h_all.clone()
                    h_all[few] = 0
            for e0 in range(0, num, chunk):
                es = range(e0, min(num, e0 + chunk))
                w = torch.stack([torch.cat([weights[members[(e, p)]] for p in projs]) for e in es]).to(torch.float32)
                h = h_all if h_all.ndim == 2 else h_all[e0:e0 + len(es)]
                r = self._solve(w, h)
                del w
                out_dtype = _scale_dtype(weights[members[(e0, projs[0])]])
                for j, e in enumerate(es):
                    if bool(r.rtn[j]) and (count is None or int(count[e]) >= self.min_expert_tokens):
                        self.fallbacks.append(f"{parent}.{e}.{kind}: {r.reasons[j]}")
                    for k, p in enumerate(projs):
                        sl = slice(k * sample.shape[0], (k + 1) * sample.shape[0])
                        zp = None if r.zero_point is None else r.zero_point[j, sl]
                        yield members[(e, p)], QuantizedLinear(r.codes[j, sl], r.scale[j, sl].to(out_dtype),
                                                               zero_point=zp)

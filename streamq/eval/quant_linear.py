"""The quantized forward of INT8, block-FP8 and INT4 weight-only checkpoints, as a server computes it.

Next to `fp8_linear.FP8Linear` (FP8 weights per tensor or per channel), three more Linears,
each built on the meta device from the checkpoint's tensor names and shapes and filled by
the layer's materialization (buffers carry the on-disk names):

- `Int8Linear` (compressed-tensors `int-quantized`, W8A8 INT8): the input is quantized per
  token (or per tensor, or with a static `input_scale`), symmetric, scale = absmax / 127,
  round half to even, clamp to +-127; then int8 x int8 -> int32. On CUDA that is
  `torch._int_mm` (needs M > 16 and K, N multiples of 8; other shapes fall back); elsewhere
  the same integers are computed exactly in floating point: in float32 when every partial
  sum fits its 24-bit significand (K * 127^2 <= 2^24), else in float64. Both give the same
  int32 accumulator, so the result does not depend on the device. The epilogue is vLLM's
  CUTLASS one: x_scale * (w_scale * float(acc)).
- `BlockFP8Linear` (vLLM fp8 with `weight_block_size`, `weight_scale_inv`; compressed-tensors
  `strategy: block`, `weight_scale`): the input is quantized per token in groups of
  `block_cols` columns (scale = max(group absmax, 1e-10) / 448, as vLLM's
  `per_token_group_quant_fp8`), and for every group of K the FP8 product (exact in float32
  term by term, accumulated in float32) is scaled by the token's group scale and the weight
  block's scale and added up, in the order vLLM's Triton block kernel does.
- `W4A16Linear` (compressed-tensors `pack-quantized`), `GPTQLinear` (GPTQ v1 layout) and
  `AWQLinear` (AutoAWQ GEMM layout): weights unpacked and dequantized to the compute dtype,
  then a plain matmul in that dtype.

Division rather than multiplication by the reciprocal (as vLLM's kernels do) quantizes the
inputs, matching how streamq quantizes weights; the two differ by one step in rare ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from streamq.eval import dequant
from streamq.eval.fp8_linear import (
    ACT_MODES,
    DYNAMIC_TENSOR,
    DYNAMIC_TOKEN,
    STATIC,
    WEIGHT_ONLY,
    FP8Linear,
    enable_scaled_mm,
    scaled_mm_supported,
)
from streamq.quant.fp8 import FP8_DTYPE, FP8_MAX
from streamq.quant.int8 import INT8_MAX, quantize_int8
from streamq.quant.int8 import MIN_SCALE as INT8_MIN_SCALE

# Block FP8: inputs quantized per token in groups of the weight block's columns.
DYNAMIC_GROUP = "dynamic-token-group"
ALL_MODES = (*ACT_MODES, DYNAMIC_GROUP)
# vLLM's floor on a token group's absmax (per_token_group_quant_fp8's eps).
GROUP_ABSMAX_EPS = 1e-10
# float32 holds every integer up to 2^24 exactly.
FLOAT32_EXACT_INT = 2**24


@dataclass(frozen=True)
class LinearKind:
    """What eval computes for one quantized Linear of a checkpoint (from its QuantSpec)."""

    weights: str  # "fp8" (per tensor / channel), "fp8-block", "int8", "int4"
    mode: str  # how inputs are quantized: one of ALL_MODES
    block: tuple[int, int] | None = None  # fp8-block: (rows, cols)
    group_size: int | None = None  # int4: input columns per scale (None: one group per row)
    symmetric: bool = True

    def describe(self) -> str:
        if self.weights == "fp8":  # the wording eval has always used for FP8 checkpoints
            return f"activations {self.mode}"
        what = {"fp8-block": f"FP8 weights in {self.block[0]}x{self.block[1]} blocks" if self.block else "",
                "int8": "INT8 weights",
                "int4": f"INT4 weights ({'symmetric' if self.symmetric else 'asymmetric'}, "
                        f"{'groups of ' + str(self.group_size) if self.group_size else 'per channel'})"}[self.weights]
        return f"{what}, activations {self.mode}"

    def matmul(self, device: torch.device) -> str:
        """How the matmuls run on `device`, for the report."""
        if self.weights == "fp8":
            if self.mode != WEIGHT_ONLY and scaled_mm_supported(device):
                return "torch._scaled_mm"
            return "simulated FP8 matmuls" if self.mode != WEIGHT_ONLY else "dequantized FP8 weights, float32 matmul"
        if self.weights == "int8":
            if self.mode == WEIGHT_ONLY:
                return "dequantized INT8 weights, float32 matmul"
            return "torch._int_mm" if int_mm_supported(device) else "simulated INT8 matmuls (exact)"
        if self.weights == "fp8-block":
            return ("simulated block-FP8 matmuls" if self.mode != WEIGHT_ONLY
                    else "dequantized FP8 weights, float32 matmul")
        return "dequantized INT4 weights, matmul in the model dtype"


def linear_kind(spec) -> LinearKind:
    """The eval computation for a `streamq.formats.QuantSpec`; ValueError if eval has none."""
    from streamq.quant.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken

    w, a = spec.weight, spec.activation
    if a is None:
        mode = WEIGHT_ONLY
    elif spec.static_activations:
        if not isinstance(a, PerTensor):
            raise ValueError(f"static activations {a} (eval runs static per-tensor input scales only)")
        mode = STATIC
    elif isinstance(a, PerTensor):
        mode = DYNAMIC_TENSOR
    elif isinstance(a, PerToken):
        mode = DYNAMIC_GROUP if isinstance(w, PerBlock) else DYNAMIC_TOKEN
    else:
        raise ValueError(f"activations {a}")
    if spec.type == "float" and spec.bits == 8:
        if isinstance(w, (PerTensor, PerChannel)):
            return LinearKind("fp8", mode)
        if isinstance(w, PerBlock):
            if mode not in (DYNAMIC_GROUP, WEIGHT_ONLY):
                raise ValueError(f"block FP8 weights with activations {mode} (servers quantize them per token group)")
            return LinearKind("fp8-block", mode, block=(w.rows, w.cols))
    if spec.type == "int" and spec.bits == 8 and isinstance(w, (PerTensor, PerChannel)):
        if not spec.symmetric:
            raise ValueError("asymmetric INT8 weights")
        return LinearKind("int8", mode)
    if spec.type == "int" and spec.bits == 4 and isinstance(w, (PerGroup, PerChannel)):
        if mode != WEIGHT_ONLY:
            raise ValueError("INT4 weights with quantized activations (eval runs W4A16)")
        return LinearKind("int4", mode, group_size=w.size if isinstance(w, PerGroup) else None,
                          symmetric=spec.symmetric)
    raise ValueError(f"{spec.type}{spec.bits} weights with {w}")


def _buffer(module: nn.Module, name: str, shape, dtype) -> None:
    module.register_buffer(name, torch.empty(tuple(shape), dtype=dtype))


def _register_bias(module: nn.Module, out_features: int, bias_dtype: torch.dtype | None) -> None:
    if bias_dtype is not None:
        _buffer(module, "bias", (out_features,), bias_dtype)
    else:
        module.bias = None


def _finish(module: nn.Module, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if module.bias is not None:  # added after the cast, as FP8Linear does
        out = out + module.bias.to(out.dtype)
    return out.reshape(*shape[:-1], module.out_features)


# ------------------------------------------------------------------ INT8


def int_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def int_mm_shapes_ok(m: int, k: int, n: int) -> bool:
    """torch._int_mm on CUDA: M > 16, K and N multiples of 8."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def quantize_int8_activation(x: torch.Tensor, mode: str, input_scale: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """2D input -> (int8 codes, float32 scale: [rows, 1] per token or [] per tensor)."""
    if mode == DYNAMIC_TOKEN:
        absmax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    elif mode == DYNAMIC_TENSOR:
        absmax = x.abs().amax().to(torch.float32)
    elif mode == STATIC:
        assert input_scale is not None
        scale = input_scale.reshape(()).to(torch.float32)
        return quantize_int8(x, scale), scale
    else:
        raise ValueError(f"no INT8 activation quantization in mode {mode!r}")
    scale = (absmax / torch.full_like(absmax, INT8_MAX)).clamp(min=INT8_MIN_SCALE)
    return quantize_int8(x, scale), scale


def int8_product(xq: torch.Tensor, wq: torch.Tensor, use_int_mm: bool) -> torch.Tensor:
    """xq [M, K] @ wq [N, K]^T of int8 codes, exactly: int32 (torch._int_mm) or exact float."""
    m, k = xq.shape
    n = wq.shape[0]
    if use_int_mm and int_mm_shapes_ok(m, k, n):
        return torch._int_mm(xq.contiguous(), wq.t())
    # Every partial sum is an integer of magnitude <= K * 127^2: exact in float32 below 2^24.
    dtype = torch.float32 if k * int(INT8_MAX) ** 2 <= FLOAT32_EXACT_INT else torch.float64
    return xq.to(dtype) @ wq.to(dtype).t()


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype, use_int_mm: bool) -> torch.Tensor:
    """(xq * x_scale) @ (wq * w_scale)^T in `out_dtype`, epilogue x_scale * (w_scale * float(acc))."""
    acc = int8_product(xq, wq, use_int_mm).to(torch.float32)  # exact integer -> float32, rounded once
    ws = w_scale.to(torch.float32)
    ws = ws.reshape(1, -1) if ws.numel() > 1 else ws.reshape(())
    xs = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(())
    return (xs * (ws * acc)).to(out_dtype)


class Int8Linear(nn.Module):
    """Buffers `weight` (int8 [out, in]), `weight_scale` (float32 [out, 1], or [1] / [] per tensor),
    `input_scale` (static only), `bias`."""

    def __init__(self, in_features: int, out_features: int, weight_scale_shape: tuple[int, ...], mode: str,
                 input_scale_shape: tuple[int, ...] | None = None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        assert mode in ACT_MODES, mode
        if mode == STATIC and input_scale_shape is None:
            raise ValueError("a static INT8 Linear needs an input_scale")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.use_int_mm = False  # set by `enable_fast_matmuls` once the layer is on its device
        _buffer(self, "weight", (out_features, in_features), torch.int8)
        _buffer(self, "weight_scale", weight_scale_shape, torch.float32)
        if input_scale_shape is not None:
            _buffer(self, "input_scale", input_scale_shape, torch.float32)
        else:
            self.input_scale = None
        _register_bias(self, out_features, bias_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == WEIGHT_ONLY:
            w = dequant.dequantize_int8(self.weight, self.weight_scale)
            out = (x2.to(torch.float32) @ w.t()).to(x.dtype)
        else:
            xq, sx = quantize_int8_activation(x2, self.mode, self.input_scale)
            out = int8_matmul(xq, sx, self.weight, self.weight_scale, x.dtype, self.use_int_mm)
        return _finish(self, out, shape)


# ------------------------------------------------------------------ block FP8


def quantize_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2D input [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K/group)]), one scale per token
    and group of `group` columns: max(absmax, 1e-10) / 448, values clamped to +-448."""
    m, k = x.shape
    groups = -(-k // group)
    xf = x.to(torch.float32)
    if groups * group != k:  # a partial last group: zeros never raise its absmax
        xf = torch.nn.functional.pad(xf, (0, groups * group - k))
    xg = xf.reshape(m, groups, group)
    absmax = xg.abs().amax(dim=-1, keepdim=True).clamp(min=GROUP_ABSMAX_EPS)
    scale = absmax / torch.full_like(absmax, FP8_MAX)
    xq = (xg / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(m, groups * group)[:, :k]
    return xq, scale.reshape(m, groups)


def block_fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """sum over K groups g of (xq_g @ wq_g^T) * x_scale[:, g] * w_scale[n // rows, g], float32.

    xq [M, K] e4m3 with x_scale [M, G]; wq [N, K] e4m3 with w_scale [ceil(N/rows), G]; the
    activation groups are the weight blocks' columns (G = ceil(K / cols)).
    """
    rows, cols = block
    n, k = wq.shape
    groups = -(-k // cols)
    if x_scale.shape != (xq.shape[0], groups) or w_scale.shape != (-(-n // rows), groups):
        raise ValueError(f"block scales {tuple(x_scale.shape)} x {tuple(w_scale.shape)} do not fit "
                         f"[{xq.shape[0]}, {k}] x [{n}, {k}] in {rows}x{cols} blocks")
    xf, wf = xq.to(torch.float32), wq.to(torch.float32)
    ws = w_scale.to(torch.float32).repeat_interleave(rows, dim=0)[:n]  # [N, G]
    out = torch.zeros(xq.shape[0], n, dtype=torch.float32, device=xq.device)
    for g in range(groups):
        c = slice(g * cols, min((g + 1) * cols, k))
        out += (xf[:, c] @ wf[:, c].t()) * x_scale[:, g, None] * ws[None, :, g]
    return out.to(out_dtype)


class BlockFP8Linear(nn.Module):
    """Buffers `weight` (e4m3 [out, in]), the block scale under its checkpoint name (`weight_scale_inv`
    or `weight_scale`, float32 [ceil(out/rows), ceil(in/cols)]) and `bias`."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], mode: str,
                 scale_name: str = "weight_scale_inv", bias_dtype: torch.dtype | None = None):
        super().__init__()
        if mode not in (DYNAMIC_GROUP, WEIGHT_ONLY):
            raise ValueError(f"block FP8 Linear with activation mode {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.block, self.scale_name = tuple(block), scale_name
        _buffer(self, "weight", (out_features, in_features), FP8_DTYPE)
        _buffer(self, scale_name, (-(-out_features // block[0]), -(-in_features // block[1])), torch.float32)
        _register_bias(self, out_features, bias_dtype)

    @property
    def block_scale(self) -> torch.Tensor:
        return getattr(self, self.scale_name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, mode={self.mode}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == WEIGHT_ONLY:
            w = dequant.dequantize_fp8_blocks(self.weight, self.block_scale, *self.block)
            out = (x2.to(torch.float32) @ w.t()).to(x.dtype)
        else:
            xq, sx = quantize_fp8_groups(x2, self.block[1])
            out = block_fp8_matmul(xq, sx, self.weight, self.block_scale, self.block, x.dtype)
        return _finish(self, out, shape)


# ------------------------------------------------------------------ INT4 weight-only


class W4A16Linear(nn.Module):
    """Buffers `weight_packed` (int32 [out, ceil(in/8)]), `weight_scale` ([out, ceil(in/g)], model
    dtype), `weight_shape` (int64 [2]), `weight_zero_point` (int32 [ceil(out/8), ceil(in/g)],
    asymmetric only), `bias`. The names are compressed-tensors'; `names` maps them elsewhere."""

    def __init__(self, in_features: int, out_features: int, group_size: int | None,
                 scale_dtype: torch.dtype = torch.bfloat16, asymmetric: bool = False,
                 bias_dtype: torch.dtype | None = None, names: dict[str, str] | None = None,
                 has_shape: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, WEIGHT_ONLY
        self.group_size = group_size or in_features
        groups = -(-in_features // self.group_size)
        self.names = {"weight": "weight_packed", "scale": "weight_scale", "shape": "weight_shape",
                      "zero_point": "weight_zero_point", **(names or {})}
        _buffer(self, self.names["weight"], (out_features, -(-in_features // dequant.NIBBLES)), torch.int32)
        _buffer(self, self.names["scale"], (out_features, groups), scale_dtype)
        self.has_shape = has_shape
        if has_shape:
            _buffer(self, self.names["shape"], (2,), torch.int64)
        self.asymmetric = asymmetric
        if asymmetric:
            _buffer(self, self.names["zero_point"], (-(-out_features // dequant.NIBBLES), groups), torch.int32)
        _register_bias(self, out_features, bias_dtype)
        self._shape_checked = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}, {'asymmetric' if self.asymmetric else 'symmetric'}")

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.has_shape and not self._shape_checked:
            stored = [int(v) for v in getattr(self, self.names["shape"]).tolist()]
            if stored != [self.out_features, self.in_features]:
                raise ValueError(f"weight_shape is {stored}, the Linear is [{self.out_features}, {self.in_features}]")
            self._shape_checked = True
        zp = getattr(self, self.names["zero_point"]) if self.asymmetric else None
        return dequant.dequantize_int4(getattr(self, self.names["weight"]), getattr(self, self.names["scale"]),
                                       self.in_features, self.group_size, zp, dtype)

    def _apply(self, fn, recurse=True):
        self._shape_checked = False  # new storage (materialized, moved): check the stored shape again
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.nn.functional.linear(x.reshape(-1, shape[-1]), self.dequantized_weight(x.dtype))
        return _finish(self, out, shape)


class GPTQLinear(nn.Module):
    """W4A16 in the GPTQ v1 layout: buffers `qweight` (int32 [in/8, out]), `qzeros` (int32
    [G, out/8]), `scales` ([G, out]), `g_idx` (int32 [in]), `bias`; dequantized to the compute
    dtype, then a plain matmul in that dtype."""

    def __init__(self, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        if in_features % dequant.NIBBLES or out_features % dequant.NIBBLES:
            raise ValueError(f"the GPTQ layout needs in and out multiples of 8, got [{out_features}, {in_features}]")
        self.in_features, self.out_features, self.mode, self.groups = in_features, out_features, WEIGHT_ONLY, groups
        _buffer(self, "qweight", (in_features // dequant.NIBBLES, out_features), torch.int32)
        _buffer(self, "qzeros", (groups, out_features // dequant.NIBBLES), torch.int32)
        _buffer(self, "scales", (groups, out_features), scale_dtype)
        _buffer(self, "g_idx", (in_features,), torch.int32)
        _register_bias(self, out_features, bias_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gptq int4, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        w = dequant.dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, x.dtype)
        return _finish(self, torch.nn.functional.linear(x.reshape(-1, shape[-1]), w), shape)


class AWQLinear(nn.Module):
    """W4A16 in the AutoAWQ GEMM layout: buffers `qweight` (int32 [in, out/8]), `qzeros` (int32
    [G, out/8]), `scales` ([G, out]), `bias`; dequantized to the compute dtype, then a plain matmul."""

    def __init__(self, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        if out_features % dequant.NIBBLES:
            raise ValueError(f"the AWQ layout needs out a multiple of 8, got {out_features}")
        self.in_features, self.out_features, self.mode, self.groups = in_features, out_features, WEIGHT_ONLY, groups
        _buffer(self, "qweight", (in_features, out_features // dequant.NIBBLES), torch.int32)
        _buffer(self, "qzeros", (groups, out_features // dequant.NIBBLES), torch.int32)
        _buffer(self, "scales", (groups, out_features), scale_dtype)
        _register_bias(self, out_features, bias_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, awq int4, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        w = dequant.dequantize_awq(self.qweight, self.qzeros, self.scales, x.dtype)
        return _finish(self, torch.nn.functional.linear(x.reshape(-1, shape[-1]), w), shape)


QUANT_LINEARS = (FP8Linear, Int8Linear, BlockFP8Linear, W4A16Linear, GPTQLinear, AWQLinear)


def enable_fast_matmuls(module: nn.Module, device: torch.device) -> None:
    """Real FP8 (`torch._scaled_mm`) and INT8 (`torch._int_mm`) matmuls below `module` where
    `device` has them; the other kinds always run their exact simulation."""
    enable_scaled_mm(module, device)
    on = int_mm_supported(device)
    for m in module.modules():
        if isinstance(m, Int8Linear):
            m.use_int_mm = on

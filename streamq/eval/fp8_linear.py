"""The quantized forward of a W8A8 FP8 checkpoint, as an inference engine computes it.

`FP8Linear` replaces an nn.Linear whose checkpoint weight is FP8: the input is quantized
(static `input_scale`, or a dynamic per-tensor / per-token scale from the input itself,
absmax / 448 as vLLM computes it), then multiplied with the FP8 weight. On GPUs with FP8
tensor cores (compute capability >= 8.9) that is a real `torch._scaled_mm`; elsewhere it is
simulated exactly: FP8 values are exact in float32 and so are their products, so the only
difference is the accumulation. (Hopper's tensor-wise FP8 GEMM accumulates with less than
float32 precision, about 1e-4 of sum |x * w| measured on an H100; the row-wise kernel and
the simulation accumulate in float32.)

`FP8Experts` replaces transformers' fused experts module (3D `gate_up_proj`/`down_proj`) by
per-expert FP8 weights under their on-disk names (`<e>.gate_proj.weight`, ...), so the
checkpoint fills it expert by expert. Its forward mirrors transformers' eager experts loop
(see `streamq.model.moe`) with vLLM's fused-MoE activation quantization: all tokens are
quantized once before dispatch and all intermediate rows once before the down projection,
with one scale per layer (static: the max over the layer's experts, as vLLM takes it).

Buffers carry the checkpoint's own names and shapes (`weight_scale` `[]`, `[1]` or
`[out, 1]`), so `streamq.model.layer.materialize_layer` copies them in unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from streamq.quant.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8, scale_from_absmax

# How inputs are quantized, from the checkpoint's quantization_config.
STATIC, DYNAMIC_TENSOR, DYNAMIC_TOKEN, WEIGHT_ONLY = "static", "dynamic-tensor", "dynamic-token", "none"
ACT_MODES = (STATIC, DYNAMIC_TENSOR, DYNAMIC_TOKEN, WEIGHT_ONLY)
# vLLM's floor for dynamic per-token scales (an all-zero row would otherwise divide by 0).
PER_TOKEN_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_activation(x: torch.Tensor, mode: str,
                        input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D input -> (FP8 values, float32 scale: [] per tensor or [rows, 1] per token).

    Division (not multiplication by the reciprocal, as vLLM's kernel does) matches how
    streamq quantizes weights; the two differ by one FP8 step in rare ties.
    """
    if mode == STATIC:
        assert input_scale is not None
        scale = input_scale.reshape(()).to(torch.float32)
    elif mode == DYNAMIC_TENSOR:
        scale = scale_from_absmax(x.abs().amax().to(torch.float32))
    elif mode == DYNAMIC_TOKEN:
        scale = (x.abs().amax(dim=-1, keepdim=True).to(torch.float32) / FP8_MAX).clamp(min=PER_TOKEN_MIN_SCALE)
    else:
        raise ValueError(f"no activation quantization in mode {mode!r}")
    return quantize_fp8(x, scale), scale


def _row_col_scales(x_scale: torch.Tensor, w_scale: torch.Tensor, rows: int, cols: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales as [rows, 1] and [1, cols] (row-wise) or both as [] (tensor-wise)."""
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        return x_scale.reshape(()), w_scale.reshape(()).to(torch.float32)
    return (x_scale.reshape(-1, 1).expand(rows, 1).contiguous(),
            w_scale.to(torch.float32).reshape(1, -1).expand(1, cols).contiguous())


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               out_dtype: torch.dtype, use_scaled_mm: bool) -> torch.Tensor:
    """(xq * x_scale) @ (wq * w_scale).T in `out_dtype`: xq [M, K], wq [N, K] FP8."""
    rows, cols = xq.shape[0], wq.shape[0]
    sa, sb = _row_col_scales(x_scale, w_scale, rows, cols)
    # cuBLASLt needs K and N divisible by 16; row-wise scaling needs a bf16 output.
    if (use_scaled_mm and wq.shape[1] % 16 == 0 and cols % 16 == 0
            and (sa.ndim == 0 or out_dtype == torch.bfloat16)):
        return torch._scaled_mm(xq.contiguous(), wq.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    acc = xq.to(torch.float32) @ wq.to(torch.float32).t()
    # One combined factor per output, as the tensor-wise GEMM epilogue applies it.
    return (acc * (sa * sb)).to(out_dtype)


def dequantized_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Weight-only FP8 (W8A16): input kept, weight dequantized, float32 accumulation."""
    w = wq.to(torch.float32) * w_scale.to(torch.float32).reshape(-1, 1) if w_scale.numel() > 1 else \
        wq.to(torch.float32) * w_scale.to(torch.float32).reshape(())
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


class FP8Linear(nn.Module):
    """A quantized Linear: buffers `weight` (FP8 [out, in]), `weight_scale`, `input_scale`, `bias`.

    Build it on the meta device from the checkpoint's tensor shapes; the layer's
    materialization fills the buffers.
    """

    def __init__(self, in_features: int, out_features: int, weight_scale_shape: tuple[int, ...], mode: str,
                 input_scale_shape: tuple[int, ...] | None = None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        assert mode in ACT_MODES, mode
        if mode == STATIC and input_scale_shape is None:
            raise ValueError("a static FP8 Linear needs an input_scale")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.use_scaled_mm = False  # set by `enable_scaled_mm` once the layer is on its device
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.empty(weight_scale_shape, dtype=torch.float32))
        # vLLM ignores a stored input_scale under a dynamic scheme; it is kept only to load the file.
        if input_scale_shape is not None:
            self.register_buffer("input_scale", torch.empty(input_scale_shape, dtype=torch.float32))
        else:
            self.input_scale = None
        if bias_dtype is not None:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == WEIGHT_ONLY:
            out = dequantized_matmul(x2, self.weight, self.weight_scale)
        else:
            xq, sx = quantize_activation(x2, self.mode, self.input_scale)
            out = fp8_matmul(xq, sx, self.weight, self.weight_scale, x.dtype, self.use_scaled_mm)
        if self.bias is not None:  # added after the cast on both paths, so they agree
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


class Expert(nn.Module):
    def __init__(self, gate_proj: FP8Linear, up_proj: FP8Linear, down_proj: FP8Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class FP8Experts(nn.Module):
    """Drop-in for transformers' fused experts module, with per-expert FP8 weights (children `0`, `1`, ...)."""

    def __init__(self, experts: list[Expert], act_fn: nn.Module, mode: str):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts, self.act_fn, self.mode = len(experts), act_fn, mode

    def expert(self, e: int) -> Expert:
        return self._modules[str(e)]

    def _layer_input_scale(self, projs: tuple[str, ...]) -> torch.Tensor | None:
        """Static mode: vLLM keeps one input scale per layer and projection, the max over experts."""
        if self.mode != STATIC:
            return None
        return torch.stack([getattr(self.expert(e), p).input_scale.reshape(())
                            for e in range(self.num_experts) for p in projs]).amax()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        first = self.expert(0).gate_proj
        if not isinstance(first, FP8Linear):
            return self._forward_modules(hidden_states, top_k_index, top_k_weights)
        use_mm, out_dtype = first.use_scaled_mm, hidden_states.dtype
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        routed = []  # (expert, top_k_pos, token_idx) in transformers' order
        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            routed.append((e, top_k_pos, token_idx))
        final_hidden_states = torch.zeros_like(hidden_states)
        if not routed:
            return final_hidden_states
        # First GEMM: every token quantized once, before dispatch.
        quant_in = self.mode != WEIGHT_ONLY
        if quant_in:
            xq, sx = quantize_activation(hidden_states, self.mode, self._layer_input_scale(("gate_proj", "up_proj")))
        intermediates = []
        for e, _, token_idx in routed:
            ex = self.expert(e)
            if quant_in:
                rows_scale = sx[token_idx] if sx.ndim else sx
                gate = fp8_matmul(xq[token_idx], rows_scale, ex.gate_proj.weight, ex.gate_proj.weight_scale,
                                  out_dtype, use_mm)
                up = fp8_matmul(xq[token_idx], rows_scale, ex.up_proj.weight, ex.up_proj.weight_scale, out_dtype,
                                use_mm)
            else:
                gate = dequantized_matmul(hidden_states[token_idx], ex.gate_proj.weight, ex.gate_proj.weight_scale)
                up = dequantized_matmul(hidden_states[token_idx], ex.up_proj.weight, ex.up_proj.weight_scale)
            intermediates.append(self.act_fn(gate) * up)
        # Second GEMM: all intermediate rows of the layer quantized together.
        inter = torch.cat(intermediates)
        if quant_in:
            iq, si = quantize_activation(inter, self.mode, self._layer_input_scale(("down_proj",)))
        start = 0
        for (e, top_k_pos, token_idx), part in zip(routed, intermediates, strict=True):
            rows = slice(start, start + part.shape[0])
            start += part.shape[0]
            down = self.expert(e).down_proj
            if quant_in:
                out = fp8_matmul(iq[rows], si[rows] if si.ndim else si, down.weight, down.weight_scale, out_dtype,
                                 use_mm)
            else:
                out = dequantized_matmul(part, down.weight, down.weight_scale)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states

    def _forward_modules(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """Experts of the other quantized kinds (`streamq.eval.quant_linear`): each projection is its
        own module. Their inputs are quantized per token (or per token group) or not at all, so
        quantizing each expert's rows on their own gives what quantizing the layer's rows at once does."""
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        final_hidden_states = torch.zeros_like(hidden_states)
        for expert_idx in expert_hit:
            e = int(expert_idx[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            ex = self.expert(e)
            x = hidden_states[token_idx]
            out = ex.down_proj(self.act_fn(ex.gate_proj(x)) * ex.up_proj(x))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


def enable_scaled_mm(module: nn.Module, device: torch.device) -> None:
    """Use real FP8 matmuls in every FP8 module below `module` if `device` has them."""
    on = scaled_mm_supported(device)
    for m in module.modules():
        if isinstance(m, FP8Linear):
            m.use_scaled_mm = on

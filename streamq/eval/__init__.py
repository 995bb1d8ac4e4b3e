"""`streamq eval`: an original and a quantized checkpoint side by side, one layer of each at a time.

  * `pair`: open both checkpoints, check they are the same model, read the quantization
    format through the format registry (`streamq.formats`) and check every quantized
    Linear's tensors against the format's specs;
  * `fp8_linear`: the quantized forward of FP8 per-tensor / per-channel checkpoints (real FP8
    matmuls where the GPU has them, an exact simulation elsewhere), and the MoE experts
    module that holds per-expert quantized Linears of any kind;
  * `quant_linear`: the quantized forward of W8A8 INT8 (`torch._int_mm` on CUDA, an exact
    simulation elsewhere), block FP8 (per-token-group inputs) and W4A16 checkpoints;
  * `dequant`: unpacking and dequantization of those weights;
  * `runner`: the layer loop (per-layer error on the original's inputs, both streams
    propagated, logits metrics at the end);
  * `report`: outlier layers, text table, JSON and plot.
"""

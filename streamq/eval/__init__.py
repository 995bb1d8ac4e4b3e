"""`streamq eval`: an original and a quantized checkpoint side by side, one layer of each at a time.

  * `fp8_linear`: the quantized forward (real FP8 matmuls where the GPU has them, an exact
    simulation elsewhere) for Linears and fused MoE experts;
  * `pair`: open both checkpoints, check they are the same model, read the quantization format;
  * `runner`: the layer loop (per-layer error on the original's inputs, both streams
    propagated, logits metrics at the end);
  * `report`: outlier layers, text table, JSON and plot.
"""

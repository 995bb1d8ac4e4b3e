"""streamq: layer-streaming post-training quantization for models larger than your GPU."""

__version__ = "0.1.0"

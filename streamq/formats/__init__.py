"""Checkpoint tensor layouts: pure pack / unpack functions for quantized weight formats."""

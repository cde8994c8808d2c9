"""FLUX.1 (dev, schnell): double-stream then single-stream transformer with 3-axis RoPE."""

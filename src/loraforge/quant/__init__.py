"""Frozen base weights kept compressed in memory: ggml blocks and NF4."""

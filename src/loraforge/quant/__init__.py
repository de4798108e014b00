"""Frozen base weights kept compressed in memory: ggml formats (held split as int8 + factors) and NF4."""

"""Training data: llama.cpp-style text windows, instruction datasets, templates, packing."""

"""Pure converters at the format boundaries: GGUF, HF safetensors, PEFT."""

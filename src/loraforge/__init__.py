"""loraforge: LoRA / QLoRA fine-tuning for llama-family models.

Bases come from a GGUF file (kept quantized in memory) or a Hugging Face
safetensors folder; adapters go out as GGUF LoRA (llama.cpp) or PEFT.
"""

__version__ = "0.1.0"

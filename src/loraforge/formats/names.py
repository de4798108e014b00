"""HF <-> GGUF tensor names and the q/k row permutation of llama-arch GGUF files.

Names are templated with `{}` for the layer index. Converters are pure functions; an
unknown name raises instead of being dropped.
"""

from __future__ import annotations

import re
from typing import TypeVar

import numpy as np
import torch

from loraforge.errors import LoraforgeError

# GGUF name template -> HF name template
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_GGUF: dict[str, str] = {v: k for k, v in GGUF_TO_HF.items()}

# GGUF tensors that carry no weights of the HF model (handled separately or unused).
GGUF_AUX_TENSORS = ("rope_freqs.weight", "blk.{}.attn_rot_embd")

# HF module short names as used by PEFT's target_modules, and the llama.cpp finetune rank flags.
MODULE_SHORT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LAYER_RE = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.search(name)
    if m is None:
        return name, None
    return name[:m.start()] + ".{}." + name[m.end():], int(m.group(1))


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names raise."""
    tpl, layer = _template(name)
    if tpl not in GGUF_TO_HF:
        raise LoraforgeError(f"unknown GGUF tensor {name!r}")
    return GGUF_TO_HF[tpl].format(layer) if layer is not None else GGUF_TO_HF[tpl]


def hf_to_gguf_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; unknown names raise."""
    tpl, layer = _template(name)
    if tpl not in HF_TO_GGUF:
        raise LoraforgeError(f"unknown model tensor {name!r}")
    return HF_TO_GGUF[tpl].format(layer) if layer is not None else HF_TO_GGUF[tpl]


def is_aux_gguf_tensor(name: str) -> bool:
    return _template(name)[0] in GGUF_AUX_TENSORS


ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _swap_pairs(w: ArrayT, n_head: int, split: tuple[int, int]) -> ArrayT:
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    w = w.reshape((n_head, *split, *rest))
    w = w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)
    return w.reshape((rows, *rest))


def permute_qk_hf_to_gguf(w: ArrayT, n_head: int) -> ArrayT:
    """Rows of an HF q/k weight (out, ...) into llama.cpp's interleaved-rope order.

    Works on any trailing shape: a weight (out, in), a bias (out,), a LoRA B (out, r), or the
    (out, bytes_per_row) blocks of a quantized weight (quant blocks run along rows).
    """
    head_dim = w.shape[0] // n_head
    return _swap_pairs(w, n_head, (2, head_dim // 2))


def permute_qk_gguf_to_hf(w: ArrayT, n_head: int) -> ArrayT:
    """Inverse of `permute_qk_hf_to_gguf`."""
    head_dim = w.shape[0] // n_head
    return _swap_pairs(w, n_head, (head_dim // 2, 2))


def needs_qk_permutation(gguf_arch: str) -> bool:
    """llama-arch GGUF files (Llama, Mistral, SmolLM ...) store q/k permuted; qwen2 (NEOX rope) does not."""
    return gguf_arch in ("llama", "mistral")


def qk_heads(hf_name: str, n_head: int, n_kv_head: int) -> int | None:
    """Heads to permute by for an HF tensor name, or None if it is not a q/k projection."""
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_kv_head
    return None

"""Adapters between stacked and separate projections: Baichuan's W_pack / Phi-3's qkv_proj (q, k, v
rows stacked) and gate_up_proj (gate rows, then up rows) against q_proj/k_proj/v_proj and
gate_proj/up_proj. Both directions are exact:

- split: a LoRA (A (r, in), B (sum of parts' rows, r)) on the stacked module is, per part, A with
  that part's rows of B (rank components whose B rows are all zero for a part are dropped);
- fuse: LoRAs on the parts are one LoRA on the stacked module of rank sum(r_i), A the parts' A
  stacked, B block-diagonal.

Each module's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is kept by giving the new
modules their own alpha (`alpha_pattern`), or folded into B when the parts' scales differ.
Used where an adapter meets a model or file of the other layout: llama.cpp's Baichuan files
hold attn_q/k/v (its converter splits W_pack), Hugging Face's Baichuan has W_pack.
"""

from __future__ import annotations

import math
import re

import torch

from loraforge.config import ModelConfig
from loraforge.lora import Adapter

QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP_PARTS = ("mlp.gate_proj", "mlp.up_proj")
_LAYER_RE = re.compile(r"^(model\.layers\.\d+\.)(.+)$")


def _alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    return scale * (math.sqrt(rank) if use_rslora else rank)


def _set_module(out: dict[str, torch.Tensor], alphas: dict[str, float], adapter: Adapter, module: str,
                a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Store one module's pair with an alpha that gives it `scale` at its rank."""
    out[module + ".lora_A"], out[module + ".lora_B"] = a.contiguous(), b.contiguous()
    alpha = _alpha_for_scale(scale, a.shape[0], adapter.use_rslora)
    if not math.isclose(alpha, adapter.alpha, rel_tol=1e-7):
        alphas[module] = alpha


def _row_sizes(parts: tuple[str, ...], cfg: ModelConfig) -> list[int]:
    if parts == QKV_PARTS:
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _split(adapter: Adapter, prefix: str, fused: str, parts: tuple[str, ...], cfg: ModelConfig,
           out: dict, alphas: dict) -> None:
    a, b = adapter.tensors[prefix + fused + ".lora_A"].float(), adapter.tensors[prefix + fused + ".lora_B"].float()
    scale = adapter.scaling(prefix + fused)
    for part, rows in zip(parts, b.split(_row_sizes(parts, cfg), dim=0)):
        keep = rows.abs().sum(dim=0) > 0
        if bool(keep.any()):
            _set_module(out, alphas, adapter, prefix + part, a[keep], rows[:, keep], scale)


def _fuse(adapter: Adapter, prefix: str, fused: str, parts: tuple[str, ...], cfg: ModelConfig,
          out: dict, alphas: dict) -> None:
    present = [p for p in parts if prefix + p + ".lora_A" in adapter.tensors]
    scales = {p: adapter.scaling(prefix + p) for p in present}
    rank = sum(adapter.rank(prefix + p) for p in present)
    common = scales[present[0]]
    folded = any(not math.isclose(s, common, rel_tol=1e-7) for s in scales.values())
    a = torch.cat([adapter.tensors[prefix + p + ".lora_A"].float() for p in present])
    sizes = _row_sizes(parts, cfg)
    b = torch.zeros(sum(sizes), rank)
    row, col = 0, 0
    for part, size in zip(parts, sizes):
        if part in scales:
            part_b = adapter.tensors[prefix + part + ".lora_B"].float()
            factor = scales[part] / common if folded else 1.0
            b[row:row + size, col:col + part_b.shape[1]] = part_b * factor
            col += part_b.shape[1]
        row += size
    _set_module(out, alphas, adapter, prefix + fused, a, b, common)


def match_layout(adapter: Adapter, cfg: ModelConfig, fused_qkv: str | None = "config",
                 fused_gate_up: bool | None = None) -> Adapter:
    """`adapter` with its q/k/v and gate/up modules stacked or separate as in `cfg` (or as given:
    fused_qkv None = separate, "qkv_proj" / "W_pack" = stacked under that name). Unchanged (the same
    object) when nothing differs."""
    target_qkv = cfg.fused_qkv if fused_qkv == "config" else fused_qkv
    target_gate_up = cfg.fused_gate_up if fused_gate_up is None else fused_gate_up
    out: dict[str, torch.Tensor] = {}
    alphas = dict(adapter.alpha_pattern)
    done: set[str] = set()
    for module in adapter.modules():
        m = _LAYER_RE.match(module)
        if m is None or module in done:
            continue
        prefix, local = m.groups()
        for parts, stacked_names, target in ((QKV_PARTS, ("self_attn.qkv_proj", "self_attn.W_pack"),
                                              f"self_attn.{target_qkv}" if target_qkv else None),
                                             (GATE_UP_PARTS, ("mlp.gate_up_proj",),
                                              "mlp.gate_up_proj" if target_gate_up else None)):
            if local in stacked_names and local != target:
                done.add(module)
                alphas.pop(module, None)
                if target is None:
                    _split(adapter, prefix, local, parts, cfg, out, alphas)
                else:  # the other stacked name: same rows, same order
                    _set_module(out, alphas, adapter, prefix + target, adapter.tensors[module + ".lora_A"],
                                adapter.tensors[module + ".lora_B"], adapter.scaling(module))
            elif local in parts and target is not None:
                group = {prefix + p for p in parts}
                done.update(group)
                for p in group:
                    alphas.pop(p, None)
                _fuse(adapter, prefix, target, parts, cfg, out, alphas)
    if not done:
        return adapter
    tensors = {k: v for k, v in adapter.tensors.items() if k.rpartition(".")[0] not in done}
    tensors.update(out)
    return Adapter(tensors=tensors, alpha=adapter.alpha, use_rslora=adapter.use_rslora,
                   alpha_pattern=alphas, metadata=dict(adapter.metadata))


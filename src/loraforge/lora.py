"""LoRA by module swap: `LoRALinear` / `LoRAEmbedding` wrap a frozen base module (dense or
quantized) and add `scale * B(A(x))` for each attached adapter.

An `Adapter` is the format-neutral form of a trained adapter: tensors keyed by HF module name
(`model.layers.0.self_attn.q_proj.lora_A` (r, in) and `.lora_B` (out, r); for embeddings A is
(r, vocab) and B (hidden, r), as PEFT stores them), HF q/k layout, plus alpha and the rules that
turn alpha and rank into a scale. Converters in `formats/` read and write it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.kernels.cpu_linear import lora_applies, lora_outputs

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Stacked projections (Phi-3's qkv_proj and gate_up_proj, Baichuan's W_pack) and what they stack: one
# is a target when it or any of its parts is named, so the default targets cover every family.
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "W_pack": ("q_proj", "k_proj", "v_proj"),
                 "gate_up_proj": ("gate_proj", "up_proj")}
ALL_TARGETS = DEFAULT_TARGETS + ("embed_tokens", "lm_head") + tuple(FUSED_TARGETS)
LINEAR_TARGETS = DEFAULT_TARGETS + tuple(FUSED_TARGETS)  # "all-linear"


@dataclass
class LoraConfig:
    """Which modules get adapters, their ranks, alpha and dropout (PEFT semantics).

    rank_pattern / alpha_pattern map a module short name ("q_proj") or a full module name
    ("model.layers.0.self_attn.q_proj") to its own rank / alpha; rank 0 switches a module off.
    A stacked module (FUSED_TARGETS) without its own entry takes the largest rank of its parts and
    the alpha of its first part that has one.
    """

    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (LINEAR_TARGETS if self.target_modules == "all-linear"
                                   else tuple(t.strip() for t in self.target_modules.split(",") if t.strip()))
        self.target_modules = tuple(self.target_modules)
        unknown = [t for t in self.target_modules if t not in ALL_TARGETS]
        if unknown:
            raise LoraforgeError(f"unknown target module(s) {', '.join(unknown)} "
                                 f"(known: {', '.join(ALL_TARGETS)}, all-linear)")
        if self.r < 0 or any(v < 0 for v in self.rank_pattern.values()):
            raise LoraforgeError("LoRA rank must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def _lookup(self, pattern: dict, module: str, default: Any) -> Any:
        if module in pattern:
            return pattern[module]
        short = module.rsplit(".", 1)[-1]
        for key, value in pattern.items():  # PEFT-style regex-ish suffix keys
            if key == short or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default

    def _parts(self, module: str) -> list[str]:
        """The module's own name and, for a stacked module, the names of what it stacks."""
        parent, _, short = module.rpartition(".")
        prefix = parent + "." if parent else ""
        return [module] + [prefix + part for part in FUSED_TARGETS.get(short, ())]

    def targets(self, module: str) -> bool:
        return any(m.rsplit(".", 1)[-1] in self.target_modules for m in self._parts(module))

    def rank_for(self, module: str) -> int:
        if not self.targets(module):
            return 0
        own, *parts = self._parts(module)
        if not parts or self._lookup(self.rank_pattern, own, None) is not None:
            return int(self._lookup(self.rank_pattern, own, self.r))
        return max(int(self._lookup(self.rank_pattern, p, self.r)) if self.targets(p) else 0 for p in parts)

    def alpha_for(self, module: str) -> float:
        for name in self._parts(module):
            value = self._lookup(self.alpha_pattern, name, None)
            if value is not None:
                return float(value)
        return float(self.alpha)

    def scaling(self, module: str, rank: int | None = None) -> float:
        r = self.rank_for(module) if rank is None else rank
        return scaling_of(self.alpha_for(module), r, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora,
                "target_modules": list(self.target_modules), "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        return cls(r=int(d["r"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   use_rslora=bool(d.get("use_rslora", False)), target_modules=tuple(d["target_modules"]),
                   rank_pattern={k: int(v) for k, v in d.get("rank_pattern", {}).items()},
                   alpha_pattern={k: float(v) for k, v in d.get("alpha_pattern", {}).items()})


def scaling_of(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA."""
    if rank <= 0:
        return 0.0
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class Adapter:
    """A trained adapter, independent of file format (HF names and q/k layout)."""

    tensors: dict[str, torch.Tensor]  # "<module>.lora_A" (r, in) / "<module>.lora_B" (out, r)
    alpha: float  # default alpha (GGUF: adapter.lora.alpha)
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module -> own alpha
    metadata: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> list[str]:
        return sorted(k[: -len(".lora_A")] for k in self.tensors if k.endswith(".lora_A"))

    def rank(self, module: str) -> int:
        return int(self.tensors[module + ".lora_A"].shape[0])

    def alpha_of(self, module: str) -> float:
        return float(self.alpha_pattern.get(module, self.alpha))

    def scaling(self, module: str) -> float:
        return scaling_of(self.alpha_of(module), self.rank(module), self.use_rslora)

    def delta(self, module: str) -> torch.Tensor:
        """The weight change scale * B @ A in the base's (out, in) layout (embeddings: (vocab, hidden))."""
        a = self.tensors[module + ".lora_A"].float()
        b = self.tensors[module + ".lora_B"].float()
        d = (b @ a) * self.scaling(module)
        return d.t() if module.endswith("embed_tokens") else d


class LoRALinear(nn.Module):
    """base(x) + sum over adapters of scale * (dropout(x) @ A^T) @ B^T. The base stays frozen."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def add_adapter(self, name: str, rank: int, scaling: float, dtype: torch.dtype, device: torch.device,
                    a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        """Attach adapter `name`; without a/b it is initialised as PEFT does (A kaiming, B zero)."""
        if a is None:
            a = torch.empty(rank, self.in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(self.out_features, rank, dtype=dtype, device=device)
        _check_shape(name, "lora_A", a, (rank, self.in_features))
        _check_shape(name, "lora_B", b, (self.out_features, rank))
        self.lora_A[name] = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(b.to(device=device, dtype=dtype))
        self.scaling[name] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.scaling:
            return y
        xd = self.dropout(x)
        for name, s in self.scaling.items():
            if s != 0.0:
                y = add_lora(y, xd, self.lora_A[name], self.lora_B[name], s)
        return y


def adapters_stackable(parts: Sequence[nn.Module]) -> bool:
    """Whether the adapters of projections that read one input can run as one LoRA (`stacked_factors`):
    not while a LoRA dropout is active (each projection draws its own mask), and with one LoRA dtype."""
    dtypes = set()
    for part in parts:
        if not isinstance(part, LoRALinear):
            continue
        if part.training and isinstance(part.dropout, nn.Dropout) and part.dropout.p > 0:
            return False
        dtypes.update(a.dtype for a in part.lora_A.values())
    return len(dtypes) <= 1


def _active(part: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) of the part's adapters that contribute (scale != 0)."""
    if not isinstance(part, LoRALinear):
        return []
    return [(part.lora_A[n], part.lora_B[n], s) for n, s in part.scaling.items() if s != 0.0]


def stacked_outputs(y: torch.Tensor, x: torch.Tensor, parts: Sequence[nn.Module], sizes: Sequence[int]
                    ) -> list[torch.Tensor]:
    """The outputs of projections that read one input x (..., in), given their base outputs side by side
    y (..., sum(sizes)): each part's slice plus its adapters. With one adapter per part, float32 on the
    CPU, all the rank-r products run as one LoRA over the stack (`kernels.cpu_linear.lora_outputs`:
    one x A^T product for every part, oneDNN throughout); else part by part."""
    adapters = [_active(p) for p in parts]
    flat = [t for pairs in adapters for a, b, _ in pairs for t in (a, b)]
    if all(len(pairs) <= 1 for pairs in adapters) and flat and lora_applies(y, x, flat):
        a = torch.cat([pairs[0][0] for pairs in adapters if pairs])
        ranks = tuple(pairs[0][0].shape[0] if pairs else 0 for pairs in adapters)
        scales = tuple(pairs[0][2] if pairs else 0.0 for pairs in adapters)
        return list(lora_outputs(y, x, a, tuple(sizes), ranks, scales, [pairs[0][1] if pairs else None
                                                                         for pairs in adapters]))
    outs = []
    for part_y, pairs in zip(y.split(list(sizes), dim=-1), adapters):
        for a, b, scale in pairs:
            part_y = add_lora(part_y, x, a, b, scale)
        outs.append(part_y)
    return outs


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """y + scale * (x A^T) B^T for y (..., out), x (..., in), A (r, in), B (out, r): by oneDNN for float32
    on the CPU (`kernels.cpu_linear.lora_outputs`), else one BLAS call (addmm) for the second product
    when the dtypes agree."""
    if lora_applies(y, x, [a, b]):
        return lora_outputs(y, x, a, (y.shape[-1],), (a.shape[0],), (scale,), [b])[0]
    xa = F.linear(x.to(a.dtype), a)  # (..., r)
    if xa.dtype == y.dtype:
        return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t(),
                           alpha=scale).view(y.shape)
    return y + F.linear(xa, b).to(y.dtype) * scale


class LoRAEmbedding(nn.Module):
    """base(ids) + sum over adapters of scale * A^T[ids] @ B^T (PEFT's lora_embedding_A/B)."""

    def __init__(self, base: nn.Module, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.base = base
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, rank: int, scaling: float, dtype: torch.dtype, device: torch.device,
                    a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        if a is None:  # PEFT: A zeros, B normal for embeddings
            a = torch.zeros(rank, self.num_embeddings, dtype=dtype, device=device)
            b = torch.randn(self.embedding_dim, rank, dtype=dtype, device=device)
        _check_shape(name, "lora_A", a, (rank, self.num_embeddings))
        _check_shape(name, "lora_B", b, (self.embedding_dim, rank))
        self.lora_A[name] = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(b.to(device=device, dtype=dtype))
        self.scaling[name] = scaling

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        for name, s in self.scaling.items():
            if s == 0.0:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            y = y + F.linear(F.embedding(ids, a.t()), b).to(y.dtype) * s
        return y


def _check_shape(adapter: str, what: str, t: torch.Tensor, expected: tuple[int, int]) -> None:
    if tuple(t.shape) != expected:
        raise LoraforgeError(f"adapter {adapter!r}: {what} has shape {tuple(t.shape)}, "
                             f"the model needs {expected}")


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Embedding) or hasattr(module, "num_embeddings"):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def _wrap(model: nn.Module, module_name: str, dropout: float) -> nn.Module:
    """Replace model's submodule `module_name` by its LoRA wrapper (once) and return the wrapper."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    current = getattr(parent, child)
    if isinstance(current, (LoRALinear, LoRAEmbedding)):
        return current
    if child == "embed_tokens":
        n, d = _dims(current)
        wrapper: nn.Module = LoRAEmbedding(current, n, d)
    else:
        i, o = _dims(current)
        wrapper = LoRALinear(current, i, o, dropout)
    setattr(parent, child, wrapper)
    return wrapper


def target_module_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the model's modules whose short name is in targets, or that stack a target
    (FUSED_TARGETS), in model order."""
    targets = set(targets)
    targets |= {fused for fused, parts in FUSED_TARGETS.items() if targets & set(parts)}
    names = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short == "base":
            continue
        if short in targets and (isinstance(module, (nn.Linear, nn.Embedding, LoRALinear, LoRAEmbedding))
                                 or hasattr(module, "qtype")):
            names.append(name)
    return names


def inject(model: nn.Module, cfg: LoraConfig, name: str = "default", dtype: torch.dtype = torch.float32
           ) -> list[str]:
    """Attach a fresh trainable adapter per cfg; freezes everything else. Returns wrapped module names.

    A tied lm_head shares the embedding matrix; it is wrapped like any other linear, which
    trains a separate low-rank delta on the output side only (as PEFT does).
    """
    device = next(model.parameters()).device
    wrapped = []
    for module_name in target_module_names(model, cfg.target_modules):
        rank = cfg.rank_for(module_name)
        if rank == 0:
            continue
        wrapper = _wrap(model, module_name, cfg.dropout)
        wrapper.add_adapter(name, rank, cfg.scaling(module_name, rank), dtype, device)
        wrapped.append(module_name)
    for pname, p in model.named_parameters():
        p.requires_grad_(f"lora_A.{name}" in pname or f"lora_B.{name}" in pname)
    return wrapped


def attach(model: nn.Module, adapter: Adapter, name: str, scale: float = 1.0,
           dtype: torch.dtype = torch.float32, trainable: bool = False) -> None:
    """Attach a loaded adapter under `name`, its per-module scale multiplied by the user's `scale`."""
    device = next(model.parameters()).device
    known = {n for n, _ in model.named_modules()}
    for module in adapter.modules():
        if module not in known and module + ".base" not in known:
            raise LoraforgeError(f"adapter targets {module!r}, which this model does not have")
        wrapper = _wrap(model, module, 0.0)
        a = adapter.tensors[module + ".lora_A"]
        b = adapter.tensors[module + ".lora_B"]
        wrapper.add_adapter(name, a.shape[0], adapter.scaling(module) * scale, dtype, device, a, b)
        wrapper.lora_A[name].requires_grad_(trainable)
        wrapper.lora_B[name].requires_grad_(trainable)


def set_scale(model: nn.Module, name: str, scale: float, adapter: Adapter) -> None:
    """Change the user scale of an attached adapter."""
    for module in adapter.modules():
        wrapper = model.get_submodule(module)
        wrapper.scaling[name] = adapter.scaling(module) * scale


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def adapter_tensors(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{'<module>.lora_A': (r, in), '<module>.lora_B': (out, r)} of adapter `name` (detached, fp32, CPU)."""
    out = {}
    for module_name, m in lora_modules(model).items():
        if name in m.scaling:
            out[module_name + ".lora_A"] = m.lora_A[name].detach().float().cpu()
            out[module_name + ".lora_B"] = m.lora_B[name].detach().float().cpu()
    return out


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy tensors (as from `adapter_tensors`) into an attached adapter in place."""
    modules = lora_modules(model)
    for key, value in tensors.items():
        module_name, _, which = key.rpartition(".")
        m = modules.get(module_name)
        if m is None or name not in m.scaling:
            raise LoraforgeError(f"adapter tensor {key} has no matching LoRA module in the model")
        param = (m.lora_A if which == "lora_A" else m.lora_B)[name]
        if tuple(param.shape) != tuple(value.shape):
            raise LoraforgeError(f"adapter tensor {key} has shape {tuple(value.shape)}, "
                                 f"the model has {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)


def to_adapter(model: nn.Module, cfg: LoraConfig, name: str = "default", metadata: dict | None = None) -> Adapter:
    """The trained adapter `name` as a format-neutral `Adapter`."""
    tensors = adapter_tensors(model, name)
    alpha_pattern = {}
    for module in {k.rpartition(".")[0] for k in tensors}:
        a = cfg.alpha_for(module)
        if a != cfg.alpha:
            alpha_pattern[module] = a
    return Adapter(tensors=tensors, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                   alpha_pattern=alpha_pattern, metadata={"lora_dropout": cfg.dropout, **(metadata or {})})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count their logical elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if hasattr(m, "qtype") and hasattr(m, "in_features"):
            total += m.in_features * m.out_features
        elif hasattr(m, "qtype") and hasattr(m, "num_embeddings"):
            total += m.num_embeddings * m.embedding_dim
    return trainable, total

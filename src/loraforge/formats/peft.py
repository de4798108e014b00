"""Hugging Face PEFT LoRA folders: `adapter_config.json` + `adapter_model.safetensors`.

Keys (as peft saves them): `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) for linears; `base_model.model.model.embed_tokens.lora_embedding_A`
(r, vocab) and `.lora_embedding_B` (hidden, r) for the embedding. q/k are in HF (unpermuted)
layout. Scaling is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern` and
`alpha_pattern` give single modules their own rank / alpha (keys matched as regex suffixes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from typing import Any

import torch

from loraforge.atomic import atomic_paths
from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import ALL_TARGETS, Adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                     r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?P<weight>\.weight)?$")


def _pattern_lookup(pattern: dict[str, Any], module: str) -> Any | None:
    """PEFT's rule: a pattern key matches a module name that ends with it (regex, after a dot)."""
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return None


GGUF_BASE_KEY = "loraforge_base_gguf"  # our own adapter_config.json field: the GGUF file trained on


def _hub_id(value: Any) -> str | None:
    """'org/name' from a model id or a huggingface.co URL, else None."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip().rstrip("/")
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "hf://"):
        if value.startswith(prefix):
            value = value[len(prefix):]
    return value if re.fullmatch(r"[\w.\-]+/[\w.\-]+", value) and not os.path.exists(value) else None


def peft_base_reference(base: str, cfg: ModelConfig | None = None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path a PEFT user can resolve, GGUF file name or None) for a base given as
    an HF folder, a GGUF file or a model id.

    HF folder: its config's hub id (`_name_or_path`) when it names one, else the folder's absolute
    path (what peft itself records). GGUF file: the hub id in its metadata (`general.base_model.0.repo_url`,
    `general.source.repo_url`, ...) or None; the file name is returned separately.
    """
    if not base:
        return (_hub_id(cfg.name) if cfg else None), None
    if os.path.isdir(base):
        config_path = os.path.join(base, "config.json")
        hub = None
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    hub = _hub_id(json.load(f).get("_name_or_path"))
            except (OSError, ValueError):
                hub = None
        return hub or os.path.abspath(base), None
    if os.path.isfile(base):
        from loraforge.formats.gguf_file import read_gguf

        try:
            meta = read_gguf(base).metadata
        except LoraforgeError:
            meta = {}
        hub = None
        for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.huggingface.repository",
                    "general.base_model.0.name"):
            hub = hub or _hub_id(meta.get(key))
        return hub, os.path.basename(base)
    return base, None


def _hf_layout(adapter: Adapter, cfg: ModelConfig) -> Adapter:
    """The adapter with q/k/v modules as the family's Hugging Face model has them (a Baichuan base
    read from GGUF has attn_q/k/v, HF's Baichuan one W_pack)."""
    from loraforge.formats.fused_adapters import match_layout
    from loraforge.formats.names import arch_facts

    return match_layout(adapter, cfg, fused_qkv=arch_facts(cfg.arch).hf_fused_qkv)


def write_peft(folder: str | os.PathLike, adapter: Adapter, cfg: ModelConfig, base_name: str = "",
               dtype: str = "f32", *, lora_dropout: float | None = None) -> None:
    """Write `adapter` as a PEFT folder for a base with config `cfg` (created if missing).

    base_name: the base model (HF folder, GGUF file or model id), see `peft_base_reference`.
    lora_dropout: recorded in the config (default: the adapter's own, from training, else 0).
    Both files are written atomically; on failure a folder this call created is removed again.
    """
    from loraforge.formats.adapter_shapes import check_adapter
    from loraforge.formats.hf import save_safetensors, verify_written_safetensors

    folder = os.fspath(folder)
    if dtype not in PEFT_DTYPES:
        raise LoraforgeError(f"--outtype {dtype!r} is not available for PEFT adapters "
                             f"(choose {', '.join(PEFT_DTYPES)})")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise file_error(folder, "exists and is not a folder (a PEFT adapter is a folder)")
    check_adapter(adapter, cfg, folder)
    adapter = _hf_layout(adapter, cfg)
    modules = adapter.modules()
    ranks = {m: adapter.rank(m) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    alphas = {m: adapter.alpha_of(m) for m in modules}
    alpha_pattern = {m: a for m, a in alphas.items() if a != adapter.alpha}
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    base_ref, base_gguf = peft_base_reference(base_name, cfg)
    dropout = lora_dropout if lora_dropout is not None else adapter.metadata.get("lora_dropout", 0.0)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": int(r),
        "lora_alpha": float(adapter.alpha),
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": bool(adapter.use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "revision": None,
    }
    if base_gguf:
        config[GGUF_BASE_KEY] = base_gguf
    torch_dtype = PEFT_DTYPES[dtype]
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        a = adapter.tensors[m + ".lora_A"].detach().to("cpu", torch_dtype).contiguous()
        b = adapter.tensors[m + ".lora_B"].detach().to("cpu", torch_dtype).contiguous()
        if m == "model.embed_tokens":
            state[f"{PREFIX}{m}.lora_embedding_A"] = a
            state[f"{PREFIX}{m}.lora_embedding_B"] = b
        else:
            state[f"{PREFIX}{m}.lora_A.weight"] = a
            state[f"{PREFIX}{m}.lora_B.weight"] = b

    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        # both files are written and checked before either replaces a previous adapter's
        with atomic_paths([os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)],
                          verify=[verify_written_safetensors],
                          size_hint=sum(t.numel() * t.element_size() for t in state.values())) as (tmp_w, tmp_c):
            save_safetensors(state, tmp_w)
            with open(tmp_c, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise file_error(folder, f"no {CONFIG_NAME} (a PEFT adapter folder needs it for alpha and ranks)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise file_error(path, "is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise file_error(path, f"peft_type is {peft_type!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise file_error(path, "DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise file_error(path, f"modules_to_save ({config['modules_to_save']}) stores whole trained modules, "
                               "which is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in ALL_TARGETS]
        if unknown:
            raise file_error(path, f"unknown target module(s) {', '.join(map(str, unknown))} "
                                   f"(known: {', '.join(ALL_TARGETS)})")
    if "lora_alpha" not in config or "r" not in config:
        raise file_error(path, "lacks r or lora_alpha")
    return config


def read_peft(folder: str | os.PathLike, cfg: ModelConfig | None = None) -> Adapter:
    """A PEFT LoRA folder as an `Adapter`, checked against `cfg` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from loraforge.formats.adapter_shapes import check_adapter, is_known_module

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise file_error(folder, "no such folder" if not os.path.exists(folder) else "not a folder")
    config = _read_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            raise file_error(folder, "has adapter_model.bin (a pickle); only adapter_model.safetensors is read")
        raise file_error(folder, f"no {WEIGHTS_NAME}")
    try:
        raw = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise file_error(weights, f"cannot read safetensors ({e})") from None

    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(".base_layer.weight") and name.split(".base_layer.")[0] in ("model.embed_tokens",
                                                                                     "lm_head"):
            continue  # peft's copy of the (frozen) base embedding / output matrix (save_embedding_layers)
        m = _KEY_RE.match(name)
        if m is None:
            raise file_error(weights, f"unexpected tensor {key!r} (only LoRA A/B tensors are supported)")
        module, which = m.group("module"), m.group("which")
        if not is_known_module(module):
            raise file_error(weights, f"unknown target module {module!r} (not a llama-family module)")
        if which.startswith("lora_embedding") != (module == "model.embed_tokens"):
            raise file_error(weights, f"tensor {key!r}: {which} does not fit module {module}")
        suffix = "lora_A" if which.endswith("A") else "lora_B"
        tensors[f"{module}.{suffix}"] = value.float()

    alpha = float(config["lora_alpha"])
    alpha_pattern = {}
    for module in {k.rpartition(".")[0] for k in tensors}:
        own = _pattern_lookup(config.get("alpha_pattern") or {}, module)
        if own is not None and float(own) != alpha:
            alpha_pattern[module] = float(own)
        want_rank = _pattern_lookup(config.get("rank_pattern") or {}, module)
        want_rank = int(config["r"]) if want_rank is None else int(want_rank)
        have = module + ".lora_A"
        if have in tensors and int(tensors[have].shape[0]) != want_rank:
            raise file_error(folder, f"module {module} has rank {int(tensors[have].shape[0])} but the config "
                                     f"says {want_rank} (r / rank_pattern)")
    adapter = Adapter(tensors=tensors, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)),
                      alpha_pattern=alpha_pattern,
                      metadata={"source": "peft", "base_model": config.get("base_model_name_or_path") or "",
                                "base_gguf": config.get(GGUF_BASE_KEY) or "",
                                "lora_dropout": float(config.get("lora_dropout") or 0.0)})
    check_adapter(adapter, cfg, folder)
    return adapter

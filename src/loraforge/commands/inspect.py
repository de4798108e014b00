"""`loraforge inspect PATH`: describe a GGUF model, GGUF LoRA adapter, training checkpoint,
Hugging Face model folder or PEFT adapter folder, without loading any weights.

  loraforge inspect model.gguf
  loraforge inspect lora.gguf --json
  loraforge inspect ./hf-model-folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from loraforge.atomic import human_bytes
from loraforge.errors import file_error

TEMPLATE_LINES = 6  # chat template lines shown in text output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", nargs="?", default=None,
                        help="GGUF file, HF model folder, PEFT adapter folder or checkpoint "
                             "(default: the embedded model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from loraforge.loader import resolve_model_path

    path = resolve_model_path(args.path)
    info = describe(path)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_text(info))
    return 0


def describe(path: str) -> dict[str, Any]:
    """What is at `path`, as a JSON-ready dict with a "kind" key; bad input raises LoraforgeError."""
    if not os.path.exists(path):
        raise file_error(path, "no such file or folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return describe_peft_folder(path)
        return describe_hf_folder(path)
    from loraforge.formats.ollama import describe_modelfile, is_modelfile

    if is_modelfile(path):
        return describe_modelfile(path)
    return describe_gguf(path)


# --- GGUF -----------------------------------------------------------------------------------------

def describe_gguf(path: str) -> dict[str, Any]:
    """Header only: the struct-based reader (`formats.gguf_file`) parses a 49k-token vocabulary in
    a fraction of a second and checks that every tensor lies inside the file."""
    import gguf

    from loraforge.formats.gguf import open_reader_checks
    from loraforge.formats.gguf_file import read_gguf

    open_reader_checks(path)
    reader = read_gguf(path)
    meta = reader.metadata
    kind = meta.get("general.type") or "model"
    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(t.qtype).name
        counts[name] = counts.get(name, 0) + 1
    info: dict[str, Any] = {
        "path": path,
        "format": f"GGUF v{reader.version}",
        "file_size": os.path.getsize(path),
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name", ""),
        "tensor_count": len(reader.tensors),
        "tensor_types": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }
    if kind == "adapter":
        info["kind"] = "gguf-lora"
        info.update(_gguf_adapter(reader, meta, path))
    elif kind == "loraforge-checkpoint" or "loraforge.checkpoint" in meta:
        info["kind"] = "checkpoint"
        info.update(_gguf_checkpoint(reader, meta, path))
    else:
        info["kind"] = "gguf-model"
        info.update(_gguf_model(reader, meta, path))
    return info


def _gguf_model(reader, meta: dict[str, Any], path: str) -> dict[str, Any]:
    import gguf

    from loraforge.quant.ggml import SUPPORTED_TYPES

    names = {t.name for t in reader.tensors}
    tok_embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    n_vocab = int(tok_embd.shape[0]) if tok_embd is not None else None
    from loraforge.config_sources import config_from_gguf_metadata

    cfg = config_from_gguf_metadata(meta, path, n_vocab=n_vocab, has_output="output.weight" in names)
    rope = _rope_text(cfg, has_rope_freqs="rope_freqs.weight" in names)
    unsupported = sorted({gguf.GGMLQuantizationType(t.qtype).name for t in reader.tensors
                          if t.qtype not in SUPPORTED_TYPES})
    out = {
        "sizes": _sizes(cfg),
        "rope": rope,
        "parameters": sum(math.prod(t.shape) for t in reader.tensors if t.name != "rope_freqs.weight"),
        "file_type": _file_type(meta),
        "tokenizer": _gguf_tokenizer(meta, path),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    if meta.get("loraforge.merged_adapters"):
        out["merged_adapters"] = json.loads(meta["loraforge.merged_adapters"])
    if unsupported:
        out["unsupported_tensor_types"] = unsupported
    return out


def _file_type(meta: dict[str, Any]) -> str | None:
    import gguf

    value = meta.get("general.file_type")
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def _gguf_tokenizer(meta: dict[str, Any], path: str) -> dict[str, Any] | None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if meta.get("tokenizer.ggml.model") is None:
        return None

    def special(key: str) -> dict[str, Any] | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not isinstance(i, int) or isinstance(i, bool):
            raise file_error(path, f"tokenizer.ggml.{key} is {i!r}, not a token id")
        text = tokens[i] if tokens is not None and 0 <= int(i) < len(tokens) else None
        return {"id": int(i), "text": text}

    return {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens or []),
        "merges": len(meta.get("tokenizer.ggml.merges") or []),
        "bos": special("bos_token_id"),
        "eos": special("eos_token_id"),
        "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
    }


def _gguf_adapter(reader, meta: dict[str, Any], path: str) -> dict[str, Any]:
    """Ranks per adapted tensor: llama.cpp reads r from lora_b, numpy (out, r)."""
    pairs: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix[1:]] = list(t.shape)
                break
        else:
            raise file_error(path, f"tensor {t.name!r} of a LoRA adapter is neither .lora_a nor .lora_b")
    tensors = {}
    for base, shapes in sorted(pairs.items(), key=lambda kv: _natural_key(kv[0])):
        if set(shapes) != {"lora_a", "lora_b"}:
            raise file_error(path, f"{base} has only one of lora_a / lora_b")
        tensors[base] = {"rank": shapes["lora_b"][-1], "lora_a": shapes["lora_a"], "lora_b": shapes["lora_b"]}
    alpha = meta.get("adapter.lora.alpha")
    ranks = sorted({v["rank"] for v in tensors.values()})
    return {
        "adapter_type": meta.get("adapter.type"),
        "alpha": alpha,
        "ranks": ranks,
        "scale_at_rank": {str(r): (float(alpha) / r if alpha else 1.0) for r in ranks},
        "adapted_tensors": len(tensors),
        "modules": _module_ranks(tensors),
        "tensors": tensors,
    }


def _module_ranks(tensors: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """{'attn_q.weight': [8], ...}: ranks of each kind of adapted tensor over the layers."""
    out: dict[str, set[int]] = {}
    for base, v in tensors.items():
        parts = base.split(".")
        kind = ".".join(parts[2:]) if parts[0] in ("blk", "model") and len(parts) > 2 else base
        out.setdefault(kind, set()).add(v["rank"])
    return {k: sorted(v) for k, v in out.items()}


def _gguf_checkpoint(reader, meta: dict[str, Any], path: str) -> dict[str, Any]:
    """The fields shown of a checkpoint's JSON metadata, each checked for its type (a full check,
    with the RNG states, is `train.checkpoint.parse_checkpoint_metadata` when resuming)."""
    raw = meta.get("loraforge.checkpoint")
    if not isinstance(raw, str):
        raise file_error(path, "damaged checkpoint metadata: loraforge.checkpoint is not a string")
    try:
        state = json.loads(raw)
    except json.JSONDecodeError as e:
        raise file_error(path, f"damaged checkpoint metadata ({e})") from None
    _expect(path, "the metadata", state, dict, "an object")
    train = _expect(path, "state", state.get("state", {}), dict, "an object")
    for key in ("iteration", "epoch", "tokens_seen"):
        _expect(path, f"state.{key}", train.get(key, 0), int, "an integer")
    _expect(path, "state.base_fingerprint", train.get("base_fingerprint", ""), str, "a string")
    _expect(path, "lora", state.get("lora", {}), dict, "an object")
    return {
        "iteration": train.get("iteration"),
        "epoch": train.get("epoch"),
        "tokens_seen": train.get("tokens_seen"),
        "lora": state.get("lora"),
        "base_fingerprint": train.get("base_fingerprint"),
        "lora_tensors": sum(t.name.startswith("lora.") for t in reader.tensors),
        "optimizer_tensors": sum(t.name.startswith("adam.") for t in reader.tensors),
        "run_spec": state.get("train_config") or None,  # the run spec of the run that wrote it
    }


def _expect(path: str, where: str, value: Any, kind: type, expected: str) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise file_error(path, f"damaged checkpoint metadata: {where} is {type(value).__name__} "
                           f"{json.dumps(value)[:40]}, expected {expected}")


# --- Hugging Face folders ---------------------------------------------------------------------------

def describe_hf_folder(path: str) -> dict[str, Any]:
    from loraforge.formats.hf import read_config, read_safetensors_header, safetensors_files

    cfg = read_config(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw_config = json.load(f)
    files = safetensors_files(path)
    dtypes: dict[str, int] = {}
    params, count = 0, 0
    names: set[str] = set()
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            names.add(name)
            count += 1
            dtypes[entry.get("dtype", "?")] = dtypes.get(entry.get("dtype", "?"), 0) + 1
            params += math.prod(entry.get("shape", []))
    if cfg.tie_word_embeddings and "lm_head.weight" in names:  # a tied copy is not another parameter
        params -= cfg.vocab_size * cfg.hidden_size
    info: dict[str, Any] = {
        "kind": "hf-model",
        "path": path,
        "format": f"safetensors, {len(files)} file(s)",
        "file_size": sum(os.path.getsize(f) for f in files),
        "architecture": cfg.arch,
        "name": raw_config.get("_name_or_path", ""),
        "tensor_count": count,
        "tensor_types": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        "sizes": _sizes(cfg),
        "rope": _rope_text(cfg, has_rope_freqs=False),
        "parameters": params,
        "file_type": raw_config.get("torch_dtype") or raw_config.get("dtype"),
        "tokenizer": None,
        "chat_template": None,
    }
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_json) or os.path.isfile(os.path.join(path, "tokenizer.model")):
        from loraforge.formats.gguf_tokenizer import hf_folder_tokenizer

        tok = hf_folder_tokenizer(path, cfg.vocab_size)
        spec: dict[str, Any] = {}
        if os.path.isfile(tokenizer_json):
            with open(tokenizer_json, encoding="utf-8") as f:
                spec = json.load(f)
        model = spec.get("model") or {}
        info["tokenizer"] = {
            "model": model.get("type") or "SentencePiece (tokenizer.model)",
            "pre": (spec.get("pre_tokenizer") or {}).get("type"),
            "vocab_size": tok.vocab_size,
            "merges": len(model.get("merges") or []),
            "bos": _hf_special(tok, tok.bos_id),
            "eos": _hf_special(tok, tok.eos_id),
            "add_bos": tok.add_bos,
        }
        info["chat_template"] = tok.chat_template
    return info


def _hf_special(tok, token_id: int | None) -> dict[str, Any] | None:
    if token_id is None:
        return None
    return {"id": int(token_id), "text": tok.backend.id_to_token(int(token_id))}


def describe_peft_folder(path: str) -> dict[str, Any]:
    from loraforge.formats.hf import read_safetensors_header

    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(config_path, f"not valid JSON ({e})") from None
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise file_error(path, "no adapter_model.safetensors in this PEFT folder")
    header = read_safetensors_header(weights)
    tensors: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        for part in (".lora_A.", ".lora_B."):
            if part in name:
                module = name.split(part)[0].removeprefix("base_model.model.")
                tensors.setdefault(module, {})[part.strip(".")] = entry.get("shape")
    ranks = sorted({v["lora_A"][0] for v in tensors.values() if v.get("lora_A")})
    return {
        "kind": "peft-lora",
        "path": path,
        "format": "PEFT",
        "file_size": os.path.getsize(weights),
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "alpha": config.get("lora_alpha"),
        "r": config.get("r"),
        "use_rslora": config.get("use_rslora", False),
        "target_modules": config.get("target_modules"),
        "ranks": ranks,
        "adapted_tensors": len(tensors),
        "tensor_count": len(header),
        "tensors": {k: {"rank": (v.get("lora_A") or [None])[0], **v}
                    for k, v in sorted(tensors.items(), key=lambda kv: _natural_key(kv[0]))},
    }


# --- shared pieces ------------------------------------------------------------------------------------

def _sizes(cfg) -> dict[str, Any]:
    return {
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "ff": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tied_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "sliding_window": cfg.sliding_window,
    }


def _rope_text(cfg, has_rope_freqs: bool) -> dict[str, Any]:
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if has_rope_freqs:
        scaling = {"rope_type": "llama3 (per-frequency factors in rope_freqs.weight)"}
    return {"base": cfg.rope_theta, "scaling": scaling}


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix} ({n:,})"
    return str(n)


def _special_text(s: dict[str, Any] | None) -> str:
    return "none" if s is None else f"{s['id']} {s['text']!r}"


def format_text(info: dict[str, Any]) -> str:
    """Aligned `label  value` lines for a terminal."""
    if info["kind"] == "ollama-modelfile":
        from loraforge.formats.ollama import format_modelfile_info

        return format_modelfile_info(info)
    rows: list[tuple[str, str]] = [("path", info["path"]), ("kind", info["kind"]), ("format", info["format"]),
                                   ("file size", human_bytes(info["file_size"], "B"))]
    if info.get("architecture"):
        rows.append(("architecture", str(info["architecture"])))
    if info.get("name"):
        rows.append(("name", str(info["name"])))
    if "sizes" in info:
        s = info["sizes"]
        rows += [
            ("layers", str(s["layers"])),
            ("hidden size", str(s["hidden"])),
            ("heads", f"{s['heads']} (key/value heads {s['kv_heads']}, head dim {s['head_dim']})"),
            ("feed-forward", str(s["ff"])),
            ("vocabulary", str(s["vocab"])),
            ("context", str(s["context"])),
            ("rope", f"base {info['rope']['base']:g}, scaling "
                     f"{json.dumps(info['rope']['scaling']) if info['rope']['scaling'] else 'none'}"),
            ("tied embeddings", "yes" if s["tied_embeddings"] else "no"),
        ]
        if s["sliding_window"]:
            rows.append(("sliding window", str(s["sliding_window"])))
        rows.append(("parameters", _human_count(info["parameters"])))
        if info.get("file_type"):
            rows.append(("file type", str(info["file_type"])))
        for merged in info.get("merged_adapters") or []:
            rows.append(("merged adapter", f"{merged['adapter']} (scale {merged['scale']:g})"))
    if "tensor_types" in info:
        types = ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items())
        rows.append(("tensors", f"{info['tensor_count']}: {types}"))
    if info.get("unsupported_tensor_types"):
        rows.append(("not loadable", "tensor types " + ", ".join(info["unsupported_tensor_types"])
                     + " are not supported by loraforge"))
    tok = info.get("tokenizer")
    if "sizes" in info:
        if tok:
            pre = f" (pre {tok['pre']})" if tok.get("pre") else ""
            rows.append(("tokenizer", f"{tok['model']}{pre}, {tok['vocab_size']} tokens, {tok['merges']} merges"))
            rows.append(("bos / eos", f"{_special_text(tok['bos'])} / {_special_text(tok['eos'])}"
                                      f"{', BOS added' if tok.get('add_bos') else ''}"))
        else:
            rows.append(("tokenizer", "none"))
    if info["kind"] in ("gguf-lora", "peft-lora"):
        if info["kind"] == "peft-lora":
            rows += [("peft type", str(info["peft_type"])), ("base model", str(info["base_model"])),
                     ("r", str(info["r"])), ("rsLoRA", "yes" if info["use_rslora"] else "no")]
        else:
            rows.append(("adapter type", str(info["adapter_type"])))
        rows.append(("alpha", "none (scale 1)" if not info["alpha"] else f"{info['alpha']:g}"))
        rows.append(("ranks", ", ".join(map(str, info["ranks"])) or "none"))
        rows.append(("adapted tensors", str(info["adapted_tensors"])))
        for module, ranks in (info.get("modules") or {}).items():
            rows.append((f"  {module}", "rank " + ", ".join(map(str, ranks))))
    if info["kind"] == "checkpoint":
        rows += [("iteration", str(info["iteration"])), ("epoch", str(info["epoch"])),
                 ("tokens seen", str(info["tokens_seen"])), ("LoRA tensors", str(info["lora_tensors"])),
                 ("optimizer tensors", str(info["optimizer_tensors"]))]
        for section, values in (info.get("run_spec") or {}).items():
            if isinstance(values, dict):
                changed = ", ".join(f"{k}={v}" for k, v in values.items() if v not in (None, "", False))
                rows.append((f"run: {section}", changed or "-"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    template = info.get("chat_template")
    if "sizes" in info:
        if template:
            t_lines = template.strip("\n").splitlines()
            lines.append(f"{'chat template':<{width}}  {len(t_lines)} lines:")
            lines += [f"{'':<{width}}  | {line}" for line in t_lines[:TEMPLATE_LINES]]
            if len(t_lines) > TEMPLATE_LINES:
                lines.append(f"{'':<{width}}  | ...")
        else:
            lines.append(f"{'chat template':<{width}}  none")
    return "\n".join(lines)

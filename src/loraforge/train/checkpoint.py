"""Resumable training checkpoints, written as GGUF files (as llama.cpp's finetune did).

Content: the LoRA tensors (`lora.<module>.lora_A|lora_B`), the optimizer state and one JSON
metadata string (`loraforge.checkpoint`) with the counters, schedule position, data order
position, RNG states, the LoRA config and the fingerprints of the base model and the training
data. Writes are atomic.

Optimizer state: torch's AdamW as its moments (`adam.m.<...>`, `adam.v.<...>`, float32) and
`adam_step`; any other optimizer (bitsandbytes' 8-bit AdamW) generically, each tensor of its
per-parameter state as `optim.<state name>.<...>` in its own dtype (uint8 stored as int8 bytes)
and the non-tensor entries (`step`) in the metadata's `optimizer` entry, with the optimizer's name.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from loraforge.atomic import atomic_path
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter, LoraConfig, lora_modules
from loraforge.train.optim import optimizer_name, same_state_layout

CHECKPOINT_TYPE = "loraforge-checkpoint"
STATE_KEY = "loraforge.checkpoint"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where training stands; everything needed to continue exactly."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # completed passes over the data
    epoch_pos: int = 0  # items of the current epoch's shuffled order already used
    samples_seen: int = 0
    tokens_seen: int = 0
    seed: int = 0
    n_items: int = 0  # samples (text) or rows (instruction data) per epoch
    data_fingerprint: str = ""
    base_fingerprint: str = ""
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    state: TrainState
    lora: LoraConfig
    tensors: dict[str, torch.Tensor]  # adapter tensors by "<module>.lora_A|B"
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]  # same keys -> (exp_avg, exp_avg_sq)
    adam_step: float
    rng: dict[str, str]  # base64 RNG states
    arch: str
    model_shape: dict[str, int]
    train_config: dict[str, Any]
    optimizer_name: str = "adamw_torch"
    optimizer_state: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> state (non-torch AdamW)


def _param_keys(model: nn.Module, name: str = "default") -> list[tuple[str, nn.Parameter]]:
    keys = []
    for module_name, m in lora_modules(model).items():
        if name in m.scaling:
            keys.append((module_name + ".lora_A", m.lora_A[name]))
            keys.append((module_name + ".lora_B", m.lora_B[name]))
    return keys


def rng_states() -> dict[str, str]:
    states = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        states["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return states


def restore_rng(states: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["torch"])), dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(states["cuda"])), dtype=torch.uint8))


def model_shape(cfg) -> dict[str, int]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size}


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, lora_cfg: LoraConfig,
                    state: TrainState, model_cfg, train_config: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a crash leaves the previous file intact)."""
    import gguf

    from loraforge.formats.gguf_file import verify_written_gguf

    with atomic_path(path, verify=verify_written_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=model_cfg.arch)
        writer.add_type(CHECKPOINT_TYPE)
        adam_step = 0.0
        optim_meta: dict[str, Any] = {"name": optimizer_name(optimizer), "scalars": {}, "dtypes": {}}
        for key, p in _param_keys(model):
            writer.add_tensor("lora." + key, p.detach().float().cpu().numpy())
            st = optimizer.state.get(p, {})
            if "exp_avg" in st:
                writer.add_tensor("adam.m." + key, st["exp_avg"].detach().float().cpu().numpy())
                writer.add_tensor("adam.v." + key, st["exp_avg_sq"].detach().float().cpu().numpy())
                adam_step = float(st["step"])
            else:
                _add_optimizer_state(writer, key, st, optim_meta)
        meta = {
            "version": FORMAT_VERSION,
            "state": asdict(state),
            "lora": lora_cfg.to_dict(),
            "adam_step": adam_step,
            "rng": rng_states(),
            "model_shape": model_shape(model_cfg),
            "train_config": train_config,
            "optimizer": optim_meta,
        }
        writer.add_string(STATE_KEY, json.dumps(meta))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _add_optimizer_state(writer, key: str, state: dict[str, Any], optim_meta: dict[str, Any]) -> None:
    """Write one parameter's optimizer state generically: tensors as `optim.<name>.<key>` in their
    dtype (uint8 as int8 bytes, the dtype noted in optim_meta), other values into optim_meta."""
    for state_name, value in state.items():
        if torch.is_tensor(value) and value.ndim > 0:
            array = value.detach().cpu().contiguous()
            tensor_name = f"optim.{state_name}.{key}"
            if array.dtype == torch.uint8:
                optim_meta["dtypes"][tensor_name] = "uint8"
                array = array.view(torch.int8)
            writer.add_tensor(tensor_name, array.numpy())
        else:
            value = value.item() if torch.is_tensor(value) else value
            optim_meta["scalars"].setdefault(key, {})[state_name] = value


_INT_FIELDS = ("iteration", "epoch", "epoch_pos", "samples_seen", "tokens_seen", "n_items")


def _damaged(path: str, where: str, problem: str) -> LoraforgeError:
    return file_error(path, f"damaged checkpoint metadata: {where} {problem}")


def _check_type(path: str, where: str, value: Any, kind: type | tuple[type, ...], expected: str) -> Any:
    """`value` if it is of `kind` (bools are not numbers here), else a one-line error naming the field."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float))):
        return value
    raise _damaged(path, where, f"is {type(value).__name__} {json.dumps(value)[:40]}, expected {expected}")


def _decode_rng(path: str, where: str, value: Any, n_bytes: int | None) -> None:
    _check_type(path, where, value, str, "a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise _damaged(path, where, "is not valid base64") from None
    if n_bytes is not None and len(raw) != n_bytes:
        raise _damaged(path, where, f"holds {len(raw)} bytes, a generator state has {n_bytes}")


def parse_checkpoint_metadata(path: str, text: str) -> dict[str, Any]:
    """The checkpoint's JSON metadata, every field checked for its type and range: a damaged or
    hand-edited checkpoint is a one-line error naming the file and the field."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise file_error(path, f"damaged checkpoint metadata (not JSON: {e})") from None
    _check_type(path, "the metadata", meta, dict, "an object")
    if meta.get("version") != FORMAT_VERSION:
        raise file_error(path, f"checkpoint format version {meta.get('version')} is not supported")
    state = _check_type(path, "state", meta.get("state"), dict, "an object")
    known = {f.name for f in fields(TrainState)}
    unknown = sorted(set(state) - known)
    if unknown:
        raise _damaged(path, f"state.{unknown[0]}", "is not a known field")
    for name in _INT_FIELDS:
        if name in state and _check_type(path, f"state.{name}", state[name], int, "an integer") < 0:
            raise _damaged(path, f"state.{name}", f"is {state[name]}, expected >= 0")
    if "seed" in state:
        _check_type(path, "state.seed", state["seed"], int, "an integer")
    for name in ("data_fingerprint", "base_fingerprint"):
        if name in state:
            _check_type(path, f"state.{name}", state[name], str, "a string")
    if "elapsed_s" in state:
        _check_type(path, "state.elapsed_s", state["elapsed_s"], (int, float), "a number")
    if "extra" in state:
        _check_type(path, "state.extra", state["extra"], dict, "an object")
    _check_type(path, "lora", meta.get("lora"), dict, "an object")
    _check_type(path, "adam_step", meta.get("adam_step", 0.0), (int, float), "a number")
    rng = _check_type(path, "rng", meta.get("rng"), dict, "an object")
    if "torch" not in rng:
        raise _damaged(path, "rng", "lacks the torch generator state")
    _decode_rng(path, "rng.torch", rng["torch"], torch.get_rng_state().numel())
    if "cuda" in rng:
        _decode_rng(path, "rng.cuda", rng["cuda"],
                    torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else None)
    shape = _check_type(path, "model_shape", meta.get("model_shape", {}), dict, "an object")
    for key, value in shape.items():
        _check_type(path, f"model_shape.{key}", value, int, "an integer")
    _check_type(path, "train_config", meta.get("train_config", {}), dict, "an object")
    return meta


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint; a damaged or foreign file is a one-line error."""
    import gguf

    from loraforge.formats.gguf import open_reader

    reader = open_reader(path)
    field_ = reader.fields.get(STATE_KEY)
    if field_ is None:
        raise file_error(path, "is a GGUF file but not a loraforge training checkpoint")
    if field_.types != [gguf.GGUFValueType.STRING]:
        raise _damaged(path, STATE_KEY, "is not a string")
    meta = parse_checkpoint_metadata(path, bytes(field_.parts[field_.data[0]]).decode("utf-8", errors="replace"))
    state = TrainState(**meta["state"])
    try:
        lora_cfg = LoraConfig.from_dict(meta["lora"])
    except (ValueError, KeyError, TypeError, AttributeError, LoraforgeError) as e:
        raise _damaged(path, "lora", f"is not a valid LoRA configuration ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    optim_meta = meta.get("optimizer") or {}
    optimizer_state: dict[str, dict[str, Any]] = {}
    for key, scalars in (optim_meta.get("scalars") or {}).items():
        optimizer_state.setdefault(key, {}).update(scalars)
    for t in reader.tensors:
        if t.name.startswith("optim."):  # optim.<state name>.<key>, in its own dtype
            state_name, _, key = t.name[6:].partition(".")
            value = torch.from_numpy(np.array(t.data))
            if (optim_meta.get("dtypes") or {}).get(t.name) == "uint8":
                value = value.view(torch.uint8)
            optimizer_state.setdefault(key, {})[state_name] = value
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise file_error(path, f"checkpoint tensor {t.name} has type {t.tensor_type.name}, expected F32")
        arr = torch.from_numpy(np.array(t.data, dtype=np.float32))
        if t.name.startswith("lora."):
            tensors[t.name[5:]] = arr
        elif t.name.startswith("adam.m."):
            m[t.name[7:]] = arr
        elif t.name.startswith("adam.v."):
            v[t.name[7:]] = arr
    moments = {k: (m[k], v[k]) for k in m if k in v}
    for key, (exp_avg, exp_avg_sq) in moments.items():
        want = tuple(tensors[key].shape) if key in tensors else None
        if tuple(exp_avg.shape) != want or tuple(exp_avg_sq.shape) != want:
            raise file_error(path, f"checkpoint optimizer moments of {key} do not match its LoRA tensor")
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", errors="replace") if arch_field else "llama"
    return Checkpoint(state, lora_cfg, tensors, moments, float(meta.get("adam_step", 0.0)), meta["rng"], arch,
                      meta.get("model_shape", {}), meta.get("train_config", {}),
                      optim_meta.get("name", "adamw_torch"), optimizer_state)


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, ckpt: Checkpoint) -> None:
    """Put the saved optimizer state back onto the model's adapter parameters."""
    current = optimizer_name(optimizer)
    if (ckpt.moments or ckpt.optimizer_state) and not same_state_layout(ckpt.optimizer_name, current):
        raise LoraforgeError(f"the checkpoint holds {ckpt.optimizer_name} optimizer state, this run uses {current}; "
                             f"resume with --optim {ckpt.optimizer_name}")
    if ckpt.optimizer_state:
        for key, p in _param_keys(model):
            if key not in ckpt.optimizer_state:
                raise LoraforgeError(f"checkpoint lacks optimizer state for {key}")
            optimizer.state[p] = {name: value.to(p.device).clone() if torch.is_tensor(value) else value
                                  for name, value in ckpt.optimizer_state[key].items()}
        return
    if not ckpt.moments:
        return
    for key, p in _param_keys(model):
        if key not in ckpt.moments:
            raise LoraforgeError(f"checkpoint lacks optimizer moments for {key}")
        exp_avg, exp_avg_sq = ckpt.moments[key]
        optimizer.state[p] = {
            "step": torch.tensor(ckpt.adam_step, dtype=torch.float32,
                                 device=p.device if getattr(optimizer, "defaults", {}).get("fused") else "cpu"),
            "exp_avg": exp_avg.to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype).clone(),
        }


def read_checkpoint_adapter(path: str) -> Adapter:
    """The adapter inside a training checkpoint (any adapter argument accepts checkpoints)."""
    ckpt = load_checkpoint(path)
    alpha_pattern = {}
    for key in ckpt.tensors:
        module = key.rpartition(".")[0]
        a = ckpt.lora.alpha_for(module)
        if a != ckpt.lora.alpha:
            alpha_pattern[module] = a
    return Adapter(tensors=dict(ckpt.tensors), alpha=ckpt.lora.alpha, use_rslora=ckpt.lora.use_rslora,
                   alpha_pattern=alpha_pattern, metadata={"source": "checkpoint", "arch": ckpt.arch})

"""NF4 (4-bit NormalFloat) weights with double-quantized scales, as in QLoRA / bitsandbytes.

Layout of one quantized matrix W (out, in), flattened row-major into n = out*in values:
  - blocks of 64 values share one scale `absmax` (the block's largest |w|);
  - each value is the index (0..15) of the nearest NF4 code to w / absmax; two codes per byte,
    the first value of a pair in the high nibble (as bitsandbytes packs them);
  - double quantization: absmax (n/64 fp32 values) minus their mean `offset` is quantized
    blockwise again, 256 scales per block, to 8 bits with bitsandbytes' signed dynamic map,
    each block keeping one fp32 scale `absmax2`.
Storage per weight: 4 bits + 8/64 bits + 32/(64*256) bits = 4.127 bits (about a quarter of bf16).

Dequantization: absmax = dynamic_map[qabsmax] * absmax2 + offset; w = NF4[code] * absmax,
computed in fp32 and cast to the compute dtype (bf16 on CUDA, fp32 on CPU).

The layout is bitsandbytes' own (`quantize_4bit(blocksize=64, quant_type="nf4",
compress_statistics=True)`): `packed` is its (ceil(n/2), 1) weight flattened, `qabsmax`,
`absmax2` and `offset` are its `QuantState.absmax`, `.state2.absmax` and `.offset`, and
values are scaled by the reciprocal of the block's absmax before rounding, as its CUDA kernel
does. So either side decodes the other's state bit for bit (`NF4Tensor.to_bnb_state`,
`NF4Tensor.from_bnb`). Backends (`NF4_BACKENDS`): "bnb" quantizes and multiplies with
bitsandbytes (`quantize_4bit`, `matmul_4bit`: its CUDA kernels), "torch" with the torch code
below (any device), "auto" picks bnb on CUDA when it is installed, torch otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraforgeError

NF4_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
QUANTIZE_TYPES = ("nf4",)
NF4_BACKENDS = ("auto", "bnb", "torch")

# The 16 NF4 values of the QLoRA paper (Appendix E), as bitsandbytes stores them (float32).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _cached(name: str, device: torch.device | str | None, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A small constant table, built once per device (dequantization runs every forward)."""
    key = (name, str(torch.device(device) if device is not None else torch.device("cpu")))
    table = _TABLES.get(key)
    if table is None:
        # built on the CPU outside any inference-mode or meta-device context, then moved
        with torch.inference_mode(False), torch.device("cpu"):
            table = _TABLES[key] = make().to(key[1])
    return table


# -- bitsandbytes ------------------------------------------------------------------------------------

@functools.cache
def bitsandbytes_available() -> bool:
    """True when bitsandbytes is installed and imports (`pip install loraforge[bnb]`)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a build without this platform's native library fails at import
        return False
    return True


def _bitsandbytes():
    if not bitsandbytes_available():
        raise LoraforgeError("the NF4 backend 'bnb' needs bitsandbytes: pip install 'loraforge[bnb]'")
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    return bitsandbytes


def check_backend(backend: str) -> str:
    if backend not in NF4_BACKENDS:
        raise LoraforgeError(f"NF4 backend must be one of {', '.join(NF4_BACKENDS)}, got {backend!r}")
    return backend


def use_bitsandbytes(backend: str, device: torch.device | str) -> bool:
    """Whether `backend` means bitsandbytes on `device` ("auto": on CUDA, when installed)."""
    if check_backend(backend) == "bnb":
        _bitsandbytes()  # a clear error when it is missing
        return True
    return backend == "auto" and torch.device(device).type == "cuda" and bitsandbytes_available()


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 codebook (16,) float32, ascending."""
    return _cached("nf4", device, lambda: torch.tensor(NF4_CODE, dtype=torch.float32))


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    return _cached("dynamic", device, _make_dynamic_map)


def _make_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256,) float32, ascending, in [-0.993, 1].

    Seven decades 10^-6 .. 10^0; decade i holds 2^i linearly spaced fractions (midpoints of
    linspace(0.1, 1, 2^i + 1)), with both signs; plus 0 and 1. Computed in float32 as
    bitsandbytes does, so the values match bit for bit.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = (10 ** (-6 + i)) * means
        values += decade.tolist() + (-decade).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value in the ascending codebook for each x; a tie goes to the lower
    code (x exactly on a midpoint), as bitsandbytes' `x > midpoint` decision tree does. uint8."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.contiguous(), midpoints, right=False).to(torch.uint8)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: (n_blocks, block)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)


def _reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """1 / absmax in float32 (bitsandbytes multiplies by it rather than dividing); 1 for an
    all-zero block, whose values all round to the code of 0."""
    return torch.where(absmax > 0, 1.0 / absmax, torch.ones_like(absmax))


def quantize_blockwise_8bit(x: torch.Tensor, block: int = ABSMAX_BLOCK_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 8-bit blockwise quantization of a 1-D float32 tensor (n,).

    Returns codes (n,) uint8 and per-block scales (ceil(n/block),) float32.
    """
    n = x.numel()
    blocks = _blocks(x.float(), block)
    scale = blocks.abs().amax(dim=1)
    codes = _nearest_code(blocks * _reciprocal(scale)[:, None], dynamic_map(x.device))
    return codes.reshape(-1)[:n], scale


def dequantize_blockwise_8bit(codes: torch.Tensor, scale: torch.Tensor,
                              block: int = ABSMAX_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: (n,) float32."""
    n = codes.numel()
    values = dynamic_map(codes.device)[codes.long()]
    values = _blocks(values, block) * scale[:, None]
    return values.reshape(-1)[:n]


class NF4Tensor:
    """The quantized state of one matrix (no autograd); see the module docstring.

    packed (ceil(n/2),) uint8; qabsmax (n_blocks,) uint8; absmax2 (ceil(n_blocks/256),)
    float32; offset () float32; shape (out, in).
    """

    def __init__(self, packed: torch.Tensor, qabsmax: torch.Tensor, absmax2: torch.Tensor,
                 offset: torch.Tensor, shape: tuple[int, int]) -> None:
        self.packed, self.qabsmax, self.absmax2, self.offset = packed, qabsmax, absmax2, offset
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor, backend: str = "auto") -> "NF4Tensor":
        """Quantize a float matrix (out, in) on its own device, with bitsandbytes or torch."""
        if use_bitsandbytes(backend, weight.device):
            return cls._quantize_bnb(weight)
        w = weight.detach().float()
        n = w.numel()
        blocks = _blocks(w, NF4_BLOCK_SIZE)  # (n_blocks, 64)
        absmax = blocks.abs().amax(dim=1)
        codes = _nearest_code(blocks * _reciprocal(absmax)[:, None], nf4_code(w.device)).view(-1)
        codes = codes[:n + n % 2].view(-1, 2)  # bitsandbytes keeps ceil(n / 2) bytes
        packed = (codes[:, 0] << 4) | codes[:, 1]
        offset = absmax.mean()
        qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset)
        return cls(packed.contiguous(), qabsmax, absmax2, offset, tuple(weight.shape))

    @classmethod
    def _quantize_bnb(cls, weight: torch.Tensor) -> "NF4Tensor":
        functional = _bitsandbytes().functional
        packed, state = functional.quantize_4bit(weight.detach().contiguous(), blocksize=NF4_BLOCK_SIZE,
                                                 compress_statistics=True, quant_type="nf4")
        return cls.from_bnb(packed, state)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, state: Any) -> "NF4Tensor":
        """From bitsandbytes' packed weight ((ceil(n/2), 1) uint8) and its nested NF4 QuantState."""
        if (state.quant_type != "nf4" or state.blocksize != NF4_BLOCK_SIZE or not state.nested
                or state.state2.blocksize != ABSMAX_BLOCK_SIZE):
            raise LoraforgeError("only bitsandbytes NF4 states with blocksize 64 and nested (double-quantized) "
                                 "absmax in blocks of 256 have this layout")
        return cls(packed.reshape(-1), state.absmax, state.state2.absmax.float(),
                   state.offset.float().reshape(()), tuple(state.shape))

    def to_bnb_state(self, dtype: torch.dtype = torch.float32) -> Any:
        """bitsandbytes' QuantState over this state's tensors (no copies); `dtype` is the dtype it
        dequantizes to. Use with `packed.view(-1, 1)` as the packed weight."""
        functional = _bitsandbytes().functional
        device = self.packed.device
        nested = functional.QuantState(absmax=self.absmax2, code=dynamic_map(device), blocksize=ABSMAX_BLOCK_SIZE,
                                       dtype=torch.float32)
        return functional.QuantState(absmax=self.qabsmax, shape=torch.Size(self.shape), code=nf4_code(device),
                                     blocksize=NF4_BLOCK_SIZE, quant_type="nf4", dtype=dtype, offset=self.offset,
                                     state2=nested)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def absmax(self) -> torch.Tensor:
        """The reconstructed per-block scales (n_blocks,) float32."""
        return dequantize_blockwise_8bit(self.qabsmax, self.absmax2) + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.qabsmax, self.absmax2, self.offset, self.shape, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.qabsmax, self.absmax2, self.offset))


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 values (high nibble, low nibble) of every byte."""
    def make() -> torch.Tensor:
        code = nf4_code()
        byte = torch.arange(256)
        return torch.stack((code[byte >> 4], code[byte & 15]), dim=1)

    return _cached("nf4_pairs", device, make)


def dequantize_nf4(packed: torch.Tensor, qabsmax: torch.Tensor, absmax2: torch.Tensor,
                   offset: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The matrix `shape` in `dtype` from packed NF4 codes and double-quantized scales."""
    n = shape[0] * shape[1]
    absmax = dequantize_blockwise_8bit(qabsmax, absmax2) + offset  # (n_blocks,) fp32
    values = F.embedding(packed.to(torch.int32), _pair_table(packed.device)).view(-1)  # (2 * bytes,)
    pad = (-values.numel()) % NF4_BLOCK_SIZE
    if pad:  # a last partial block (bitsandbytes stores ceil(n / 2) bytes)
        values = F.pad(values, (0, pad))
    values = values.view(-1, NF4_BLOCK_SIZE) * absmax[:, None]
    return values.view(-1)[:n].view(shape).to(dtype)


def _compute_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W decoded from NF4; gradient for x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "NF4Linear", bias: torch.Tensor | None) -> torch.Tensor:
        weight = module.dequantized_weight(x.dtype)
        # Only a reference to the module is kept: its buffers are resident, and saved-tensor
        # hooks (activation offload, checkpointing) must not copy them.
        ctx.module = module
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.module.dequantized_weight(grad_out.dtype)
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None


class NF4Linear(nn.Module):
    """Frozen linear layer over an NF4 weight (out_features, in_features), QLoRA style.

    Buffers: `packed` uint8 (2 codes a byte), `qabsmax` uint8, `absmax2` float32, `offset`
    float32, `bias` (out_features,) or None. forward: x (..., in_features) -> (..., out_features),
    computed in `compute_dtype` (bf16 on CUDA, fp32 on CPU; autocast's dtype when autocast is
    on) and returned in x's dtype, as bitsandbytes' Linear4bit does.
    """

    qtype = "nf4"
    _FP32_STATE = ("absmax2", "offset")

    def __init__(self, state: NF4Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend(backend)  # see NF4_BACKENDS
        self._bnb_states: dict[tuple, Any] = {}  # bitsandbytes QuantStates by (dtype, device)
        self.out_features, self.in_features = state.shape
        self.register_buffer("packed", state.packed)
        self.register_buffer("qabsmax", state.qabsmax)
        self.register_buffer("absmax2", state.absmax2)
        self.register_buffer("offset", state.offset)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise LoraforgeError(f"bias of shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias.detach().to(state.packed.device)
        self.register_buffer("bias", bias)
        self._compute_dtype = compute_dtype  # None: follow the device

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                    backend: str = "auto") -> "NF4Linear":
        """Quantize an nn.Linear (on its device); the dense weight is not kept."""
        return cls(NF4Tensor.quantize(linear.weight, backend), linear.bias, compute_dtype, backend)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype or _compute_dtype_for(self.packed.device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # Device moves apply to every buffer; a dtype cast (model.to(torch.bfloat16)) sets the
        # compute dtype but must not round the fp32 second-level scales.
        to32 = fn(torch.empty(0, dtype=torch.float32)).dtype
        to16 = fn(torch.empty(0, dtype=torch.float16)).dtype
        if to32 != torch.float32:
            self._compute_dtype = to32
        elif to16 != torch.float16:
            self._compute_dtype = to16
        kept = {name: self._buffers.pop(name) for name in self._FP32_STATE}
        super()._apply(fn, recurse)
        device = self.packed.device
        for name, value in kept.items():
            self._buffers[name] = value.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = self.compute_dtype
        # bitsandbytes' CPU kernels assume whole 64-weight blocks per row (every real model's rows)
        if self.in_features % NF4_BLOCK_SIZE == 0 and use_bitsandbytes(self.backend, x.device):
            bias = None if self.bias is None else self.bias.to(dtype)
            y = _bitsandbytes().matmul_4bit(x.to(dtype), self.packed.view(-1, 1).t(),
                                            quant_state=self.bnb_state(dtype), bias=bias)
        else:
            y = _NF4LinearFunction.apply(x.to(dtype), self, self.bias)
        return y.to(x.dtype)

    def bnb_state(self, dtype: torch.dtype) -> Any:
        """bitsandbytes' QuantState over this layer's buffers, decoding to `dtype` (cached)."""
        key = (dtype, self.packed.device, self.packed.data_ptr())
        state = self._bnb_states.get(key)
        if state is None:
            self._bnb_states.clear()  # buffers moved or were replaced
            state = self._bnb_states[key] = self.nf4_state().to_bnb_state(dtype)
        return state

    def nf4_state(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.qabsmax, self.absmax2, self.offset,
                         (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight (out_features, in_features), a fresh tensor."""
        return dequantize_nf4(self.packed, self.qabsmax, self.absmax2, self.offset,
                              (self.out_features, self.in_features), dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Decoded weight in the compute dtype, for reading (e.g. merging); writes are lost."""
        return self.dequantized_weight()

    def quantized_nbytes(self) -> int:
        """Bytes held for the weight (codes + scales), bias excluded."""
        return self.nf4_state().nbytes()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qtype=nf4, compute_dtype={self.compute_dtype}, "
                f"backend={self.backend}")


def quantize_model(model: nn.Module, quantize: str, compute_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> int:
    """Replace, in place, every nn.Linear inside the decoder layers (`model.layers.*`) by an
    NF4Linear; embeddings, the final norm and lm_head stay as they are. Returns how many.
    backend: see NF4_BACKENDS ("auto": bitsandbytes on CUDA when installed)."""
    if quantize not in QUANTIZE_TYPES:
        raise LoraforgeError(f"--quantize must be one of {', '.join(QUANTIZE_TYPES)}, got {quantize!r}")
    check_backend(backend)
    layers = model.get_submodule("model.layers")
    count = 0
    for name, module in list(layers.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = layers.get_submodule(parent_name) if parent_name else layers
        setattr(parent, child, NF4Linear.from_linear(module, compute_dtype, backend))
        count += 1
    return count


def nf4_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes the model's NF4 weights hold, bytes the same weights would take in bf16)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return (sum(m.quantized_nbytes() for m in layers),
            sum(2 * m.in_features * m.out_features for m in layers))

"""A frozen 4-bit NF4 linear layer: the base layer of QLoRA (Dettmers et al. 2023, §3).

The weight (O, I) is stored as NF4 codes plus their block scales (see `anita.quant.nf4`) in
buffers — never trainable parameters, so it gets no gradient and no optimizer state; gradients
flow to the input only (for FSDP2, which shards only parameters, `hold_as_parameters` makes the
codes and scales frozen parameters). Forward computes in `compute_dtype` (bf16 in the recipe)
either through bitsandbytes (`backend="bnb"`: its `matmul_4bit` on CPU; on CUDA its dequantization
into a reused buffer and cuBLAS, `anita.quant.matmul`) or by dequantizing in plain PyTorch and
calling `F.linear` (`backend="torch"`, the fallback where bitsandbytes is missing).
Modelled on bitsandbytes' `nn.Linear4bit` and torchtune's `FrozenNF4Linear`.

A `Linear4bit` holds `weight`, the packed codes (a buffer, so it moves with the model), and
`state`, the `NF4State` that dequantizes them (block scales, code book, double quantization); the
flag `is_loaded` says whether a weight is in. An empty layer is built on the meta device with only
the full-precision shape, waiting for `load_checkpoint_tensor("weight", w)`, which
`anita.model.checkpoint` calls while streaming a checkpoint, so a model loads straight into 4
bits. An empty layer's state_dict is exactly what a checkpoint provides: `weight` (O, I); a loaded
one's is `weight` plus the state's tensors as `weight_absmax`, `weight_code`, `weight_meta`, ...

Shape letters: B batch, T time, I in_features, O out_features, N = O·I weight elements.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from anita.dtypes import WEIGHT_DTYPES, parse_dtype
from anita.errors import AnitaError
from anita.quant.matmul import nf4_matmul
from anita.quant.nf4 import BLOCKSIZES, NF4State, dequantize_nf4, quantize_nf4

BACKENDS = ("bnb", "torch")
STATE_FIELDS = ("absmax", "code", "meta", "absmax_scale", "absmax_offset", "absmax_code")  # NF4State.to_tensors keys


@functools.cache
def import_bitsandbytes():
    """bitsandbytes, or None where it cannot be imported (not installed, or no native library)."""
    # Its CPU backend logs a warning at import about an optional kernel package anita never
    # uses (the `packing_format_for_cpu` path); silence just that logger while importing.
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_logger.level
    cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError):
        return None
    finally:
        cpu_logger.setLevel(level)
    return bitsandbytes


def resolve_backend(backend: str | None, in_features: int, blocksize: int) -> str:
    """"bnb" or "torch". None picks "bnb" when bitsandbytes imports and its CPU kernels are exact
    for this layer (see `Linear4bit.forward`), else "torch"."""
    if backend is None:
        usable = import_bitsandbytes() is not None and in_features % blocksize == 0
        return "bnb" if usable else "torch"
    if backend not in BACKENDS:
        raise AnitaError(f"backend {backend!r} is not supported; expected one of {BACKENDS} or None")
    if backend == "bnb" and import_bitsandbytes() is None:
        raise AnitaError("backend='bnb' needs bitsandbytes, which cannot be imported; use backend='torch'")
    return backend


def _needs_grad(x: torch.Tensor, add: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (add is not None and add.requires_grad))


def bnb_quant_state(s: NF4State, dtype: torch.dtype | None = None):
    """The same state as bitsandbytes' `QuantState` (it holds the same tensors under other names),
    dequantizing to `dtype` (default: the weight's original dtype)."""
    bnbf = import_bitsandbytes().functional
    state2 = None
    if s.double_quant:
        state2 = bnbf.QuantState(absmax=s.absmax_scale, code=s.absmax_code, blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(absmax=s.absmax, shape=torch.Size(s.shape), code=s.code, blocksize=s.blocksize,
                           quant_type="nf4", dtype=dtype or s.dtype, offset=s.absmax_offset, state2=state2)


class Linear4bit(nn.Module):
    """y = x Wᵀ with W (O, I) held in NF4; frozen, bias-free (Llama's linears have no bias)."""

    bias = None  # read by code that handles nn.Linear and Linear4bit alike

    def __init__(self, in_features: int, out_features: int, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, backend: str | None = None, device="meta"):
        super().__init__()
        if not (isinstance(in_features, int) and isinstance(out_features, int) and in_features > 0
                and out_features > 0):
            raise AnitaError(f"Linear4bit: in_features and out_features must be positive ints, "
                             f"got {in_features!r}, {out_features!r}")
        if blocksize not in BLOCKSIZES:
            raise AnitaError(f"Linear4bit: blocksize {blocksize!r} is not one of {BLOCKSIZES}")
        compute_dtype = parse_dtype(compute_dtype, WEIGHT_DTYPES, "Linear4bit compute_dtype")
        if device is not None and torch.device(device).type != "meta":
            raise AnitaError(f"Linear4bit(...) builds an empty layer on the meta device, not {device!r}; "
                             "use Linear4bit.from_linear(linear) or fill it with load_checkpoint_tensor")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        self.backend = resolve_backend(backend, in_features, blocksize)
        self.is_loaded = False  # set once a weight is quantized in
        self.state: NF4State | None = None  # what dequantizes `weight`, once loaded
        # The packed codes (ceil(O·I/2), 1) uint8 once loaded; until then a meta placeholder with
        # the shape a checkpoint's weight has.
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=compute_dtype, device="meta"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> "Linear4bit":
        """Quantize `linear`'s weight (on its device) into a new frozen 4-bit layer."""
        if not isinstance(linear, nn.Linear):
            raise AnitaError(f"Linear4bit.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise AnitaError("Linear4bit.from_linear: the linear has a bias; Linear4bit holds bias-free "
                             "linears only (as Llama's are)")
        module = cls(linear.in_features, linear.out_features, blocksize, double_quant, compute_dtype, backend)
        module.load_checkpoint_tensor("weight", linear.weight.detach())
        return module.train(linear.training)

    # ------------------------------------------------------------------------------ state
    def _set_quantized(self, packed: torch.Tensor, state: NF4State) -> None:
        self.weight = packed  # replaces the buffer (and the meta placeholder)
        self.state = state
        self.is_loaded = True

    def hold_as_parameters(self) -> None:
        """Hold the packed codes and the block scales as frozen parameters `weight` and `absmax`
        (FSDP2 shards parameters on dim 0 and leaves buffers whole: `anita.train.fsdp`); `state`
        keeps the small rest (code books, second-level scales). State-dict keys stay the same."""
        self._check_loaded()
        weight, absmax = self.weight, self.state.absmax
        del self._buffers["weight"]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.absmax = nn.Parameter(absmax, requires_grad=False)
        self.state = dataclasses.replace(self.state, absmax=None)  # one copy of the scales: the parameter

    def quant_state(self) -> NF4State:
        """`state`, with the block scales of the `absmax` parameter once `hold_as_parameters` ran
        (inside FSDP2's forward: the gathered, whole tensor)."""
        absmax = self._parameters.get("absmax")
        return self.state if absmax is None else dataclasses.replace(self.state, absmax=absmax)

    def _check_loaded(self) -> None:
        if not self.is_loaded:
            raise AnitaError(f"Linear4bit({self.in_features}, {self.out_features}): no weight loaded yet "
                             "(an empty meta layer; call load_checkpoint_tensor('weight', w) first)")

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Quantize a full-precision checkpoint tensor into this layer, on the tensor's device."""
        if name != "weight":
            raise AnitaError(f"Linear4bit has no tensor {name!r}: it holds only a bias-free 'weight'")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (self.out_features, self.in_features):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise AnitaError(f"Linear4bit: weight has shape {got}, expected "
                             f"({self.out_features}, {self.in_features}) (out_features, in_features)")
        packed, state = quantize_nf4(tensor, self.blocksize, self.double_quant)
        self._set_quantized(packed, state)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (O, I) as a dense tensor in `dtype` (default: compute_dtype), no gradient."""
        self._check_loaded()
        return dequantize_nf4(self.weight, self.quant_state(), dtype or self.compute_dtype)

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ (.., I) -> (.., O), plus `add` (.., O) when given (LoRA's update: `anita.lora.lean`)."""
        self._check_loaded()
        if x.shape[-1] != self.in_features:
            raise AnitaError(f"Linear4bit: input has {x.shape[-1]} features in its last dim, expected {self.in_features}")
        x_c = x.to(self.compute_dtype)
        if x.is_cuda and self.backend == "bnb" and _needs_grad(x, add):  # training: anita.quant.matmul
            add_c = add.to(self.compute_dtype) if add is not None else None
            return nf4_matmul(x_c, self, add_c).to(x.dtype)  # c + x Wᵀ, W dequantized into a reused buffer
        # no gradient (decoding, scoring, DPO's reference): bitsandbytes' own kernels (its 4-bit GEMV for a token)
        if self.backend == "torch":
            y = F.linear(x_c, self.dequantize())  # (..., I) @ (I, O) -> (..., O)
        else:
            y = self._bnb_matmul(x_c)  # (..., O)
        y = y.to(x.dtype)
        return y if add is None else y + add.to(y.dtype)

    def _bnb_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ through bitsandbytes' `matmul_4bit` (dequantize + matmul; gradients to x)."""
        if x.device.type == "cpu" and self.in_features % self.blocksize:
            # bitsandbytes 0.50's AVX-512 CPU dequantization indexes block scales per row, which
            # is wrong when a block spans two rows of W (I not a multiple of blocksize).
            raise AnitaError(f"Linear4bit: backend 'bnb' on CPU needs in_features ({self.in_features}) to be "
                             f"a multiple of blocksize ({self.blocksize}); use backend='torch' or another blocksize")
        return import_bitsandbytes().matmul_4bit(x, self.weight, quant_state=bnb_quant_state(self.quant_state()))

    def dequantize_for_matmul(self) -> torch.Tensor:
        """The weight (O, I) in compute_dtype, the fast way: bitsandbytes' kernel with backend "bnb"
        (about 30x faster than `dequantize` on CPU), `dequantize` otherwise. Both compute each value
        in fp32 and round it once, so they return the same bits (tests/quant/test_linear.py)."""
        self._check_loaded()
        if self.backend == "torch" or (self.weight.device.type == "cpu" and self.in_features % self.blocksize):
            return self.dequantize()  # (bitsandbytes' CPU kernel is wrong there: see `_bnb_matmul`)
        bnbf = import_bitsandbytes().functional
        return bnbf.dequantize_4bit(self.weight, bnb_quant_state(self.quant_state(), self.compute_dtype))

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The weight (O, I) written into `out` (compute dtype, on the weight's device): bitsandbytes' CUDA
        kernel writes it in place there (`anita.quant.matmul`'s reused buffer); elsewhere a copy."""
        if out.is_cuda and self.backend == "bnb":
            bnbf = import_bitsandbytes().functional
            return bnbf.dequantize_4bit(self.weight, bnb_quant_state(self.quant_state(), out.dtype), out=out)
        return out.copy_(self.dequantize_for_matmul())

    # ------------------------------------------------------------- moving, saving, loading
    def _apply(self, fn, recurse=True):
        """Move with the model but never cast: `model.to(torch.bfloat16)` must not round the scales.

        `Module.to`/`.cuda()`/`.half()` call `fn` on every buffer and cast only floating ones; the
        packed weight is uint8, so it is just moved, and the state follows it to its device.
        """
        super()._apply(fn, recurse)
        if self.is_loaded:
            self.state = self.state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """`weight`, and once loaded the state's tensors beside it (`weight_absmax`, ...)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "absmax", None)  # (held as a parameter) saved as weight_absmax below
        if self.is_loaded:
            for name, tensor in self.quant_state().to_tensors().items():
                destination[f"{prefix}weight_{name}"] = tensor

    def nbytes(self) -> int:
        """Bytes this layer holds: the packed codes and the tensors of their state (0 while empty)."""
        if not self.is_loaded:
            return 0
        s = self.quant_state()
        held = [self.weight, s.absmax, s.code, s.absmax_scale, s.absmax_offset, s.absmax_code]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept either a quantized state (from `state_dict()`) or a full-precision `weight`."""
        key = prefix + "weight"
        ours = {key} | {f"{key}_{f}" for f in STATE_FIELDS}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours
                               and "." not in k[len(prefix):])
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if weight.is_floating_point():
            self.load_checkpoint_tensor("weight", weight)
            return
        # Like nn.Module: copy into this layer's device, or take the tensors as they are with assign=True.
        device = weight.device if self.weight.is_meta else self.weight.device
        copy = not local_metadata.get("assign_to_params_buffers", False)
        tensors = {f: state_dict[f"{key}_{f}"].to(device, copy=copy) for f in STATE_FIELDS if f"{key}_{f}" in state_dict}
        state = NF4State.from_tensors(tensors, where=key)
        expected = ((self.out_features, self.in_features), self.blocksize, self.double_quant)
        if (state.shape, state.blocksize, state.double_quant) != expected:
            raise AnitaError(f"{key}: saved as shape {state.shape}, blocksize {state.blocksize}, double_quant "
                             f"{state.double_quant}; this layer expects {expected[0]}, {expected[1]}, {expected[2]}")
        state.validate(weight, where=key)
        self._set_quantized(weight.to(device, copy=copy), state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}, backend={self.backend!r}"
                + ("" if self.is_loaded else ", empty"))

"""NF4 (4-bit NormalFloat) quantization with double quantization, in plain PyTorch.

Reference: Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, *QLoRA: Efficient Finetuning of
Quantized LLMs* (arXiv 2305.14314), §3 "4-bit NormalFloat" and "Double Quantization"; the
8-bit dynamic code of the second level is from Dettmers 2016, *8-Bit Approximations for
Parallelism in Deep Learning* (arXiv 1511.04561). The bit layout (code book, nibble order,
absmax offset, block sizes, rounding) is that of bitsandbytes' `quantize_4bit(quant_type="nf4")`,
and the tests check the two agree bit for bit; this file is the readable version of it.

The recipe, for a weight with N elements:
1. flatten it and cut it into N/blocksize blocks; absmax = the largest |w| of each block;
2. scale each block into [-1, 1] and replace every value by the index (0..15) of the nearest
   value of the NF4 code book — 16 quantiles of a standard normal, normalised to [-1, 1];
3. pack two 4-bit indices per byte, the first element in the high nibble;
4. double quantization: store absmax itself in 8 bits — subtract its mean, cut it into blocks
   of 256, scale each block by its own absmax and round to bitsandbytes' 8-bit dynamic code.
Dequantization looks the codes up and multiplies by the (dequantized) absmax of their block.

Shape letters: N elements of the weight, N1 = ceil(N / blocksize) first-level blocks,
N2 = ceil(N1 / 256) second-level blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from anita.dtypes import WEIGHT_DTYPES, parse_dtype
from anita.errors import AnitaError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit
ABSMAX_BLOCKSIZE = 256  # block size of the second (8-bit) level of double quantization
DTYPE_IDS = {dtype: i for i, dtype in enumerate(WEIGHT_DTYPES)}  # how `meta` stores a dtype: fp32 0, bf16 1, fp16 2
CHUNK = 2**22  # elements quantized at a time: whole blocks of every size, an even count
# QLoRA's outermost quantile 1 - (1/32 + 1/30)/2 = 0.96770833..., written to 7 digits as
# bitsandbytes does; the unrounded value would move the code book by up to 3e-7.
NF4_OFFSET = 0.9677083


# ------------------------------------------------------------------------------ code books
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), normalised so the largest is 1 (QLoRA §3).

    Zero must be exact (padding and zero weights), so the two halves are built separately:
    8 quantiles of the positive side (probabilities from NF4_OFFSET down to 1/2, the last
    dropped) and 7 of the negative side, plus 0 — 16 values, one more positive than negative.
    """
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # (8,) Φ⁻¹(p)
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # (7,)
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return values / values.max()  # (16,) from -1 to 1


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers 2016): 256 sorted values in [-1, 1].

    A code is a sign bit, then a run of zero bits whose length e picks the decade 10^-e, an
    indicator bit, and the remaining bits a linear fraction in [0.1, 1]. Decade 10^-(6-i) thus
    gets 2^i evenly spaced values (bin midpoints of [0.1, 1]) per sign: 2·(1+2+...+64) = 254
    values, plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0  # (2^i,)
        values += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest value of the sorted `code` (at most 256 values) for each x.

    The nearest code's index is the number of midpoints between neighbouring codes that lie
    below x. A value exactly on a midpoint is not counted, so it goes to the lower code, as in
    bitsandbytes (whose `bucketize` over the midpoints computes the same thing).
    """
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint in ((code[:-1] + code[1:]) / 2).tolist():
        index += (x > midpoint).view(torch.uint8)  # the midpoints are fp32 values: exact comparison
    return index


# ----------------------------------------------------------------------- blockwise absmax
def blockwise_absmax_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat fp32 `x` (N,) into blocks; return (each block scaled into [-1, 1], absmax (N1,)).

    bitsandbytes multiplies the full blocks by 1/absmax but divides the last, partial block
    by its absmax; the two can differ in the last bit of fp32, so we do the same. An all-zero
    block keeps absmax 0 (its values scale to 0 via the 1e-38 floor).
    """
    N = x.numel()
    full = N - N % blocksize
    blocks = x[:full].view(-1, blocksize)  # (N // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (N // blocksize,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < N:
        tail_absmax = x[full:].abs().amax()
        tail = (x[full:] / tail_absmax.clamp(min=1e-38)).clamp(-1, 1)
        absmax = torch.cat([absmax, tail_absmax[None]])  # (N1,)
        scaled = torch.cat([scaled, tail])
    return scaled, absmax


@functools.lru_cache(maxsize=8)
def dynamic_code_grid(device: str) -> torch.Tensor:
    """(65536,) the dynamic-code index of each grid point g_i = -1 + 2i/65535 (a constant table)."""
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0  # (65536,)
    return nearest_code(grid, dynamic_code()).to(device)


def nearest_dynamic_code(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest dynamic-code value for each x in [-1, 1], the way bitsandbytes'
    CPU kernel rounds 8-bit blockwise quantization: through a 65536-point grid.

    x is first snapped to the nearest of 65536 evenly spaced points g_i = -1 + 2i/65535, and
    g_i is then given its nearest code (the lower one on a tie). The result is the nearest code
    except for values within half a grid step (1.5e-5) of a midpoint between two codes, which
    may land on the farther one; we reproduce that so the absmax codes match bit for bit.
    """
    grid_index = ((x.clamp(-1, 1) + 1) * 0.5 * 65535.0 + 0.5).long()  # round to the nearest point
    return dynamic_code_grid(str(x.device))[grid_index]


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization (QLoRA §3): absmax (N1,) fp32 -> (uint8 codes (N1,), scale (N2,), offset ()).

    absmax is all positive, so it is first centred on its mean (the 8-bit code is symmetric),
    then quantized blockwise, 256 per block, to the dynamic code: each value is multiplied by
    1/(its block's absmax) and rounded as `nearest_dynamic_code` does. A block whose values
    all equal the mean has scale 0; bitsandbytes stores code 0 for it, which dequantizes to
    0 · code + offset = offset, the right value.

    The mean is always taken on the CPU: a GPU sums in another order, and one ulp of offset
    changes scales and codes, so the same weight would get other bytes on another device.
    """
    offset = absmax.cpu().mean().to(absmax.device)
    x = absmax - offset
    N1 = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -N1 % ABSMAX_BLOCKSIZE)).view(-1, ABSMAX_BLOCKSIZE)  # (N2, 256)
    scale = blocks.abs().amax(dim=1)  # (N2,)
    normed = blocks * (1.0 / torch.where(scale > 0, scale, 1.0))[:, None]  # (N2, 256)
    codes = nearest_dynamic_code(normed)  # (N2, 256)
    codes = torch.where(scale[:, None] == 0, 0, codes).reshape(-1)[:N1].clone()  # (N1,), own storage
    return codes, scale, offset


def dequantize_absmax(state: "NF4State") -> torch.Tensor:
    """The first-level absmax (N1,) fp32: stored as is, or rebuilt from its 8-bit codes."""
    if not state.double_quant:
        return state.absmax.float()
    N1 = state.absmax.numel()
    values = state.absmax_code.to(state.absmax.device)[state.absmax.long()]  # (N1,)
    values = torch.nn.functional.pad(values, (0, -N1 % ABSMAX_BLOCKSIZE)).view(-1, ABSMAX_BLOCKSIZE)
    values = values * state.absmax_scale[:, None]  # (N2, 256)
    return values.reshape(-1)[:N1] + state.absmax_offset  # (N1,)
# ----------------------------------------------------------------------------------- state
@dataclass
class NF4State:
    """What `dequantize_nf4` needs besides the packed codes (bitsandbytes calls it QuantState).

    Without double quantization `absmax` is the fp32 scale of each block; with it, `absmax`
    holds 8-bit codes and the three `absmax_*` fields say how to decode them.
    """

    absmax: torch.Tensor  # (N1,) fp32 block scales, or (N1,) uint8 codes when double-quantized
    shape: tuple[int, ...]  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight: what dequantize_nf4 returns by default
    blocksize: int  # elements per first-level block, one of BLOCKSIZES
    code: torch.Tensor  # (16,) fp32 NF4 code book
    absmax_scale: torch.Tensor | None = None  # (N2,) fp32 absmax of each 256-block of (absmax - offset)
    absmax_offset: torch.Tensor | None = None  # () fp32 mean of the absmax values
    absmax_code: torch.Tensor | None = None  # (256,) fp32 dynamic code of the 8-bit absmax codes

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device) -> "NF4State":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4State(move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
                        move(self.absmax_scale), move(self.absmax_offset), move(self.absmax_code))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flatten to named tensors (for a state_dict); `meta` packs blocksize, dtype and shape."""
        meta = torch.tensor([self.blocksize, DTYPE_IDS[self.dtype], *self.shape], dtype=torch.int64)
        tensors = {"absmax": self.absmax, "code": self.code, "meta": meta.to(self.absmax.device)}
        if self.double_quant:
            tensors |= {"absmax_scale": self.absmax_scale, "absmax_offset": self.absmax_offset,
                        "absmax_code": self.absmax_code}
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str = "NF4State") -> "NF4State":
        """Rebuild from `to_tensors()` output, checking every field; errors name `where`.field."""
        for name in ("absmax", "code", "meta"):
            if not isinstance(tensors.get(name), torch.Tensor):
                raise AnitaError(f"{where}.{name}: missing")
        meta = tensors["meta"]
        if meta.dtype != torch.int64 or meta.dim() != 1 or meta.numel() < 3:
            raise AnitaError(f"{where}.meta: expected int64 [blocksize, dtype id, *shape], "
                             f"got {meta.dtype} of shape {tuple(meta.shape)}")
        blocksize, dtype_id, *shape = meta.tolist()
        dtype = {i: d for d, i in DTYPE_IDS.items()}.get(dtype_id)
        if dtype is None:
            raise AnitaError(f"{where}.meta: dtype id {dtype_id} is not one of {sorted(DTYPE_IDS.values())}")
        dq = [tensors.get(n) for n in ("absmax_scale", "absmax_offset", "absmax_code")]
        if any(t is not None for t in dq) and not all(isinstance(t, torch.Tensor) for t in dq):
            raise AnitaError(f"{where}: absmax_scale, absmax_offset and absmax_code must all be present "
                             "(double quantization) or all absent")
        state = cls(tensors["absmax"], tuple(shape), dtype, blocksize, tensors["code"], *dq)
        state.validate(where=where, check_values=True)
        return state

    def validate(self, packed: torch.Tensor | None = None, where: str = "NF4State",
                 check_values: bool = False) -> None:
        """Check shapes and dtypes (and, with `check_values`, the numbers); raise naming the field."""
        if self.blocksize not in BLOCKSIZES:
            raise AnitaError(f"{where}.blocksize: {self.blocksize} is not one of {BLOCKSIZES}")
        parse_dtype(self.dtype, WEIGHT_DTYPES, f"{where}.dtype")
        if not self.shape or any(not isinstance(d, int) or d <= 0 for d in self.shape):
            raise AnitaError(f"{where}.shape: {self.shape} must be non-empty with positive sizes")
        N1 = -(-self.numel // self.blocksize)
        expect = {"code": (torch.float32, 16),
                  "absmax": (torch.uint8 if self.double_quant else torch.float32, N1)}
        if self.double_quant:
            expect |= {"absmax_scale": (torch.float32, -(-N1 // ABSMAX_BLOCKSIZE)),
                       "absmax_offset": (torch.float32, 1), "absmax_code": (torch.float32, 256)}
        for name, (dtype, numel) in expect.items():
            t = getattr(self, name)
            if t.dtype != dtype or t.numel() != numel:
                raise AnitaError(f"{where}.{name}: expected {numel} {dtype} values for a {self.shape} weight "
                                 f"with blocksize {self.blocksize}, got {t.numel()} {t.dtype}")
            if check_values and not torch.isfinite(t.float()).all():
                raise AnitaError(f"{where}.{name}: contains NaN or inf")
        if check_values and not self.double_quant and (self.absmax < 0).any():
            raise AnitaError(f"{where}.absmax: block scales must be >= 0")
        if packed is not None and (packed.dtype != torch.uint8 or packed.numel() != -(-self.numel // 2)):
            raise AnitaError(f"{where}: packed weight must hold {-(-self.numel // 2)} uint8 values "
                             f"(two 4-bit codes per byte), got {packed.numel()} {packed.dtype}")


# ------------------------------------------------------------------------ quantize / dequantize
def check_weight(weight, blocksize: int, what: str = "weight") -> None:
    """Raise `AnitaError` unless `weight` is a non-empty fp32/bf16/fp16 tensor with data.

    (Finiteness is checked on the block absmax in `quantize_chunk`: NaN and inf propagate to it.)"""
    if not isinstance(weight, torch.Tensor):
        raise AnitaError(f"{what}: expected a torch.Tensor, got {type(weight).__name__}")
    if blocksize not in BLOCKSIZES:
        raise AnitaError(f"blocksize {blocksize!r} is not supported; expected one of {BLOCKSIZES}")
    parse_dtype(weight.dtype, WEIGHT_DTYPES, what)
    if weight.dim() == 0 or weight.numel() == 0:
        raise AnitaError(f"{what}: shape {tuple(weight.shape)} has no elements to quantize")
    if weight.is_meta:
        raise AnitaError(f"{what}: is on the meta device (shape only, no values to quantize)")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N,) codes in 0..15 (N even) -> (N/2, 1) uint8; element 2i in the high nibble, as bitsandbytes."""
    codes = codes.to(torch.uint8).view(-1, 2)  # (N/2, 2)
    return ((codes[:, 0] << 4) | codes[:, 1]).unsqueeze(1)  # (N/2, 1)


def unpack_nibbles(packed: torch.Tensor, N: int) -> torch.Tensor:
    """(ceil(N/2), 1) uint8 -> (N,) int32 codes, undoing `pack_nibbles`."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:N].int()  # (N,)


def quantize_chunk(x: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level NF4 of a flat chunk x (n,): (packed (ceil(n/2), 1) uint8, absmax (ceil(n/blocksize),))."""
    scaled, absmax = blockwise_absmax_scale(x.float(), blocksize)  # (n,), (n1,)
    if not torch.isfinite(absmax).all():  # NaN and inf reach the block absmax
        raise AnitaError("weight: contains NaN or inf, which NF4 cannot represent")
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad with 0.0 (code 7) to fill the last byte
    return pack_nibbles(nearest_code(scaled, code)), absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
                 ) -> tuple[torch.Tensor, NF4State]:
    """Quantize `weight` (any shape, N elements) to NF4: (packed (ceil(N/2), 1) uint8, state).

    Bit-exact with `bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`: same packed bytes, same absmax (or absmax codes).
    The weight is processed CHUNK elements at a time (whole blocks, whole bytes), which keeps
    the fp32 temporaries small when a large checkpoint tensor is quantized on load.
    """
    check_weight(weight, blocksize)
    flat = weight.detach().reshape(-1)  # (N,)
    code = nf4_code().to(flat.device)
    pieces = [quantize_chunk(flat[i:i + CHUNK], blocksize, code) for i in range(0, flat.numel(), CHUNK)]
    packed = torch.cat([p for p, _ in pieces])  # (ceil(N/2), 1)
    absmax = torch.cat([a for _, a in pieces])  # (N1,)
    state = NF4State(absmax, tuple(weight.shape), weight.dtype, blocksize, code)
    if double_quant:
        state.absmax, state.absmax_scale, state.absmax_offset = quantize_absmax(absmax)
        state.absmax_code = dynamic_code().to(flat.device)
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_nf4`: a tensor of `state.shape` in `dtype` (default: the original dtype).

    Each value is code[c] · absmax of its block, computed in fp32 and rounded once to `dtype`,
    as `bitsandbytes.functional.dequantize_4bit` does.
    """
    state.validate(packed)
    dtype = parse_dtype(dtype or state.dtype, WEIGHT_DTYPES, "dequantize_nf4")
    N, B = state.numel, state.blocksize
    absmax = dequantize_absmax(state)  # (N1,)
    values = state.code.to(packed.device).index_select(0, unpack_nibbles(packed, N))  # (N,) code values
    values = torch.nn.functional.pad(values, (0, -N % B)).view(-1, B) * absmax[:, None]  # (N1, B)
    return values.reshape(-1)[:N].view(state.shape).to(dtype)

"""anita.quant.nf4 (the plain-PyTorch NF4) against bitsandbytes, the independent reference:
code books, packed bytes, absmax codes and dequantized values, bit for bit, over every
blocksize bitsandbytes accepts, fp32/bf16/fp16 inputs, odd sizes and seeded random shapes; plus
hand-derived checks (the published code book, nibble packing, error bounds, state round trips)
and the error paths.

Only the tests that take the `bnbf` fixture need bitsandbytes (they skip without it); the
hand-derived ones run everywhere.

bitsandbytes' own CPU dequantization has one known defect (0.50, AVX-512 machines): when the
last dim is a multiple of 16 but not of the blocksize, its kernel takes block scales per row
and gets blocks that straddle two rows wrong. There we compare with bitsandbytes' pure-PyTorch
reference kernel instead (`bnb_dequantize` below); see also `Linear4bit._bnb_matmul`.
"""

import itertools
import math
import random

import pytest
import torch

from anita.errors import AnitaError
from anita.quant import NF4State, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4
from anita.quant.nf4 import dequantize_absmax

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional; the requesting test skips where bitsandbytes cannot be imported."""
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def no_dynamo():
    """bitsandbytes torch.compiles some CPU fallbacks; compiling per shape would dominate these tests."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_dequantize(bnbf, packed, qs):
    """bitsandbytes' dequantization of (packed, QuantState), flattened (it returns 1-D shapes as
    (1, N)). Its pure-PyTorch reference kernel where its AVX-512 kernel is wrong, and for N <= 2
    (one packed byte), where `dequantize_4bit` transposes its output and fails on 3-D shapes."""
    shape = tuple(qs.shape)
    straddles = len(shape) > 1 and shape[-1] % 16 == 0 and shape[-1] % qs.blocksize != 0
    if not straddles and packed.shape[0] > 1:
        return bnbf.dequantize_4bit(packed, qs).reshape(-1)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = bnbf.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, qs.blocksize, shape, qs.dtype).reshape(-1)


def assert_matches_bnb(bnbf, w, blocksize, double_quant):
    packed, state = quantize_nf4(w, blocksize, double_quant)
    P, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(packed, P), "packed bytes differ"
    assert torch.equal(state.absmax, qs.absmax), "absmax (codes) differ"
    if double_quant:
        assert torch.equal(state.absmax_scale, qs.state2.absmax)
        assert torch.equal(state.absmax_offset, qs.offset)
        assert torch.equal(state.absmax_code, qs.state2.code)
    out = dequantize_nf4(packed, state)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(out.reshape(-1), bnb_dequantize(bnbf, P, qs)), "dequantized values differ"


# ------------------------------------------------------------------------------ code books
# The NF4 table as QLoRA (Dettmers et al. 2023) lists it: the float32 literals of bitsandbytes'
# `get_4bit_type("nf4")`, written out so the check needs no bitsandbytes.
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_code_equals_the_published_table():
    """16 values, -1 … 1, exact zero at index 7, one more positive value than negative, equal
    in float32 to the published table."""
    code = nf4_code()
    assert code.dtype == torch.float32 and torch.equal(code, torch.tensor(NF4_TABLE))
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    assert (code.diff() > 0).all()


def test_nf4_code_equals_bitsandbytes_table(bnbf):
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))


def test_nf4_code_equals_create_normal_map(bnbf):
    """bitsandbytes' generator (scipy's norm.ppf), its 15 non-zero entries plus zero."""
    pytest.importorskip("scipy")
    assert torch.equal(nf4_code(), torch.unique(bnbf.create_normal_map()))


def test_dynamic_code_by_hand():
    """256 sorted values: 0, 1, and for decade 10^-(6-i) (i = 0..6) 2^i bin midpoints of [0.1, 1]
    per sign, e.g. the largest below 1 is 0.99296875 = (0.9859375 + 1)/2 (i = 6, 64 bins of 0.0140625)
    and the smallest positive 0.55e-6 = (0.1 + 1)/2 · 10^-6."""
    code = dynamic_code()
    assert code.numel() == 256 and code[-1] == 1 and (code == 0).sum() == 1 and (code.diff() > 0).all()
    assert torch.equal(code[code < 0].flip(0), -code[(code > 0) & (code < 1)])  # symmetric but for 1
    assert code[-2].item() == pytest.approx(0.99296875, rel=1e-7)
    assert code[code > 0].min().item() == pytest.approx(0.55e-6, rel=1e-6)
    assert (code > 0).sum() == 1 + 127 and (code < 0).sum() == 127


def test_dynamic_code_equals_bitsandbytes(bnbf):
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


# --------------------------------------------------------------------------- bit-exactness
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_bit_exact_with_bitsandbytes(bnbf, blocksize, dtype, double_quant):
    """A multiple of every blocksize (16·256 = 4096), a size with a partial last block (9100), and
    an odd size (the last byte padded with code 7, the code of 0.0); weights ~N(0, 0.02)."""
    gen = torch.Generator().manual_seed(blocksize)
    for shape in [(16, 256), (130, 70), (7, 33)]:
        w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        assert_matches_bnb(bnbf, w, blocksize, double_quant)


def test_bit_exact_with_more_than_256_blocks(bnbf):
    """Double quantization in several 256-blocks of absmax, the last one partial (1100 blocks)."""
    w = torch.randn(1100, 64, generator=torch.Generator().manual_seed(1)) * torch.rand(1100, 1) * 0.1
    assert_matches_bnb(bnbf, w, 64, True)


def test_bit_exact_on_zeros_and_constant_blocks(bnbf):
    """All-zero blocks keep absmax 0; equal absmax everywhere makes absmax - mean all zero,
    which bitsandbytes stores as code 0 with scale 0 (dequantizing to the mean)."""
    w = torch.zeros(8, 64)
    w[2:4] = 0.5
    assert_matches_bnb(bnbf, w, 64, True)
    assert_matches_bnb(bnbf, torch.full((4, 64), -0.25), 64, True)


def test_zero_and_constant_blocks_dequantize_exactly():
    """By hand, blocksize 64 (one block per row). A block of -0.25 has absmax 0.25 and scales to
    -1: code 0, exact; with double quantization every absmax equal makes absmax - mean = 0, so the
    mean comes back exactly. Zero rows with two rows of 0.5: zeros take code 7 (0.0) whatever their
    absmax, 0.5 scales to 1 (code 15), and the largest absmax - mean scales to 1, exact in the
    dynamic code, so 0.5 comes back exactly too. Packed: 0x00, 0x77 = 119, 0xFF = 255."""
    for double_quant in (True, False):
        w = torch.full((4, 64), -0.25)
        packed, state = quantize_nf4(w, 64, double_quant)
        assert packed.flatten().tolist() == [0] * 128
        assert torch.equal(dequantize_nf4(packed, state), w)
        w = torch.zeros(8, 64)
        w[2:4] = 0.5
        packed, state = quantize_nf4(w, 64, double_quant)
        assert packed.view(8, 32).tolist() == [[119] * 32] * 2 + [[255] * 32] * 2 + [[119] * 32] * 4
        assert torch.equal(dequantize_nf4(packed, state), w)


def test_bit_exact_when_quantized_in_several_chunks(bnbf, monkeypatch):
    """quantize_nf4 works CHUNK elements at a time; with CHUNK = 8192 a (101, 333) weight
    (33,633 elements: 5 chunks, the last odd and ending in a partial block) still matches."""
    from anita.quant import nf4

    monkeypatch.setattr(nf4, "CHUNK", 8192)
    w = torch.randn(101, 333, generator=torch.Generator().manual_seed(2))
    for blocksize in (64, 4096):
        assert_matches_bnb(bnbf, w, blocksize, True)


def _random_shape_cases():
    """Every (blocksize, dtype, double_quant) combination once (8·3·2 = 48 cases), each with a
    shape of 1-3 dims of 1-40 drawn from a fixed seed (every other one made of odd dims, so an
    odd element count whose last byte is padded), a weight seed and a scale log-uniform in
    [1e-3, 1e3]. Six cases get edge shapes instead: (1,) and (2,) (a single packed byte, where
    `bnb_dequantize` takes bitsandbytes' reference kernel), (3,), (1, 1, 1), (2, 1) and the
    largest, (40, 40, 40)."""
    rng = random.Random(2305_14314)
    edges = iter([(1,), (2,), (3,), (1, 1, 1), (2, 1), (40, 40, 40)])
    cases = []
    for i, (blocksize, dtype, double_quant) in enumerate(itertools.product(BLOCKSIZES, DTYPES, (True, False))):
        shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
        if i % 2:
            shape = tuple(d | 1 for d in shape)
        if i % 8 == 0:
            shape = next(edges)
        seed, scale = rng.randrange(2**16), 10 ** rng.uniform(-3, 3)
        name = f"{'x'.join(map(str, shape))}-b{blocksize}-{str(dtype)[6:]}-{'dq' if double_quant else 'nodq'}"
        cases.append(pytest.param(shape, blocksize, dtype, double_quant, seed, scale, id=name))
    return cases


@pytest.mark.parametrize("shape, blocksize, dtype, double_quant, seed, scale", _random_shape_cases())
def test_bit_exact_on_random_shapes(bnbf, shape, blocksize, dtype, double_quant, seed, scale):
    """Seeded, so every run tests the same 48 cases (the test ids name their shapes)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    assert_matches_bnb(bnbf, w.to(dtype), blocksize, double_quant)


# ----------------------------------------------------------------------------- by hand
def test_hand_derived_codes_and_packing():
    """One block, absmax 1, so scaled = w. Nearest NF4 codes: 0.5 lies below the midpoint
    (0.4407 + 0.5626)/2 = 0.5017 -> 12; -1 -> 0; 0.25 below (0.2461 + 0.3379)/2 = 0.2920 -> 10;
    1 -> 15. Packed high nibble first: 12<<4|0 = 192, 10<<4|15 = 175. Dequantized: the codes."""
    w = torch.tensor([0.5, -1.0, 0.25, 1.0])
    packed, state = quantize_nf4(w, blocksize=32, double_quant=False)
    assert packed.flatten().tolist() == [192, 175]
    assert state.absmax.tolist() == [1.0]
    code = nf4_code()
    assert torch.equal(dequantize_nf4(packed, state), code[[12, 0, 10, 15]])


def test_error_is_bounded_by_half_the_widest_code_gap():
    """NF4's widest gap is between -1 and -0.6962 (half-gap 0.1519), so with the exact absmax a
    value is off by at most 0.1519·absmax; double quantization adds the absmax's own error,
    which the 8-bit dynamic code keeps under 1% here: |w - ŵ| <= 0.1519·absmax + |Δabsmax|."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(w)
    absmax = w.view(-1, 64).abs().amax(1)  # (128,)
    absmax_error = (dequantize_absmax(state) - absmax).abs()
    assert (absmax_error <= 0.01 * absmax).all()
    err = (dequantize_nf4(packed, state) - w).abs().view(-1, 64).amax(1)
    assert (err <= 0.1519 * absmax + absmax_error + 1e-6).all()


def test_dequantize_to_another_dtype_rounds_once():
    """dtype=bf16 from an fp32 state equals the fp32 result rounded once."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(packed, state, torch.bfloat16), dequantize_nf4(packed, state).bfloat16())


# ------------------------------------------------------------------------------- state
def test_state_round_trips_through_tensors():
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(0)).bfloat16()
    for double_quant in (True, False):
        packed, state = quantize_nf4(w, 128, double_quant)
        tensors = state.to_tensors()
        assert set(tensors) == {"absmax", "code", "meta"} | (
            {"absmax_scale", "absmax_offset", "absmax_code"} if double_quant else set())
        back = NF4State.from_tensors(tensors)
        assert (back.shape, back.dtype, back.blocksize) == ((5, 70), torch.bfloat16, 128)
        assert torch.equal(dequantize_nf4(packed, back), dequantize_nf4(packed, state))


def _corrupt(field, value):
    packed, state = quantize_nf4(torch.randn(4, 96, generator=torch.Generator().manual_seed(0)))
    tensors = state.to_tensors()
    if value is None:
        del tensors[field]
    else:
        tensors[field] = value
    return tensors


@pytest.mark.parametrize("field, value, message", [
    ("absmax", torch.zeros(5, dtype=torch.uint8), "absmax: expected 6"),
    ("absmax", torch.zeros(6), "absmax: expected 6 torch.uint8"),
    ("absmax_scale", torch.tensor([float("nan")]), "absmax_scale: contains NaN"),
    ("absmax_offset", None, "must all be present"),
    ("code", torch.zeros(8), "code: expected 16"),
    ("meta", torch.tensor([64, 7, 4, 96]), "meta: dtype id 7"),
    ("meta", torch.tensor([48, 0, 4, 96]), "blocksize: 48"),
    ("meta", torch.tensor([64, 0, 4, 0]), "shape: (4, 0)"),
    ("meta", torch.tensor([64.0, 0.0, 4.0, 96.0]), "meta: expected int64"),
    ("meta", None, "meta: missing"),
])
def test_corrupted_state_names_the_field(field, value, message):
    with pytest.raises(AnitaError) as e:
        NF4State.from_tensors(_corrupt(field, value), where="layer.weight")
    assert "layer.weight" in str(e.value) and message in str(e.value)


def test_packed_of_the_wrong_size_is_refused():
    packed, state = quantize_nf4(torch.randn(4, 96))
    with pytest.raises(AnitaError, match="packed weight must hold 192 uint8"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(AnitaError, match="packed weight"):
        dequantize_nf4(packed.float(), state)
    with pytest.raises(AnitaError, match="dtype torch.int32 is not supported"):
        dequantize_nf4(packed, state, torch.int32)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("weight, blocksize, message", [
    (torch.randn(4, 64), 48, "blocksize 48 is not supported"),
    (torch.randn(4, 64), 8192, "blocksize 8192"),
    (torch.randn(4, 64).double(), 64, "dtype torch.float64 is not supported"),
    (torch.ones(4, 64, dtype=torch.int8), 64, "dtype torch.int8"),
    (torch.randn(0, 64), 64, "shape (0, 64) has no elements"),
    (torch.tensor(1.0), 64, "shape () has no elements"),
    (torch.tensor([1.0, float("nan")]), 64, "NaN or inf"),
    (torch.tensor([1.0, float("inf")]), 64, "NaN or inf"),
    (torch.empty(4, 64, device="meta"), 64, "meta device"),
    ([1.0, 2.0], 64, "expected a torch.Tensor"),
])
def test_bad_input_raises(weight, blocksize, message):
    with pytest.raises(AnitaError) as e:
        quantize_nf4(weight, blocksize)
    assert message in str(e.value)


def test_packed_size_and_bits():
    """N = 4·96 = 384 -> 192 bytes, 6 absmax codes of 1 byte, 1 scale and 1 offset of 4 bytes."""
    packed, state = quantize_nf4(torch.randn(4, 96))
    assert packed.shape == (192, 1) and packed.dtype == torch.uint8
    assert state.absmax.shape == (6,) and state.absmax_scale.shape == (1,)
    assert math.prod(state.shape) == 384 and state.double_quant

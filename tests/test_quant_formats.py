"""The compressed-tensors weight formats: error bounds of quantize -> dequantize per scheme,
the int packing against compressed-tensors' own functions, and the quantized linear layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bamba.quant.formats import (
    FP8,
    QuantScheme,
    dequantize,
    make_scheme,
    pack_ints,
    quantize,
    unpack_ints,
)
from bamba.quant.linear import QuantizedLinear

SCHEMES = [QuantScheme("fp8"), QuantScheme("int8"), QuantScheme("int8", 64),
           QuantScheme("int4", 32), QuantScheme("int4", 128), QuantScheme("int4"),
           QuantScheme("int4", 32, symmetric=False), QuantScheme("int8", symmetric=False)]


def _weight(n: int = 48, k: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.2
    w[3, 17] = 1.5  # an outlier in one group
    return w.to(dtype)


def _groups(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    g = w.shape[1] if scheme.group_size is None else scheme.group_size
    return w.reshape(w.shape[0], -1, g)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantize_dequantize_error_is_within_the_format_rounding(scheme):
    w = _weight()
    tensors = quantize(w, scheme)
    back = dequantize(tensors, scheme, torch.float32)
    absmax = _groups(w, scheme).abs().amax(-1, keepdim=True)
    err = _groups(back - w, scheme).abs()
    if not scheme.symmetric:  # the range [min, max] widened to hold 0, in 2^b - 1 steps
        groups = _groups(w, scheme)
        step = (groups.amax(-1, keepdim=True).clamp(min=0) -
                groups.amin(-1, keepdim=True).clamp(max=0)) / (2 ** scheme.bits - 1)
        assert (err <= step * 1.0001 + 1e-7).all()  # the rounded zero point may clamp an end
        assert err.mean() < (step / 4).mean()  # most round to nearest
    elif scheme.packed:
        step = absmax / ((2 ** scheme.bits - 1) / 2)
        assert (err <= step / 2 * 1.0001 + 1e-7).all()  # round to nearest, +absmax clamps by half a step
    else:  # e4m3: 3 mantissa bits, relative error <= 2^-4 above the subnormals
        scale = absmax / 448
        assert (err <= _groups(w, scheme).abs() * 2 ** -4 + scale * 2 ** -9 + 1e-7).all()
    assert not torch.equal(back, w)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_tensors_have_the_compressed_tensors_names_shapes_and_dtypes(scheme):
    w = _weight(dtype=torch.bfloat16)
    tensors = quantize(w, scheme)
    groups = 1 if scheme.group_size is None else 256 // scheme.group_size
    assert tensors["weight_scale"].shape == (48, groups)
    assert tensors["weight_scale"].dtype == torch.bfloat16
    if not scheme.symmetric:  # the zero points packed down the columns, as compressed-tensors
        assert tensors.pop("weight_zero_point").shape == (48 * scheme.bits // 32, groups)
    if scheme.packed:
        assert set(tensors) == {"weight_packed", "weight_shape", "weight_scale"}
        assert tensors["weight_packed"].dtype == torch.int32
        assert tensors["weight_packed"].shape == (48, 256 * scheme.bits // 32)
        assert tensors["weight_shape"].tolist() == [48, 256]
        assert tensors["weight_shape"].dtype == torch.int64
    else:
        assert set(tensors) == {"weight", "weight_scale"}
        assert tensors["weight"].dtype == FP8 and tensors["weight"].shape == (48, 256)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 40, 7])
def test_pack_unpack_round_trip_and_equal_to_compressed_tensors(bits, k):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    low = -(1 << (bits - 1))
    q = torch.randint(low, -low, (5, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_ints(q, bits)
    assert torch.equal(unpack_ints(packed, bits, k), q)
    assert torch.equal(packed, ct.pack_to_int32(q, bits))
    assert torch.equal(ct.unpack_from_int32(packed, bits, torch.Size((5, k))), q)


@pytest.mark.parametrize("bits", [6, 5])
def test_values_held_in_fewer_bits_round_trip_in_the_blocks_byte_order(bits) -> None:
    """pack_six_bits / pack_five_bits are their unpacks' inverses over every value, 3 / 5 bytes
    of 4 / 8 values, and lay the values out as GGUF's Q6_K / Q5_K blocks do: input 0's low
    nibble first, its high bits in the run's last bytes."""
    from bamba.quant.formats import (pack_five_bits, pack_six_bits, unpack_five_bits,
                                     unpack_six_bits)

    pack, unpack = (pack_six_bits, unpack_six_bits) if bits == 6 else \
        (pack_five_bits, unpack_five_bits)
    centre = 1 << (bits - 1)
    q = torch.randint(-centre, centre, (3, 512), dtype=torch.int8)
    q[0, :2 * centre] = torch.arange(-centre, centre)
    packed = pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 512 * bits // 8)
    assert torch.equal(unpack(packed, 512), q)
    one = torch.full((1, 256), -centre, dtype=torch.int8)
    one[0, 0] = centre - 1  # u = 2^bits - 1 at input 0: its nibble, then its high bits
    first = pack(one)[0]
    run = 96 if bits == 6 else 160
    assert first[0] == 15 and first[run - 32] == (3 if bits == 6 else 1)
    assert first[1:run - 32].eq(0).all()


def test_int4_nibble_order_is_low_nibble_first():
    q = torch.tensor([[1, -2, 3, -8, 7, 0, -1, 2]], dtype=torch.int8)
    raw = pack_ints(q, 4).view(torch.uint8)[0].tolist()  # little-endian bytes
    assert raw == [(1 + 8) | (6 << 4), (3 + 8) | (0 << 4), 15 | (8 << 4), 7 | (10 << 4)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantize_and_dequantize_equal_compressed_tensors(scheme):
    """Same scales and values as compressed-tensors' min-max observer math + quantize, and the
    same dense weight back from its dequantize (float32 weights: no rounding order differs)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    w = _weight()
    args = QuantizationArgs(num_bits=scheme.bits, type="int" if scheme.packed else "float",
                            symmetric=scheme.symmetric, strategy="channel" if
                            scheme.group_size is None else "group", group_size=scheme.group_size)
    groups = _groups(w, scheme)
    ct_scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    ours = quantize(w, scheme)
    assert torch.equal(ours["weight_scale"], ct_scale)
    if not scheme.symmetric:
        zero = zero.round().to(torch.int8)  # as its observers store them
        assert torch.equal(ours["weight_zero_point"], pack_to_int32(zero, scheme.bits, 0))
    values = ct_quantize(w, ct_scale, zero, args, dtype=torch.int8 if scheme.packed else FP8)
    if scheme.packed:
        assert torch.equal(unpack_ints(ours["weight_packed"], scheme.bits, w.shape[1]), values)
    else:
        assert torch.equal(ours["weight"].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(dequantize(ours, scheme, torch.float32),
                       ct_dequantize(values, ct_scale, None if scheme.symmetric else zero, args,
                                     torch.float32))


def test_zero_rows_get_a_nonzero_scale_and_dequantize_to_zero():
    w = _weight()
    w[5] = 0
    for scheme in SCHEMES:
        tensors = quantize(w, scheme)
        assert (tensors["weight_scale"] > 0).all()
        assert (dequantize(tensors, scheme, torch.float32)[5] == 0).all()


def test_bad_schemes_and_group_sizes_are_value_errors():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        make_scheme("int3")
    with pytest.raises(ValueError, match="group size 96 does not divide in_features 256"):
        quantize(_weight(), QuantScheme("int4", 96))
    with pytest.raises(ValueError, match="fp8 weights are symmetric"):
        make_scheme("fp8", symmetric=False)


def test_a_k_table_holds_two_level_scales_and_offsets_as_the_blocks_do():
    """A K table (GGUF Q4_K / Q5_K) gives scale d * sc and offset centre * scale - dmin * m per
    group of 32, each super-block of 256 inputs its own d and dmin; Q6_K's (one half, signed
    sc per 16) scale d * sc alone; only int8 / int4 in groups of 32 with offsets and int8 in
    groups of 16 without take one."""
    from bamba.quant.formats import k_table, k_table_values

    d, dmin = torch.tensor([[0.5, 0.25]]), torch.tensor([[0.125, 2.0]])
    sc, m = torch.arange(16).reshape(1, 16), torch.arange(16, 32).reshape(1, 16)
    table = k_table(d, sc, dmin, m)
    assert table.dtype == torch.uint8 and table.shape == (1, 2, 4 * 2 + 16)
    supers = torch.tensor([0] * 8 + [1] * 8)
    for name, centre in (("int4", 8.0), ("int8", 0.0)):
        scheme = make_scheme(name, 32, symmetric=False, offsets=True, two_level=True)
        scale, offset = k_table_values(table, 512, scheme)
        torch.testing.assert_close(scale, d[:, supers] * sc.float(), rtol=0, atol=0)
        torch.testing.assert_close(offset, centre * scale - dmin[:, supers] * m.float(),
                                   rtol=0, atol=0)
    sc = torch.tensor([[-128, -1, 0, 1, 127] + [5] * 27])
    table = k_table(torch.tensor([[0.5, -0.25]]), sc)
    assert table.shape == (1, 1, 4 * 2 + 32)
    scale, offset = k_table_values(table, 512, make_scheme("int8", 16, two_level=True))
    assert offset is None
    torch.testing.assert_close(scale, torch.tensor([[0.5] * 16 + [-0.25] * 16]) * sc.float(),
                               rtol=0, atol=0)
    for bad in (dict(name="int4", group_size=32, symmetric=True),
                dict(name="int4", group_size=64, symmetric=False, offsets=True),
                dict(name="int4", group_size=16), dict(name="fp8", group_size=32)):
        with pytest.raises(ValueError, match="two-level scales are GGUF's K-quants'"):
            make_scheme(**bad, two_level=True)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantized_linear_matches_its_dequantized_weight_and_keeps_no_dense_copy(scheme):
    dense = nn.Linear(256, 48, bias=True).to(torch.bfloat16)
    layer = QuantizedLinear.from_linear(dense, scheme)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(torch.bfloat16), dense.bias)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        rel = ((layer(x) - dense(x)).float().norm() / dense(x).float().norm()).item()
    assert rel < {"fp8": 0.05, "int8": 0.02, "int4": 0.15}[scheme.name]
    names = set(layer.state_dict())
    assert names == set(scheme.tensor_names()) | {"bias"}
    dense_bytes = 48 * 256 * 2
    held = sum(t.nbytes for t in layer.state_dict().values() if t.dim() == 2)
    zero_points = 0 if scheme.symmetric else 48 * 8 * scheme.bits // 8
    assert held <= dense_bytes * scheme.bits / 16 + 48 * 8 * 2 + zero_points
    kw = layer.kernel_weights()
    assert kw.weight is (layer.weight_packed if scheme.packed else layer.weight)
    assert kw.format == scheme.name
    if scheme.symmetric:
        assert kw.scales is layer.weight_scale
        return
    # asymmetric: a float32 table [48, 2, groups] of the scales and offsets -zp * scale, made
    # once
    scale = layer.weight_scale.float()
    assert kw.scales.shape == (48, 2, scale.shape[1]) and kw.scales.dtype == torch.float32
    assert torch.equal(kw.scales[:, 0], scale)
    assert layer.kernel_weights().scales is kw.scales
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # new scales: a new table
    assert torch.equal(layer.kernel_weights().scales[:, 0], 2 * scale)


def test_module_casts_keep_the_fp8_weight():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 8), QuantScheme("fp8"))
    before = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8),
                                                     before.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.bfloat16


def test_quantized_linear_loads_its_own_state_dict():
    scheme = QuantScheme("int4", 32)
    src = QuantizedLinear.from_linear(nn.Linear(64, 16, bias=False), scheme)
    dst = QuantizedLinear(64, 16, scheme, scale_dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(dst(x), src(x))

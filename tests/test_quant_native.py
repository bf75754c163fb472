"""The native kernels over quantized linears (fp8, int8, int4) against the torch reference
(``QuantizedLinear.forward``): the few-row kernel and the prefill tiles, the quantized
embedding's lookup, the layer and model decode steps of quantized models (dense lm_head,
formats mixed per layer), and the torch path for what the kernels do not take."""

import copy

import pytest
import torch
from torch import nn

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, decode_ops, dispatch, plan, quant_ops, seam
from bamba.quant.apply import quantize_model
from bamba.quant.embedding import QuantizedEmbedding
from bamba.quant.formats import (int8_activations, make_scheme, pack_five_bits, pack_ints,
                                 pack_six_bits)
from bamba.quant.linear import QuantizedLinear

pytestmark = pytest.mark.skipif(
    not dispatch.linear_available(torch.bfloat16) or
    not all(quant_ops.format_supported(code, 128, 128) for code in (1, 2, 3)),  # fp8, int8, int4
    reason="the quantized kernels need AVX-512 BF16 (and VBMI for fp8/int8) and a C compiler")

GROUPS = [32, 64, 128, None]  # None: one scale per output channel
ASYMMETRIC = ["int8-asym", "int4-asym"]  # zero points: w = (q - zp) * scale


def _scheme(fmt: str, group: int | None):
    """``fmt`` a scheme name, "-asym" for zero points."""
    return make_scheme(fmt.removesuffix("-asym"), group, symmetric=not fmt.endswith("-asym"))


def _layer(fmt: str, group: int | None, bias: bool, dtype: torch.dtype, k: int = 256,
           n: int = 88) -> QuantizedLinear:
    dense = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        dense.weight.normal_(0, 0.05)
        dense.weight.add_(torch.linspace(-0.05, 0.1, n)[:, None])  # skewed rows: zero points
        if bias:
            dense.bias.uniform_(-0.5, 0.5)
    return QuantizedLinear.from_linear(dense, _scheme(fmt, group))


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Within ``tol`` of the reference's largest magnitude (float32 x is rounded to bf16 by the
    few-row kernel; bf16 outputs round once more)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} vs {tol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4", *ASYMMETRIC])
def test_native_linear_equals_the_reference(monkeypatch, bf16_activations, fmt, group, bias,
                                            dtype) -> None:
    """With the activations as they are (int8 activations off), every row count: at 40 rows
    dequantized tiles, but fp8 against bf16 x in bf16 products."""
    reference = _layer(fmt, group, bias, dtype)
    native = accelerate(copy.deepcopy(nn.Sequential(reference)))[0]
    assert type(native) is seam.QuantizedLinear
    calls = {"rows": 0, "tiles": 0}
    for name in calls:
        real = getattr(quant_ops, f"quant_linear_{name}")
        monkeypatch.setattr(quant_ops, f"quant_linear_{name}",
                            lambda *a, _real=real, _name=name, **k:
                            calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
    for rows in (1, 3, 8, 40):
        x = torch.randn(rows, 256, dtype=dtype)
        with torch.inference_mode():
            ours, ref = native(x), reference(x)
        tight = rows > dispatch.MAX_LINEAR_ROWS and dtype == torch.float32
        _close(ours, ref, 1e-5 if tight else 1.5e-2)
    assert calls == {"rows": 3, "tiles": 0 if fmt == "fp8" and dtype == torch.bfloat16 else 1}


@pytest.fixture
def bf16_activations():
    """The few-row kernels with bf16 activations for one test, int8 ones again after it."""
    quant_ops.set_int8_activations(False)
    yield
    quant_ops.set_int8_activations(True)


@pytest.mark.parametrize("k", [384, 1152])  # int4 at one row: four weight rows at a time, one
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fmt", ["int8", "int4", *ASYMMETRIC])
def test_int_weights_at_few_rows_take_int8_activations(fmt, group, dtype, k) -> None:
    """With int8 activations (where the CPU has VNNI) the few-row kernel computes exactly, up
    to float32 summation order, x quantized per 32 inputs against the dequantized weight at
    every row count it takes (1 to 8)."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: the kernels keep bf16 activations")
    layer = _layer(fmt, group, True, dtype, k=k)  # 3 or 9 chunks of 128 inputs
    layout = quant_ops.quant_layout(layer.kernel_weights(), k)
    for rows in range(1, 9):
        x = (torch.randn(rows, k) * torch.logspace(-2, 1, k)).to(dtype)  # uneven blocks
        with torch.inference_mode():
            ours = quant_ops.quant_linear_rows(x, layout, layer.bias, False)
        seen = int8_activations(x)
        want = torch.nn.functional.linear(seen, layer.dequantized_weight(torch.float32),
                                          layer.bias.float()).to(dtype)
        # bf16 outputs: one bf16 step of the largest (float32 sums in another order round to
        # either neighbour)
        _close(ours, want, 1e-5 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,group", [*((f, g) for f in ("int8", "int4", *ASYMMETRIC)
                                        for g in GROUPS), ("int8", 16), ("int4", 16)])
def test_int_weights_at_many_rows_take_integer_products(monkeypatch, fmt, group, dtype) -> None:
    """Past the few-row kernel (prefill), int8 and int4 weights meet the same int8 activations
    in a matrix product of integer dot products (quant_gemm.h), never a dequantized tile: x
    quantized per 32 inputs against the dequantized weight, up to float32 summation order, for
    row counts that fill 16-row blocks and 48-row tiles or not, and past the 512 rows packed at
    a time. Symmetric groups of 16 (GGUF's Q6_K) split each block of 32 in two sums."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: prefill dequantizes tiles")
    monkeypatch.setattr(quant_ops, "quant_linear_tiles", lambda *a, **k: pytest.fail("tile"))
    layer = _layer(fmt, group, True, dtype, k=384, n=92)  # 92 outputs: 23 groups of 4, 2 threads
    layout = quant_ops.quant_layout(layer.kernel_weights(), 384)
    weight = layer.dequantized_weight(torch.float32)
    for rows in (9, 16, 47, 48, 50, 530):
        x = (torch.randn(rows, 384) * torch.logspace(-2, 1, 384)).to(dtype)  # uneven blocks
        with torch.inference_mode():
            ours = quant_ops.quant_linear_many(x, layout, layer.bias)
        want = torch.nn.functional.linear(int8_activations(x), weight, layer.bias.float())
        _close(ours, want.to(dtype), 1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("fmt", ASYMMETRIC)
def test_zero_points_leave_the_few_row_kernel_the_reference_at_any_row_count(bf16_activations, fmt,
                                                                               group) -> None:
    """The zero points' terms go 16 rows at a time: with bf16 activations the few-row kernel
    (a decode step's, whatever its rows) gives the reference's numbers past 16 rows too."""
    layer = _layer(fmt, group, True, torch.float32, k=384, n=60)
    layout = quant_ops.quant_layout(layer.kernel_weights(), 384)
    assert layout.offsets
    weight = layer.dequantized_weight(torch.float32)
    for rows in (1, 5, 17, 33):
        x = torch.randn(rows, 384)
        with torch.inference_mode():
            ours = quant_ops.quant_linear_rows(x, layout, layer.bias, False)
        _close(ours, torch.nn.functional.linear(x.bfloat16().float(), weight, layer.bias), 1e-5)


@pytest.mark.parametrize("group", [32, 128, None])
def test_fp8_weights_at_many_rows_take_bf16_products(monkeypatch, group) -> None:
    """Past the few-row kernel, fp8 weights against bf16 x are dequantized a panel at a time to
    the very bf16 weights of the torch reference and multiplied in bf16 products (float32
    sums), never a dense tile: the reference's numbers up to summation order and bf16 output
    rounding."""
    monkeypatch.setattr(quant_ops, "quant_linear_tiles", lambda *a, **k: pytest.fail("tile"))
    layer = _layer("fp8", group, True, torch.bfloat16, k=384, n=92)
    layout = quant_ops.quant_layout(layer.kernel_weights(), 384)
    weight = layer.dequantized_weight(torch.bfloat16).float()
    for rows in (9, 16, 47, 50, 530):
        x = (torch.randn(rows, 384) * torch.logspace(-2, 1, 384)).bfloat16()
        with torch.inference_mode():
            ours = quant_ops.quant_linear_many(x, layout, layer.bias)
        want = torch.nn.functional.linear(x.float(), weight, layer.bias.float())
        _close(ours, want.bfloat16(), 8e-3)


def test_many_rows_that_the_products_do_not_take_dequantize_tiles(monkeypatch) -> None:
    """fp8 against float32 x, zero points in groups of 16 inputs (not whole blocks of 32),
    output counts that are not a multiple of 4 and int8 activations switched off all go to the
    dequantized tiles (the activations as they are: the reference's numbers)."""
    calls = []
    real = quant_ops.quant_linear_tiles
    monkeypatch.setattr(quant_ops, "quant_linear_tiles",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [("fp8", None, 88, True), ("int8-asym", 16, 88, True), ("int4", 128, 90, True),
             ("int4", 128, 88, False)]
    for fmt, group, n, int8_on in cases:
        layer = _layer(fmt, group, False, torch.float32, n=n)
        layout = quant_ops.quant_layout(layer.kernel_weights(), 256)
        x = torch.randn(40, 256)
        quant_ops.set_int8_activations(int8_on)
        try:
            with torch.inference_mode():
                ours = quant_ops.quant_linear_many(x, layout, None)
        finally:
            quant_ops.set_int8_activations(True)
        _close(ours, layer(x), 1e-5)
    assert len(calls) == len(cases)


def _assert_rows_do_not_depend_on_their_call(layout: quant_ops.QuantLayout,
                                             bias: torch.Tensor | None,
                                             dtype: torch.dtype = torch.float32) -> None:
    """Every row's outputs at 1 to 8 rows a call, on one thread or two (other shares of the
    weight rows, other tiles), are bit for bit its outputs among 8 rows: a request's numbers do
    not depend on the batch it decodes in."""
    x = (torch.randn(8, layout.k) * torch.logspace(-2, 1, layout.k)).to(dtype)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            every = quant_ops.quant_linear_rows(x, layout, bias, False)
            for count in (1, 2):
                torch.set_num_threads(count)
                for rows in range(1, 9):
                    for first in {0, 8 - rows}:
                        ours = quant_ops.quant_linear_rows(x[first:first + rows], layout, bias,
                                                           False)
                        assert torch.equal(ours, every[first:first + rows]), (rows, first, count)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k", [384, 1152])  # int4 at one row: four weight rows at a time, one
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fmt", ["int8", "int4", *ASYMMETRIC])
def test_a_rows_numbers_do_not_depend_on_the_rows_beside_it(fmt, group, k) -> None:
    """Each output's arithmetic is the same in every tile (one row against one weight row or
    four, 2 to 4 rows against pairs; 91 outputs over two threads leave odd shares)."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: the kernels keep bf16 activations")
    layer = _layer(fmt, group, True, torch.float32, k=k, n=91)
    _assert_rows_do_not_depend_on_their_call(
        quant_ops.quant_layout(layer.kernel_weights(), k), layer.bias)


@pytest.mark.parametrize("fmt,group,int8_activations", [
    ("fp8", None, True), ("int8", 192, True), ("int8", None, False), ("int4", 128, False),
    ("int4", 32, False), ("int4-asym", 128, False)])
def test_bf16_activation_rows_numbers_do_not_depend_on_the_rows_beside_them(
        fmt, group, int8_activations) -> None:
    """bf16 activations (fp8 weights always, integer ones in groups the integer products do not
    take, or with int8 activations off) sum each output the same way at 1 to 8 rows: one weight
    row at a time or two, any tile. Outputs in bf16 hide most float32 differences, so the layer
    is wide: fp8's rows summed as pairs at 3-8 rows (the old kernels) gave 1-2 of these 4096
    outputs a row count one bf16 step apart from the row alone."""
    quant_ops.set_int8_activations(int8_activations)
    try:
        layer = _layer(fmt, group, True, torch.bfloat16, k=768, n=4096)
        _assert_rows_do_not_depend_on_their_call(
            quant_ops.quant_layout(layer.kernel_weights(), 768), layer.bias, torch.bfloat16)
    finally:
        quant_ops.set_int8_activations(True)


@pytest.mark.parametrize("fmt,k,group", [("int4", 384, 128), ("int4", 512, 256),
                                         ("int4", 384, None), ("int8", 384, None),
                                         ("fp8", 384, None)])
def test_a_bf16_models_rows_take_two_weight_rows_at_a_time(bf16_activations, fmt, k,
                                                           group) -> None:
    """A bf16 model's rows (1 to 8) over int4 weights whose groups are whole chunks of 128,
    and over fp8 and int8 ones with a scale per row, go two weight rows at a time (91 outputs
    over two threads leave one over). int4 meets the weights the torch reference dequantizes
    to, bf16(q * scale), not q * scale in float32: with inputs in {-1, 0, 1} every float32 sum
    is exact, so its outputs equal the reference's bit for bit; int8 scales the exact integer
    sum once; fp8's sums are float32 ones."""
    layer = _layer(fmt, group, False, torch.bfloat16, k=k, n=91)
    layout = quant_ops.quant_layout(layer.kernel_weights(), k)
    if fmt == "int4":
        want = lambda x: (x.float() @ layer.dequantized_weight(torch.bfloat16).float().T)
    else:  # the stored values times the row's scale
        values = (layer.dequantized_weight(torch.float64) / layout.scales.double()).float()
        want = lambda x: (x.float() @ values.T) * layout.scales.float().T
    generator = torch.Generator().manual_seed(0)
    for rows in range(1, 9):
        x = torch.randint(-1, 2, (rows, k), generator=generator).bfloat16()
        with torch.inference_mode():
            ours = quant_ops.quant_linear_rows(x, layout, None, False)
        if fmt == "fp8":
            torch.testing.assert_close(ours.float(), want(x).bfloat16().float(), rtol=2 ** -8,
                                       atol=0)
        else:
            assert torch.equal(ours, want(x).bfloat16()), rows


def test_bf16_activations_can_be_chosen(bf16_activations) -> None:
    """Switched off, the int8 kernel takes bf16 activations at one row too: the torch
    reference's numbers up to bf16 rounding, far closer than int8 activations get."""
    layer = _layer("int8", None, False, torch.float32)
    layout = quant_ops.quant_layout(layer.kernel_weights(), 256)
    x = torch.randn(1, 256) * torch.logspace(-2, 1, 256)
    with torch.inference_mode():
        ours = quant_ops.quant_linear_rows(x, layout, None, False)
    _close(ours, layer(x.bfloat16().float()), 1e-5)


@pytest.mark.parametrize("int8_on", [False, True])
def test_every_int8_value_is_read_exactly(int8_on) -> None:
    """Batch rows (4) over int8 weights holding every q in [-128, 127] (-128, which
    llm-compressor's range allows, included), with bf16 activations and with int8 ones: a row
    per sign and magnitude band, so each output sums terms of one sign and size and a wrong
    table entry or byte shows."""
    q = torch.arange(-128, 128, dtype=torch.int64)
    bands = [q[(q >= lo) & (q < lo + 16)] for lo in range(-128, 128, 16)]  # 16 rows of 16
    rows = torch.stack([band.repeat(8) for band in bands]).to(torch.int8)  # [16, 128]
    from bamba.quant.formats import pack_ints

    int8 = QuantizedLinear.from_tensors(
        {"weight_packed": pack_ints(rows, 8), "weight_shape": torch.tensor([16, 128]),
         "weight_scale": torch.ones(16, 1)}, make_scheme("int8"))
    layout = quant_ops.quant_layout(int8.kernel_weights(), 128)
    x = (torch.rand(4, 128) + 0.5).bfloat16().float()  # positive, bf16 values: exact inputs
    if quant_ops.set_int8_activations(int8_on) != int8_on:
        pytest.skip("no AVX-512 VNNI: the kernels keep bf16 activations")
    try:
        with torch.inference_mode():
            ours = quant_ops.quant_linear_rows(x, layout, None, False).double()
    finally:
        quant_ops.set_int8_activations(True)
    want = (int8_activations(x) if int8_on else x).double() @ rows.double().T
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-3), (ours - want).abs().max()


def test_one_scale_for_the_whole_matrix_and_float32_scales() -> None:
    """fp8 with a per-tensor scale ([1]) and int4 with float32 scales in a bf16 layer."""
    w = torch.randn(64, 128) * 0.1
    scale = w.abs().max() / 448
    fp8 = QuantizedLinear.from_tensors({"weight": (w / scale).to(torch.float8_e4m3fn),
                                        "weight_scale": scale.reshape(1)}, make_scheme("fp8"))
    int4 = _layer("int4", 32, True, torch.float32, k=128, n=64)
    int4.bias.data = int4.bias.data.bfloat16()
    for reference in (fp8, int4):
        native = accelerate(copy.deepcopy(nn.Sequential(reference)))[0]
        x = torch.randn(2, 128, dtype=torch.bfloat16)
        with torch.inference_mode():
            _close(native(x), reference(x), 1.5e-2)



def test_every_fp8_value_is_read_exactly_by_the_few_row_kernel() -> None:
    """The few-row kernel's e4m3 byte tables: each weight row holds every byte of one sign and
    exponent field (subnormals at e = 0; the NaN bytes as zeros), so each output sums terms of
    one sign and magnitude and a wrong table entry shows far above float32 rounding."""
    codes = torch.arange(256, dtype=torch.int32)
    exponent, sign = (codes >> 3) & 15, codes >> 7
    rows = torch.stack([codes[(exponent == e) & (sign == s)].repeat(16)
                        for s in (0, 1) for e in range(16)])  # [32, 128]
    rows = torch.where((rows & 0x7F) == 0x7F, 0, rows)  # e4m3fn's NaNs
    weight = rows.to(torch.uint8).view(torch.float8_e4m3fn)
    fp8 = QuantizedLinear.from_tensors({"weight": weight, "weight_scale": torch.ones(32, 1)},
                                       make_scheme("fp8"))
    layout = quant_ops.quant_layout(fp8.kernel_weights(), 128)
    x = (torch.rand(2, 128) + 0.5).bfloat16().float()  # positive, bf16 values: exact inputs
    with torch.inference_mode():
        ours = quant_ops.quant_linear_rows(x, layout, None, False).double()
    values = weight.float().double()
    want = x.double() @ values.T
    assert torch.allclose(ours, want, rtol=1e-5, atol=0), (ours / want).tolist()

def test_widths_the_kernels_do_not_take_run_the_torch_reference(monkeypatch) -> None:
    """An input width not a multiple of 128, and a group size smaller than the kernels' lanes,
    fall back to the torch reference."""
    monkeypatch.setattr(quant_ops, "quant_linear_rows", lambda *a, **k: pytest.fail("kernel"))
    monkeypatch.setattr(quant_ops, "quant_linear_tiles", lambda *a, **k: pytest.fail("kernel"))
    for reference in (_layer("int8", 32, True, torch.bfloat16, k=96),
                      _layer("int4", 4, False, torch.bfloat16, k=128)):
        native = accelerate(copy.deepcopy(nn.Sequential(reference)))[0]
        x = torch.randn(2, reference.in_features, dtype=torch.bfloat16)
        assert dispatch.quant_linear_fits(x, native.kernel_weights()) is None
        with torch.inference_mode():
            torch.testing.assert_close(native(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, group", [("fp8", None), ("int8", None), ("int8", 32),
                                        ("int4", 32), ("int4", 128), ("int4", None),
                                        ("int8-asym", None), ("int4-asym", 32)])
def test_prefill_tiles_are_the_reference_weights_exactly(fmt, group, dtype) -> None:
    """A tile dequantized natively (sixteen weights a vector) is the reference's dense
    weight bit for bit, every row from any first row on."""
    layer = _layer(fmt, group, False, torch.bfloat16, k=384, n=40)
    layout = quant_ops.quant_layout(layer.kernel_weights(), 384)
    want = layer.dequantized_weight(dtype)
    torch.testing.assert_close(quant_ops.dequantize_tile(layout, 0, 40, dtype), want,
                               rtol=0, atol=0)
    torch.testing.assert_close(quant_ops.dequantize_tile(layout, 7, 23, dtype), want[7:23],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must be a contiguous .* \[16, 384\]"):
        quant_ops.dequantize_tile(layout, 7, 23, dtype, torch.empty(16, 383, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, group", [("fp8", None), ("int8", None), ("int8", 32),
                                        ("int4", 32), ("int4", 128), ("int4", None),
                                        ("int8-asym", None), ("int4-asym", 32)])
def test_a_quantized_embedding_looks_up_its_rows_natively_as_the_reference(fmt, group, dtype):
    """The lookup in one native call gives the reference's rows bit for bit (ids of any shape,
    repeated, at both ends of the table); an id outside it is torch's IndexError. Zero points
    with float32 scales: within float32 rounding of the table's largest value (the kernels'
    q * scale + (-zp * scale) against the reference's (q - zp) * scale; with bf16 or float16
    scales both are exact)."""
    dense = nn.Embedding(300, 384).to(dtype)
    reference = QuantizedEmbedding.from_embedding(dense, _scheme(fmt, group))
    native = accelerate(copy.deepcopy(nn.Sequential(reference)))[0]
    assert type(native) is seam.QuantizedEmbedding
    ids = torch.tensor([[0, 299, 7], [7, 150, 3]])
    assert dispatch.quant_gather_fits(ids, native.kernel_weights(), 384, dtype) is not None
    ulp = fmt.endswith("-asym") and dtype == torch.float32
    largest = reference.dequantized_weight(torch.float32).abs().max().item()
    exact = dict(rtol=0, atol=2 ** -23 * largest if ulp else 0)
    with torch.inference_mode():
        torch.testing.assert_close(native(ids), reference(ids), **exact)
        torch.testing.assert_close(native(ids[0, 1]), reference(ids[0, 1]), **exact)
        for bad in (300, -1):
            with pytest.raises(IndexError, match="index out of range"):
                native(torch.tensor([[3, bad]]))


def test_an_embedding_the_kernels_do_not_take_runs_the_torch_reference(monkeypatch) -> None:
    """A width not a multiple of 128 (and a compiled graph, asked the same way) keep the
    reference lookup."""
    monkeypatch.setattr(quant_ops, "quant_gather", lambda *a, **k: pytest.fail("kernel"))
    reference = QuantizedEmbedding.from_embedding(nn.Embedding(40, 96), make_scheme("int8"))
    native = accelerate(copy.deepcopy(nn.Sequential(reference)))[0]
    ids = torch.tensor([[1, 2]])
    assert dispatch.quant_gather_fits(ids, native.kernel_weights(), 96, torch.float32) is None
    torch.testing.assert_close(native(ids), reference(ids), rtol=0, atol=0)
    monkeypatch.setattr(dispatch, "through_dispatcher", lambda: True)
    wide = accelerate(nn.Sequential(QuantizedEmbedding.from_embedding(nn.Embedding(40, 128),
                                                                      make_scheme("int8"))))[0]
    assert dispatch.quant_gather_fits(ids, wide.kernel_weights(), 128, torch.float32) is None


@pytest.mark.parametrize("tile_weights, want_tiles", [(256 * 500, [448, 448, 204]),
                                                      (256 * 1100, [1100]), (1, [64] * 17 + [12])])
def test_the_tile_matmul_needs_no_dense_copy_of_the_weight(monkeypatch, tile_weights,
                                                           want_tiles) -> None:
    """Prefill dequantizes about ``tile_weights`` weights at a time (multiples of 64 output
    features, each tile's slice of the bias with it), into one reused buffer; a linear that
    fits is one tile."""
    layer = _layer("int4", 64, True, torch.bfloat16, k=256, n=1100)
    layout = dispatch.quant_linear_fits(torch.zeros(1, 256, dtype=torch.bfloat16),
                                        layer.kernel_weights())
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    tiles, buffers = [], set()
    real = quant_ops.dequantize_tile

    def counted(layout, begin, end, dtype, out):
        tiles.append(end - begin)
        buffers.add(out.data_ptr())
        return real(layout, begin, end, dtype, out)

    monkeypatch.setattr(quant_ops, "dequantize_tile", counted)
    for _ in range(2):
        out = quant_ops.quant_linear_tiles(x, layout, layer.bias, tile_weights)
        _close(out, layer(x), 1e-2)
    assert tiles == want_tiles * 2 and len(buffers) == 1


# Whole models: the tiny hybrid (widths 256, 512, 768: all multiples of 128).

def _model(dtype: torch.dtype) -> BambaLM:
    model = init_weights(BambaLM(preset("tiny", mlp_bias=True)), seed=0).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return model


MIXED = [make_scheme("int4", 64), make_scheme("int8"), make_scheme("fp8"), make_scheme("int4"),
         make_scheme("int8", 32), make_scheme("int4", 128),
         make_scheme("int4", 128, symmetric=False), make_scheme("int8", symmetric=False),
         make_scheme("int8", 16)]  # groups of 16: GGUF's Q6_K


def _mixed(model: BambaLM, schemes: list = MIXED) -> BambaLM:
    """Every linear but lm_head quantized, the scheme changing from linear to linear."""
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"]
    for i, (name, linear) in enumerate(linears):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                QuantizedLinear.from_linear(linear, schemes[i % len(schemes)]))
    return model


def _decode(model: BambaLM, rows: int = 3, steps: int = 4) -> torch.Tensor:
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (rows, 10),
                           generator=torch.Generator().manual_seed(1))
    cache = ContiguousCache(cfg, rows, 16, model.dtype)
    logits = []
    with torch.inference_mode():
        model(tokens[:, :6], cache=cache)
        for step in range(steps):
            logits.append(model(tokens[:, 6 + step:7 + step],
                                positions=torch.full((rows, 1), 6 + step), cache=cache))
    return torch.cat(logits, dim=1).float()


def _fused_calls(monkeypatch) -> list:
    calls: list = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _assert_steps_equal_the_torch_path(monkeypatch, reference: BambaLM,
                                       dtype: torch.dtype) -> None:
    """``reference`` accelerated takes the whole-model decode step, with the numbers of the
    per-layer steps and, within the kernels' rounding, of the native linears one by one and of
    the torch path. (The two steps' float32 activations differ in their last bits, which int8
    activations can round to neighbouring steps: within 1e-4 of the logits' size.)"""
    model = accelerate(copy.deepcopy(reference))
    assert model.decode_plan().tensors is not None
    calls = _fused_calls(monkeypatch)
    fused = _decode(model)
    assert len(calls) == 4
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer = _decode(model)  # each layer in one call (layer_ops)
    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)
    per_op = _decode(model)  # the native linears one by one
    torch_path = _decode(reference)
    assert len(calls) == 4
    scale = torch_path.abs().max().item()
    torch.testing.assert_close(fused, per_layer, rtol=0, atol=1e-4 * scale if
                               dtype == torch.float32 else 2e-2 * scale)
    for ours in (fused, per_op):
        assert (ours - torch_path).abs().max().item() <= 3e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_of_a_mixed_quantized_model_equal_its_torch_path(monkeypatch, dtype) -> None:
    _assert_steps_equal_the_torch_path(monkeypatch, _mixed(_model(dtype)), dtype)


@pytest.mark.parametrize("rows,threads,dtype", [(12, 2, torch.float32), (20, 3, torch.float32),
                                               (12, 2, torch.bfloat16)])
def test_decode_steps_past_the_few_row_kernels_take_the_integer_products(monkeypatch, rows,
                                                                         threads, dtype) -> None:
    """A decode step of more rows than the few-row kernels take (dispatch.MAX_LINEAR_ROWS)
    meets int8 and int4 weights with int8 activations in quant_gemm.h's products, in the
    whole-model step as in the per-op path (one 16-row block padded, or two; three threads,
    whose shares of in_proj's 1160 outputs split tiles of 4): a model's rows agree to float32
    summation order, but for the odd row where that order moved an input across a rounding
    boundary of its int8 block (one quantization step, ~1e-2 here). With bf16 activations
    (the few-row kernels) every row would differ by bf16's rounding (~2e-2)."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: the kernels keep bf16 activations")
    assert rows > dispatch.MAX_LINEAR_ROWS
    products = [scheme for scheme in MIXED  # what the products take (groups of whole blocks)
                if scheme.name != "fp8" and (scheme.group_size or 32) % 32 == 0]
    model = accelerate(_mixed(_model(dtype), products))
    calls = _fused_calls(monkeypatch)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = _decode(model, rows=rows, steps=2)
    finally:
        torch.set_num_threads(previous)
    assert len(calls) == 2
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)
    per_op = _decode(model, rows=rows, steps=2)
    worst = (fused - per_op).abs().amax(dim=-1).flatten() / per_op.abs().max()
    assert (worst <= 1e-5).float().mean() >= 0.6, worst
    assert worst.max() <= 3e-2


def test_an_int4_model_with_a_dense_lm_head_takes_the_whole_model_step(monkeypatch) -> None:
    reference = quantize_model(_model(torch.bfloat16), make_scheme("int4", 128))
    assert isinstance(reference.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for name, m in reference.named_modules()
                   if name != "lm_head")
    model = accelerate(copy.deepcopy(reference))
    steps = model.decode_plan()
    assert steps.tensors is not None and all(t is not None for t in steps.tensors)
    assert any(t is not None and t.dtype == torch.int32 for t in steps.tensors[0])
    calls = _fused_calls(monkeypatch)
    fused, ref = _decode(model), _decode(reference)
    assert len(calls) == 4
    assert (fused - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()


def test_a_layout_the_steps_cannot_read_sends_its_layer_to_the_per_op_path(monkeypatch) -> None:
    """int4 with groups of 8 inputs: the few-row kernel takes it, the layer steps do not."""
    model = _model(torch.bfloat16)
    ff = model.model.layers[2].feed_forward
    ff.up_proj = QuantizedLinear.from_linear(ff.up_proj, make_scheme("int4", 8))
    model = accelerate(model)
    assert plan.layer_tensors(model.model.layers[2]).whole() is None
    assert model.decode_plan().tensors is None
    assert plan.layer_tensors(model.model.layers[1]).whole() is not None
    monkeypatch.setattr(decode_ops, "decode_layers", lambda *a, **k: pytest.fail("fused step"))
    _decode(model, steps=2)


def test_a_quantized_bias_of_another_dtype_keeps_its_layer_off_the_steps() -> None:
    """A float32 model whose quantized linear kept a bf16 bias (scales and bias in the
    checkpoint's dtype): that layer runs op by op, the others in the layer steps."""
    reference = quantize_model(_model(torch.float32), make_scheme("int8"))
    down = reference.model.layers[1].feed_forward.down_proj
    down.bias = nn.Parameter(down.bias.detach().bfloat16(), requires_grad=False)
    model = accelerate(copy.deepcopy(reference))
    assert plan.layer_tensors(model.model.layers[1]).whole() is None
    assert plan.layer_tensors(model.model.layers[0]).whole() is not None
    fused, ref = _decode(model, steps=2), _decode(reference, steps=2)
    assert (fused - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()


@pytest.mark.parametrize("fmt, group", [("int4", 128), ("int8", None), ("fp8", None)])
def test_a_tile_past_the_caches_is_the_reference_weights_exactly(fmt, group) -> None:
    """A bf16 tile of 4 MiB or more goes out in streaming stores: still the reference's
    weights bit for bit, from an aligned first row or not."""
    layer = _layer(fmt, group, False, torch.bfloat16, k=1024, n=2100)
    layout = quant_ops.quant_layout(layer.kernel_weights(), 1024)
    want = layer.dequantized_weight(torch.bfloat16)
    assert 2100 * 1024 * 2 >= 4 << 20
    torch.testing.assert_close(quant_ops.dequantize_tile(layout, 0, 2100, torch.bfloat16),
                               want, rtol=0, atol=0)
    out = torch.empty(2051 * 1024 + 8, dtype=torch.bfloat16)[8:].view(2051, 1024)  # misaligned
    torch.testing.assert_close(quant_ops.dequantize_tile(layout, 49, 2100, torch.bfloat16, out),
                               want[49:], rtol=0, atol=0)


def _half_scales(model: nn.Module) -> nn.Module:
    """The same model with every quantized linear's scales in float16 (bf16 scales convert
    exactly), as GGUF's Q8_0 / Q4_0 blocks and float16 checkpoints store them."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.weight_scale = module.weight_scale.half()
    return model


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_float16_scales_are_read_natively_as_their_values(fmt, group) -> None:
    """Every native path (few rows, int8 activations or not; prefill tiles) reads float16 scales
    as the same numbers as bf16 ones: outputs bit for bit the same."""
    bf16 = accelerate(nn.Sequential(_layer(fmt, group, True, torch.bfloat16)))[0]
    half = _half_scales(copy.deepcopy(bf16))
    assert dispatch.quant_linear_fits(torch.zeros(1, 256, dtype=torch.bfloat16),
                                      half.kernel_weights()) is not None
    for rows in (1, 2, 3, 4, 8, 40):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(half(x), bf16(x)), rows


def test_a_model_with_float16_scales_takes_the_whole_model_step_alike(monkeypatch) -> None:
    model = accelerate(_mixed(_model(torch.bfloat16)))
    half = _half_scales(copy.deepcopy(model))
    assert half.decode_plan().tensors is not None
    calls = _fused_calls(monkeypatch)
    assert torch.equal(_decode(half), _decode(model)) and len(calls) == 8


def test_a_quantized_models_decode_rows_do_not_depend_on_the_rows_beside_them() -> None:
    """Prompts prefilled one at a time (as ``generate`` does), then decode steps of all six
    rows at once (the whole-model step, as the engine runs them): each row's logits are those
    it gets decoding alone, every quantized linear meeting the same int8 activations in the
    same arithmetic at 1 to 8 rows (bit for bit: ``_assert_rows_do_not_depend_on_their_call``);
    the rest of the step, the float32 head's among them, differs in float32 rounding (~1e-7, as
    a dense model's does). When 3 to 8 rows met bf16 activations, logits moved by ~1e-2 with
    the batch."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: bf16 activations at every row count")
    model = accelerate(_mixed(_model(torch.float32), [s for s in MIXED if s.name != "fp8"]))
    cfg = model.config
    prompts = torch.randint(3, cfg.vocab_size, (6, 9), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(3, cfg.vocab_size, (6, 4), generator=torch.Generator().manual_seed(4))

    def decode(rows: int) -> torch.Tensor:
        cache = ContiguousCache(cfg, rows, 16, model.dtype)
        logits = []
        with torch.inference_mode():
            for row in range(rows):
                model(prompts[row:row + 1], cache=cache.bind([row]))
            cache.bind(list(range(rows)))
            for step in range(steps.shape[1]):
                logits.append(model(steps[:rows, step:step + 1],
                                    positions=torch.full((rows, 1), 9 + step), cache=cache))
        return torch.cat(logits, dim=1)

    calls = []
    real = decode_ops.decode_layers
    decode_ops.decode_layers = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        alone, among = decode(1), decode(6)
    finally:
        decode_ops.decode_layers = real
    assert calls, "the whole-model step did not run"
    torch.testing.assert_close(among[:1], alone, rtol=0, atol=1e-5 * alone.abs().max().item())


def _assert_every_path_reads_as_the_reference(monkeypatch, layer: QuantizedLinear) -> None:
    """``layer``'s few-row kernel with bf16 activations at any row count (float32 and bf16
    inputs), with int8 ones at every row count (the integer products; a row's numbers the same
    in any call of 1 to 8), and its tiles and lookup bit for bit: the torch reference's numbers
    up to float32 summation order."""
    k = layer.in_features
    layout = quant_ops.quant_layout(layer.kernel_weights(), k)
    weight, bias = layer.dequantized_weight(torch.float32), layer.bias
    previous = quant_ops.set_int8_activations(False)
    try:
        for rows, dtype in ((1, torch.float32), (2, torch.float32), (3, torch.float32),
                            (5, torch.float32), (17, torch.float32), (33, torch.float32),
                            (2, torch.bfloat16), (8, torch.bfloat16)):
            x = (torch.randn(rows, k) * torch.logspace(-2, 1, k)).to(dtype)
            with torch.inference_mode():
                ours = quant_ops.quant_linear_rows(x, layout, bias, False)
            ref = torch.nn.functional.linear(x.bfloat16().float(), weight, bias)
            _close(ours.float(), ref, 1e-5 if dtype == torch.float32 else 1e-2)
    finally:
        quant_ops.set_int8_activations(previous)
    if quant_ops.set_int8_activations(True):  # VNNI: int8 activations, integer products
        _assert_rows_do_not_depend_on_their_call(layout, bias)
        monkeypatch.setattr(quant_ops, "quant_linear_tiles", lambda *a, **kw: pytest.fail("tile"))
        for rows in (1, 2, 3, 5, 9, 48, 530):
            x = torch.randn(rows, k) * torch.logspace(-2, 1, k)
            with torch.inference_mode():
                ours = quant_ops.quant_linear_rows(x, layout, bias, False) if rows <= 8 else \
                    quant_ops.quant_linear_many(x, layout, bias)
            _close(ours, torch.nn.functional.linear(int8_activations(x), weight, bias), 1e-5)
    for dtype in (torch.bfloat16, torch.float32):
        torch.testing.assert_close(quant_ops.dequantize_tile(layout, 5, 60, dtype),
                                   layer.dequantized_weight(dtype)[5:60], rtol=0, atol=0)
        ids = torch.tensor([[0, 91, 7], [7, 50, 3]])
        torch.testing.assert_close(quant_ops.quant_gather(layout, ids, dtype),
                                   layer.dequantized_weight(dtype)[ids], rtol=0, atol=0)


# K tables (GGUF's K-quant scales in two levels, bamba.quant.formats.k_table): with offsets,
# int4 holding a block's u as q = u - 8 (Q4_K), int8 holding u itself (Q5_K); without, int8 in
# groups of 16 holding q = u - 32 under signed sc bytes (Q6_K), as int8 bytes or in 6 bits;
# Q5_K's u in 5 bits as q = u - 16 (centred at 16, as int4 at 8)
K_FORMATS = {"int4": (-8, 8), "int8": (0, 32), "q6_k": (-32, 32), "q6_k-six": (-32, 32),
             "q5_k-five": (-16, 16)}


def _k_layer(fmt: str, k: int = 768, n: int = 92) -> QuantizedLinear:
    """A linear with random K-table weights, as llama.cpp's K-quant blocks hold them:
    float16-valued d (and dmin) per 256 inputs, 6-bit sc and m per 32 (Q6_K: d of either sign,
    a signed byte sc per 16), random values; a bias."""
    from bamba.quant.formats import k_table

    g = torch.Generator().manual_seed(k + n)
    q6_k = fmt.startswith("q6_k")
    supers, group = k // 256, 16 if q6_k else 32
    d = (torch.rand(n, supers, generator=g) * 2e-3 + 1e-4).half().float()
    if q6_k:
        d = d * (torch.randint(0, 2, d.shape, generator=g) * 2 - 1)
        table = k_table(d, torch.randint(-128, 128, (n, k // group), generator=g))
        scheme = make_scheme("int8", group, two_level=True,
                             held_bits=6 if fmt == "q6_k-six" else None)
    else:
        dmin = (torch.rand(n, supers, generator=g) * 2e-3).half().float()
        table = k_table(d, torch.randint(0, 64, (n, k // group), generator=g), dmin,
                        torch.randint(0, 64, (n, k // group), generator=g))
        five = fmt == "q5_k-five"
        scheme = make_scheme("int8" if five else fmt, group, symmetric=False, offsets=True,
                             two_level=True, held_bits=5 if five else None)
    q = torch.randint(*K_FORMATS[fmt], (n, k), generator=g, dtype=torch.int8)
    packs = {6: pack_six_bits, 5: pack_five_bits}
    tensors = {"weight_packed": packs[scheme.held_bits](q) if scheme.held_bits else
               pack_ints(q, scheme.bits),
               "weight_shape": torch.tensor([n, k]), "weight_table": table}
    return QuantizedLinear.from_tensors(tensors, scheme, torch.randn(n))


@pytest.mark.parametrize("k", [768, 1280])  # 3 and 5 super-blocks: groups not a multiple of 16
@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_tables_are_read_by_every_native_path_as_the_reference(monkeypatch, fmt, k) -> None:
    """A K table (one byte per group under a float32 per 256 inputs) is read by the few-row
    kernel with bf16 activations at any row count (the offsets' terms 16 rows at a time past
    16) and with int8 ones, by the integer products past 8 rows, and by the tiles and the
    lookup bit for bit: the reference's numbers (its scales d * sc, its offsets centre * scale
    - dmin * m, rounded once) up to float32 summation order."""
    layer = _k_layer(fmt, k=k)
    layout = quant_ops.quant_layout(layer.kernel_weights(), k)
    q6_k = fmt.startswith("q6_k")
    assert layout.two_level and layout.offsets == (not q6_k)
    assert layout.group == (16 if q6_k else 32)
    assert layout.format == {"q6_k-six": "int6", "q6_k": "int8", "q5_k-five": "int5"}.get(fmt, fmt)
    assert layout.scales is layer.weight_table and layer.weight_table.dtype == torch.uint8
    assert quant_ops.step_code(layout) is not None
    _assert_every_path_reads_as_the_reference(monkeypatch, layer)


def _iq4_layer(group: int, k: int, two_level: bool, n: int = 92,
               bias: bool = True) -> QuantizedLinear:
    """A linear of random IQ4 nibbles (indices into IQ4's levels) under random float16-valued
    scales, as GGUF's IQ4_NL blocks hold them, or (``two_level``) IQ4_XS's: a float16-valued d
    of either sign per 256 inputs and a signed 6-bit scale per 32, a K table."""
    from bamba.quant.formats import k_table

    g = torch.Generator().manual_seed(k + group + two_level)
    scheme = make_scheme("int4", group, two_level=two_level, levels=True)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    tensors = {"weight_packed": pack_ints(codes - 8, 4).view(torch.uint8),
               "weight_shape": torch.tensor([n, k])}
    if two_level:
        d = (torch.rand(n, k // 256, generator=g) * 2e-4 - 1e-4).half().float()
        sc = torch.randint(-32, 32, (n, k // group), generator=g)
        tensors["weight_table"] = k_table(d, sc)
    else:
        tensors["weight_scale"] = (torch.rand(n, k // group, generator=g) * 1e-3).half()
    return QuantizedLinear.from_tensors(tensors, scheme,
                                        torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("group,k,two_level", [(32, 768, False), (32, 1280, False),
                                               (128, 512, False), (32, 768, True),
                                               (32, 1280, True)])
def test_iq4_levels_are_read_by_every_native_path_as_the_reference(monkeypatch, group, k,
                                                                   two_level) -> None:
    """int4 nibbles indexing IQ4's 16 levels (GGUF's IQ4_NL, and IQ4_XS with its scales in two
    levels) are read by the few-row kernel with bf16 activations at any row count (two weight
    rows at a time for groups of whole chunks), with int8 ones at 1 to 8 rows (four weight
    rows at a time at one), by the integer products past 8 rows, and by the tiles and the
    lookup bit for bit: the reference's numbers, level * scale, up to float32 summation
    order."""
    from bamba.quant.formats import IQ4_LEVELS, quantized_values

    layer = _iq4_layer(group, k, two_level)
    assert set(quantized_values(layer.quantized_tensors(), layer.scheme).unique().tolist()) == \
        set(float(v) for v in IQ4_LEVELS)
    layout = quant_ops.quant_layout(layer.kernel_weights(), k)
    assert layout is not None and layout.format == "iq4" and layout.group == group
    assert layout.two_level == two_level and not layout.offsets
    assert quant_ops.step_code(layout) is not None
    _assert_every_path_reads_as_the_reference(monkeypatch, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_of_an_iq4_model_equal_its_torch_path(monkeypatch, dtype) -> None:
    """A model whose linears hold IQ4 nibbles (IQ4_NL's and IQ4_XS's scales, alternating)
    takes the whole-model decode step (iq4 in its formats word), with the numbers of the
    per-layer steps and, within the kernels' rounding, of the per-op path and the torch
    path."""
    reference = _model(dtype)
    linears = [(name, m) for name, m in reference.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"]
    for i, (name, linear) in enumerate(linears):
        parent, _, attr = name.rpartition(".")
        iq4 = _iq4_layer(32, linear.in_features, two_level=i % 2 == 1,
                         n=linear.out_features, bias=linear.bias is not None)
        setattr(reference.get_submodule(parent), attr, iq4.to(dtype))
    _assert_steps_equal_the_torch_path(monkeypatch, reference, dtype)

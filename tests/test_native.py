"""The native one-pass SSM decode kernel against the torch reference (bamba.ops.ssd.ssd_step)."""

import pytest
import torch

from bamba.native import accelerate, dispatch, library
from bamba.config import preset
from bamba.cache import ContiguousCache
from bamba.model import BambaLM, init_weights
from bamba.ops.ssd import ssd_step

pytestmark = pytest.mark.skipif(not dispatch.ssd_step_available(),
                                reason="no C compiler: the native kernel is not built")


def _inputs(b: int, h: int, p: int, n: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, p, generator=gen), torch.rand(b, h, generator=gen),
            -torch.rand(h, generator=gen) * 2, torch.randn(b, g, n, generator=gen),
            torch.randn(b, g, n, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_updates_only_its_rows_and_matches_reference(dtype, groups) -> None:
    slots, b, h, p, n = 9, 5, 4, 8, 16
    pool = torch.randn(slots, h, p, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = torch.tensor([7, 0, 3, 8, 2])
    x, dt, A, B, C = _inputs(b, h, p, n, groups)
    y_ref, state_ref = ssd_step(pool[rows].float(), x, dt, A, B, C)
    before = pool.clone()
    y = torch.ops.bamba.ssd_step_pool(pool, rows, x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(pool[rows].float(), state_ref.to(dtype).float(), **tol)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(pool[untouched], before[untouched])


def test_bad_inputs_raise_one_line_errors() -> None:
    pool = torch.zeros(3, 2, 4, 8)
    x, dt, A, B, C = _inputs(2, 2, 4, 8, 1)
    with pytest.raises(ValueError, match="rows must lie"):
        torch.ops.bamba.ssd_step_pool(pool, torch.tensor([0, 3]), x, dt, A, B, C)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        torch.ops.bamba.ssd_step_pool(pool, torch.tensor([0, 1]), x[:, :1], dt, A, B, C)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.bamba.ssd_step_pool(pool.half(), torch.tensor([0, 1]), x, dt, A, B, C)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_model_decode_equal_with_and_without_the_kernel(monkeypatch, state_dtype) -> None:
    cfg = preset("tiny")
    model = accelerate(init_weights(BambaLM(cfg), seed=0).eval())
    prompt = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))

    def decode(rows: list[int], cache_rows: int = 4) -> torch.Tensor:
        cache = ContiguousCache(cfg, cache_rows, 16, torch.float32, state_dtype).bind(rows)
        with torch.no_grad():
            model(prompt, cache=cache)
            pos = torch.full((3, 1), 7)
            return torch.cat([model(prompt[:, :1] + i, positions=pos + i, cache=cache)
                              for i in range(3)], dim=1)

    # scattered slots of a larger cache, and a cache used whole (its pools in batch order)
    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)  # the per-op decode path
    native_out, native_whole = decode([2, 0, 3]), decode([0, 1, 2], cache_rows=3)
    monkeypatch.setattr(dispatch, "ssd_step_available", lambda: False)
    torch.testing.assert_close(native_out, decode([2, 0, 3]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native_whole, decode([0, 1, 2], cache_rows=3), rtol=1e-4, atol=1e-4)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BAMBA_CACHE", str(tmp_path))
    first = library.build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert library.build() == first
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp left behind


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64", "skylake-avx512", "cooperlake"])
def test_the_kernels_compile_for_cpus_without_all_of_avx512(march) -> None:
    """Built on a CPU without AVX-512 (AVX2, or baseline x86-64) or with only some of it (no
    VNNI or BF16; VNNI and BF16 without VBMI), the kernels still compile: the paths that need
    what is missing drop out and the library serves the rest (a table defined inside the
    AVX-512 block but read outside it once broke every build without AVX-512)."""
    import platform
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() != "x86_64":
        pytest.skip("needs an x86-64 C compiler")
    units = [str(s) for s in library.SOURCES if s.suffix == ".c"]
    done = subprocess.run([compiler, "-fsyntax-only", f"-march={march}", "-fopenmp",
                           *units], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bamba_native_0_disables_the_kernel(monkeypatch) -> None:
    monkeypatch.setenv("BAMBA_NATIVE", "0")
    library.load.cache_clear()
    try:
        assert not dispatch.ssd_step_available()
    finally:
        monkeypatch.delenv("BAMBA_NATIVE")
        library.load.cache_clear()
    assert dispatch.ssd_step_available()


needs_bf16_dot = pytest.mark.skipif(not dispatch.linear_available(),
                                    reason="the bf16 linear kernel needs AVX-512 BF16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 8, 12])  # row walk; tiles with partial row groups
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kernel_matches_torch_linear(dtype, rows: int, bias: bool) -> None:
    """42 features: tiles of 4 weight rows, then the row walk for the last 2."""
    if not dispatch.linear_available(dtype):
        pytest.skip(f"no {dtype} linear kernel on this CPU")
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 96, generator=gen).to(dtype)
    weight = torch.randn(42, 96, generator=gen).to(dtype)
    b = torch.randn(42, generator=gen).to(dtype) if bias else None
    assert dispatch.linear_fits(x, weight) == (rows <= dispatch.MAX_LINEAR_ROWS)
    y = torch.ops.bamba.linear_rows(x, weight, b)
    ref = torch.nn.functional.linear(x.double(), weight.double(),
                                     None if b is None else b.double())
    assert y.shape == (rows, 1, 42) and y.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), ref, **tol)


def test_linear_kernel_is_only_chosen_where_it_applies() -> None:
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not dispatch.linear_fits(torch.zeros(9, 64, dtype=torch.bfloat16), w)  # rows
    assert not dispatch.linear_fits(torch.zeros(1, 64), w)  # mixed dtypes
    assert not dispatch.linear_fits(torch.zeros(1, 64).half(), w.half())  # float16
    assert not dispatch.linear_fits(torch.zeros(1, 48, dtype=torch.bfloat16),
                                        torch.zeros(8, 48, dtype=torch.bfloat16))  # width
    grad_w = w.clone().requires_grad_()
    assert not dispatch.linear_fits(torch.zeros(1, 64, dtype=torch.bfloat16), grad_w)
    with torch.no_grad():
        assert dispatch.linear_fits(torch.zeros(1, 64, dtype=torch.bfloat16), grad_w) == \
            dispatch.linear_available()


def _gemm_or_skip(x, weight, bias):
    from bamba.native import linear_ops

    y = linear_ops.gemm_rows(x, weight, bias)
    if y is None:
        pytest.skip("the panel product is not built for this CPU (AVX-512 VNNI and BF16)")
    return y


@pytest.mark.parametrize("rows", [9, 16, 47, 48, 49, 128])  # partial and whole blocks of 16
@pytest.mark.parametrize("bias", [False, True])
def test_dense_panel_product_matches_float64_and_each_row_stands_alone(rows, bias) -> None:
    """bf16 rows past the few-row kernel: float32 sums of bf16 products, one rounding to bf16
    (at most one bf16 step from the float64 product), and each row's numbers those it gets
    in any other batch (lanes are rows: the rows beside it never enter its sums)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 192, generator=gen).to(torch.bfloat16)
    weight = torch.randn(68, 192, generator=gen).to(torch.bfloat16)  # 8 + 8 + ... + 4 rows
    b = torch.randn(68, generator=gen).to(torch.bfloat16) if bias else None
    assert dispatch.gemm_fits(x, weight) == dispatch.library_available()
    y = _gemm_or_skip(x, weight, b)
    ref = torch.nn.functional.linear(x.double(), weight.double(),
                                     None if b is None else b.double())
    step = ref.abs().clamp(min=2 ** -100) * 2 ** -7  # one bf16 step at the value
    assert y.dtype == torch.bfloat16 and bool(((y.double() - ref).abs() <= step + 1e-6).all())
    alone = _gemm_or_skip(torch.cat([x[:1], torch.zeros(8 + 1, 192, dtype=x.dtype)]), weight, b)
    assert torch.equal(alone[0], y[0])


def test_dense_panel_product_is_only_chosen_where_it_applies() -> None:
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    x = torch.zeros(9, 64, dtype=torch.bfloat16)
    assert dispatch.gemm_fits(x, w) == dispatch.library_available()
    assert not dispatch.gemm_fits(x[:8], w)  # the few-row kernel's
    assert not dispatch.gemm_fits(torch.zeros(dispatch.MAX_GEMM_ROWS + 1, 64,
                                              dtype=torch.bfloat16), w)  # oneDNN's
    assert not dispatch.gemm_fits(x.float(), w.float())  # bf16 only
    assert not dispatch.gemm_fits(torch.zeros(9, 96, dtype=torch.bfloat16),
                                  torch.zeros(8, 96, dtype=torch.bfloat16))  # width
    assert not dispatch.gemm_fits(x, torch.zeros(6, 64, dtype=torch.bfloat16))  # outputs
    assert not dispatch.gemm_fits(x, w.clone().requires_grad_())


@needs_bf16_dot
def test_bf16_model_decode_close_with_and_without_the_linear_kernel(monkeypatch) -> None:
    cfg = preset("tiny")
    model = accelerate(init_weights(BambaLM(cfg), seed=0).to(torch.bfloat16).eval())
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))

    def step_logits() -> torch.Tensor:
        cache = ContiguousCache(cfg, 2, 8, torch.bfloat16)
        with torch.inference_mode():
            model(prompt, cache=cache)
            return model(prompt[:, :1], positions=torch.full((2, 1), 6), cache=cache).float()

    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)  # the per-op decode path
    with_kernel = step_logits()
    monkeypatch.setattr(dispatch, "linear_available", lambda dtype=None: False)
    torch.testing.assert_close(with_kernel, step_logits(), rtol=0.05, atol=0.05)

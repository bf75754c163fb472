"""Prefill's elementwise glue in native passes (bamba.native.elementwise_ops) against the torch
expressions they replace."""

import pytest
import torch
import torch.nn.functional as F

from bamba.native import dispatch, elementwise_ops
from bamba.ops import norm

pytestmark = pytest.mark.skipif(not dispatch.elementwise_fits(torch.zeros(1)),
                                reason="the native kernels need a C compiler")


def _torch_rms_norm(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(3, 7, 301, generator=gen).mul(4).to(dtype) for _ in "gu")  # a tail
    out = elementwise_ops.silu_mul(g, u)
    ref = F.silu(g) * u
    assert out.dtype == dtype and out.shape == ref.shape
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}
    torch.testing.assert_close(out, ref, **tol)  # bf16: at most one rounding step apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch_and_is_what_the_model_uses(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 96, generator=gen).mul(3).to(dtype)
    weight = torch.rand(96, generator=gen).add(0.5).to(dtype)
    ref = _torch_rms_norm(x, weight, 1e-5)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-3}
    torch.testing.assert_close(elementwise_ops.rms_norm(x, weight, 1e-5), ref, **tol)
    with torch.no_grad():
        torch.testing.assert_close(norm.rms_norm(x, weight, 1e-5), ref, **tol)


def test_autograd_and_mixed_dtypes_keep_the_torch_path() -> None:
    x = torch.randn(4, 32, requires_grad=True)
    assert not dispatch.elementwise_fits(x, torch.ones(32))
    assert not dispatch.elementwise_fits(torch.randn(4, 32), torch.ones(32).bfloat16())
    assert not dispatch.elementwise_fits(torch.randn(4, 32).double())
    assert not dispatch.elementwise_fits(torch.randn(4, 32).t())  # not contiguous
    norm.rms_norm(x, torch.ones(32), 1e-5).sum().backward()  # the torch path differentiates
    assert x.grad is not None


def test_bad_calls_raise_one_line_errors() -> None:
    with pytest.raises(ValueError, match="differ"):
        elementwise_ops.silu_mul(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="does not fit"):
        elementwise_ops.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)

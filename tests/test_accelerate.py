"""The seam that installs the native kernels: a model built by hand runs torch only; the
accelerated model equals it, with the kernels taking the calls they fit; a linear whose weight
format the kernels cannot read sends the steps back to the torch path."""

import copy

import pytest
import torch
from torch import nn

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import (accelerate, decode_ops, decode_rows, dispatch, is_accelerated, library,
                          plan)

needs_kernels = pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                                   reason="the native decode step needs AVX-512 and a C compiler")


def _model(dtype: torch.dtype = torch.float32) -> BambaLM:
    return init_weights(BambaLM(preset("tiny")), seed=0).to(dtype).eval()


def _run(model: BambaLM) -> list[torch.Tensor]:
    """Prefill, three decode steps through a cache, a forward without cache and a training
    forward and backward; every output and the parameters' gradients."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = ContiguousCache(cfg, 2, 16, model.dtype)
    outs = []
    with torch.inference_mode():
        outs.append(model(ids, cache=cache))
        for step in range(3):
            outs.append(model(ids[:, step:step + 1], positions=torch.full((2, 1), 9 + step),
                              cache=cache))
        outs.append(model(ids))
    model.zero_grad()
    model(ids).float().square().mean().backward()
    return [*outs, *(p.grad for p in model.parameters())]


def test_a_model_built_by_hand_calls_no_kernel(monkeypatch):
    """Neither the library nor the dispatch checks are reached, whatever BAMBA_NATIVE says."""
    monkeypatch.setattr(library, "load", lambda: pytest.fail("a kernel was looked up"))
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype)
        with torch.profiler.profile() as prof:
            _run(model)
        assert not is_accelerated(model)
        assert not [e.name for e in prof.events() if e.name.startswith("bamba::")]


@needs_kernels
def test_the_accelerated_model_equals_the_reference_and_uses_the_kernels(monkeypatch):
    reference = _model()
    fast = accelerate(copy.deepcopy(reference))
    assert is_accelerated(fast) and not is_accelerated(reference)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    assert accelerate(fast) is fast  # a second time changes nothing
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for ours, ref in zip(_run(fast), _run(reference), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3  # every decode step took the one-call step
    assert dispatch.decode_rows(torch.float32, fast.device, fast.decode_plan().dims,
                                [torch.float32]) == dispatch.MAX_ROWS


class _PackedLinear(nn.Linear):
    """A stand-in for a quantized linear: a format the kernels do not read (yet)."""

    def kernel_weights(self) -> plan.LinearWeights:
        return plan.LinearWeights("int8", self.weight, self.bias, torch.ones(1))


@needs_kernels
def test_an_unknown_weight_format_keeps_the_steps_on_the_torch_path(monkeypatch):
    model = accelerate(_model())
    reference = _run(model)[:4]
    ff = model.model.layers[2].feed_forward
    packed = _PackedLinear(ff.up_proj.in_features, ff.up_proj.out_features, bias=False)
    packed.weight = ff.up_proj.weight
    ff.up_proj = packed  # after the model has run: its plan must be rebuilt
    monkeypatch.setattr(decode_ops, "decode_layers", lambda *a, **k: pytest.fail("fused step"))
    assert model.decode_plan().tensors is None and \
        plan.layer_tensors(model.model.layers[2]).whole() is None
    assert decode_rows(model) == 0
    for ours, ref in zip(_run(model)[:4], reference, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

"""The native Mamba2 prefill (bamba.native.prefill_ops) against the torch path it replaces.

The torch path (``mamba_prefill`` with the kernel switched off) is itself held to the naive
scan and to transformers by test_ops/test_parity; here the kernel must give the same y, conv
state and SSM state: to float32 rounding in float32, and to bf16 rounding with bf16 products.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_logits, load_hf, random_ids
from test_parity import assert_logits_close, run_in_pieces

from bamba.checkpoint import from_pretrained
from bamba.native import accelerate, dispatch, library
from bamba.ops import mixer
from bamba.native.seam import prefill_middle as mamba_prefill
from bamba.ops.mixer import MixerShape, MixerWeights

pytestmark = pytest.mark.skipif(not dispatch.prefill_available(),
                                reason="native prefill kernels not built for this CPU")


def make_mixer(h: int, p: int, g: int, n: int, k: int = 4, bias: bool = True,
               seed: int = 0) -> tuple[MixerShape, MixerWeights]:
    gen = torch.Generator().manual_seed(seed)
    shape = MixerShape(h, p, g, n, (0.001, 10.0), 1e-5)
    d, cd = h * p, h * p + 2 * g * n

    def r(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen)
    return shape, MixerWeights(r(cd, k) * 0.5, r(cd) * 0.1 if bias else None, r(h) * 0.5,
                               torch.rand(h, generator=gen) * 2, r(h), 1 + 0.1 * r(d))


def run(zx: torch.Tensor, shape: MixerShape, w: MixerWeights, states: bool, chunk: int,
        md: torch.dtype, native: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, ...]:
    """y, conv state, SSM state of mamba_prefill, with or without the kernel."""
    b, gen = zx.shape[0], torch.Generator().manual_seed(1)
    conv = torch.randn(b, 3, shape.conv_dim, generator=gen)
    ssm = torch.randn(b, shape.n_heads, shape.head_dim, shape.d_state, generator=gen)
    pools = (conv, ssm, None) if states else None
    with monkeypatch.context() as m:
        if not native:
            m.setattr(dispatch, "prefill_fits", lambda *args: False)
        with torch.no_grad():
            y = mamba_prefill(zx, pools, w, shape, None, chunk, md)
    return y.float(), conv, ssm


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the calls that reach the native kernel (it still runs)."""
    calls: list[int] = []
    original = torch.ops.bamba.mixer_prefill

    def counted(*args):
        calls.append(args[0].shape[1])
        return original(*args)
    monkeypatch.setattr(mixer.torch.ops.bamba, "mixer_prefill", counted)
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [(1, 64, 2, 16, 1, 16, 16), (2, 37, 4, 16, 2, 32, 16), (1, 100, 4, 32, 1, 16, 64),
         (1, 5, 2, 16, 1, 16, 16), (1, 70, 4, 16, 1, 32, 64),
         (2, 300, 4, 16, 2, 16, 256)]  # long chunks: decays summed without cancellation


@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("b,l,h,p,g,n,chunk", CASES)
def test_float32_kernel_matches_torch_path(monkeypatch, b, l, h, p, g, n, chunk, states):
    shape, w = make_mixer(h, p, g, n, seed=l)
    zx = torch.randn(b, l, 2 * h * p + 2 * g * n + h, generator=torch.Generator().manual_seed(l))
    ours = run(zx, shape, w, states, chunk, torch.float32, True, monkeypatch)
    ref = run(zx, shape, w, states, chunk, torch.float32, False, monkeypatch)
    assert ours[0].dtype == ref[0].dtype == torch.float32
    assert rel(ours[0], ref[0]) < 1e-5
    assert torch.equal(ours[1], ref[1])  # the conv state is the last inputs, copied
    assert rel(ours[2], ref[2]) < 1e-5


@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("b,l,h,p,g,n,chunk", CASES)
def test_bf16_kernel_stays_within_bf16_rounding(monkeypatch, b, l, h, p, g, n, chunk, states):
    """bf16 in_proj output and bf16 products: y and the (float32) states within bf16 rounding
    of the all-float32 result, no further than the torch bf16 path (whose y is rounded alike)."""
    shape, w = make_mixer(h, p, g, n, seed=l)
    w = w._replace(norm_weight=w.norm_weight.bfloat16(), dt_bias=w.dt_bias.bfloat16())
    zx = torch.randn(b, l, 2 * h * p + 2 * g * n + h,
                     generator=torch.Generator().manual_seed(l)).bfloat16()
    exact = run(zx.float(), shape, w, states, chunk, torch.float32, False, monkeypatch)
    ours = run(zx, shape, w, states, chunk, torch.bfloat16, True, monkeypatch)
    torch_bf16 = run(zx, shape, w, states, chunk, torch.bfloat16, False, monkeypatch)
    assert rel(ours[0], exact[0]) < max(2 * rel(torch_bf16[0].bfloat16().float(), exact[0]), 8e-3)
    assert torch.equal(ours[1], exact[1])
    assert rel(ours[2], exact[2]) < 8e-3


def test_native_output_dtype_is_in_proj_dtype():
    shape, w = make_mixer(2, 16, 1, 16)
    zx = torch.randn(1, 9, 2 * 32 + 32 + 2).bfloat16()
    with torch.no_grad():
        assert mamba_prefill(zx, None, w, shape, None, 8, torch.bfloat16).dtype == torch.bfloat16


def test_usable_only_without_autograd_documents_or_odd_sizes():
    shape, w = make_mixer(2, 16, 1, 16)
    zx = torch.randn(1, 9, 2 * 32 + 32 + 2)
    sizes = (2, 16, 1, 16)
    with torch.no_grad():
        assert dispatch.prefill_fits(zx, None, w, sizes)
        assert not dispatch.prefill_fits(zx, torch.zeros(1, 9, dtype=torch.long), w, sizes)
        assert not dispatch.prefill_fits(zx, None, w, (2, 16, 1, 8))  # d_state not a multiple of 16
        assert not dispatch.prefill_fits(zx.half(), None, w, sizes)
        assert not dispatch.prefill_fits(zx[:, :0], None, w, sizes)
    assert not dispatch.prefill_fits(zx.requires_grad_(), None, w, sizes)


def test_training_path_still_backpropagates_through_the_mixer():
    shape, w = make_mixer(2, 16, 1, 16)
    w = w._replace(D=w.D.requires_grad_())
    zx = torch.randn(1, 9, 2 * 32 + 32 + 2, requires_grad=True)
    mamba_prefill(zx, None, w, shape, None, 8, torch.float32).square().sum().backward()
    assert zx.grad is not None and w.D.grad is not None


HYBRID16 = dict(mamba_n_groups=2, mamba_d_state=16)  # sizes the kernel serves


@pytest.mark.parametrize("length", [5, 37])
def test_model_with_native_prefill_matches_transformers(make_hf_checkpoint, length):
    directory = make_hf_checkpoint("hybrid", **HYBRID16)
    ids = random_ids(2, length, seed=length)
    model = accelerate(from_pretrained(directory))
    with torch.no_grad():
        assert_logits_close(model(ids), hf_logits(load_hf(directory), ids))


def test_chunked_prefill_with_native_kernel_matches_one_shot(make_hf_checkpoint,
                                                             kernel_calls):
    directory = make_hf_checkpoint("hybrid", **HYBRID16)
    ids = random_ids(2, 37, seed=4)
    model = accelerate(from_pretrained(directory))
    with torch.no_grad():
        one_shot = model(ids)
    assert_logits_close(run_in_pieces(model, ids, [5, 8, 13, 11]), one_shot)
    assert 5 in kernel_calls and 37 in kernel_calls  # it served the pieces and the whole


def test_pool_rows_and_bf16_pools_match_torch_path(monkeypatch):
    """States read from and written to chosen rows of pools (the engine's slots), bf16 pools."""
    shape, w = make_mixer(4, 16, 2, 16, seed=3)
    zx = torch.randn(2, 21, 2 * 64 + 64 + 4, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([3, 0])
    results = []
    for native in (True, False):
        gen = torch.Generator().manual_seed(5)
        conv = torch.randn(4, 3, shape.conv_dim, generator=gen).bfloat16()
        ssm = torch.randn(4, 4, 16, 16, generator=gen).bfloat16()
        with monkeypatch.context() as m:
            if not native:
                m.setattr(dispatch, "prefill_fits", lambda *args: False)
            with torch.no_grad():
                y = mamba_prefill(zx, (conv, ssm, rows), w, shape, None, 8, torch.float32)
        results.append((y, conv, ssm))
    (y, conv, ssm), (y_ref, conv_ref, ssm_ref) = results
    assert rel(y, y_ref) < 1e-5
    assert torch.equal(conv, conv_ref) and torch.equal(ssm[[1, 2]], ssm_ref[[1, 2]])
    assert rel(ssm.float(), ssm_ref.float()) < 1e-2  # one bf16 rounding apart at most


def test_engine_with_native_prefill_equals_the_plain_model(kernel_calls):
    """Chunked prefill into state slots, batched with decode rows, through the kernel."""
    from test_engine import greedy, prompts, reference_greedy

    from bamba.config import BambaConfig
    from bamba.engine import LLM
    from bamba.model import BambaLM, init_weights
    cfg = BambaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                      mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2,
                      mamba_chunk_size=8, initializer_range=0.2, max_position_embeddings=512)
    model = init_weights(BambaLM(cfg), seed=0).eval()
    # Steps of more tokens than the native decode step's rows take the prefill pass.
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=48)
    batch = prompts((5, 40, 70))
    outs = llm.generate(batch, [greedy(4)] * 3)
    assert kernel_calls
    for prompt, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, 4)


def test_bamba_native_0_sends_prefill_to_the_torch_path(monkeypatch):
    shape, w = make_mixer(2, 16, 1, 16)
    zx = torch.randn(1, 9, 2 * 32 + 32 + 2)
    monkeypatch.setenv("BAMBA_NATIVE", "0")
    library.load.cache_clear()
    try:
        assert not dispatch.prefill_available()
        with torch.no_grad():
            assert not dispatch.prefill_fits(zx, None, w, (2, 16, 1, 16))
            y = mamba_prefill(zx, None, w, shape, None, 8, torch.float32)
    finally:
        monkeypatch.delenv("BAMBA_NATIVE")
        library.load.cache_clear()
    assert dispatch.prefill_available()
    with torch.no_grad():
        assert rel(mamba_prefill(zx, None, w, shape, None, 8, torch.float32), y) < 1e-5


def test_dispatch_modes_see_the_torch_ops_and_the_op_has_a_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode
    shape, w = make_mixer(2, 16, 1, 16)
    zx = torch.randn(1, 9, 2 * 32 + 32 + 2)
    sizes = (2, 16, 1, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert not dispatch.prefill_fits(zx, None, w, sizes)
        mamba_prefill(zx, None, w, shape, None, 8, torch.float32)
        torch.ops.bamba.mixer_prefill(zx, None, None, *w, [2, 16, 1, 16, 8, 0], [0.0, 1.0, 1e-5])
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    # 2 chunks of 8: C·Bᵀ 2·16·8·16, diagonal 2·16·8·32, chunk states and read-out 2·2·16·512
    assert counts["bamba.mixer_prefill"] == 4096 + 8192 + 32768
    assert counts["aten.bmm"] == counts["bamba.mixer_prefill"]  # as the torch path counts

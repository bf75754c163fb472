"""Whole decoder layers in one native call per decode token (bamba.native.layer_ops) against
the model's per-op torch path: same logits, same states, only the batch's pool rows touched."""

import pytest
import torch

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, dispatch

pytestmark = pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                                reason="the native layer step needs AVX-512 and a C compiler")

VARIANTS = {  # the tiny preset, and one with every optional piece switched the other way
    "tiny": {},
    "groups-biases": dict(mamba_n_groups=2, mamba_conv_bias=False, mamba_proj_bias=True,
                          mlp_bias=True, attention_bias=True, time_step_limit=(0.01, 0.5)),
    # Granite 4.0: fused MLP, each residual branch x 0.22 (rounded before its sum)
    "granite": dict(model_type="granitemoehybrid", embedding_multiplier=12.0,
                    residual_multiplier=0.22, attention_multiplier=0.05, logits_scaling=2.5,
                    position_embedding_type="nope"),    # and experts beside the MLP (8, 3 a token, each of a 96-wide inner layer)
    "granite-moe": dict(model_type="granitemoehybrid", residual_multiplier=0.5,
                        position_embedding_type="nope", num_local_experts=8,
                        num_experts_per_tok=3, expert_intermediate_size=96),
}


def _decode(model: BambaLM, prompt: torch.Tensor, rows: list[int], cache_rows: int,
            state_dtype: torch.dtype, steps: int = 4) -> tuple[torch.Tensor, ContiguousCache]:
    """Prefill then ``steps`` greedy-free decode steps (fixed tokens); logits of the steps."""
    b, l = prompt.shape
    cache = ContiguousCache(model.config, cache_rows, l + steps, model.dtype, state_dtype)
    cache.bind(rows)
    with torch.inference_mode():
        model(prompt, cache=cache)
        logits = [model(prompt[:, i:i + 1], positions=torch.full((b, 1), l + i), cache=cache)
                  for i in range(steps)]
    return torch.cat(logits, dim=1).float(), cache


def _pair(monkeypatch, cfg_name: str, dtype: torch.dtype, state_dtype: torch.dtype,
          rows: list[int], cache_rows: int, float32_heads: bool = False):
    cfg = preset("tiny", **VARIANTS[cfg_name])
    model = accelerate(init_weights(BambaLM(cfg), seed=0).to(dtype).eval())
    if float32_heads:  # as from_pretrained leaves a bf16 model: A_log, D, dt_bias in float32
        for layer in model.model.layers:
            if layer.layer_type == "mamba":
                for name in ("A_log", "D", "dt_bias"):
                    getattr(layer.mamba, name).data = getattr(layer.mamba, name).data.float()
    if cfg.mlp_bias or cfg.mamba_proj_bias:  # init leaves biases at zero: make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.uniform_(-0.1, 0.1)
    prompt = torch.randint(0, cfg.vocab_size, (len(rows), 5),
                           generator=torch.Generator().manual_seed(1))
    assert dispatch.layer_fits(dtype, model.model.layers[0].step_dims)
    fused = _decode(model, prompt, rows, cache_rows, state_dtype)
    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)
    return fused, _decode(model, prompt, rows, cache_rows, state_dtype)


@pytest.mark.parametrize("cfg_name", sorted(VARIANTS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_float32_layer_step_matches_the_torch_path(monkeypatch, cfg_name, state_dtype) -> None:
    (fused, fused_cache), (ref, ref_cache) = _pair(monkeypatch, cfg_name, torch.float32,
                                                   state_dtype, rows=[3, 0, 2], cache_rows=5)
    _assert_same_states(fused, fused_cache, ref, ref_cache, state_dtype, untouched=(1, 4))


def test_many_rows_take_the_tiled_linears(monkeypatch) -> None:
    """From 9 rows the layer's linears run in 4 x 4 tiles (dot_rows.h); 13 rows leave a
    partial tile of rows."""
    rows = [12, 0, 5, 3, 9, 1, 7, 14, 2, 11, 4, 8, 6]
    (fused, fused_cache), (ref, ref_cache) = _pair(monkeypatch, "groups-biases", torch.float32,
                                                   torch.float32, rows=rows, cache_rows=16)
    _assert_same_states(fused, fused_cache, ref, ref_cache, torch.float32, untouched=(10, 13))


def _assert_same_states(fused, fused_cache, ref, ref_cache, state_dtype, untouched):
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if state_dtype == torch.float32 else \
        {"rtol": 2e-2, "atol": 2e-2}
    for i in fused_cache.ssm:
        torch.testing.assert_close(fused_cache.ssm[i].float(), ref_cache.ssm[i].float(), **tol)
        torch.testing.assert_close(fused_cache.conv[i], ref_cache.conv[i], rtol=1e-5, atol=1e-5)
        for row in untouched:  # rows outside the batch stay zero
            assert not fused_cache.ssm[i][row].any()
            assert not fused_cache.conv[i][row].any()


@pytest.mark.skipif(not dispatch.linear_available(torch.bfloat16),
                    reason="the bf16 layer step needs AVX-512 BF16")
@pytest.mark.parametrize("cfg_name", sorted(VARIANTS))
@pytest.mark.parametrize("float32_heads", [False, True])
def test_bf16_layer_step_rounds_where_the_torch_path_does(monkeypatch, cfg_name,
                                                          float32_heads) -> None:
    (fused, _), (ref, _) = _pair(monkeypatch, cfg_name, torch.bfloat16, torch.float32,
                                 rows=[0, 1], cache_rows=2, float32_heads=float32_heads)
    # Same rounding points; only the order of float32 sums (and exp/silu) may differ.
    assert (fused - ref).abs().max() <= 0.02 * ref.abs().max()


def test_layer_step_is_only_used_where_it_applies() -> None:
    cfg = preset("tiny")
    layer = accelerate(init_weights(BambaLM(cfg), seed=0).eval()).model.layers[0]
    x = torch.zeros(2, 1, cfg.hidden_size)

    def fits(x: torch.Tensor) -> bool:
        return dispatch.layer_step_fits(x, layer.input_layernorm.weight.dtype, layer.step_dims)

    with torch.no_grad():
        assert fits(x)
        assert not fits(torch.zeros(2, 3, cfg.hidden_size))  # prefill
        assert not fits(torch.zeros(dispatch.MAX_ROWS + 1, 1, cfg.hidden_size))
        assert not fits(x.double())
    assert not fits(x)  # autograd on: training uses the torch path
    assert not dispatch.layer_fits(torch.float32, layer.step_dims._replace(hidden=40))


def test_bad_pools_and_rows_raise_one_line_errors() -> None:
    cfg = preset("tiny")
    layer = accelerate(init_weights(BambaLM(cfg), seed=0).eval()).model.layers[0]
    cache = ContiguousCache(cfg, 2, 4, torch.float32)
    x = torch.zeros(2, 1, cfg.hidden_size)
    with torch.no_grad():
        cache.bind([0, 2])
        with pytest.raises(ValueError, match="rows must be"):
            layer(x, None, None, cache, None)
        cache.bind([0, 1])
        ssm = cache.ssm[0]
        cache.ssm[0] = ssm[:, :, :, :8].contiguous()  # a pool of another shape
        with pytest.raises(ValueError, match="do not fit"):
            layer(x, None, None, cache, None)
        cache.ssm[0] = ssm
        layer.feed_forward.up_proj.weight.data = layer.feed_forward.up_proj.weight.data.t()
        with pytest.raises(ValueError, match="up must be a contiguous CPU tensor"):
            layer(x, None, None, cache, None)

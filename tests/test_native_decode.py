"""The whole-model native decode step (bamba.native.decode_ops) against the per-layer native
path it replaces: the same logits (bit for bit in bf16), states and caches; taken only where
it applies; bad storage and rows give one-line errors."""

import copy
import gc
import weakref

import pytest
import torch

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, decode_ops, dispatch, plan, steady_weights

pytestmark = pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                                reason="the native decode step needs AVX-512 and a C compiler")

VARIANTS = {
    "tiny": {},  # rope on half of each head
    "groups-biases-full-rope": dict(mamba_n_groups=2, mamba_proj_bias=True, mlp_bias=True,
                                    attention_bias=True, partial_rotary_factor=1.0),
    "all-mamba": dict(attn_layer_indices=[]),
    "all-attention": dict(attn_layer_indices=list(range(8))),
    # Granite 4.0: fused MLP, multipliers on residual branches and scores, no rotary positions
    "granite": dict(model_type="granitemoehybrid", embedding_multiplier=12.0,
                    residual_multiplier=0.22, attention_multiplier=0.05, logits_scaling=2.5,
                    position_embedding_type="nope"),
    "granite-rope": dict(model_type="granitemoehybrid", residual_multiplier=0.5,
                         attention_multiplier=0.1, partial_rotary_factor=1.0),    # and experts beside the MLP (8, 3 a token, each of a 96-wide inner layer)
    "granite-moe": dict(model_type="granitemoehybrid", residual_multiplier=0.5,
                        position_embedding_type="nope", num_local_experts=8,
                        num_experts_per_tok=3, expert_intermediate_size=96),
}


def _model(variant: str, dtype: torch.dtype) -> BambaLM:
    cfg = preset("tiny", **VARIANTS[variant])
    model = accelerate(init_weights(BambaLM(cfg), seed=0).to(dtype).eval())
    with torch.no_grad():  # init leaves biases at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return model


def _decode(model: BambaLM, rows: list[int], cache_rows: int, state_dtype: torch.dtype,
            steps: int = 5) -> tuple[torch.Tensor, ContiguousCache]:
    """Prompts of different lengths per row (so rows sit at different positions), then
    ``steps`` decode steps; the logits of the steps."""
    cfg, b = model.config, len(rows)
    tokens = torch.randint(0, cfg.vocab_size, (b, 12), generator=torch.Generator().manual_seed(1))
    lengths = [4 + 2 * i for i in range(b)]
    cache = ContiguousCache(cfg, cache_rows, 24, model.dtype, state_dtype)
    logits = []
    with torch.inference_mode():
        for i, row in enumerate(rows):  # prefill each row alone
            cache.bind([row])
            model(tokens[i:i + 1, :lengths[i]], cache=cache)
        cache.bind(rows)
        positions = torch.tensor(lengths)[:, None]
        for step in range(steps):
            logits.append(model(tokens[:, step:step + 1], positions=positions + step,
                                cache=cache))
    return torch.cat(logits, dim=1).float(), cache


def _both(monkeypatch, variant: str, dtype: torch.dtype, state_dtype: torch.dtype):
    """(fused, per-layer) decodes of the same model and rows; asserts the fused one ran."""
    model = _model(variant, dtype)
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [3, 0, 2]
    fused = _decode(model, rows, 5, state_dtype)
    assert len(calls) == 5
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer = _decode(model, rows, 5, state_dtype)
    assert len(calls) == 5
    return fused, per_layer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_decode_step_matches_the_per_layer_path(monkeypatch, variant) -> None:
    (fused, fused_cache), (ref, ref_cache) = _both(monkeypatch, variant, torch.float32,
                                                   torch.float32)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for pools in ("ssm", "conv", "keys", "values"):
        for i, pool in getattr(fused_cache, pools).items():
            torch.testing.assert_close(pool, getattr(ref_cache, pools)[i], rtol=1e-5, atol=1e-5)
            assert not pool[1].any() and not pool[4].any()  # rows outside the batch untouched


@pytest.mark.skipif(not dispatch.linear_available(torch.bfloat16),
                    reason="the bf16 decode step needs AVX-512 BF16")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bf16_decode_step_equals_the_per_layer_path_bit_for_bit(monkeypatch, variant,
                                                                 state_dtype) -> None:
    """Same kernels, same rounding points (rope included): identical numbers."""
    (fused, fused_cache), (ref, ref_cache) = _both(monkeypatch, variant, torch.bfloat16,
                                                   state_dtype)
    assert torch.equal(fused, ref)
    for pools in ("ssm", "conv", "keys", "values"):
        for i, pool in getattr(fused_cache, pools).items():
            assert torch.equal(pool, getattr(ref_cache, pools)[i])


def test_hooks_and_caches_without_token_rows_take_the_per_layer_path(monkeypatch) -> None:
    model = _model("tiny", torch.float32)
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: pytest.fail("the fused step ran"))
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda *args: seen.append(1))
    _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == 1 + 2  # the prefill and both decode steps reached the hooked layer
    handle.remove()

    class Plain(ContiguousCache):  # an InferenceCache without the native layout
        token_rows = property(lambda self: (_ for _ in ()).throw(AttributeError))

    cache = Plain(model.config, 1, 8, torch.float32)
    with torch.inference_mode():
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([[2]]), cache=cache)


def test_bad_rows_and_storage_raise_one_line_errors() -> None:
    model = _model("tiny", torch.float32)
    cfg, layers = model.config, model.model.layers
    cache = ContiguousCache(cfg, 2, 4, torch.float32)
    token = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="beyond the cache length 4"):
            model(token, positions=torch.tensor([[1], [4]]), cache=cache)
        cache.keys[3] = cache.keys[3].to(torch.bfloat16)  # layer 3 is an attention layer
        with pytest.raises(ValueError, match="keys .* must be alike, contiguous, of the model"):
            model(token, positions=torch.tensor([[1], [2]]), cache=cache)
        cache.keys[3] = cache.keys[3].float()

        x = torch.zeros(2, cfg.hidden_size)
        cos = torch.ones(2, cfg.rotary_dim)
        tensors = [plan.layer_tensors(layers[0]).whole(), plan.layer_tensors(layers[3]).whole()]
        storage = [decode_ops.LayerStorage(cache.conv[0], cache.ssm[0]),
                   decode_ops.LayerStorage(*cache.kv_pages(3)[:2])]
        kv = cache.kv_pages(3)[2]

        def step(slots, write_rows, read_rows, final_norm=None):
            rows = decode_ops.StepRows(torch.tensor(slots), torch.tensor([0, 1]), cos, cos,
                                       torch.tensor(write_rows), torch.tensor(read_rows))
            return decode_ops.decode_layers(x, tensors, [False, True], storage, rows,
                                            layers[0].step_dims, layers[3].step_dims, kv,
                                            cfg.rms_norm_eps, (0.0, float("inf")),
                                            final_norm=final_norm)

        assert step([0, 1], [0, 5], [[0, 1], [4, 5]]).shape == x.shape
        with pytest.raises(ValueError, match="slots must index the state pools"):
            step([0, 2], [0, 5], [[0, 1], [4, 5]])
        with pytest.raises(ValueError, match="token rows 0..8 lie outside the keys"):
            step([0, 1], [0, 8], [[0, 1], [4, 5]])
        with pytest.raises(ValueError, match="positions must lie in 0..0"):
            step([0, 1], [0, 5], [[0], [4]])
        before = [t.clone() for t in (cache.conv[0], cache.ssm[0], cache.keys[3])]
        with pytest.raises(ValueError, match="slots must index the state pools"):
            step([-1, 1], [0, 5], [[0, 1], [4, 5]])
        with pytest.raises(ValueError, match="token rows -3..5 lie outside the keys"):
            step([0, 1], [0, 5], [[0, 1], [-3, 5]])
        with pytest.raises(ValueError, match="token rows 0..9 lie outside the keys"):
            step([0, 1], [0, 5], [[0, 1], [9, 5]])
        for was, now in zip(before, (cache.conv[0], cache.ssm[0], cache.keys[3])):
            assert torch.equal(was, now)  # checked before anything ran
        with pytest.raises(ValueError, match=r"final norm's weight \(3,\) .* must be \[256\]"):
            step([0, 1], [0, 5], [[0, 1], [4, 5]], decode_ops.FinalNorm(torch.ones(3), 1e-5))


def test_the_checked_plan_is_built_once_and_again_only_when_a_weight_moves(monkeypatch) -> None:
    """The step's C structs are built on the first decode token and reused (the memo the
    model's decode plan keeps) until a tensor lies elsewhere; then built once more."""
    model = _model("tiny", torch.float32)
    builds = []
    real = decode_ops._build
    monkeypatch.setattr(decode_ops, "_build", lambda *a: builds.append(1) or real(*a))
    cache = ContiguousCache(model.config, 1, 24, model.dtype, torch.float32)
    up = model.model.layers[2].feed_forward.up_proj
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        for position in range(3, 7):
            model(torch.tensor([[9]]), positions=torch.tensor([[position]]), cache=cache)
        assert len(builds) == 1
        up.weight.data = up.weight.data.clone()  # the same Parameter, its tensor elsewhere
        for position in range(7, 10):
            model(torch.tensor([[9]]), positions=torch.tensor([[position]]), cache=cache)
    assert len(builds) == 2


@pytest.mark.parametrize("target, how", [
    ("up_proj", "parameter"), ("up_proj", "data"), ("up_proj", "module"),
    ("final_norm", "parameter"), ("final_norm", "data"), ("final_norm", "module"),
    ("final_norm", "hook")])
def test_replaced_weights_and_hooks_are_seen(monkeypatch, target, how) -> None:
    """The step reads each weight where it lies now: a new Parameter, new .data or a new
    submodule after some decode steps changes the next logits as the per-layer path says --
    the final norm's too, which the step applies itself unless a forward hook on the norm
    asks for its module (the hook then sees every decode token)."""
    model = _model("tiny", torch.float32)
    _decode(model, [0], 1, torch.float32, steps=2)  # the step has run and cached its tensors
    parent, name = (model.model.layers[2].feed_forward, "up_proj") if target == "up_proj" \
        else (model.model, "final_layernorm")
    module, seen = getattr(parent, name), []
    new = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(5)) + 0.5
    with torch.no_grad():
        if how == "parameter":
            module.weight = torch.nn.Parameter(new)
        elif how == "data":
            module.weight.data = new
        elif how == "module":
            replacement = copy.deepcopy(module)
            replacement.weight.data = new
            setattr(parent, name, replacement)
        else:
            module.register_forward_hook(lambda *args: seen.append(1))
    fused, _ = _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == (3 if how == "hook" else 0)  # the prefill and both decode tokens
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer, _ = _decode(model, [0], 1, torch.float32, steps=2)
    torch.testing.assert_close(fused, per_layer, rtol=1e-5, atol=1e-5)


def test_a_hook_inside_a_layer_sees_every_token_and_its_removal_restores_the_step(
        monkeypatch) -> None:
    """A forward hook on a module inside a layer (a linear of its MLP): the one-call steps,
    which would skip that module's call, stand aside while it is there -- the hook sees the
    prefill and every decode token, the logits stay the per-layer torch path's -- and the
    whole-model step runs again once the hook's handle removes it."""
    model = _model("tiny", torch.float32)
    calls, seen = [], []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _decode(model, [0], 1, torch.float32, steps=2)
    assert len(calls) == 2
    handle = model.model.layers[2].feed_forward.up_proj.register_forward_hook(
        lambda *args: seen.append(1))
    hooked, _ = _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == 3 and len(calls) == 2  # prefill + 2 tokens; no whole-model step
    handle.remove()
    restored, _ = _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == 3 and len(calls) == 4
    monkeypatch.setattr(dispatch, "layer_step_fits", lambda *args: False)
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    torch_path, _ = _decode(model, [0], 1, torch.float32, steps=2)
    torch.testing.assert_close(hooked, torch_path, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, torch_path, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["layer", "final_norm"])
def test_a_hook_from_before_accelerate_removed_by_its_own_handle_restores_the_step(
        monkeypatch, where) -> None:
    """A hook registered before ``accelerate`` has torch's own handle, whose removal the
    registrations count does not see: the steps look again while they stand aside, so the
    whole-model step (and its final norm) come back once the hook is gone."""
    model = init_weights(BambaLM(preset("tiny")), seed=0).float().eval()
    target = model.model.layers[2].feed_forward.up_proj if where == "layer" else \
        model.model.final_layernorm
    seen, calls = [], []
    handle = target.register_forward_hook(lambda *args: seen.append(1))
    accelerate(model)
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(k.get("final_norm", a[-1])) or real(*a, **k))
    _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == 3  # the prefill and both tokens
    assert len(calls) == (0 if where == "layer" else 2)
    handle.remove()
    _decode(model, [0], 1, torch.float32, steps=2)
    assert len(seen) == 3 and len(calls) == (2 if where == "layer" else 4)
    assert calls[-1] is not None  # the step applies the final norm again


def _checks(monkeypatch) -> list[int]:
    """Counts every reading of the layers' tensor addresses (``_layout``)."""
    seen: list[int] = []
    real = decode_ops._layout
    monkeypatch.setattr(decode_ops, "_layout", lambda present: seen.append(1) or real(present))
    return seen


def test_a_steady_scope_checks_the_weights_once(monkeypatch) -> None:
    """Outside ``steady_weights`` every decode token reads every tensor's address again;
    inside, only the scope's first token does, and a new scope checks again (a .data
    replaced between two scopes is seen)."""
    model = _model("tiny", torch.float32)
    checks = _checks(monkeypatch)
    _decode(model, [0], 1, torch.float32, steps=5)
    unscoped = len(checks)
    assert unscoped >= 5
    checks.clear()
    with steady_weights():
        _decode(model, [0], 1, torch.float32, steps=5)
    assert len(checks) == 1
    up = model.model.layers[2].feed_forward.up_proj
    up.weight.data = torch.randn(up.weight.shape, generator=torch.Generator().manual_seed(5))
    with steady_weights():
        fused, _ = _decode(model, [0], 1, torch.float32, steps=2)
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer, _ = _decode(model, [0], 1, torch.float32, steps=2)
    torch.testing.assert_close(fused, per_layer, rtol=1e-5, atol=1e-5)


def test_a_steady_scope_still_sees_new_parameters_and_other_caches(monkeypatch) -> None:
    """Inside one scope, a Parameter registered anew and a cache whose storage the plan has
    not checked are both checked; the logits stay the per-layer path's; the plan keeps no
    cache alive after its call."""
    model = _model("tiny", torch.float32)
    up = model.model.layers[2].feed_forward.up_proj
    new = torch.randn(up.weight.shape, generator=torch.Generator().manual_seed(5))
    with steady_weights():
        _decode(model, [0], 1, torch.float32, steps=2)
        checks = _checks(monkeypatch)
        up.weight = torch.nn.Parameter(new)
        first, cache = _decode(model, [0], 1, torch.float32, steps=3)
        second, _ = _decode(model, [0], 1, torch.float32, steps=3)  # a new cache
        assert len(checks) == 2
    pool = weakref.ref(cache.conv[0])
    del cache
    gc.collect()
    assert pool() is None
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer, _ = _decode(model, [0], 1, torch.float32, steps=3)
    torch.testing.assert_close(first, per_layer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, per_layer, rtol=1e-5, atol=1e-5)


def test_generate_and_the_engine_hold_a_steady_scope(monkeypatch) -> None:
    """``generate`` and ``LLM.generate`` check the weights on their first decode token, not
    on every one."""
    model = _model("tiny", torch.float32)
    checks = _checks(monkeypatch)
    generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=8))
    assert len(checks) == 1
    checks.clear()
    llm = LLM(model, tokenizer=None)
    outputs = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0))
    assert len(outputs[0].outputs[0].token_ids) == 8
    assert len(checks) == 1


def test_inside_a_steady_scope_a_replaced_weight_is_read_where_it_was(monkeypatch) -> None:
    """The promise broken (a .data replaced inside the scope): the step keeps reading the old
    tensor, which the plan holds alive, so its logits stay those of the old weights."""
    model = _model("tiny", torch.float32)
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    per_layer, _ = _decode(model, [0], 1, torch.float32, steps=4)
    monkeypatch.undo()
    up = model.model.layers[2].feed_forward.up_proj
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = ContiguousCache(cfg, 1, 24, model.dtype, torch.float32)
    logits = []
    with torch.inference_mode(), steady_weights():
        cache.bind([0])
        model(tokens[:, :4], cache=cache)
        for step in range(4):
            logits.append(model(tokens[:, step:step + 1], positions=torch.tensor([[4 + step]]),
                                cache=cache))
            if step == 1:
                up.weight.data = torch.zeros_like(up.weight)  # the old tensor's last reference
                gc.collect()
    torch.testing.assert_close(torch.cat(logits, dim=1).float(), per_layer, rtol=1e-5, atol=1e-5)

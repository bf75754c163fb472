"""The training step's fast paths give the plain paths' results: the loss terms (z-loss without
boolean indexing, and compiled), the fused AdamW, regional compilation in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.train.loss import IGNORE_INDEX, compiled_loss_terms, lm_loss_sums, loss_terms
from bamba.train.optim import build_optimizer, param_groups
from bamba.train.trainer import compile_layers

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, attn_layer_indices=[1],
             num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=2, mamba_d_head=32,
             mamba_d_state=8, mamba_chunk_size=16, vocab_size=64)


def reference_terms(logits: torch.Tensor, labels: torch.Tensor,
                    z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook form: sums over the counted rows, picked out by a boolean mask."""
    flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = target != IGNORE_INDEX
    lse = torch.logsumexp(flat[keep], dim=-1)
    ce = (lse - flat[keep].gather(1, target[keep][:, None])[:, 0]).sum()
    return ce + z_loss * lse.square().sum(), ce


def sample(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 19, generator=gen)).to(dtype)
    labels = torch.randint(0, 19, (3, 7), generator=gen)
    labels[0, :2] = labels[2, 5] = IGNORE_INDEX
    return logits, labels


def grads_of(fn, logits: torch.Tensor, labels: torch.Tensor, z: float):
    leaf = logits.clone().requires_grad_(True)
    total, ce = fn(leaf, labels, z)
    total.backward()
    return total.detach(), ce.detach(), leaf.grad


@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_loss_terms_match_reference_values_and_gradients(z: float) -> None:
    logits, labels = sample(torch.float32)
    got, want = grads_of(loss_terms, logits, labels, z), grads_of(reference_terms, logits, labels, z)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_loss_sums_of_bf16_logits_are_float32_and_count_tokens() -> None:
    logits, labels = sample(torch.bfloat16)
    sums = lm_loss_sums(logits, labels, 1e-3)
    assert sums.total.dtype == torch.float32 and sums.tokens == int((labels != -100).sum())
    torch.testing.assert_close(sums.ce, F.cross_entropy(logits.float().reshape(-1, 19),
                                                        labels.reshape(-1), reduction="sum"))


def test_fused_adamw_is_chosen_on_cpu_and_steps_like_the_plain_loop() -> None:
    model = init_weights(BambaLM(preset("tiny", **SMALL)), seed=0)
    twin = init_weights(BambaLM(preset("tiny", **SMALL)), seed=0)
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=(0.9, 0.95),
                              foreach=False)
    assert fused.defaults["fused"] is True
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_layers_is_in_place() -> None:
    model = BambaLM(preset("tiny", **SMALL))
    keys = list(model.state_dict())
    compile_layers(model)
    assert list(model.state_dict()) == keys
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


@pytest.mark.slow
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_compiled_loss_terms_match_eager(z: float) -> None:
    logits, labels = sample(torch.bfloat16)
    got = grads_of(compiled_loss_terms(), logits, labels, z)
    want = grads_of(loss_terms, logits, labels, z)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

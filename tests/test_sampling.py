"""Sampling: filters give the exact distributions their definitions say, penalties follow the
OpenAI/vLLM formulas, and seeded draws do not depend on the rest of the batch."""

import math

import pytest
import torch

from bamba import sampling
from bamba.sampling import (SamplingBatch, apply_penalties, compute_logprobs, filtered_logits,
                            min_p_filter, sample, sample_from_logits, token_counts,
                            top_k_top_p_filter)


def _logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = _logits()
    greedy = sample(logits, SamplingBatch.build(4, temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    top1 = sample(logits, SamplingBatch.build(4, temperature=1.3, top_k=1, seeds=[1, 2, 3, 4]))
    assert torch.equal(top1, greedy)


def test_mixed_greedy_and_sampled_rows():
    logits = _logits()
    batch = SamplingBatch.build(4, temperature=[0.0, 1.0, 0.0, 1.0], top_k=[0, 1, 0, 1],
                                seeds=[0, 1, 2, 3])
    assert torch.equal(sample(logits, batch), logits.argmax(-1))


def test_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, -2.0, -3.0, 9.0]])
    out = top_k_top_p_filter(logits, torch.tensor([2, 0]), None)
    assert torch.isinf(out[0]).tolist() == [True, False, True, False, True]
    assert torch.equal(out[1], logits[1])  # 0 = off


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log()[None].repeat(3, 1)
    out = top_k_top_p_filter(logits, None, torch.tensor([0.7, 0.71, 1.0]))
    kept = [(~torch.isinf(row)).tolist() for row in out]
    assert kept[0] == [False, True, False, True]  # 0.4 + 0.3 = 0.7 reaches 0.7
    assert kept[1] == [False, True, True, True]  # needs 0.2 as well
    assert kept[2] == [True, True, True, True]
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3]) / 0.7
    torch.testing.assert_close(out[0].softmax(-1), expected)


def test_top_p_applies_after_top_k_renormalisation():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # top_k 2 leaves 0.625 / 0.375; top_p 0.6 then keeps only the first
    out = top_k_top_p_filter(probs.log(), torch.tensor([2]), torch.tensor([0.6]))
    assert (~torch.isinf(out[0])).tolist() == [True, False, False, False]


def test_top_p_candidate_shortcut_equals_full_sort(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    scales = torch.tensor([0.01, 0.3, 1.0, 4.0, 12.0, 2.0, 0.5, 8.0])[:, None]
    logits = torch.randn(8, 1000, generator=gen) * scales  # flat rows need the full sort
    top_k = torch.tensor([0, 0, 40, 0, 700, 5, 0, 0])
    top_p = torch.tensor([0.9, 0.5, 0.8, 1.0, 0.95, 0.99, 1.0, 0.7])
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 16)
    fast = top_k_top_p_filter(logits, top_k, top_p)
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 1000)
    full = top_k_top_p_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(fast), torch.isinf(full))
    assert torch.equal(fast[6], logits[6])  # no filter on this row
    assert int((~torch.isinf(fast[2])).sum()) <= 40 and int((~torch.isinf(fast[0])).sum()) > 16


def test_min_p_keeps_tokens_above_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    out = min_p_filter(probs.log(), torch.tensor([0.3, 0.0]))
    assert (~torch.isinf(out[0])).tolist() == [True, True, True, False]  # 0.15 = 0.3 * 0.5
    torch.testing.assert_close(out[0].softmax(-1), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.equal(out[1], probs.log()[1])


def test_temperature_scales_distribution():
    logits = _logits(2)
    batch = SamplingBatch.build(2, temperature=[0.5, 2.0])
    torch.testing.assert_close(filtered_logits(logits, batch),
                               logits / torch.tensor([[0.5], [2.0]]))


def test_penalties_follow_the_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5], [2.0, -2.0, 1.0, -1.0, 0.5]])
    counts = token_counts([[0, 1, 0], [4]], 5)
    assert counts.tolist() == [[2, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    seen = counts > 0
    seen[1, 3] = True  # a prompt token of row 1: repetition only
    out = apply_penalties(logits, counts, torch.tensor([2.0, 1.5]), torch.tensor([0.5, 0.0]),
                          torch.tensor([0.25, 1.0]), seen)
    row0 = [2.0 / 2 - 0.5 - 2 * 0.25, -2.0 * 2 - 0.5 - 0.25, 1.0, -1.0, 0.5]
    row1 = [2.0, -2.0, 1.0, -1.0 * 1.5, 0.5 / 1.5 - 1.0]
    torch.testing.assert_close(out, torch.tensor([row0, row1]))


def test_sample_uses_penalties_and_requires_counts():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    batch = SamplingBatch.build(1, temperature=0.0, frequency_penalty=1.0)
    with pytest.raises(ValueError, match="output_counts"):
        sample(logits, batch)
    assert sample(logits, batch, token_counts([[0]], 3)).item() == 1


def test_seeded_draws_do_not_depend_on_batch_composition():
    logits = _logits(4, 30, seed=1)
    params = dict(temperature=[0.8, 1.0, 0.0, 1.2], top_p=[0.9, 1.0, 1.0, 0.95])

    def draws(rows, steps=20):
        batch = SamplingBatch.build(4, **params, seeds=[10, 11, 12, 13]).select(rows)
        return torch.stack([sample(logits[rows], batch) for _ in range(steps)], 1)

    together = draws([0, 1, 2, 3])
    for r in range(4):
        assert torch.equal(draws([r])[0], together[r])
    assert torch.equal(draws([3, 0])[1], together[0])
    assert torch.equal(draws([0, 1, 2, 3]), together)  # same seeds, same draws


def test_seeded_sampler_matches_filtered_distribution():
    vocab = 12
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 2
    rows, steps = 4000, 5  # many seeded rows at once (and several draws from each generator)
    batch = SamplingBatch.build(rows, temperature=0.9, top_k=8, top_p=0.9, min_p=0.05,
                                seeds=range(rows))
    expected = filtered_logits(logits, batch.select([0])).softmax(-1)[0].double()
    n = rows * steps
    draws = torch.cat([sample(logits.expand(rows, vocab), batch) for _ in range(steps)])
    observed = torch.bincount(draws, minlength=vocab).double()
    assert observed[expected == 0].sum() == 0  # filtered tokens are never drawn
    keep = expected > 0
    chi2 = (((observed - n * expected)[keep] ** 2) / (n * expected[keep])).sum().item()
    dof = int(keep.sum()) - 1
    assert dof >= 3
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # ~5 sigma; the seed is fixed


def test_inverse_cdf_never_draws_masked_tokens():
    logits = torch.full((3, 6), -math.inf)
    logits[:, [1, 4]] = torch.tensor([0.0, 1.0])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(200):
        assert set(sample_from_logits(logits, gens).tolist()) <= {1, 4}


def test_logprobs_of_chosen_and_top_n():
    logits = _logits(3, 20)
    chosen = torch.tensor([0, 5, 19])
    result = compute_logprobs(logits, chosen, top_n=4)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(result.chosen, logp[torch.arange(3), chosen])
    assert torch.equal(result.top_ids, logp.argsort(-1, descending=True)[:, :4])
    torch.testing.assert_close(result.top_logprobs, logp.gather(-1, result.top_ids))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"),
    (dict(temperature=[1.0, 1.0, 1.0]), "one value per row"), (dict(seeds=[1]), "per row"),
])
def test_bad_parameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingBatch.build(2, **kwargs)

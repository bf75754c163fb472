"""generate with the hybrid cache equals recomputing the whole sequence each step, row by row."""

import pytest
import torch

from bamba.config import BambaConfig
from bamba.generation import GenerationConfig, GenerationStream, generate
from bamba.model import BambaLM, init_weights

PROMPTS = [[5, 9, 2], list(range(10, 21)),
           [7, 3, 60, 44, 1, 8, 8, 9, 30, 31, 2, 5, 6, 7, 50, 51, 3]]  # 3, 11 and 17 tokens


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add overhead
    yield
    torch.set_num_threads(threads)


def _model(attn_layers=(1, 3), seed=0) -> BambaLM:
    torch.manual_seed(seed)
    config = BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         attn_layer_indices=list(attn_layers), mamba_n_heads=4, mamba_d_head=16,
                         mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8,
                         max_position_embeddings=64, initializer_range=0.3, eos_token_id=None)
    return init_weights(BambaLM(config), seed=seed).eval()


def _greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("attn_layers", [(1, 3), (), (0, 1, 2, 3)],
                         ids=["hybrid", "all-mamba", "all-attention"])
def test_greedy_equals_full_recompute(attn_layers):
    model = _model(attn_layers)
    results = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == _greedy_without_cache(model, prompt, 12)
        assert result.finish_reason == "length"
        assert result.prompt_tokens == len(prompt) and result.decode_steps == 11
        assert result.prefill_seconds > 0 and result.decode_seconds > 0


def test_batch_equals_one_by_one_greedy_and_seeded():
    model = _model()
    for config in (GenerationConfig(max_new_tokens=9),
                   GenerationConfig(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=5)):
        together = generate(model, PROMPTS, config)
        for i, prompt in enumerate(PROMPTS):
            seed = None if config.seed is None else config.seed + i  # prompt i's own generator
            alone = generate(model, [prompt], GenerationConfig(
                max_new_tokens=9, temperature=config.temperature, top_p=config.top_p, seed=seed))
            assert alone[0].token_ids == together[i].token_ids


def test_seeded_sampling_reproducible_and_seed_matters():
    model = _model()
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=20, seed=3)
    first = [r.token_ids for r in generate(model, PROMPTS, config)]
    assert first == [r.token_ids for r in generate(model, PROMPTS, config)]
    other = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=20, seed=4)
    assert first != [r.token_ids for r in generate(model, PROMPTS, other)]


def test_eos_stops_only_its_row():
    model = _model()
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12))
    eos = free[1].token_ids[3]
    stopped = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, eos_token_ids=[eos]))
    for before, after in zip(free, stopped, strict=True):
        if eos in before.token_ids:
            cut = before.token_ids.index(eos) + 1
            assert after.token_ids == before.token_ids[:cut] and after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids and after.finish_reason == "length"
    assert len(stopped[1].token_ids) <= 4
    ignored = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, eos_token_ids=[eos],
                                                        ignore_eos=True))
    assert [r.token_ids for r in ignored] == [r.token_ids for r in free]


def test_model_config_eos_is_the_default():
    model = _model()
    eos = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=5))[0].token_ids[0]
    model.config.eos_token_id = eos
    result = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=5))[0]
    assert result.token_ids == [eos] and result.finish_reason == "stop"


def test_stream_yields_the_generated_tokens():
    model = _model()
    config = GenerationConfig(max_new_tokens=7, temperature=0.8, seed=1)
    stream = GenerationStream(model, PROMPTS[2], config)
    tokens = list(stream)
    assert tokens == stream.result.token_ids == generate(model, [PROMPTS[2]], config)[0].token_ids
    assert len(tokens) == 7 and stream.result.finish_reason == "length"


def test_context_limit_and_bad_prompts_raise():
    model = _model()
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, [list(range(60))], GenerationConfig(max_new_tokens=5))
    generate(model, [list(range(59))], GenerationConfig(max_new_tokens=5))  # exactly fits
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 64]], GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(seed="x"), "seed"),
    (dict(eos_token_ids=[-1]), "eos_token_ids"),
])
def test_generation_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_custom_decode_step_is_used_while_the_whole_batch_decodes():
    model = _model()
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12))
    eos = free[1].token_ids[3]
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=[eos])
    calls = []

    def decode_step(tokens, positions, cache):
        calls.append(tokens.shape[0])
        return model(tokens, positions=positions, cache=cache)[:, -1]

    results = generate(model, PROMPTS, config, decode_step=decode_step)
    assert [r.token_ids for r in results] == [r.token_ids for r in generate(model, PROMPTS, config)]
    first_stop = min(len(r.token_ids) for r in results)  # decode steps before a row left
    assert calls == [len(PROMPTS)] * (first_stop - 1)


@pytest.mark.parametrize("field, value", [("temperature", 1e-9), ("repetition_penalty", 1e39),
                                          ("top_p", 1e-46), ("presence_penalty", 3.0)])
def test_generate_and_the_engine_refuse_the_same_sampling_values(field: str, value: float) -> None:
    from bamba.engine import SamplingParams
    from bamba.generation import GenerationConfig

    for build in (GenerationConfig, SamplingParams):
        with pytest.raises(ValueError, match=field):
            build(**{field: value})

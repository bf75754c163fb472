"""The engine's compiled decode graph (LLM(compile_mode=...)) gives the eager engine's greedy
tokens across batch sizes, contexts and slot orders. The graph normally serves only batches
above the native layer steps' row limit; here it serves every decode call. Slow: inductor
compiles for a minute."""

from __future__ import annotations

import pytest

from bamba.engine import LLM, SamplingParams
from test_engine import assert_pools_full, prompts, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_compiled_decode_equals_eager(state_dtype: str) -> None:
    model = tiny_model()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batch = prompts((5, 17, 9, 30, 3), seed=4)
    outputs = {}
    for mode in (None, "default"):
        llm = LLM(model, memory_gb=0.01, block_size=4, max_num_seqs=3, state_dtype=state_dtype,
                  enable_prefix_caching=False, compile_mode=mode)
        if mode is not None:  # every decode call through the graph, not the native layer steps
            llm.runner.native_rows = 0
        outputs[mode] = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
        assert_pools_full(llm)
    assert outputs["default"] == outputs[None]


def test_unknown_compile_mode_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        LLM(tiny_model(), memory_gb=0.01, compile_mode="fast")

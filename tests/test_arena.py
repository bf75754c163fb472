"""Weights in one huge-page buffer (bamba.arena): same values, one storage, ties kept."""

import mmap

import pytest
import torch

from bamba.arena import WeightArena, pack_weights
from bamba.huge_pages import HUGE_PAGE, huge_page_buffer
from bamba.checkpoint import from_pretrained
from bamba.config import preset
from bamba.model import BambaLM, init_weights


def _storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def test_huge_page_buffer_is_aligned_and_sized() -> None:
    buffer = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 3 * HUGE_PAGE + 5
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert buffer.data_ptr() % HUGE_PAGE == 0
    buffer.fill_(7)  # writable to the last byte
    assert int(buffer[-1]) == 7 and huge_page_buffer(0).numel() == 0


def test_slots_are_aligned_and_shapes_checked() -> None:
    arena = WeightArena([("a", torch.Size([3]), torch.bfloat16),
                         ("b", torch.Size([2, 5]), torch.float32)])
    a = arena.place("a", torch.tensor([1.0, 2.0, 3.0]))
    b = arena.place("b", torch.ones(2, 5, dtype=torch.float64))
    assert a.dtype == torch.bfloat16 and a.tolist() == [1.0, 2.0, 3.0]
    assert b.dtype == torch.float32 and b.data_ptr() % 64 == 0 and b.sum() == 10
    with pytest.raises(ValueError, match=r"b: shape \(5, 2\), expected \(2, 5\)"):
        arena.place("b", torch.ones(5, 2))


@pytest.mark.parametrize("tied", [False, True])
def test_pack_weights_keeps_values_and_ties(tied) -> None:
    model = init_weights(BambaLM(preset("tiny", tie_word_embeddings=tied)), seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(tokens)
        pack_weights(model)
        assert len(_storages(model)) == 1
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert torch.equal(model(tokens), expected)


def test_from_pretrained_loads_into_one_buffer(tmp_path) -> None:
    model = init_weights(BambaLM(preset("tiny")), seed=0)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert len(_storages(loaded)) == 1
    assert loaded.model.layers[0].mamba.A_log.dtype == torch.float32  # kept float32, as ever
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight,
                               rtol=1e-2, atol=1e-3)
    loaded.save_pretrained(tmp_path / "again")  # views of one buffer save as separate tensors
    again = from_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  again.state_dict().values()))

"""Shared fixtures: tiny random checkpoints made by transformers itself, and a tiny tokenizer.

``make_hf_checkpoint(kind, **overrides)`` builds transformers' BambaForCausalLM (kinds "hybrid",
"mamba", "attention"), LlamaForCausalLM ("llama") or GraniteMoeHybridForCausalLM ("granite",
"granite-rope", "granite-moe") with a small random config, perturbs the
parameters transformers initialises to constants (A_log, dt_bias, D, norm weights) so parity
tests see non-trivial values, and saves it (with a tokenizer) into a fresh temp directory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Tests pin their thread counts: no adapting them to the machine's load (test_cores tests that).
os.environ.setdefault("BAMBA_ADAPT_THREADS", "0")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 = the configs' pad/bos/eos
TOKENIZER_TEXTS = [
    "The hybrid model mixes Mamba2 layers with a few attention layers.",
    "State space models keep a fixed-size state per sequence.",
    "Attention layers keep keys and values for every token they have seen.",
    "Numbers 0123456789, punctuation !?;:, and unicode: café, naïve, 東京.",
]
VOCAB_SIZE = 320  # >= the byte-level BPE vocabulary below

BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2,
             mamba_chunk_size=8, mamba_d_conv=4, mamba_expand=2)
LAYERS = {"hybrid": [1, 3], "mamba": [], "attention": [0, 1, 2, 3]}
# Granite 4.0 hybrids (GraniteMoeHybrid): multipliers of the released configs' magnitudes;
# "granite" has no rotary positions (as released), "granite-rope" rotates, "granite-moe" adds
# experts beside the shared MLP (4, top 2).
GRANITE = dict(layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=0,
               shared_intermediate_size=48, embedding_multiplier=12.0, residual_multiplier=0.22,
               attention_multiplier=0.0078125, logits_scaling=2.5)


@pytest.fixture(autouse=True)
def _torch_threads_and_seed() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_demo_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default must not depend on a `bamba demo` run on this machine."""
    monkeypatch.setenv("BAMBA_DEMO_DIR", str(tmp_path_factory.getbasetemp() / "no-demo"))


def hf_config(kind: str, **overrides: Any) -> Any:
    """A transformers BambaConfig / LlamaConfig / GraniteMoeHybridConfig of the given kind."""
    from transformers import BambaConfig, GraniteMoeHybridConfig, LlamaConfig

    if kind == "llama":
        return LlamaConfig(**{**BASE, **overrides})
    if kind in ("granite", "granite-rope", "granite-moe"):
        position = "rope" if kind == "granite-rope" else None
        experts = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32) \
            if kind == "granite-moe" else {}
        return GraniteMoeHybridConfig(**{**BASE, **MAMBA, **GRANITE, **experts,
                                         "position_embedding_type": position, **overrides})
    if kind in LAYERS:
        use_cache = kind != "mamba"  # transformers' Bamba cache needs an attention layer
        return BambaConfig(**{**BASE, **MAMBA, "attn_layer_indices": LAYERS[kind],
                              "use_cache": use_cache, **overrides})
    raise ValueError(f"unknown checkpoint kind {kind!r}")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Replace the constant initial values transformers uses with random, plausible ones."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("A_log"):
            param.copy_(torch.log(torch.rand(param.shape, generator=gen) * 8 + 0.5))
        elif name.endswith("dt_bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5 - 1.0)
        elif name.endswith(".D"):
            param.copy_(torch.randn(param.shape, generator=gen))
        elif "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))


def hf_model(kind: str, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers model in eval mode, fp32."""
    from transformers import BambaForCausalLM, GraniteMoeHybridForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    config = hf_config(kind, **overrides)
    cls = LlamaForCausalLM if kind == "llama" else \
        GraniteMoeHybridForCausalLM if kind.startswith("granite") else BambaForCausalLM
    model = cls(config).eval()
    perturb(model, seed + 1)
    return model


def build_tokenizer(add_bos_token: bool = False, chat_template: str | None = None,
                    split: tuple[str, bool] | None = None) -> Any:
    """A byte-level BPE trained in milliseconds, wrapped as transformers' PreTrainedTokenizerFast:
    GPT-2's split, or with ``split`` = (regex, ignore_merges) a Split before a regex-free
    ByteLevel, as Llama 3's tokenizer.json has it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split[0]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(TOKENIZER_TEXTS, trainer=trainer)
    if split is not None and split[1]:
        raw = json.loads(backend.to_str())
        raw["model"]["ignore_merges"] = True
        backend = Tokenizer.from_str(json.dumps(raw))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", add_bos_token=add_bos_token,
                                   chat_template=chat_template)


_counter = itertools.count()


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No native kernels for one test (``BAMBA_NATIVE=0``): every module takes its torch path,
    whose numbers do not depend on how many rows a call carries, as the quantized kernels'
    do not either, and whose quantized linears take the activations as they are (the
    kernels' int8 activations round them)."""
    from bamba.native import library

    monkeypatch.setenv("BAMBA_NATIVE", "0")
    library.load.cache_clear()
    yield
    monkeypatch.delenv("BAMBA_NATIVE")
    library.load.cache_clear()


@pytest.fixture
def make_hf_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_hf_checkpoint(kind="hybrid", seed=0, tokenizer=True, max_shard_size=None,
    **config_overrides) -> directory saved by transformers' save_pretrained."""

    def make(kind: str = "hybrid", seed: int = 0, tokenizer: bool = True,
             max_shard_size: str | int | None = None, **overrides: Any) -> Path:
        directory = tmp_path / f"hf-{kind}-{next(_counter)}"
        model = hf_model(kind, seed, **overrides)
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kwargs)
        if tokenizer:
            build_tokenizer().save_pretrained(directory)
        return directory

    return make


def load_hf(directory: Path) -> Any:
    """Load a checkpoint with transformers' AutoModelForCausalLM, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits from a transformers model, without its cache."""
    return model(input_ids, use_cache=False).logits


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = VOCAB_SIZE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny hybrid with the test tokenizer, saved by transformers (one a module)."""
    from serve_helpers import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint: Path) -> Any:
    """An engine on ``tiny_checkpoint`` (fp32, a 256-token context)."""
    from bamba.engine import LLM

    return LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=256)

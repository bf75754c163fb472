"""Make the llm-compressor fixtures of tests/fixtures/llmcompressor/ (run by
scripts/make_llmcompressor_fixture.sh, which says which interpreter runs which stage).

``quantize OUT`` (in llm-compressor's own virtual environment): a tiny random transformers
``BambaForCausalLM`` in bf16, quantized data-free (round to nearest, no calibration data) by
llm-compressor's ``oneshot`` with each scheme of ``SCHEMES`` (by GPTQ on seeded random ids for
those of ``GPTQ``), saved compressed to ``OUT/<name>``;
and a tiny random ``GraniteMoeHybridForCausalLM`` (IBM Granite 4.0 MoE hybrid) with each of
``GRANITE_SCHEMES`` (llm-compressor splits its stacked experts into per-expert linears and
writes them so, its routers kept).

``record OUT`` (in the project's environment: its transformers reads compressed-tensors
checkpoints through the ``compressed-tensors`` package): for each ``OUT/<name>``, the float32
logits transformers gives for seeded random token ids and its greedy continuation, written to
``OUT/<name>/expected_logits.safetensors``:
  - ``logits``: the quantized weights, activations not quantized (what bamba runs: weights
    stay quantized, activations in the model dtype). compressed-tensors decompresses each
    weight to q * scale in float32 on the first forward. By default it also rounds each
    linear's input to fp8 per token for FP8_DYNAMIC: the README gives how far that moves the
    logits;
    transformers (5.25) does not read the per-expert tensors of the Granite checkpoints: it
    leaves its stacked experts as initialized. There they are put back by hand, each piece
    dequantized by compressed-tensors' own unpacking, in float32;
  - ``greedy_ids``: prompt + greedy tokens of the ``logits`` model. The prompt is the first
    seeded random one whose every greedy step has a top-2 logit margin of ``MIN_MARGIN`` or
    more, so a test may hold other code to the same tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch

SEED = 0
SCHEMES = {"fp8_dynamic": "FP8_DYNAMIC", "w4a16": "W4A16", "w8a16": "W8A16",
           "w4a16_asym": "W4A16_ASYM", "w4a16_gptq": "W4A16"}
# Fixtures made by GPTQ (``GPTQModifier``, its default actorder "static") on seeded random
# calibration ids, not data-free round to nearest.
GPTQ = {"w4a16_gptq"}
CALIBRATION = (16, 32)  # sequences, tokens each
# hidden 128 and the MLP/Mamba widths are multiples of 128: W4A16/W8A16 quantize in groups of 128.
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
              attn_layer_indices=[2], num_attention_heads=4, num_key_value_heads=2,
              mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
              mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, rms_norm_eps=1e-5,
              max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
PROMPT_SHAPE = (2, 12)
NEW_TOKENS = 6
MIN_MARGIN = 0.05  # logits; float32 parity of bamba with transformers is ~1e-4
KEPT_FILES = ("config.json", "model.safetensors", "recipe.yaml")
GRANITE_SCHEMES = {"granite_moe_w4a16": "W4A16", "granite_moe_fp8_dynamic": "FP8_DYNAMIC"}
# two layers (Mamba, then attention with rope), 4 experts of width 128 (2 a token) beside a
# shared MLP; every linear's input a multiple of 128 (W4A16's group)
GRANITE_CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=128,
                      shared_intermediate_size=128, num_hidden_layers=2,
                      layer_types=["mamba", "attention"], num_local_experts=4,
                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                      mamba_n_heads=8, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                      mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
                      position_embedding_type="rope", embedding_multiplier=6.0,
                      residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=2.0,
                      rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.1,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_model(directory: Path, granite: bool = False) -> None:
    """Save a seeded random bf16 BambaForCausalLM (or GraniteMoeHybridForCausalLM), with
    non-constant A_log, dt_bias, D, norms."""
    from transformers import (BambaConfig, BambaForCausalLM, GraniteMoeHybridConfig,
                              GraniteMoeHybridForCausalLM)

    torch.manual_seed(SEED)
    model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**GRANITE_CONFIG)) if granite \
        else BambaForCausalLM(BambaConfig(**CONFIG))
    model.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("A_log"):
                param.copy_(noise.abs().mul(1.5).add(0.2))
            elif name.endswith("dt_bias"):
                param.copy_(noise * 0.5 - 1.0)
            elif name.endswith(".D"):
                param.copy_(noise)
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
    model.to(torch.bfloat16).save_pretrained(directory)


def quantize(out: Path, only: list[str]) -> None:
    """Quantize the random models with each scheme (or those named in ``only``); keep only the
    files the tests read."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    for granite, schemes in ((False, SCHEMES), (True, GRANITE_SCHEMES)):
        schemes = {k: v for k, v in schemes.items() if not only or k in only}
        if not schemes:
            continue
        base = out / "_base"
        random_model(base, granite)
        for name, scheme in schemes.items():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            ignore = ["lm_head", "re:.*block_sparse_moe\\.router$"] if granite else ["lm_head"]
            if name in GPTQ:
                oneshot(model=model, recipe=GPTQModifier(targets="Linear", scheme=scheme,
                                                         ignore=ignore),
                        tie_word_embeddings=False, **calibration())
            else:
                recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
                oneshot(model=model, recipe=recipe, tie_word_embeddings=False)
            saved = out / f"_{name}"
            model.save_pretrained(saved, save_compressed=True)
            target = out / name
            target.mkdir(parents=True, exist_ok=True)
            for file in KEPT_FILES:
                shutil.copyfile(saved / file, target / file)
            shutil.rmtree(saved)
        shutil.rmtree(base)
    (out / "versions.json").write_text(json.dumps(
        {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}))


def calibration() -> dict:
    """``oneshot``'s calibration arguments: seeded random token ids (CALIBRATION) and a word-level
    tokenizer of the vocabulary, which ``oneshot`` asks for beside a dataset."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    count, length = CALIBRATION
    gen = torch.Generator().manual_seed(SEED + 2)
    rows = [{"input_ids": torch.randint(3, CONFIG["vocab_size"], (length,), generator=gen).tolist(),
             "attention_mask": [1] * length} for _ in range(count)]
    vocab = {f"t{i}": i for i in range(CONFIG["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0",
        pad_token="t0")
    return dict(dataset=Dataset.from_list(rows), processor=tokenizer,
                num_calibration_samples=count, max_seq_length=length)


def load(directory: Path, quantize_activations: bool):
    """transformers' model of a checkpoint in float32; the weights dequantize exactly (q * scale
    in float32), the activations round as the scheme says unless quantize_activations is False;
    a Granite checkpoint's per-expert pieces put back into its stacked experts; an asymmetric
    one's weights put in by hand (``decompressed_by_hand``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    groups = config.quantization_config["config_groups"].values()
    if any(group["weights"]["symmetric"] is False for group in groups):
        return decompressed_by_hand(directory)
    if not quantize_activations:
        for group in groups:
            group["input_activations"] = None
    model = AutoModelForCausalLM.from_pretrained(directory, config=config,
                                                 dtype=torch.float32).eval()
    if config.model_type == "granitemoehybrid":
        restore_experts(model, directory)
    return model


@torch.no_grad()
def decompressed_by_hand(directory: Path):
    """transformers' float32 model of a weight-only asymmetric checkpoint, each quantized
    linear decompressed by compressed-tensors' own ``PackedQuantizationCompressor`` into
    (q - zp) * scale: transformers 5.25 with compressed-tensors 0.20.1 does not load these
    files (it expects the zero points unpacked, [N, G], where the files hold them packed)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    (group,) = config.quantization_config["config_groups"].values()
    scheme = QuantizationScheme(targets=group["targets"],
                                weights=QuantizationArgs(**group["weights"]))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = load_file(directory / "model.safetensors")
    state = {}
    for key, tensor in stored.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight_packed":
            parts = {name: stored[f"{prefix}.{name}"] for name in
                     ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
            parts["weight_scale"] = parts["weight_scale"].float()
            state[f"{prefix}.weight"] = \
                PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        elif not leaf.startswith("weight_"):
            state[key] = tensor.float()
    model.load_state_dict(state)
    return model


@torch.no_grad()
def restore_experts(model, directory: Path) -> None:
    """Each expert's gate_proj, up_proj and down_proj of the file, dequantized in float32 by
    compressed-tensors' unpacking, into transformers' stacked gate_up_proj and down_proj."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        def dense(prefix: str) -> torch.Tensor:
            scale = f.get_tensor(f"{prefix}.weight_scale").float()
            if f"{prefix}.weight" in f.keys():  # fp8
                return f.get_tensor(f"{prefix}.weight").float() * scale
            shape = torch.Size(f.get_tensor(f"{prefix}.weight_shape").tolist())
            bits = 32 * f.get_slice(f"{prefix}.weight_packed").get_shape()[1] // shape[1]
            values = unpack_from_int32(f.get_tensor(f"{prefix}.weight_packed"), bits, shape)
            grouped = values.float().view(shape[0], scale.shape[1], -1) * scale[:, :, None]
            return grouped.view(shape)

        for index, layer in enumerate(model.model.layers):
            experts = layer.block_sparse_moe.experts
            for e in range(experts.gate_up_proj.shape[0]):
                prefix = f"model.layers.{index}.block_sparse_moe.experts.{e}"
                experts.gate_up_proj[e].copy_(torch.cat([dense(f"{prefix}.gate_proj"),
                                                         dense(f"{prefix}.up_proj")]))
                experts.down_proj[e].copy_(dense(f"{prefix}.down_proj"))


@torch.no_grad()
def greedy(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Greedy continuation without a cache (full forward each step); None when a step's top-2
    margin is under MIN_MARGIN."""
    for _ in range(NEW_TOKENS):
        top = model(ids, use_cache=False).logits[:, -1].topk(2)
        if (top.values[:, 0] - top.values[:, 1]).min().item() < MIN_MARGIN:
            return None
        ids = torch.cat([ids, top.indices[:, :1]], dim=1)
    return ids


def clear_prompt(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seeded random prompt whose greedy path keeps MIN_MARGIN, and that path."""
    for seed in range(SEED, SEED + 100):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, CONFIG["vocab_size"], PROMPT_SHAPE, generator=gen)
        path = greedy(model, ids)
        if path is not None:
            return ids, path
    raise SystemExit(f"no prompt among 100 seeds keeps a top-2 margin of {MIN_MARGIN}")


@torch.no_grad()
def record(out: Path) -> None:
    from safetensors.torch import save_file

    maker = json.loads((out / "versions.json").read_text())
    recorder = {p: version(p) for p in ("compressed-tensors", "transformers", "torch")}
    lines = []
    for name, scheme in {**SCHEMES, **GRANITE_SCHEMES}.items():
        directory = out / name
        weight_only = load(directory, quantize_activations=False)
        ids, path = clear_prompt(weight_only)
        tensors = {"input_ids": ids, "logits": weight_only(ids, use_cache=False).logits,
                   "greedy_ids": path}
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(directory / "expected_logits.safetensors"),
                  metadata={"recorded_with": json.dumps(recorder)})
        if name in GRANITE_SCHEMES:
            lines.append(f"- `{name}/`: `QuantizationModifier(targets=\"Linear\", scheme="
                         f"\"{scheme}\", ignore=[\"lm_head\", \"re:.*block_sparse_moe\\.router$\"])` "
                         "on a seeded random bf16 GraniteMoeHybridForCausalLM (GRANITE_CONFIG); "
                         "its experts are stored as per-expert gate_proj / up_proj / down_proj "
                         "linears, which transformers does not read: the expected logits put "
                         "them back by hand (activations not quantized).")
            continue
        as_written = load(directory, quantize_activations=True)(ids, use_cache=False).logits
        gap = (as_written - tensors["logits"]).abs().max().item()
        modifier = "GPTQModifier" if name in GPTQ else "QuantizationModifier"
        lines.append(f"- `{name}/`: llm-compressor `oneshot` with `{modifier}("
                     f"targets=\"Linear\", scheme=\"{scheme}\", ignore=[\"lm_head\"])`, "
                     + ("on 16 seeded random sequences of 32 token ids (its actorder: "
                        "\"static\", the default)" if name in GPTQ else "data-free")
                     + ", on a seeded random bf16 BambaForCausalLM "
                     "(scripts/llmcompressor_fixture.py CONFIG). Quantizing the activations as "
                     f"the scheme says moves the logits by at most {gap:.3g} (their std: "
                     f"{tensors['logits'].std().item():.3g})." + (
                         " transformers 5.25 with compressed-tensors 0.20.1 does not load its "
                         "packed zero points: the expected logits put each weight in by hand, "
                         "as compressed-tensors' own PackedQuantizationCompressor decompresses "
                         "it." if "asym" in name else ""))
    (out / "README.md").write_text(
        "# llm-compressor fixtures\n\nMade by `scripts/make_llmcompressor_fixture.sh` "
        f"with {', '.join(f'{k} {v}' for k, v in maker.items())}; expected logits recorded by "
        f"{', '.join(f'{k} {v}' for k, v in recorder.items())} (float32). Layers quantized: "
        f"{', '.join(quantized_layers(out / next(iter(SCHEMES))))}; lm_head, embeddings, norms, conv, A_log, D, "
        "dt_bias stay bf16 (and a Granite MoE's routers).\n\n" + "\n".join(lines) + "\n")
    (out / "versions.json").unlink()


def quantized_layers(directory: Path) -> list[str]:
    """The kinds of layer a checkpoint quantizes (e.g. "mamba.in_proj"), from its scale tensors."""
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        return sorted({".".join(k.split(".")[-3:-1]) for k in f.keys() if k.endswith(".weight_scale")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["quantize", "record"])
    parser.add_argument("out", type=Path, help="the fixtures directory")
    parser.add_argument("only", nargs="*", help="quantize: these fixtures alone (default: all)")
    args = parser.parse_args()
    if args.stage == "quantize":
        quantize(args.out, args.only)
    else:
        record(args.out)


if __name__ == "__main__":
    main()

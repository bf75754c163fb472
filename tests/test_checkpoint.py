"""Hugging Face checkpoints in and out: values, dtypes, shards, hub ids, atomic saves, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bamba
import bamba.checkpoint as ckpt
import bamba.checkpoint_writer as checkpoint_writer
from bamba.checkpoint import (from_pretrained, load_tokenizer, parse_size, save_pretrained,
                              to_bamba_name, to_checkpoint_name)


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_same_weights(model, directory: Path) -> None:
    """Every tensor of the checkpoint equals the loaded parameter of the mapped name."""
    ours = model.state_dict()
    for path in directory.glob("*.safetensors"):
        for name, tensor in load_file(path).items():
            torch.testing.assert_close(ours[to_bamba_name(name, model.config.model_type)], tensor,
                                       rtol=0, atol=0)


# ---- loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hybrid", "llama"])
def test_loaded_tensors_equal_the_checkpoint(make_hf_checkpoint, kind):
    directory = make_hf_checkpoint(kind)
    model = from_pretrained(directory)
    assert not model.training
    assert_same_weights(model, directory)
    assert model.config.model_type == ("llama" if kind == "llama" else "bamba")


def test_loads_a_sharded_transformers_checkpoint(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    assert_same_weights(from_pretrained(directory), directory)


def test_bfloat16_load_casts_weights_but_keeps_per_head_parameters_float32(make_hf_checkpoint):
    model = from_pretrained(make_hf_checkpoint("hybrid"), dtype=torch.bfloat16)
    mixer = model.model.layers[0].mamba
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_bias.dtype} == {torch.float32}


def test_rejects_an_integer_dtype(make_hf_checkpoint):
    with pytest.raises(ValueError, match="floating-point"):
        from_pretrained(make_hf_checkpoint("hybrid", tokenizer=False), dtype=torch.int8)


def test_ignores_rotary_inv_freq_buffers(make_hf_checkpoint):
    directory = make_hf_checkpoint("llama", tokenizer=False)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    from_pretrained(directory)


def test_llama_names_map_both_ways():
    pairs = {"model.norm.weight": "model.final_layernorm.weight",
             "model.layers.3.mlp.up_proj.weight": "model.layers.3.feed_forward.up_proj.weight",
             "model.layers.0.post_attention_layernorm.weight":
                 "model.layers.0.pre_ff_layernorm.weight",
             "model.layers.1.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight"}
    for theirs, ours in pairs.items():
        assert to_bamba_name(theirs, "llama") == ours
        assert to_checkpoint_name(ours, "llama") == theirs
        assert to_bamba_name(ours, "bamba") == ours


def test_lazy_top_level_names_resolve():
    assert bamba.from_pretrained is from_pretrained
    assert bamba.load_tokenizer is load_tokenizer


# ---- hub ids ---------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch, make_hf_checkpoint):
    """snapshot_download replaced by a function that records its arguments."""
    import huggingface_hub

    directory = make_hf_checkpoint("hybrid")
    calls: list[dict] = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return directory, calls


def test_hub_id_downloads_only_config_weights_and_tokenizer(fake_hub, monkeypatch):
    directory, calls = fake_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = from_pretrained("ibm-ai-platform/Bamba-tiny", revision="abc123")
    assert_same_weights(model, directory)
    (call,) = calls
    assert call["repo_id"] == "ibm-ai-platform/Bamba-tiny" and call["revision"] == "abc123"
    assert call["local_files_only"] is False
    patterns = call["allow_patterns"]
    assert {"config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(patterns)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) for p in patterns)
    assert load_tokenizer("ibm-ai-platform/Bamba-tiny").eos_token_id == 2


def test_hub_offline_uses_local_files_only(fake_hub, monkeypatch):
    _, calls = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_pretrained("org/name")
    assert calls[0]["local_files_only"] is True


def test_hub_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def failing(repo_id, **kwargs):
        raise OSError("We couldn't connect to the Hub.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(FileNotFoundError) as exc:
        from_pretrained("org/absent-model")
    assert_one_line(exc, "org/absent-model", "couldn't connect")


def test_real_snapshot_download_resolves_a_local_cache_offline(make_hf_checkpoint, tmp_path,
                                                               monkeypatch):
    """The real huggingface_hub code path, with a hub cache laid out by hand and no network."""
    import huggingface_hub.constants

    source = make_hf_checkpoint("hybrid")
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_weights(from_pretrained("org/tiny"), source)


# ---- saving ----------------------------------------------------------------------------------
def test_save_writes_the_hugging_face_layout(make_hf_checkpoint, tmp_path):
    model = from_pretrained(make_hf_checkpoint("hybrid", tie_word_embeddings=True))
    target = save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["architectures"] == ["BambaForCausalLM"]
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    generation = json.loads((target / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    with safe_open(target / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()  # tied: written once, as transformers does
    reloaded = from_pretrained(target)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert_same_weights(reloaded, target)


def test_sharded_save_respects_the_shard_limit(make_hf_checkpoint, tmp_path):
    model = from_pretrained(make_hf_checkpoint("hybrid"))
    limit = 30_000
    target = save_pretrained(model, tmp_path / "out", max_shard_size=limit)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(target.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = {name: t for s in shards for name, t in load_file(s).items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:
        sizes = [t.nbytes for t in load_file(shard).values()]
        assert sum(sizes) <= limit or len(sizes) == 1
    assert not (target / "model.safetensors").exists()
    assert_same_weights(from_pretrained(target), target)


def test_saving_over_a_checkpoint_replaces_stale_shards(make_hf_checkpoint, tmp_path):
    model = from_pretrained(make_hf_checkpoint("hybrid"))
    target = tmp_path / "out"
    save_pretrained(model, target, max_shard_size=20_000)
    (target / "notes.txt").write_text("kept")
    save_pretrained(model, target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert_same_weights(from_pretrained(target), target)


def test_a_crash_while_saving_leaves_no_half_written_checkpoint(make_hf_checkpoint, tmp_path,
                                                                monkeypatch):
    model = from_pretrained(make_hf_checkpoint("hybrid"))
    calls = []

    def crash_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_writer, "save_file", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new", max_shard_size=20_000)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    save_pretrained(model, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    calls.clear()
    monkeypatch.setattr(checkpoint_writer, "save_file", crash_on_second_shard)
    with pytest.raises(OSError):
        save_pretrained(model, tmp_path / "old", max_shard_size=20_000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_save_includes_the_tokenizer(make_hf_checkpoint, tmp_path):
    source = make_hf_checkpoint("hybrid")
    target = save_pretrained(from_pretrained(source), tmp_path / "out",
                             tokenizer=load_tokenizer(source))
    assert (target / "tokenizer.json").is_file()
    assert load_tokenizer(target).encode("state space") == load_tokenizer(source).encode("state space")


@pytest.mark.parametrize("text,expected", [(1234, 1234), ("2GB", 2 * 10**9), ("500MB", 5 * 10**8),
                                           ("1GiB", 2**30), ("1.5 KB", 1500), ("64", 64)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2XB", 0, -5, "0GB"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


# ---- bad input: one line naming the file and the problem --------------------------------------
def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        from_pretrained(tmp_path / "nowhere")
    assert_one_line(exc, "nowhere", "no such checkpoint directory")


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as exc:
        from_pretrained(tmp_path / "weights.bin")
    assert_one_line(exc, "weights.bin", "is a file")


def test_config_missing(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, str(directory / "config.json"), "not found")


def test_config_invalid_json(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    (directory / "config.json").write_text('{"model_type": "bamba",')
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, "config.json", "not valid JSON")


def test_config_of_another_model_type(make_hf_checkpoint):
    directory = make_hf_checkpoint("llama", tokenizer=False)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "model_type": "mistral"}))
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, "config.json", "mistral")


IN_PROJ = "model.layers.0.mamba.in_proj.weight"
TENSOR_EDITS = {  # case: (kind, edit of the tensor dict, fragments the error names)
    "missing": ("hybrid", lambda t: t.pop("model.layers.2.mamba.D"),
                ["missing tensors model.layers.2.mamba.D"]),
    "missing_untied_lm_head": ("llama", lambda t: t.pop("lm_head.weight"),
                               ["missing tensors lm_head.weight"]),
    "mis_shaped": ("hybrid", lambda t: t.update({IN_PROJ: t[IN_PROJ][:-1]}),
                   [IN_PROJ, "has shape [163, 32], expected [164, 32]"]),
    "unexpected": ("hybrid", lambda t: t.update({"model.layers.0.mamba.extra": torch.zeros(2)}),
                   ["unexpected tensor model.layers.0.mamba.extra"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_bad_tensors_are_named(make_hf_checkpoint, case):
    kind, edit, fragments = TENSOR_EDITS[case]
    directory = make_hf_checkpoint(kind, tokenizer=False)
    rewrite(directory / "model.safetensors", edit)
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, "model.safetensors", *fragments)


def test_truncated_safetensors(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, str(path), "corrupt or truncated")


def test_corrupt_safetensors_header(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"#garbage" + data[16:])
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, str(path), "corrupt or truncated")


def test_corrupt_shard_is_found_before_anything_loads(make_hf_checkpoint, monkeypatch):
    directory = make_hf_checkpoint("hybrid", tokenizer=False, max_shard_size="20KB")
    last = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    assigned = []
    monkeypatch.setattr(ckpt, "_assign", lambda *args: assigned.append(args))
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, last.name, "corrupt or truncated")
    assert assigned == []


def test_index_naming_a_missing_shard(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False, max_shard_size="20KB")
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, "model.safetensors.index.json", shard.name, "does not exist")


def test_index_mapping_a_tensor_to_the_wrong_shard(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False, max_shard_size="20KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, "index.json", name)


def test_no_weights_at_all(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        from_pretrained(directory)
    assert_one_line(exc, str(directory), "no model.safetensors")


def test_tokenizer_missing(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", tokenizer=False)
    with pytest.raises(FileNotFoundError) as exc:
        load_tokenizer(directory)
    assert_one_line(exc, str(directory), "no tokenizer")


def test_hf_model_helper_builds_each_kind():
    for kind in ("hybrid", "mamba", "attention", "llama"):
        assert hf_model(kind).config.num_hidden_layers == 4


# ---- memory: never two full copies --------------------------------------------------------------
MEASURE_LOAD = """
import json, sys, threading, time
import torch
from bamba.checkpoint import from_pretrained

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

torch.set_num_threads(1)
from_pretrained(sys.argv[1])  # warm-up: torch's one-time lazy allocations are not the load's
base = rss_anon()
peak, done = [base], threading.Event()

def poll():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.0005)

thread = threading.Thread(target=poll)
thread.start()
model = from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
done.set()
thread.join()
size = sum(p.nbytes for p in model.parameters())
print(json.dumps({"growth": max(peak[0], rss_anon()) - base, "model_bytes": size}))
"""


@pytest.fixture(scope="module")
def large_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """~40 MB (bf16) and ~80 MB (fp32) checkpoints of many similar tensors, and a tiny one."""
    from bamba.config import BambaConfig
    from bamba.model import BambaLM

    root = tmp_path_factory.mktemp("memory")
    shape = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=5,
                 num_attention_heads=8, num_key_value_heads=2, attn_layer_indices=[3],
                 mamba_n_heads=16, mamba_d_state=64)
    model = BambaLM(BambaConfig(**shape))
    model.save_pretrained(root / "float32", max_shard_size="40MB")
    model.to(torch.bfloat16).save_pretrained(root / "bfloat16", max_shard_size="40MB")
    tiny = {**shape, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "attn_layer_indices": [1],
            "mamba_n_heads": 4, "mamba_d_state": 8}
    BambaLM(BambaConfig(**tiny)).save_pretrained(root / "tiny")
    return {"float32": root / "float32", "bfloat16": root / "bfloat16", "tiny": root / "tiny"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("stored,loaded", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_loading_never_holds_two_copies_of_the_weights(large_checkpoints, stored, loaded):
    """Loading with a cast makes private copies; their peak must stay near one model's size.
    (Without a cast safetensors maps the file, so there is nothing to measure.)"""
    import subprocess
    import sys

    args = [str(large_checkpoints["tiny"]), str(large_checkpoints[stored]), loaded]
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, *args],
                         capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # one model in the target dtype plus slack for a tensor in flight; holding the source
    # tensors too would add at least half a model more.
    budget = result["model_bytes"] * 1.1 + 16 * 2**20
    assert result["growth"] <= budget, result


def test_saving_back_into_the_directory_a_model_was_loaded_from(make_hf_checkpoint):
    """float32 weights map the files they came from; replacing those files must not disturb them."""
    directory = make_hf_checkpoint("hybrid")
    model = from_pretrained(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, directory, max_shard_size=20_000)
    save_pretrained(model, directory)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert_same_weights(from_pretrained(directory), directory)
    assert (directory / "tokenizer.json").is_file()  # files that are not weights stay


def test_a_config_of_absurd_size_fails_before_any_module_is_built(make_hf_checkpoint):
    path = make_hf_checkpoint("hybrid", tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1_000_000  # the weights file still holds the small model
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_hidden_layers=1000000.*of memory is available"):
        from_pretrained(path)

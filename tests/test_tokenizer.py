"""bamba's tokenizer against transformers' AutoTokenizer, both reading each other's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tokenizer
from tokenizers import processors

from bamba.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["", "State space models keep a fixed-size state.", "<s> special </s> in text",
         "  leading spaces, café, 東京 and emoji 🚀", "Numbers 0123456789!"]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def auto(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def assert_same_behaviour(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == \
                    theirs.decode(ids, skip_special_tokens=skip), (text, skip)


@pytest.fixture
def hf_tokenizer_dir(tmp_path) -> Path:
    directory = tmp_path / "hf-tokenizer"
    build_tokenizer(chat_template=TEMPLATE).save_pretrained(directory)
    return directory


def test_reads_transformers_files_and_encodes_identically(hf_tokenizer_dir):
    ours = load_tokenizer(hf_tokenizer_dir)
    assert_same_behaviour(ours, auto(hf_tokenizer_dir))
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)
    assert ours.eos_token_ids == [2]
    assert ours.encode("State space")  # the BPE actually learned something
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]


def test_files_saved_by_bamba_load_in_autotokenizer(hf_tokenizer_dir, tmp_path):
    ours = load_tokenizer(hf_tokenizer_dir)
    ours.save(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    special = json.loads((tmp_path / "ours" / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    theirs = auto(tmp_path / "ours")
    assert_same_behaviour(ours, theirs)
    assert_same_behaviour(load_tokenizer(tmp_path / "ours"), theirs)
    assert theirs.chat_template == TEMPLATE


@pytest.mark.parametrize("add_bos", [True, False])
def test_add_bos_token_follows_transformers(tmp_path, add_bos):
    build_tokenizer(add_bos_token=add_bos).save_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "hf")
    assert (ours.encode("hello")[0] == ours.bos_token_id) == add_bos
    assert ours.encode("hello", add_special_tokens=False)[0] != ours.bos_token_id
    assert_same_behaviour(ours, auto(tmp_path / "hf"))
    ours.save(tmp_path / "again")
    assert_same_behaviour(load_tokenizer(tmp_path / "again"), auto(tmp_path / "again"))


def test_backend_post_processor_is_kept_when_no_flags_are_given(tmp_path):
    backend = build_tokenizer().backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    ours = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    ids = ours.encode("hello")
    assert ids[0] == 1 and ids[-1] == 2
    ours.save(tmp_path / "t")
    assert load_tokenizer(tmp_path / "t").encode("hello") == ids
    assert auto(tmp_path / "t").encode("hello") == ids


def test_chat_template_renders_like_transformers(hf_tokenizer_dir):
    ours = load_tokenizer(hf_tokenizer_dir)
    assert ours.chat_template == TEMPLATE
    expected = auto(hf_tokenizer_dir).apply_chat_template(MESSAGES, tokenize=False,
                                                          add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES) == expected
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("</s>\n")


def test_chat_template_missing_is_an_error(tmp_path):
    build_tokenizer().save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(tmp_path / "t").apply_chat_template(MESSAGES)


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(exc.value) and "no tokenizer" in str(exc.value)


def test_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError) as exc:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(exc.value) and "\n" not in str(exc.value)


def test_invalid_tokenizer_config_json(hf_tokenizer_dir):
    (hf_tokenizer_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(hf_tokenizer_dir)


def test_special_token_outside_the_vocabulary(hf_tokenizer_dir):
    path = hf_tokenizer_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "eos_token": "<|end|>"}))
    with pytest.raises(ValueError) as exc:
        load_tokenizer(hf_tokenizer_dir)
    assert "tokenizer_config.json" in str(exc.value) and "<|end|>" in str(exc.value)


def test_named_chat_templates_use_the_default_one(hf_tokenizer_dir):
    path = hf_tokenizer_dir / "tokenizer_config.json"
    (hf_tokenizer_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads(path.read_text())
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": TEMPLATE}]
    path.write_text(json.dumps({**config, "chat_template": templates}))
    assert load_tokenizer(hf_tokenizer_dir).chat_template == TEMPLATE
    path.write_text(json.dumps({**config, "chat_template": 3}))
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be"):
        load_tokenizer(hf_tokenizer_dir)

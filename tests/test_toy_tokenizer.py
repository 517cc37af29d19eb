"""The toy tokenizer: round trip, "\\n\\n" as one token, and the same tokens once loaded as a Qwen2 checkpoint's."""

import pytest
from rsd_generation.benchmarks.toy.task import problems
from rsd_generation.benchmarks.toy.tokenizer import build_toy_tokenizer
from transformers import AutoTokenizer

from rsd_generation.testing import make_lm


@pytest.fixture(scope="module")
def toy_tok():
    return build_toy_tokenizer()


def test_round_trip_and_separator_token(toy_tok):
    texts = [p.prompt + p.solution() for p in problems(99, 40)]
    for text in texts:
        ids = toy_tok.encode(text, add_special_tokens=False)
        assert toy_tok.decode(ids) == text
    assert toy_tok.tokenize("96\n\n37") == ["9", "6", "ĊĊ", "3", "7"]  # digits one by one, "\n\n" one token
    assert len(toy_tok) <= 320
    assert build_toy_tokenizer().get_vocab() == toy_tok.get_vocab()  # deterministic


def test_loads_identically_from_a_qwen2_checkpoint(toy_tok, tmp_path):
    make_lm("qwen2", len(toy_tok), seed=1).save_pretrained(tmp_path)
    toy_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for p in problems(5, 20):
        text = p.prompt + p.solution()
        assert loaded.encode(text, add_special_tokens=False) == toy_tok.encode(text, add_special_tokens=False)
    assert loaded.eos_token_id == toy_tok.eos_token_id == toy_tok.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.padding_side == "left"

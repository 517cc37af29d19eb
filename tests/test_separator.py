"""The step separator's automaton (`rsd_generation.decoding.StepSeparator`) against transformers'
`StopStringCriteria`, which it replaces in the decoding loop: on random token sequences, both end a step at the same
token, on the device and on the host, for separators that overlap themselves and tokens that run past either end
of the separator, with character-level and byte-level vocabularies."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, StopStringCriteria

from rsd_generation.decoding import StepSeparator, separator_tables, stop_string_criteria
from rsd_generation.testing import build_tokenizer

# tokens that hold a separator, run off its start or end, or repeat it ("abcdef": transformers reads its letters)
PIECES = ["<pad>", "a", "b", "ab", "ba", "aba", "abab", "xab", "bax", "x", "\n", "\n\n", ".\n\n", "\nS", "Step", "tep",
          "S", "\n\nSt", "ep:", "c", "d", "e", "f"]  # fmt: skip
BYTES = ["<pad>", "a", "b", "Ċ", "ĊĊ", ".ĊĊ", "aĊ", "Ċb", "Ġ", "ĠĊ", "ĊĊĊ", "."]  # byte-level: "Ċ" is "\n"


def _pieces() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(PIECES)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")


def _byte_level() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(BYTES)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")


CASES = [
    ("qwen-like", build_tokenizer, ["\n\n", ".\n", "b"]),
    ("pieces", _pieces, ["aba", "abab", "\n\nStep", "ab", "a", "\n\n"]),
    ("byte-level", _byte_level, ["\n\n", "a\n\nb"]),
]


@pytest.mark.parametrize("name,build,separators", CASES, ids=[c[0] for c in CASES])
def test_the_automaton_ends_a_step_where_stop_string_criteria_do(name, build, separators):
    tok = build()
    rng = random.Random(0)
    for sep in separators:
        criteria = StopStringCriteria(tok, [sep])
        ours = StepSeparator(tok, sep)
        assert ours.next_state.shape[0] == len(sep.encode()) or name != "pieces"  # one state per prefix length
        near = [i for i in range(len(tok)) if set(tok.decode([i])) & set(sep)]  # tokens sharing a character
        ended, spanning = 0, 0
        for _ in range(300):
            n = rng.randrange(1, 10)  # mostly tokens near the separator; ids past the vocabulary too
            seq = [rng.choice(near) if rng.random() < 0.7 else rng.randrange(len(tok) + 2) for _ in range(n)]
            want = next((k for k in range(len(seq)) if bool(criteria(torch.tensor([seq[: k + 1]]), None)[0])), None)
            state, got = ours.start(1, torch.device("cpu")), None
            for k, t in enumerate(seq):
                state, hit = ours.advance(state, torch.tensor([t]))
                if bool(hit[0]):
                    got = k
                    break
            on_host = next((k for k in range(len(seq)) if ours.ended(seq[: k + 1])), None)
            assert want == got == on_host, (sep, tok.convert_ids_to_tokens([t for t in seq if t < len(tok)]), want)
            ended += want is not None
            spanning += want is not None and not ours.ended(seq[want : want + 1])  # not in its last token alone
        assert 10 < ended < 300, (sep, ended)  # the sequences test both outcomes
        assert spanning > 5 or len(sep) == 1, (sep, spanning)  # and separators split across tokens


def test_the_automaton_runs_rows_in_a_batch_as_alone():
    """Rows advance independently: a batch of rows gives each row's own results."""
    tok = build_tokenizer()
    sep = StepSeparator(tok, "\n\n")
    rng = random.Random(1)
    rows = torch.tensor([[rng.randrange(len(tok)) for _ in range(12)] for _ in range(5)])  # rows: [5, 12]
    nl, nn = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids("\n\n")
    rows[0, 3:5] = nl  # "\n" "\n": ends at 4
    rows[1, 6] = nn
    state, hits = sep.start(5, torch.device("cpu")), []
    for t in range(12):
        state, hit = sep.advance(state, rows[:, t])
        hits.append(hit)
    hits = torch.stack(hits, 1)  # hits: [5, 12]
    for r in range(5):
        alone, one = sep.start(1, torch.device("cpu")), []
        for t in range(12):
            alone, hit = sep.advance(alone, rows[r : r + 1, t])
            one.append(bool(hit[0]))
        assert hits[r].tolist() == one
    assert bool(hits[0, 4]) and bool(hits[1, 6])


def test_a_separator_too_long_for_the_automaton_is_refused_naming_its_length():
    tok = build_tokenizer()
    with pytest.raises(ValueError, match=r"at most 62 characters .* got 63"):
        separator_tables(stop_string_criteria(tok, ["a" * 63]))

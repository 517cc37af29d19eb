"""The generate surface: step boundaries, stopping, streamer, errors, and stock behaviour without a PRM."""

import functools
import itertools
import operator
import re

import numpy as np
import pytest
import torch
from conftest import PROMPTS, encode, median_reward, rsd_generate
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2ForCausalLM
from transformers.generation.streamers import BaseStreamer

import rsd_generation as rsd
from rsd_generation.testing import build_tokenizer, make_lm


class Script(LogitsProcessor):
    """Forces the next token as a function of the last one, so both policies write a known text."""

    def __init__(self, tok, text: str):
        ids = tok.encode(text, add_special_tokens=False)
        self.next = {a: b for a, b in itertools.pairwise(ids)}

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        for r, last in enumerate(input_ids[:, -1].tolist()):
            forced[r, self.next.get(last, 2)] = 0.0
        return forced


# a prompt ending in the separator, then a cycle "ab.\n\n" "c\n\n" ... where ".\n\n" is one merged token
SCRIPT = "\n\nab.\n\nc\n\nab"


def scripted(qwen_pair, prm, tok, **kw):
    target, draft = qwen_pair
    kw.setdefault("rsd_max_step_tokens", 64)
    kw.setdefault("max_new_tokens", 10)
    return rsd_generate(
        target, draft, prm, tok, ["x=\n\n"], logits_processor=LogitsProcessorList([Script(tok, SCRIPT)]), **kw
    )


def test_steps_end_at_the_separator_text_even_inside_a_merged_token(qwen_pair, prm, tok):
    assert tok.tokenize("ab.\n\n") == ["a", "b", ".\n\n"]
    out = scripted(qwen_pair, prm, tok, rsd_threshold=0.0)
    steps = out.rsd_stats["steps"][0]
    # the prompt's own trailing "\n\n" does not end the first step
    assert [s["text"] for s in steps] == ["ab.\n\n", "c\n\n", "ab.\n\n", "c\n\n"]
    assert [s["n_tokens"] for s in steps] == [3, 2, 3, 2]


def test_custom_separator_and_max_step_tokens(qwen_pair, prm, tok):
    out = scripted(qwen_pair, prm, tok, rsd_threshold=0.0, rsd_step_separator="b", rsd_max_step_tokens=2)
    assert [s["text"] for s in out.rsd_stats["steps"][0]] == ["ab", ".\n\nc", "\n\na", "b", ".\n\nc", "\n\n"]


def test_max_steps_and_user_stop_strings_stop_the_row(qwen_pair, prm, tok):
    out = scripted(qwen_pair, prm, tok, rsd_threshold=0.0, rsd_max_steps=3)
    assert tok.decode(out.sequences[0, 3:]) == "ab.\n\nc\n\nab.\n\n"
    out = scripted(qwen_pair, prm, tok, rsd_threshold=0.0, stop_strings=["c"])
    assert tok.decode(out.sequences[0, 3:]) == "ab.\n\nc"
    # a stop string in a rejected draft step does not stop the row when the target's step lacks it
    out = scripted(qwen_pair, prm, tok, rsd_threshold=1.5, stop_strings=["c"])
    assert tok.decode(out.sequences[0, 3:]) == "ab.\n\nc"


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_accepted_steps_only(qwen_pair, prm, tok):
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS[1:2])
    streamer = Recorder()
    out = rsd_generate(target, draft, prm, tok, PROMPTS[1:2], rsd_threshold=delta, streamer=streamer)
    steps = out.rsd_stats["steps"][0]
    assert any(not s["accepted"] for s in steps), "some draft step must be discarded"
    prompt_ids = encode(tok, PROMPTS[1:2])["input_ids"][0].tolist()
    assert streamer.chunks[0] == prompt_ids and streamer.ended
    kept = [s for s in steps if s["accepted"]]
    assert [len(c) for c in streamer.chunks[1:]] == [s["n_tokens"] for s in kept]
    assert [tok.decode(c, skip_special_tokens=True) for c in streamer.chunks[1:]] == [s["text"] for s in kept]
    assert functools.reduce(operator.iadd, streamer.chunks[1:], []) == out.sequences[0, len(prompt_ids) :].tolist()


def test_nan_reward_is_a_rejection_with_a_warning(qwen_pair, skywork_path, tok):
    target, draft = qwen_pair
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok)
    prm.reward = lambda hidden: torch.full((hidden.shape[0],), float("nan"))
    with pytest.warns(UserWarning, match="NaN"):
        out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.0)
    assert out.rsd_stats["acceptance_rate"] == 0.0
    assert torch.equal(out.sequences, target.generate(**encode(tok, PROMPTS), max_new_tokens=24, do_sample=False))


def test_plain_call_returns_the_sequences_tensor(qwen_pair, prm, tok):
    target, draft = qwen_pair
    out = target.generate(
        **encode(tok, PROMPTS), tokenizer=tok, assistant_model=draft, reward_model=prm, max_new_tokens=8
    )
    assert isinstance(out, torch.Tensor) and out.shape[0] == 3


def test_without_reward_model_generate_is_stock(tok):
    model = make_lm("qwen2", len(tok), seed=1)
    torch.manual_seed(1)
    stock = Qwen2ForCausalLM(model.config).eval()
    stock.load_state_dict(model.state_dict())
    enc = encode(tok, PROMPTS)
    assert torch.equal(model.generate(**enc, max_new_tokens=12), stock.generate(**enc, max_new_tokens=12))
    # assisted generation still works through the mixin, and greedy assisted decoding equals greedy decoding
    draft = make_lm("qwen2", len(tok), seed=2)
    one = encode(tok, PROMPTS[:1])
    assisted = model.generate(**one, assistant_model=draft, max_new_tokens=12, do_sample=False)
    assert torch.equal(assisted, model.generate(**one, max_new_tokens=12, do_sample=False))


def test_with_rsd_is_in_place_idempotent_and_keeps_the_class_name(tok):
    model = Qwen2ForCausalLM(make_lm("qwen2", len(tok), seed=1).config)
    same = rsd.with_rsd(model)
    assert same is model and isinstance(model, rsd.RSDGenerationMixin)
    assert rsd.with_rsd(model).__class__ is model.__class__
    assert type(model).__name__ == "Qwen2ForCausalLM" and isinstance(model, Qwen2ForCausalLM)
    with pytest.raises(ValueError, match="PreTrainedModel, got str"):
        rsd.with_rsd("model")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rsd_threshold": float("nan")}, "rsd_threshold must be a real number"),
        ({"rsd_weighting": "softmax"}, "unknown rsd_weighting 'softmax'"),
        ({"assistant_model": None}, "needs the draft model as assistant_model"),
        ({"num_beams": 2}, "num_beams must be 1, got 2"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences must be 1, got 2"),
        ({"rsd_max_step_tokens": 0}, "rsd_max_step_tokens must be an int >= 1, got 0"),
        ({"rsd_max_steps": -1}, "rsd_max_steps must be None or an int >= 1, got -1"),
        ({"rsd_max_step_tokens": True}, "rsd_max_step_tokens must be an int >= 1, got True"),
        ({"rsd_max_steps": True}, "rsd_max_steps must be None or an int >= 1, got True"),
        ({"rsd_step_separator": ""}, "rsd_step_separator must be a non-empty string"),
        ({"rsd_step_separator": "ab" * 32}, "a step separator may be at most 62 characters (or bytes) long, got 64"),
        ({"reward_prompts": ["only one"]}, "one problem per row: got 1 for 3 rows"),
        ({"tokenizer": None}, "RSD needs tokenizer="),
        ({"reward_model": "skywork"}, "reward_model must be a RewardModel"),
        ({"streamer": Recorder()}, "a streamer takes one row; got a batch of 3"),
        ({"rsd_threshold": True}, "rsd_threshold must be a real number (δ, any value but NaN), got True"),
        (
            {"rsd_weighting": "logistic", "rsd_weighting_kwargs": {"alpha": "x"}},
            "alpha a finite real number > 0, got 'x'",
        ),
        ({"rsd_weighting": "logistic", "rsd_weighting_kwargs": {"alpha": float("nan")}}, "> 0, got nan"),
        ({"rsd_weighting": "constant", "rsd_weighting_kwargs": {"p": "0.5"}}, "p in [0, 1], got '0.5'"),
        ({"reward_prompts": "xyz"}, "reward_prompts must be a list of strings, one problem per row; got str 'xyz'"),
        ({"reward_prompts": [1, 2, 3]}, "reward_prompts must be a list of strings"),
        ({"rsd_weighting": lambda r: torch.tensor(1.0)}, "a tensor of shape (3,) like its input; got ()"),
        ({"rsd_weighting": lambda r: 1.0}, "a tensor of shape (3,) like its input; got float"),
        ({"input_ids": torch.zeros(3, 0, dtype=torch.long), "attention_mask": None}, "row(s) [0, 1, 2] of 3 are empty"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long), "attention_mask": torch.ones(1, 0)}, "row(s) [0] of 1"),
        ({"attention_mask": torch.tensor([[1] * 10, [0] * 10, [1] * 10])}, "row(s) [1] of 3 are empty"),
        ({"assistant_model": "backbone"}, "assistant_model must be a causal LM with an output head"),
        ({"rsd_budget": 1.2}, "rsd_budget must be a share of steps in [0, 1], got 1.2"),
        (
            {"rsd_budget": 0.2, "rsd_threshold": 0.7},
            "rsd_budget chooses a binary weighting's δ itself; drop rsd_threshold",
        ),
        ({"rsd_budget": 0.2, "rsd_weighting": "clip"}, "drop rsd_weighting"),
    ],
)
def test_bad_input_is_refused_with_the_value_named(qwen_pair, prm, tok, kwargs, message):
    target, draft = qwen_pair
    if kwargs.get("assistant_model") == "backbone":
        kwargs = {"assistant_model": prm.backbone}
    call = {**encode(tok, PROMPTS), "tokenizer": tok, "assistant_model": draft, "reward_model": prm}
    call = {**call, "max_new_tokens": 4, **kwargs}
    if "attention_mask" in kwargs and "input_ids" not in kwargs:
        call["input_ids"] = torch.ones(3, 10, dtype=torch.long)
    call = {k: v for k, v in call.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        target.generate(**call)


def test_numpy_and_tensor_thresholds_are_real_numbers(qwen_pair, prm, tok):
    target, draft = qwen_pair
    expected = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.5).sequences
    for delta in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5).item()):
        assert torch.equal(rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta).sequences, expected)


def test_rsd_options_without_reward_model_are_refused(qwen_pair, tok):
    target, _ = qwen_pair
    with pytest.raises(ValueError, match="rsd_threshold only apply with reward_model="):
        target.generate(**encode(tok, PROMPTS), rsd_threshold=0.5, max_new_tokens=4)


def test_right_padding_is_refused(qwen_pair, prm):
    target, draft = qwen_pair
    right = build_tokenizer()
    right.padding_side = "right"
    enc = right(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with pytest.raises(ValueError, match=r"needs left padding.*padding_side='left'"):
        target.generate(**enc, tokenizer=right, assistant_model=draft, reward_model=prm, max_new_tokens=4)


def test_draft_and_target_must_share_a_tokenizer(qwen_pair, prm, tok):
    target, _ = qwen_pair
    other = make_lm("qwen2", 3000, seed=9)
    with pytest.raises(ValueError, match=r"share a tokenizer: vocab sizes 3000 \(draft\) and 81 \(target\)"):
        rsd_generate(target, other, prm, tok, PROMPTS)
    other_tok = build_tokenizer()
    other_tok.add_tokens(["zzz"])
    with pytest.raises(ValueError, match="assistant_tokenizer differs"):
        rsd_generate(target, qwen_pair[1], prm, tok, PROMPTS, assistant_tokenizer=other_tok)
    # vocabularies that differ by padding only are one tokenizer (as Qwen2.5 1.5B 151936 vs 7B 152064)
    padded = make_lm("qwen2", len(tok) + 47, seed=2)
    out = rsd_generate(target, padded, prm, tok, PROMPTS, rsd_threshold=0.0)
    assert int(out.sequences.max()) < len(tok)


def test_stop_string_criteria_are_built_once_per_tokenizer(tok):
    from rsd_generation.decoding import stop_string_criteria

    first = stop_string_criteria(tok, ["\n\n"])
    assert stop_string_criteria(tok, ("\n\n",)) is first  # reused: indexing a 150k vocabulary takes seconds
    assert stop_string_criteria(tok, "c") is stop_string_criteria(tok, ["c"])  # a bare string is one stop string
    assert stop_string_criteria(tok, "c") is not first
    assert stop_string_criteria(build_tokenizer(), ["\n\n"]) is not first  # per tokenizer

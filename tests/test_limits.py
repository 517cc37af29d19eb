"""Limit behaviours (DESIGN.md) and batch = single, under greedy decoding, for Qwen2 and Llama policies."""

import pytest
import torch
import transformers
from conftest import PROMPTS, encode, median_reward, rsd_generate
from transformers import Qwen2Config, Qwen2ForSequenceClassification

import rsd_generation as rsd
from rsd_generation.testing import make_lm


@pytest.fixture(params=["qwen_pair", "llama_pair"])
def pair(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one-row", "batch-of-3"])
def test_all_accepted_gives_draft_greedy_output(pair, prm, tok, prompts):
    target, draft = pair
    out = rsd_generate(target, draft, prm, tok, prompts, rsd_threshold=0.0)  # sigmoid rewards are >= 0
    expected = draft.generate(**encode(tok, prompts), max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.rsd_stats["acceptance_rate"] == 1.0
    assert out.rsd_stats["forward_tokens"]["target"] == 0  # the target is never called, not even for a prefill


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one-row", "batch-of-3"])
def test_all_rejected_gives_target_greedy_output(pair, prm, tok, prompts):
    target, draft = pair
    out = rsd_generate(target, draft, prm, tok, prompts, rsd_threshold=1.5)  # above every sigmoid reward
    expected = target.generate(**encode(tok, prompts), max_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.rsd_stats["acceptance_rate"] == 0.0
    assert out.rsd_stats["draft_tokens"] == 0


def test_batch_gives_exactly_what_each_row_gives_alone(pair, prm, tok):
    target, draft = pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    batch = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta, max_new_tokens=32)
    decisions = [s["accepted"] for row in batch.rsd_stats["steps"] for s in row if s["source"] == "draft"]
    assert any(decisions) and not all(decisions), "the threshold must mix accepted and rejected steps"
    for i, prompt in enumerate(PROMPTS):
        alone = rsd_generate(target, draft, prm, tok, [prompt], rsd_threshold=delta, max_new_tokens=32)
        row = batch.sequences[i].tolist()
        row = row[next(k for k, t in enumerate(row) if t != tok.pad_token_id) :]  # drop the left padding
        n = alone.sequences.shape[1]
        assert row[:n] == alone.sequences[0].tolist()
        assert set(row[n:]) <= {tok.pad_token_id}  # a row that finished early is right-padded, as in HF
        steps, alone_steps = batch.rsd_stats["steps"][i], alone.rsd_stats["steps"][0]
        assert [{**s, "reward": None} for s in steps] == [{**s, "reward": None} for s in alone_steps]
        assert [s["reward"] for s in steps] == pytest.approx([s["reward"] for s in alone_steps], abs=1e-5)


def test_sampling_all_accepted_matches_draft_sampling_under_seed(qwen_pair, prm, tok):
    target, draft = qwen_pair
    torch.manual_seed(123)
    out = rsd_generate(target, draft, prm, tok, PROMPTS[:1], rsd_threshold=0.0, do_sample=True, temperature=0.7)
    torch.manual_seed(123)
    expected = draft.generate(**encode(tok, PROMPTS[:1]), max_new_tokens=24, do_sample=True, temperature=0.7)
    assert torch.equal(out.sequences, expected)


def test_sampling_is_reproducible_under_seed_and_generator(qwen_pair, prm, tok):
    target, draft = qwen_pair
    kw = dict(rsd_weighting="clip", do_sample=True, top_k=20, top_p=0.95, max_new_tokens=32)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(rsd_generate(target, draft, prm, tok, PROMPTS, **kw))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].rsd_stats["steps"] == runs[1].rsd_stats["steps"]
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    gens = [
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=torch.Generator().manual_seed(5), **kw)
        for _ in range(2)
    ]
    torch.manual_seed(99)  # the global RNG does not matter once a generator is passed
    third = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(gens[0].sequences, gens[1].sequences)
    assert torch.equal(gens[0].sequences, third.sequences)


@pytest.fixture(params=["value_head", "qwen_prm", "sequence_classification"])
def any_prm(request, skywork_path, qwen_prm_path, tok, tmp_path_factory):
    if request.param == "value_head":
        return rsd.load_reward_model(skywork_path, tokenizer=tok)
    if request.param == "qwen_prm":
        return rsd.load_reward_model(qwen_prm_path, tokenizer=tok)
    path = tmp_path_factory.mktemp("orm")
    cfg = make_lm("qwen2", len(tok), seed=8).config.to_dict()
    torch.manual_seed(8)
    Qwen2ForSequenceClassification(Qwen2Config(**{**cfg, "num_labels": 1})).save_pretrained(path)
    return rsd.load_reward_model(path, tokenizer=tok)


def test_limits_hold_with_every_reward_model_kind(qwen_pair, any_prm, tok):
    """Outcome RMs give raw scores of any sign: δ = -inf accepts everything, δ = +inf nothing."""
    target, draft = qwen_pair
    enc = encode(tok, PROMPTS)
    accepted = rsd_generate(target, draft, any_prm, tok, PROMPTS, rsd_threshold=float("-inf"))
    assert torch.equal(accepted.sequences, draft.generate(**enc, max_new_tokens=24, do_sample=False))
    rejected = rsd_generate(target, draft, any_prm, tok, PROMPTS, rsd_threshold=float("inf"))
    assert torch.equal(rejected.sequences, target.generate(**enc, max_new_tokens=24, do_sample=False))
    # the PRM saw every draft step of both runs once, and its context the committed text only
    for out in (accepted, rejected):
        for prompt, steps in zip(PROMPTS, out.rsd_stats["steps"], strict=True):
            committed = []
            for s in steps:
                if s["source"] == "draft":
                    fresh = any_prm.score_steps(prompt, [*committed, s["text"]])[-1]
                    assert s["reward"] == pytest.approx(fresh, abs=1e-4)
                if s["accepted"]:
                    committed.append(s["text"])


def _greedy_new(model, tok) -> torch.Tensor:
    """The model's greedy new tokens on PROMPTS: `(3, 16)`."""
    return model.generate(**encode(tok, PROMPTS), max_new_tokens=16, do_sample=False)[:, -16:]


PROCESSORS = {  # "early": row 0's 3rd greedy token, as EOS; "frequent": the model's most frequent greedy token
    "repetition_penalty": {"repetition_penalty": 1.2},
    "min_new_tokens": {"min_new_tokens": 9, "eos_token_id": "early"},
    "no_repeat_ngram": {"no_repeat_ngram_size": 2},
    "bad_words": {"bad_words_ids": "frequent"},
    "all": {"repetition_penalty": 1.3, "min_new_tokens": 7, "eos_token_id": "early", "no_repeat_ngram_size": 3},
}


def _processor_kwargs(name: str, model, tok) -> dict:
    """`PROCESSORS[name]` with its placeholders replaced by tokens of the model's greedy output."""
    new = _greedy_new(model, tok)
    kw = dict(PROCESSORS[name])
    if kw.get("eos_token_id") == "early":
        kw["eos_token_id"] = int(new[0, 2])
    if kw.get("bad_words_ids") == "frequent":
        kw["bad_words_ids"] = [[int(torch.mode(new.flatten()).values)]]
    return kw


def _separator(qwen_pair, tok) -> str:
    """A step separator both models write now and then, so that steps (and rows) differ in length."""
    new = torch.cat([_greedy_new(m, tok).flatten() for m in qwen_pair])
    return tok.decode([int(torch.mode(new).values)])


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_limits_hold_with_logits_processors(qwen_pair, prm, tok, name):
    """Every step rejected (accepted) gives the target's (draft's) own `generate` with the same processors, in a
    left-padded batch whose rows end at different lengths: processors see the ids generate gives them."""
    target, draft = qwen_pair
    for delta, reference in ((1.5, target), (0.0, draft)):
        kw = _processor_kwargs(name, reference, tok)
        sep = _separator(qwen_pair, tok)
        out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta, max_new_tokens=24,
                           rsd_step_separator=sep, **kw)  # fmt: skip
        expected = reference.generate(**encode(tok, PROMPTS), max_new_tokens=24, do_sample=False, **kw)
        without = {k: v for k, v in kw.items() if k == "eos_token_id"}
        assert not torch.equal(expected, reference.generate(**encode(tok, PROMPTS), max_new_tokens=24, **without))
        assert out.sequences.tolist() == expected[:, : out.sequences.shape[1]].tolist()
        assert set(expected[:, out.sequences.shape[1] :].flatten().tolist()) <= {tok.pad_token_id}


def _generate_ignores_padding_in_repetition_penalty(model, tok, monkeypatch) -> bool:
    """Whether this transformers' `generate` gives its repetition penalty each row's padding length (5.24 does;
    5.17 penalises pad tokens in a batch, so a padded row can differ from the same row alone)."""
    seen = []
    original = transformers.generation.utils.RepetitionPenaltyLogitsProcessor

    def spy(penalty, prompt_ignore_length=None, **kw):
        seen.append(prompt_ignore_length)
        return original(penalty, prompt_ignore_length=prompt_ignore_length, **kw)

    with monkeypatch.context() as m:
        m.setattr(transformers.generation.utils, "RepetitionPenaltyLogitsProcessor", spy)
        model.generate(**encode(tok, PROMPTS), max_new_tokens=1, repetition_penalty=1.2)
    return isinstance(seen[0], torch.Tensor)


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_batch_gives_what_each_row_gives_alone_with_logits_processors(qwen_pair, prm, tok, name, monkeypatch):
    target, draft = qwen_pair
    kw = {**_processor_kwargs(name, target, tok), "rsd_step_separator": _separator(qwen_pair, tok)}
    if "repetition_penalty" in kw and not _generate_ignores_padding_in_repetition_penalty(target, tok, monkeypatch):
        pytest.skip(
            f"transformers {transformers.__version__}'s own generate penalises a batch row's left padding (its "
            "repetition penalty has no per-row prompt_ignore_length), and RSD hands processors what generate does"
        )
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    batch = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta, max_new_tokens=32, **kw)
    lengths = {len([t for t in row if t != tok.pad_token_id]) for row in batch.sequences.tolist()}
    decisions = [s["accepted"] for row in batch.rsd_stats["steps"] for s in row if s["source"] == "draft"]
    assert any(decisions) and not all(decisions), "the threshold must mix accepted and rejected steps"
    for i, prompt in enumerate(PROMPTS):
        alone = rsd_generate(target, draft, prm, tok, [prompt], rsd_threshold=delta, max_new_tokens=32, **kw)
        row = batch.sequences[i].tolist()
        row = row[next(k for k, t in enumerate(row) if t != tok.pad_token_id) :]  # drop the left padding
        n = alone.sequences.shape[1]
        assert row[:n] == alone.sequences[0].tolist(), f"row {i} of {len(lengths)} distinct lengths"
        assert set(row[n:]) <= {tok.pad_token_id}


@pytest.mark.parametrize(
    "extra",
    [{}, {"rsd_speculative": 2}, {"rsd_max_batch_size": 2, "rsd_schedule": 2}, {"rsd_fast_path": "static"}],
    ids=["plain", "speculative", "queue-and-schedule", "static"],
)
def test_sampled_rows_with_their_own_generators_are_what_they_are_alone(qwen_pair, prm, tok, extra):
    """rsd_generator as a list: each row draws from its own stream (tokens, acceptance), so a sampled row in a batch
    is the same row sampled alone with that generator (temperature and top-p on, coin-flip acceptance)."""
    target, draft = qwen_pair
    kw = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0, rsd_weighting="constant", rsd_threshold=0.5)
    kw.update(max_new_tokens=24, **extra)

    def gens(rows):
        return [torch.Generator().manual_seed(100 + i) for i in rows]

    batch = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=gens(range(len(PROMPTS))), **kw)
    decisions = [s["accepted"] for row in batch.rsd_stats["steps"] for s in row if s["source"] == "draft"]
    assert any(decisions) and not all(decisions)
    for i, prompt in enumerate(PROMPTS):
        alone = rsd_generate(target, draft, prm, tok, [prompt], rsd_generator=gens([i]), **kw)
        row = batch.sequences[i].tolist()
        row = row[next(k for k, t in enumerate(row) if t != tok.pad_token_id) :]
        assert row[: alone.sequences.shape[1]] == alone.sequences[0].tolist()
        assert [(s["text"], s["accepted"]) for s in batch.rsd_stats["steps"][i]] == [
            (s["text"], s["accepted"]) for s in alone.rsd_stats["steps"][0]
        ]


def test_a_generator_list_must_match_the_batch(qwen_pair, prm, tok):
    target, draft = qwen_pair
    with pytest.raises(ValueError, match="one generator per row: got 2 for 3 rows"):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="a list of them, got a list holding int"):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=[torch.Generator(), 3, torch.Generator()])

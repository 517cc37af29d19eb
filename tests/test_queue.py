"""A refilling queue (rsd_max_batch_size): at most k rows decode at once, finished rows hand their slot to the next
prompt, and every row gets what it gets in one full batch (greedy), in prompt order, on every cache."""

import pytest
import torch
from conftest import PATHS, encode, median_reward, on_device, prm_on_device, rsd_generate

from rsd_generation.decoding import catch_up_mode
from rsd_generation.fast import fast_mode

PROMPTS = ["1+2=", "12*3+45-6=", "7*8=", "99-8*7=", "4+4+4+4=", "6/3="]  # rows of different lengths


def _steps(out) -> list:
    return [[(s["text"], s["source"], s["accepted"]) for s in row] for row in out.rsd_stats["steps"]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_a_queue_gives_what_the_full_batch_gives(qwen_pair, prm, tok, path, slots):
    target, draft = on_device(qwen_pair, path)
    prm = prm_on_device(prm, path)
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    kw = dict(rsd_threshold=delta, max_new_tokens=32, rsd_fast_path=path, rsd_max_step_tokens=5)
    full = rsd_generate(target, draft, prm, tok, PROMPTS, **kw)
    queued = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_max_batch_size=slots, **kw)
    assert torch.equal(queued.sequences, full.sequences)
    assert _steps(queued) == _steps(full)
    decisions = [a for row in _steps(full) for _, src, a in row if src == "draft"]
    assert any(decisions) and not all(decisions), "the threshold must mix accepted and rejected steps"
    lengths = {len([t for t in row if t != tok.pad_token_id]) for row in full.sequences.tolist()}
    assert len(lengths) > 1, "rows must finish at different times, so that slots are handed on mid-run"
    # each row's work is its own; where the target catches rows up along other rows' forwards (the graph paths'
    # default), how many tokens it runs depends on which rows share a forward: the draft's and PRM's counts only
    lazy = catch_up_mode("auto", fast_mode(path, target)) == "lazy"

    def counts(stats: dict) -> list[dict]:
        return [{k: v for k, v in c.items() if lazy or k != "target"}
                for c in (stats["forward_tokens"], *(r["forward_tokens"] for r in stats["per_row"]))]  # fmt: skip

    assert counts(queued.rsd_stats) == counts(full.rsd_stats)


@pytest.mark.parametrize("path", PATHS)
def test_prompts_and_catch_ups_fed_in_slices_give_the_same_run(qwen_pair, prm, tok, path, monkeypatch):
    """With every queue fed in slices of a few columns (MAX_CHUNK_POSITIONS: the prompts, the target's catch-ups,
    the PRM's problems and steps), RSD through a queue gives the same tokens, decisions and counts."""
    from rsd_generation import kv

    target, draft = on_device(qwen_pair, path)
    prm = prm_on_device(prm, path)
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    kw = dict(rsd_threshold=delta, max_new_tokens=32, rsd_fast_path=path, rsd_max_step_tokens=5, rsd_max_batch_size=4)
    whole = rsd_generate(target, draft, prm, tok, PROMPTS, **kw)
    monkeypatch.setattr(kv, "MAX_CHUNK_POSITIONS", 8)  # 4 slots: 2 columns per forward
    sliced = rsd_generate(target, draft, prm, tok, PROMPTS, **kw)
    assert torch.equal(sliced.sequences, whole.sequences)
    assert _steps(sliced) == _steps(whole)
    assert sliced.rsd_stats["forward_tokens"] == whole.rsd_stats["forward_tokens"]
    calls = [s.rsd_stats["forward_calls"] for s in (whole, sliced)]
    assert all(calls[1][m] > calls[0][m] for m in ("draft", "target", "reward")), calls


@pytest.mark.parametrize("path", PATHS)
def test_limits_hold_through_a_queue(qwen_pair, prm, tok, path):
    target, draft = on_device(qwen_pair, path)
    prm = prm_on_device(prm, path)
    enc = encode(tok, PROMPTS).to(target.device)
    for delta, reference in ((0.0, draft), (1.5, target)):
        out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta, rsd_max_batch_size=2,
                           rsd_fast_path=path)  # fmt: skip
        assert torch.equal(out.sequences.cpu(), reference.generate(**enc, max_new_tokens=24, do_sample=False).cpu())


def test_a_queue_with_logits_processors_and_a_schedule(qwen_pair, prm, tok):
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    kw = dict(rsd_threshold=delta, max_new_tokens=32, repetition_penalty=1.2, no_repeat_ngram_size=3)
    full = rsd_generate(target, draft, prm, tok, PROMPTS, **kw)
    queued = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_max_batch_size=3, rsd_schedule=2, **kw)
    assert torch.equal(queued.sequences, full.sequences)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_a_bad_max_batch_size_is_refused_with_the_value_named(qwen_pair, prm, tok, bad):
    target, draft = qwen_pair
    with pytest.raises(ValueError, match=f"rsd_max_batch_size must be None or an int >= 1, got {bad!r}"):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_max_batch_size=bad)


def test_a_queue_with_stop_strings_max_steps_and_sampling(qwen_pair, prm, tok):
    target, draft = qwen_pair
    text = [tok.decode(r) for r in target.generate(**encode(tok, PROMPTS), max_new_tokens=12, do_sample=False)]
    stop = text[1][-4]  # a character the target writes: some rows stop early on it
    for kw in (
        dict(rsd_threshold=0.5, stop_strings=[stop]),
        dict(rsd_threshold=0.5, rsd_max_steps=3),
        dict(rsd_weighting="clip", do_sample=True, top_k=10),
    ):
        runs = [
            rsd_generate(
                target,
                draft,
                prm,
                tok,
                PROMPTS,
                rsd_generator=torch.Generator().manual_seed(1),
                rsd_max_batch_size=k,
                **kw,
            )
            for k in (None, 2, 2)
        ]
        assert torch.equal(runs[1].sequences, runs[2].sequences)  # reproducible under a seed
        if not kw.get("do_sample"):  # greedy: the queue gives the full batch's tokens
            assert torch.equal(runs[0].sequences, runs[1].sequences)
            assert _steps(runs[0]) == _steps(runs[1])


def test_every_combination_of_path_schedule_queue_and_speculation_gives_the_same_tokens(qwen_pair, prm, tok):
    """Greedy: how rows are scheduled, queued and regenerated never changes what they compute."""
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    kw = dict(rsd_threshold=delta, max_new_tokens=32, rsd_max_step_tokens=5)
    reference = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path="off", **kw)
    for path in ("off", "static"):
        for schedule in ("eager", 2, "throughput"):
            for slots in (None, 2):
                for gamma in (0, 3):
                    out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path=path, rsd_schedule=schedule,
                                       rsd_max_batch_size=slots, rsd_speculative=gamma, **kw)  # fmt: skip
                    case = f"path={path} schedule={schedule} slots={slots} gamma={gamma}"
                    assert torch.equal(out.sequences, reference.sequences), case
                    assert _steps(out) == _steps(reference), case

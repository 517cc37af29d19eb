"""The scheduler (rsd_generation.schedule): which model runs at each tick changes the speed, never the tokens."""

import pytest
import torch
from conftest import PATHS, PROMPTS, encode, median_reward, on_device, prm_on_device, rsd_generate

from rsd_generation.schedule import Scheduler

SCHEDULES = ["eager", 2, 3, "throughput"]
MORE = [*PROMPTS, "99-8*7=", "4+4+4+4="]  # five rows of different lengths


def _steps(out) -> list:
    """Per row: the steps' texts, sources and decisions (rewards compared apart, to float tolerance)."""
    return [[(s["text"], s["source"], s["accepted"]) for s in row] for row in out.rsd_stats["steps"]]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_gives_the_eager_tokens_and_decisions(qwen_pair, prm, tok, schedule):
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, MORE)
    kw = dict(rsd_threshold=delta, max_new_tokens=32)
    eager = rsd_generate(target, draft, prm, tok, MORE, rsd_schedule="eager", **kw)
    out = rsd_generate(target, draft, prm, tok, MORE, rsd_schedule=schedule, **kw)
    assert torch.equal(out.sequences, eager.sequences)
    assert _steps(out) == _steps(eager)
    decisions = [a for row in _steps(out) for _, src, a in row if src == "draft"]
    assert any(decisions) and not all(decisions), "the threshold must mix accepted and rejected steps"
    for i, prompt in enumerate(MORE):  # and each row is what it is alone
        alone = rsd_generate(target, draft, prm, tok, [prompt], rsd_schedule=schedule, **kw)
        row = out.sequences[i].tolist()
        row = row[next(k for k, t in enumerate(row) if t != tok.pad_token_id) :]
        assert row[: alone.sequences.shape[1]] == alone.sequences[0].tolist()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_limits_hold_under_every_schedule(qwen_pair, prm, tok, schedule):
    target, draft = qwen_pair
    enc = encode(tok, MORE)
    for delta, reference in ((0.0, draft), (1.5, target)):
        out = rsd_generate(target, draft, prm, tok, MORE, rsd_threshold=delta, rsd_schedule=schedule)
        assert torch.equal(out.sequences, reference.generate(**enc, max_new_tokens=24, do_sample=False))


def test_waiting_rows_let_the_target_serve_more_rows_per_tick(qwen_pair, prm, tok):
    target, draft = qwen_pair
    kw = dict(rsd_weighting="constant", rsd_threshold=0.6, max_new_tokens=32)  # seeded coin flips
    runs = {
        schedule: rsd_generate(
            target, draft, prm, tok, MORE, rsd_schedule=schedule, rsd_generator=torch.Generator().manual_seed(3), **kw
        ).rsd_stats
        for schedule in ("eager", len(MORE))
    }
    eager, gather = runs["eager"], runs[len(MORE)]
    assert gather["ticks"]["target"] < eager["ticks"]["target"]  # fuller target calls, fewer of them
    assert gather["ticks"]["draft"] > eager["ticks"]["draft"]  # the draft goes on meanwhile, with fewer rows
    rejected = sum(not s["accepted"] for row in gather["steps"] for s in row if s["source"] == "draft")
    assert gather["ticks"]["target"] <= rejected and gather["target_tokens"] > 0


def test_the_policies_decide_as_documented():
    assert Scheduler("eager").run_target(waiting=1, drafting=7)
    assert not Scheduler(3).run_target(waiting=2, drafting=6) and Scheduler(3).run_target(waiting=3, drafting=5)
    assert Scheduler(3).run_target(waiting=1, drafting=0)  # nobody left to draft: the target runs
    assert not Scheduler("eager").run_target(waiting=0, drafting=8)
    t = Scheduler("throughput")
    assert t.run_target(waiting=1, drafting=7)  # nothing measured yet: as eager
    t.seconds, t.accepted = {"draft": 0.1, "target": 0.2}, 0.8
    assert not t.run_target(waiting=2, drafting=6)  # 2 / 0.2 = 10 steps/s < 0.8 * 6 / 0.1 = 48
    assert t.run_target(waiting=7, drafting=1)  # 35 >= 8


@pytest.mark.parametrize("bad", ["lazy", 0, -2, True, 1.5])
def test_a_bad_schedule_is_refused_with_the_value_named(qwen_pair, prm, tok, bad):
    target, draft = qwen_pair
    with pytest.raises(ValueError, match=f"rsd_schedule must be one of .* got {bad!r}"):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_schedule=bad)


@pytest.mark.parametrize("path", PATHS)
def test_catching_up_along_gives_the_lazy_tokens_and_decisions(qwen_pair, prm, tok, path):
    """`rsd_catch_up="along"`: the target's forwards feed the other rows' accepted drafts one token at a time. The
    tokens and decisions are the lazy catch-up's (greedy), under the eager schedule and with rows waiting; the
    target runs no more forwards, and processes more tokens (it also reads steps of rows it never writes for).
    `"auto"` (the default) is along on the graphs path and lazy on the others."""
    target, draft = on_device(qwen_pair, path)
    prm = prm_on_device(prm, path)
    # seeded coins over many short steps: rows that rode along are rejected later, so their context is read
    kw = dict(rsd_weighting="constant", rsd_weighting_kwargs={"p": 0.5}, max_new_tokens=32, rsd_fast_path=path,
              rsd_max_step_tokens=4)  # fmt: skip
    for schedule in ("eager", 2):
        runs = {
            catch_up: rsd_generate(target, draft, prm, tok, MORE, rsd_schedule=schedule, rsd_catch_up=catch_up,
                                   rsd_generator=torch.Generator().manual_seed(5), **kw)
            for catch_up in ("lazy", "along", "auto")
        }  # fmt: skip
        lazy, along = runs["lazy"], runs["along"]
        assert torch.equal(along.sequences, lazy.sequences)
        assert _steps(along) == _steps(lazy)
        auto = runs["along" if path == "graphs" else "lazy"]
        assert torch.equal(runs["auto"].sequences, lazy.sequences)
        for stat in ("forward_calls", "forward_tokens", "padded_tokens"):
            assert runs["auto"].rsd_stats[stat] == auto.rsd_stats[stat], (stat, path)
        decisions = [a for row in _steps(lazy) for _, src, a in row if src == "draft"]
        assert any(decisions) and not all(decisions), "the threshold must mix accepted and rejected steps"
        a, b = along.rsd_stats, lazy.rsd_stats
        assert a["forward_calls"]["target"] <= b["forward_calls"]["target"]
        assert a["forward_tokens"]["target"] > b["forward_tokens"]["target"]  # the riders were fed


def test_catching_up_along_samples_what_lazy_samples(qwen_pair, prm, tok):
    """Under sampling with one shared generator, riders draw nothing of their own (their picks are discarded, as
    a masked row's are), so the sampled tokens and decisions are the lazy catch-up's."""
    target, draft = qwen_pair
    runs = {
        catch_up: rsd_generate(target, draft, prm, tok, MORE, rsd_weighting="constant", rsd_weighting_kwargs={"p": 0.5},
                               max_new_tokens=32, rsd_max_step_tokens=4, do_sample=True, temperature=1.0,
                               rsd_generator=torch.Generator().manual_seed(7), rsd_catch_up=catch_up)
        for catch_up in ("lazy", "along")
    }  # fmt: skip
    lazy, along = runs["lazy"], runs["along"]
    assert torch.equal(along.sequences, lazy.sequences)
    assert _steps(along) == _steps(lazy)
    assert along.rsd_stats["forward_tokens"]["target"] > lazy.rsd_stats["forward_tokens"]["target"]  # riders fed


def test_catching_up_along_cuts_the_targets_padding_at_batch_64():
    """At 64 rows the lazy catch-up pads each chunk to its longest queue; fed along, most of that padding goes
    (tiny random models of the speed benchmark's layout, seeded coin acceptance, the same tokens either way)."""
    from rsd_generation.benchmarks.speed import QWEN_1_5B, QWEN_7B, TINY, random_model, word_tokenizer
    from torch import nn

    import rsd_generation as rsd

    small = {**QWEN_1_5B, **TINY, "vocab_size": 2000}
    big = {**QWEN_7B, **TINY, "hidden_size": 128, "vocab_size": 2000}
    words = word_tokenizer(small["vocab_size"])
    draft, target = random_model(small, 1, "cpu", torch.float32), random_model(big, 2, "cpu", torch.float32)
    reward = rsd.ValueHeadPRM(random_model(small, 3, "cpu", torch.float32).model, nn.Linear(64, 1), words, "b")
    prompts = torch.randint(1, 1000, (64, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for catch_up in ("lazy", "along"):
        runs[catch_up] = target.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=128, min_new_tokens=128,
            do_sample=False, tokenizer=words, assistant_model=draft, reward_model=reward, rsd_max_step_tokens=32,
            return_dict_in_generate=True, rsd_fast_path="static", rsd_generator=torch.Generator().manual_seed(16),
            rsd_weighting="constant", rsd_weighting_kwargs={"p": 0.8}, rsd_catch_up=catch_up,
        )  # fmt: skip
    lazy, along = runs["lazy"], runs["along"]
    assert torch.equal(along.sequences, lazy.sequences)
    pad_lazy, pad_along = lazy.rsd_stats["padded_tokens"]["target"], along.rsd_stats["padded_tokens"]["target"]
    assert pad_along < 0.6 * pad_lazy, (pad_along, pad_lazy)
    total = {
        k: r.rsd_stats["padded_tokens"]["target"] + r.rsd_stats["forward_tokens"]["target"] for k, r in runs.items()
    }
    assert total["along"] < total["lazy"], total  # fewer positions in all, padding and real


def test_catch_up_auto_rides_where_forwards_are_graphs():
    """`catch_up_mode`: an explicit value stands; `"auto"` is along on the graph-captured paths only."""
    from rsd_generation.decoding import catch_up_mode

    assert [catch_up_mode("auto", f) for f in ("off", "static", "graphs", "compile")] == ["lazy", "lazy", "along",
                                                                                           "along"]  # fmt: skip
    assert catch_up_mode("lazy", "graphs") == "lazy" and catch_up_mode("along", "off") == "along"


@pytest.mark.parametrize("bad", ["eager", "", None, 1])
def test_a_bad_catch_up_is_refused_with_the_value_named(qwen_pair, prm, tok, bad):
    target, draft = qwen_pair
    with pytest.raises(ValueError, match=f"rsd_catch_up must be one of .* got {bad!r}"):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_catch_up=bad)

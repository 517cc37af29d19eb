"""Cache reuse: on a 10-step response, each model processes at most 1.1x the positions it truly needs."""

import pytest
import torch
from conftest import PROMPTS, EndRowZeroEarly, encode, median_reward, rsd_generate

BOUND = 1.1  # forward positions / positions truly needed; recomputing the prefix each step would give ~5x


def test_forward_tokens_within_bound_of_what_each_model_needs(qwen_pair, prm, tok):
    target, draft = qwen_pair
    prompt = PROMPTS[1]
    delta = median_reward(target, draft, prm, tok, [prompt])
    out = rsd_generate(target, draft, prm, tok, [prompt], rsd_threshold=delta, max_new_tokens=40)
    st, steps = out.rsd_stats, out.rsd_stats["steps"][0]
    committed = [s for s in steps if s["accepted"]]
    assert len(committed) >= 10, "steps of at most 4 tokens, 40 new tokens: a response of 10+ steps"
    assert 0 < st["acceptance_rate"] < 1, "both branches must run"
    P = encode(tok, [prompt])["input_ids"].shape[1]

    # draft: the prompt, every committed token, its own discarded tokens
    need_draft = P + st["draft_tokens"] + st["target_tokens"] + st["discarded_draft_tokens"]
    # target: the prompt and everything committed up to the end of its last step
    last_target = max(i for i, s in enumerate(committed) if s["source"] == "target")
    need_target = P + sum(s["n_tokens"] for s in committed[: last_target + 1])
    # PRM: its prefix, every scored draft step, every target step (as context)
    need_prm = len(prm.prefix_ids(prompt)) + sum(len(prm.step_ids(s["text"])) for s in steps)

    assert st["forward_tokens"]["draft"] <= BOUND * need_draft
    assert st["forward_tokens"]["target"] <= BOUND * need_target
    assert st["forward_tokens"]["reward"] <= BOUND * need_prm
    # and nothing is skipped: every needed position but the last generated token of a step is processed
    assert st["forward_tokens"]["reward"] == need_prm
    assert st["forward_tokens"]["draft"] >= need_draft - len(steps)
    assert st["prm_calls"] == sum(s["source"] == "draft" for s in steps)
    # one forward per generated token (the catch-up rides on a step's first forward), one PRM forward per step
    assert st["forward_calls"] == {
        "draft": st["draft_tokens"] + st["discarded_draft_tokens"],
        "target": st["target_tokens"],
        "reward": st["prm_calls"],
    }
    for model in ("draft", "target", "reward"):
        assert st["flops"][model] == 2 * st["num_parameters"][model] * st["forward_tokens"][model]


def test_stats_add_up_to_the_output(qwen_pair, prm, tok):
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta)
    P = encode(tok, PROMPTS)["input_ids"].shape[1]
    st = out.rsd_stats
    for i, steps in enumerate(st["steps"]):
        text = tok.decode(out.sequences[i, P:], skip_special_tokens=True)
        assert text == "".join(s["text"] for s in steps if s["accepted"])
        new = int((out.sequences[i, P:] != tok.pad_token_id).sum())
        assert new == sum(s["n_tokens"] for s in steps if s["accepted"])
        for s in steps:
            assert s["source"] in ("draft", "target")
            assert (s["reward"] is None) == (s["source"] == "target")
    assert st["draft_tokens"] + st["target_tokens"] == int((out.sequences[:, P:] != tok.pad_token_id).sum())
    drafted = [s for row in st["steps"] for s in row if s["source"] == "draft"]
    assert st["acceptance_rate"] == pytest.approx(sum(s["accepted"] for s in drafted) / len(drafted))
    assert st["decode_flops"]["reward"] == 2 * st["num_parameters"]["reward"] * st["prm_calls"]


def test_rows_finish_on_their_own(qwen_pair, prm, tok):
    """A row that hits EOS stops; the others go on and the finished row is right-padded."""
    target, draft = qwen_pair
    eos = tok.eos_token_id

    from transformers import LogitsProcessorList

    out = rsd_generate(
        target,
        draft,
        prm,
        tok,
        PROMPTS,
        rsd_threshold=0.0,
        logits_processor=LogitsProcessorList([EndRowZeroEarly(tok)]),
    )
    P = encode(tok, PROMPTS)["input_ids"].shape[1]
    row0 = out.sequences[0, P:].tolist()
    k = row0.index(eos)
    assert set(row0[k + 1 :]) == {tok.pad_token_id} and k < 4
    assert all(t != tok.pad_token_id for t in out.sequences[1, P:].tolist())
    assert out.sequences.shape[1] == P + 24
    assert torch.equal(
        out.sequences[1:], rsd_generate(target, draft, prm, tok, PROMPTS[1:], rsd_threshold=0.0).sequences
    )


def test_per_row_counts_equal_each_row_run_alone(qwen_pair, prm, tok):
    """Per-row forward positions and FLOPs of a batch are what each row spends when it runs alone."""
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    batch = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta)["rsd_stats"]
    for model in ("draft", "target", "reward"):
        assert sum(r["forward_tokens"][model] for r in batch["per_row"]) == batch["forward_tokens"][model]
        assert sum(r["flops"][model] for r in batch["per_row"]) == batch["flops"][model]
        assert sum(r["decode_flops"][model] for r in batch["per_row"]) == batch["decode_flops"][model]
    for i, prompt in enumerate(PROMPTS):
        alone = rsd_generate(target, draft, prm, tok, [prompt], rsd_threshold=delta)["rsd_stats"]
        row = batch["per_row"][i]
        assert row["flops"] == alone["flops"]
        assert row["decode_flops"] == alone["decode_flops"]
        # the batch prompt is left-padded; padding is masked, so not counted
        assert row["forward_tokens"] == alone["forward_tokens"]


@pytest.mark.parametrize("path", ["off", "static"])
def test_the_target_runs_only_the_rows_it_writes_for(qwen_pair, prm, tok, path):
    """At batch 8 with 1 step in 5 rejected, the target's forwards carry few padded positions: rows that did not
    reject are not fed as masked padding (before gathering: 3.4x and 4.3x the valid positions)."""
    target, draft = qwen_pair
    prompts = ["1+2=", "12*3+45-6=", "7*8=", "99-8*7=", "4+4+4+4=", "6/3=", "5*5-1=", "8+8="]
    kw = dict(rsd_weighting="constant", rsd_threshold=0.8, max_new_tokens=32, rsd_fast_path=path,
              rsd_generator=torch.Generator().manual_seed(3))  # fmt: skip
    st = rsd_generate(target, draft, prm, tok, prompts, **kw).rsd_stats
    assert 0.6 < st["acceptance_rate"] < 1 and st["target_tokens"] > 0
    assert st["padded_tokens"]["target"] <= 0.5 * st["forward_tokens"]["target"]

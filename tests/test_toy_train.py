"""Pieces of the toy training script that must agree with the rest of the project."""

import json
import random

import pytest
import torch
from conftest import NEEDS_BENCH
from rsd_generation.benchmarks.toy import MODELS as TOY
from rsd_generation.benchmarks.toy.task import CORRUPTIONS, Problem, corrupt_step, problems, split_steps, step_labels
from rsd_generation.benchmarks.toy.tokenizer import build_toy_tokenizer
from rsd_generation.benchmarks.toy.train import (
    SMALL,
    PRMHead,
    hard_negatives,
    main,
    new_policy,
    pair_accuracy,
    pair_examples,
    prm_example,
    roc_auc,
)

import rsd_generation as rsd
from rsd_generation.rewards import read_prm_format


def test_roc_auc_on_a_hand_computed_case():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4
    assert roc_auc(torch.tensor([0.9, 0.5, 0.4, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)  # ties count half
    assert torch.isnan(torch.tensor(roc_auc(torch.tensor([0.3]), torch.tensor([1.0]))))


def test_an_undefined_metric_is_written_as_strict_json_null(tmp_path):
    """An AUC over one class (NaN) and other non-finite floats reach result files as null, never as the bare `NaN`
    that strict JSON parsers refuse."""
    from rsd_generation.benchmarks.io import write_json_atomic

    auc = roc_auc(torch.tensor([0.3]), torch.tensor([1.0]))
    path = write_json_atomic(tmp_path / "metrics.json", {"auc": auc, "curve": [float("inf"), 0.5], "pair": (1.0, -0.0)})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written == {"auc": None, "curve": [None, 0.5], "pair": [1.0, 0.0]}


def _toy_prm(tok) -> PRMHead:
    return PRMHead(new_policy(SMALL, len(tok), tok.eos_token_id, 0))


def test_prm_training_layout_is_what_the_benchmark_scores():
    """The PRMs are trained on exactly the ids the shipped checkpoints are scored on in `rsd-bench`: the problem as
    the toy dataset states it, each step unstripped, then the token of "\n\n" (the RSD reference's format)."""
    tok = build_toy_tokenizer()
    p = Problem(numbers=(37, 8, 12, 5), ops=("+", "*", "-"), level=2)
    steps = split_steps("8*12=96\n\n37+96=134\n\n134-5=129\n\nThe answer is 129.")
    fmt = _toy_prm(tok).input_format(tok)
    ids, pos, labels = prm_example(fmt, p, steps, step_labels(p, steps))
    adapter = rsd.load_reward_model(TOY / "prm-small")  # what the benchmark loads
    assert p.question == "Compute 37+8*12-5."
    sep = tok.encode("\n\n", add_special_tokens=False)
    assert len(sep) == 1
    expected = tok.encode("Compute 37+8*12-5.\n", add_special_tokens=False)
    for s in ["8*12=96", "37+96=134", "134-5=129", "The answer is 129."]:
        expected += tok.encode(s, add_special_tokens=False) + sep
    assert ids == expected
    assert adapter.input_format == fmt.input_format == {"step_token": "\n\n", "strip_steps": False}
    assert read_prm_format(TOY / "prm-small") == fmt.input_format
    assert [ids[q] for q in pos] == sep * 4
    assert labels == [1.0, 0.0, 0.0, 0.0]


@NEEDS_BENCH
def test_the_toy_dataset_gives_the_prms_the_problem_text_they_are_trained_on():
    from rsd_generation.benchmarks.datasets import load_toy_dataset

    assert [e.question for e in load_toy_dataset(5, 3)] == [p.question for p in problems(5, 3)]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupted_step_is_wrong_and_near_the_right_one(kind):
    rng = random.Random(0)
    for p in problems(7, 200):
        ref = split_steps(p.solution())
        k = rng.randrange(len(ref))
        bad = corrupt_step(p, ref[:k], rng, kind)
        assert step_labels(p, [*ref[:k], bad]) == [True] * k + [False], (p.expression, ref[:k], bad)
        if k == len(ref) - 1:
            assert bad.startswith("The answer is ") and bad != ref[k]
        elif kind == "result":  # the same reduction, another result
            assert bad.split("=")[0] == ref[k].split("=")[0] and bad != ref[k]


def test_corrupted_step_kinds_differ_and_bad_input_is_refused():
    p = Problem(numbers=(37, 8, 12, 5), ops=("+", "*", "-"), level=2)
    rng = random.Random(1)
    assert corrupt_step(p, [], rng, "order") in ("37+8=45", "12-5=7")  # legal arithmetic, illegal order
    assert corrupt_step(p, [], rng, "operand").split("=")[0] != "8*12"
    with pytest.raises(ValueError, match="'sideways'"):
        corrupt_step(p, [], rng, "sideways")
    with pytest.raises(ValueError, match="'8\\*12=97' is not"):
        corrupt_step(p, ["8*12=97"], rng)


def test_hard_negatives_and_pairs_are_labelled_as_the_task_grades():
    tok = build_toy_tokenizer()
    fmt = _toy_prm(tok).input_format(tok)
    probs = problems(3, 40)
    negs = hard_negatives(fmt, probs, random.Random(0))
    assert len(negs) == 40 and all(lab[-1] == 0.0 and all(x == 1.0 for x in lab[:-1]) for _, _, lab in negs)
    pairs = pair_examples(fmt, probs, random.Random(0))
    assert len(pairs) == 80 and [e[2] for e in pairs[:4]] == [[1.0], [0.0], [1.0], [0.0]]
    assert all(len(e[1]) == 1 and e[1][0] == len(e[0]) - 1 for e in pairs)  # only the last step is scored
    assert pair_accuracy(torch.tensor([0.9, 0.1, 0.2, 0.3, 0.5, 0.5])) == pytest.approx((1 + 0 + 0.5) / 3)


def test_training_refuses_to_overwrite_and_checks_its_inputs(tmp_path):
    (tmp_path / "draft").mkdir()
    with pytest.raises(SystemExit, match="draft exists; pass --force"):
        main(["--output", str(tmp_path), "--only", "draft", "--scale", "0.001", "--device", "cpu"])
    with pytest.raises(SystemExit, match="has no trained draft"):
        main(["--output", str(tmp_path), "--only", "prm-small", "--scale", "0.001", "--device", "cpu"])
    assert list((tmp_path / "draft").iterdir()) == []  # untouched


def test_the_specialist_slice_is_what_it_says_and_the_mix_follows_its_share():
    from rsd_generation.benchmarks.toy.specialist import SLICE_OPERANDS, mixed, slice_problem

    rng = random.Random(0)
    for _ in range(200):
        p = slice_problem(rng)
        assert set(p.ops) <= {"+", "-"} and 4 <= len(p.ops) <= 6
        assert all(SLICE_OPERANDS[0] <= n <= SLICE_OPERANDS[1] for n in p.numbers)
        assert step_labels(p, split_steps(p.solution())) == [True] * (len(p.ops) + 1)
    drawn = [mixed(0.25)(rng) for _ in range(2000)]
    share = sum(min(p.numbers) >= 100 and "*" not in p.ops and len(p.ops) >= 4 for p in drawn) / len(drawn)
    assert 0.2 < share < 0.3  # the usual levels almost never look like the slice
    assert all("*" not in p.ops and min(p.numbers) >= 100 for p in (mixed(1.0)(rng) for _ in range(50)))

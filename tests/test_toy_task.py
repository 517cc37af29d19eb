"""The toy task: generator, reference solutions, step labels and grading."""

import pytest
from rsd_generation.benchmarks.toy.task import (
    LEVELS,
    Problem,
    generate_problem,
    is_correct,
    problems,
    split_steps,
    step_labels,
)

P = Problem(numbers=(37, 8, 12, 5), ops=("+", "*", "-"), level=2)


def test_expression_prompt_answer_and_reference_solution():
    assert P.expression == "37+8*12-5"
    assert P.prompt == "Compute 37+8*12-5.\n\n"
    assert P.answer == 128
    assert P.solution() == "8*12=96\n\n37+96=133\n\n133-5=128\n\nThe answer is 128."


@pytest.mark.parametrize(
    ("solution", "labels"),
    [
        ("8*12=96\n\n37+96=133\n\n133-5=128\n\nThe answer is 128.", [True] * 4),
        ("8*12=96\n\n37+96=134\n\n134-5=129\n\nThe answer is 129.", [True, False, False, False]),  # wrong sum
        ("37+8=45\n\n45*12=540\n\n540-5=535\n\nThe answer is 535.", [False] * 4),  # + before *: illegal
        ("8*12=96\n\n96-5=91\n\n37+91=128\n\nThe answer is 128.", [True, False, False, False]),  # - not leftmost
        ("8*12=96\n\nThe answer is 96.", [True, False]),  # answer before the end
        ("8*12=96\n\n37+96=133\n\n133-5=128\n\nThe answer is 128.\n\n1+1=2", [True] * 4 + [False]),
        ("eight times twelve\n\n37+96=133", [False, False]),
    ],
)
def test_step_labels_are_prefix_correct(solution, labels):
    assert step_labels(P, split_steps(solution)) == labels


def test_any_product_may_go_first():
    p = Problem(numbers=(2, 3, 4, 5), ops=("*", "+", "*"), level=2)
    assert step_labels(p, ["4*5=20", "2*3=6", "6+20=26", "The answer is 26."]) == [True] * 4


def test_grading_reads_the_final_answer():
    assert is_correct(P, "8*12=96\n\n37+96=133\n\n133-5=128\n\nThe answer is 128.")
    assert is_correct(P, "The answer is 128.")  # outcome grading ignores the steps
    assert not is_correct(P, "8*12=96\n\n37+96=133\n\n133-5=128")  # no answer stated
    assert not is_correct(P, "The answer is 127.")


def test_generator_is_seeded_and_levelled():
    a, b = problems(7, 50), problems(7, 50)
    assert a == b and a != problems(8, 50)
    for p in a:
        assert len(p.ops) == p.level + 1
        assert step_labels(p, split_steps(p.solution())) == [True] * (len(p.ops) + 1)
        assert is_correct(p, p.solution())
    assert {p.level for p in a} == set(LEVELS)
    with pytest.raises(ValueError, match="level must be one of"):
        import random

        generate_problem(random.Random(0), 6)

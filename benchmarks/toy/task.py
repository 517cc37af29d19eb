"""Multi-step arithmetic whose every step can be checked: the toy task of the benchmark.

A problem is an expression such as `37+8*12-5`. A solution reduces it one operation per step, steps separated by
"\\n\\n", and its last step states the answer:

    8*12=96

    37+96=133

    133-5=128

    The answer is 128.

Levels 1-5 (as MATH has) set the number of operations (level + 1) and the operand sizes. A step is correct when it
performs a legal reduction (any product first, then the leftmost sum or difference) with the right result, and
when every step before it was correct (prefix-correct labels, as PRMs are trained on).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SEPARATOR = "\n\n"
LEVELS = (1, 2, 3, 4, 5)
_OPERAND_MAX = {1: 9, 2: 20, 3: 50, 4: 99, 5: 199}
_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"^\s*The answer is (-?\d+)\.?\s*$")


@dataclass(frozen=True)
class Problem:
    """One problem: its expression as numbers and operators, its level and its answer."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]
    level: int

    @property
    def expression(self) -> str:
        """The expression as text, e.g. "37+8*12-5"."""
        return str(self.numbers[0]) + "".join(f"{o}{n}" for o, n in zip(self.ops, self.numbers[1:], strict=True))

    @property
    def prompt(self) -> str:
        """The text the policies see."""
        return f"Compute {self.expression}.{SEPARATOR}"

    @property
    def question(self) -> str:
        """The problem as the benchmark states it (the text the PRMs see as the problem)."""
        return self.prompt.strip()

    @property
    def answer(self) -> int:
        """The value of the expression (products first, then left to right)."""
        return _reduce_all(list(self.numbers), list(self.ops))

    def solution(self) -> str:
        """The reference solution: one legal reduction per step, then the answer."""
        nums, ops, steps = list(self.numbers), list(self.ops), []
        while ops:
            i = _next_legal(ops)
            a, o, b = nums[i], ops[i], nums[i + 1]
            c = _apply(a, o, b)
            steps.append(f"{a}{o}{b}={c}")
            nums[i : i + 2], ops[i : i + 1] = [c], []
        steps.append(f"The answer is {nums[0]}.")
        return SEPARATOR.join(steps)


def _apply(a: int, op: str, b: int) -> int:
    """a op b."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def _next_legal(ops: list[str]) -> int:
    """Index of the canonical next operation: the leftmost product, else the leftmost sum or difference."""
    return ops.index("*") if "*" in ops else 0


def _legal(ops: list[str], i: int) -> bool:
    """Whether reducing operation i now keeps the value: any product, or the leftmost +/- once no product is left."""
    return ops[i] == "*" or ("*" not in ops and i == 0)


def _reduce_all(nums: list[int], ops: list[str]) -> int:
    """The expression's value."""
    while ops:
        i = _next_legal(ops)
        nums[i : i + 2], ops[i : i + 1] = [_apply(nums[i], ops[i], nums[i + 1])], []
    return nums[0]


def generate_problem(rng: random.Random, level: int) -> Problem:
    """A random problem of `level` (1-5): level + 1 operations, operands up to a level-dependent size."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    hi = _OPERAND_MAX[level]
    n_ops = level + 1
    ops = tuple(rng.choice("+-*") for _ in range(n_ops))
    numbers = tuple(rng.randint(2, hi if op != "*" else min(hi, 12 + 3 * level)) for op in ("+", *ops))
    return Problem(numbers, ops, level)


def problems(seed: int, n: int, levels: tuple[int, ...] = LEVELS) -> list[Problem]:
    """`n` problems cycling through `levels`, reproducible from `seed`."""
    rng = random.Random(seed)
    return [generate_problem(rng, levels[i % len(levels)]) for i in range(n)]


def split_steps(text: str) -> list[str]:
    """A solution's steps (text between separators), empty pieces dropped."""
    return [s for s in text.split(SEPARATOR) if s.strip()]


def step_labels(problem: Problem, steps: list[str]) -> list[bool]:
    """Prefix-correct label of each step: legal, arithmetically right, and after only correct steps.

    A step "a op b=c" must reduce an adjacent pair of the current expression that may be reduced now; "The answer
    is N." must come once the expression is a single number N. Anything else is wrong, and so is all after it.
    """
    nums, ops, labels, ok = list(problem.numbers), list(problem.ops), [], True
    for step in steps:
        ok = ok and _advance(nums, ops, step)
        labels.append(ok)
    return labels


def _advance(nums: list[int], ops: list[str], step: str) -> bool:
    """Apply one step to the expression state in place; whether it was correct."""
    if not nums:  # the answer was already given: nothing may follow it
        return False
    if m := _ANSWER.match(step):
        ok = not ops and int(m.group(1)) == nums[0]
        nums.clear()
        return ok
    m = _STEP.match(step)
    if m is None:
        return False
    a, o, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    for i in range(len(ops)):
        if (nums[i], ops[i], nums[i + 1]) == (a, o, b) and _legal(ops, i):
            if _apply(a, o, b) != c:
                return False
            nums[i : i + 2], ops[i : i + 1] = [c], []
            return True
    return False


CORRUPTIONS = ("result", "operand", "order")


def corrupt_step(problem: Problem, steps_before: list[str], rng: random.Random, kind: str = "result") -> str:
    """A wrong next step after the correct `steps_before`, close to a right one (a PRM's hard negative).

    Kinds: "result" (the next legal reduction with a nearby wrong result), "operand" (an operand changed and the
    arithmetic right for the changed pair, so the pair is not in the expression), "order" (a sum or difference that
    may not be reduced yet, with the right arithmetic; "result" where every remaining operation is legal). Once the
    expression is a single number, the step is "The answer is N." with N off by a little, whatever the kind.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    nums, ops = list(problem.numbers), list(problem.ops)
    for s in steps_before:
        if not _advance(nums, ops, s):
            raise ValueError(f"steps_before must be correct steps of {problem.expression}; {s!r} is not")
    off = rng.choice((1, 2, 3, 5, 9, 10, 11, 20, 100)) * rng.choice((-1, 1))
    if not nums:
        raise ValueError(f"steps_before already answer {problem.expression}: no step may follow")
    if not ops:
        return f"The answer is {nums[0] + off}."
    illegal = [i for i in range(len(ops)) if not _legal(ops, i)]
    i = _next_legal(ops)
    a, o, b = nums[i], ops[i], nums[i + 1]
    if kind == "operand":
        a, b = (a + off, b) if rng.random() < 0.5 else (a, b + off)
        step = f"{a}{o}{b}={_apply(a, o, b)}"
    elif kind == "order" and illegal:
        j = rng.choice(illegal)
        step = f"{nums[j]}{ops[j]}{nums[j + 1]}={_apply(nums[j], ops[j], nums[j + 1])}"
    else:
        step = f"{a}{o}{b}={_apply(a, o, b) + off}"
    if step_labels(problem, [*steps_before, step])[-1]:  # e.g. the changed pair also occurs in the expression
        step = f"{nums[i]}{ops[i]}{nums[i + 1]}={_apply(nums[i], ops[i], nums[i + 1]) + off}"
    return step


def final_answer(text: str) -> int | None:
    """The number stated by the last "The answer is N." step, if any."""
    steps = split_steps(text)
    m = _ANSWER.match(steps[-1]) if steps else None
    return int(m.group(1)) if m else None


def is_correct(problem: Problem, text: str) -> bool:
    """Outcome grading: the stated final answer equals the expression's value."""
    return final_answer(text) == problem.answer

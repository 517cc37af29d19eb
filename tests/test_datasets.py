"""Evaluation sets: jsonl loaders, toy loader, the Qwen2.5-Math prompt and math-verify grading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify", reason="needs the [bench] extra (math-verify, which rsd-bench grades with)")
from rsd_generation.benchmarks import datasets
from rsd_generation.benchmarks.datasets import (
    SYSTEM_PROMPT,
    Example,
    answer_key,
    grade,
    gsm8k_gold,
    load_jsonl_dataset,
    load_toy_dataset,
    qwen_math_prompt,
)
from rsd_generation.benchmarks.toy.task import problems

from rsd_generation.testing import build_tokenizer


@pytest.fixture(scope="module")
def math500() -> list[Example]:
    return load_jsonl_dataset("math500")


@pytest.fixture(scope="module")
def gsm8k() -> list[Example]:
    return load_jsonl_dataset("gsm8k")


# --- loaders ---


def test_math500_loader(math500):
    assert len(math500) == 500
    assert {e.level for e in math500} == {1, 2, 3, 4, 5}
    assert len({e.id for e in math500}) == 500
    first = math500[0]
    assert first == Example(
        id="test/precalculus/807.json",
        question=first.question,
        gold="\\left( 3, \\frac{\\pi}{2} \\right)",
        level=2,
        dataset="math500",
    )
    assert first.question.startswith("Convert the point $(0,3)$ in rectangular coordinates")


def test_gsm8k_loader(gsm8k):
    assert len(gsm8k) == 1319
    assert {e.level for e in gsm8k} == {None}
    assert [e.id for e in gsm8k[:3]] == ["0", "1", "2"]
    assert gsm8k[0].gold == "18"
    assert gsm8k[0].question.startswith("Janet")
    assert all("," not in e.gold and "#" not in e.gold for e in gsm8k)
    assert all(int(e.gold) == float(e.gold) for e in gsm8k)  # every GSM8K gold is an integer


def test_limit_keeps_the_first_rows(math500):
    assert load_jsonl_dataset("math500", limit=7) == math500[:7]
    assert load_jsonl_dataset("gsm8k", limit=0) == []
    with pytest.raises(ValueError, match="-1"):
        load_jsonl_dataset("gsm8k", limit=-1)


def test_gsm8k_gold_takes_the_text_after_hashes_without_commas():
    assert gsm8k_gold("He pays 1,000 + 450,000 = <<1000+450000=451000>>451,000\n#### 1,451,000") == "1451000"
    assert gsm8k_gold("so -10\n#### -10") == "-10"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final line")


def test_missing_file_names_the_path_and_how_to_point_at_it(tmp_path):
    missing = tmp_path / "nowhere" / "test.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        load_jsonl_dataset("gsm8k", path=missing)
    assert str(missing) in str(e.value)
    assert "--data-dir" in str(e.value) and "RSD_DATA_DIR" in str(e.value)


def test_default_path_follows_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DATA_DIR", tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 2", "idx": 5}) + "\n")
    assert load_jsonl_dataset("gsm8k") == [Example("5", "q", "2", None, "gsm8k")]
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "math500" / "test.jsonl"))):
        load_jsonl_dataset("math500")


def test_bad_dataset_name_is_named():
    with pytest.raises(ValueError, match="'math5000'"):
        load_jsonl_dataset("math5000")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q", "idx": 2}', ":3: missing field.*'answer'"),
        ('{"question": "q", "answer": "#### 4"', ":3: not valid JSON"),
        ('["q", "#### 4", 2]', ":3: expected a JSON object"),
        ('{"question": "q", "answer": "four", "idx": 2}', ":3: bad gsm8k row.*####"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "answer": "#### 4", "idx": 0})
    path = tmp_path / "g.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")  # the blank line 2 is skipped; line 3 is bad
    with pytest.raises(ValueError, match=message) as e:
        load_jsonl_dataset("gsm8k", path=path)
    assert str(path) in str(e.value)


def test_malformed_math500_line_names_the_missing_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "p", "answer": "1", "unique_id": "u"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: missing field\(s\) \['level'\]"):
        load_jsonl_dataset("math500", path=path)


# --- toy ---


def test_toy_loader_is_reproducible_with_unique_ids():
    a, b = load_toy_dataset(3, 12, (1, 2, 3)), load_toy_dataset(3, 12, (1, 2, 3))
    assert a == b
    assert [e.id for e in a] == [f"toy-3-{i}" for i in range(12)]
    assert [e.level for e in a] == [1, 2, 3] * 4
    assert load_toy_dataset(4, 12, (1, 2, 3)) != a
    p = problems(3, 1, (1,))[0]
    assert a[0] == Example("toy-3-0", f"Compute {p.expression}.", str(p.answer), 1, "toy")
    with pytest.raises(ValueError, match=r"\(\)"):
        load_toy_dataset(0, 3, ())
    with pytest.raises(ValueError, match="6"):
        load_toy_dataset(0, 3, (6,))


def test_toy_grading():
    for ex, p in zip(load_toy_dataset(0, 10, (1, 3, 5)), problems(0, 10, (1, 3, 5)), strict=True):
        assert grade(ex, p.solution())
        assert not grade(ex, p.solution().replace(f"The answer is {p.answer}.", f"The answer is {p.answer + 1}."))
        assert not grade(ex, "")
        assert not grade(ex, f"\\boxed{{{p.answer}}}")  # the toy task states its answer in words, not boxed


# --- grading MATH500 / GSM8K with math-verify ---


def test_every_math500_gold_grades_correct_against_itself(math500):
    wrong = [e.id for e in math500 if not grade(e, f"The answer is $\\boxed{{{e.gold}}}$")]
    assert wrong == []


def test_every_gsm8k_gold_grades_correct_against_itself(gsm8k):
    wrong_plain = [e.id for e in gsm8k if not grade(e, f"She pays 3 + 4 = 7 more, so the answer is {e.gold}.")]
    wrong_boxed = [e.id for e in gsm8k if not grade(e, f"Therefore the total is $\\boxed{{{e.gold}}}$ dollars.")]
    assert (wrong_plain, wrong_boxed) == ([], [])


def test_gsm8k_wrong_numbers_grade_wrong(gsm8k):
    right = [e.id for e in gsm8k if grade(e, f"So the answer is $\\boxed{{{int(e.gold) + 1}}}$.")]
    assert right == []


@pytest.mark.parametrize(
    ("unique_id", "wrong"),
    [
        ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{3} \\right)"),  # tuple
        ("test/intermediate_algebra/1994.json", "q - p"),  # symbolic
        ("test/algebra/2584.json", "\\frac{14}{5}"),  # fraction
        ("test/algebra/2257.json", "\\frac{19}{9}"),  # gold written \frac9{19}
        ("test/intermediate_algebra/1714.json", "[5,\\infty)"),  # open vs closed interval
        ("test/algebra/101.json", "x \\in [-2,8]"),
        ("test/prealgebra/1991.json", "\\text{Luka}"),  # a name
        ("test/precalculus/145.json", "\\begin{pmatrix} -7 \\\\ 16 \\\\ 6 \\end{pmatrix}"),  # matrix
        ("test/precalculus/323.json", "y = 2x - 3"),  # equation
        ("test/intermediate_algebra/1102.json", "-2,2"),  # set of roots
        ("test/algebra/2780.json", "\\$18.95"),  # money
    ],
)
def test_math500_wrong_answers_grade_wrong(math500, unique_id, wrong):
    ex = next(e for e in math500 if e.id == unique_id)
    assert grade(ex, f"The answer is $\\boxed{{{ex.gold}}}$")
    assert not grade(ex, f"The answer is $\\boxed{{{wrong}}}$")


def test_math500_equivalent_forms_grade_correct(math500):
    ex = next(e for e in math500 if e.id == "test/algebra/2257.json")  # gold \frac9{19}
    assert grade(ex, "So $x = \\boxed{\\dfrac{9}{19}}$.")
    assert grade(ex, "The answer is $\\boxed{18/38}$.")


def test_math500_grading_passes_gold_first(math500):
    """verify is asymmetric: an interval gold is not matched by a relation answer, the reverse would be."""
    ex = next(e for e in math500 if e.id == "test/intermediate_algebra/1714.json")  # gold (5,\infty)
    assert grade(ex, "The answer is $\\boxed{(5, \\infty)}$.")
    assert not grade(ex, "The answer is $\\boxed{x > 5}$.")


@pytest.mark.parametrize("response", ["", "no idea", "\\boxed{", "}}{{\\frac", "\\boxed{\\frac{1}{0}}", "$$$", "\x00"])
def test_garbage_responses_grade_false_without_raising(response):
    for ex in (Example("a", "q", "\\frac{1}{2}", 1, "math500"), Example("b", "q", "18", None, "gsm8k")):
        assert grade(ex, response) is False


def test_grading_works_off_the_main_thread():
    ex = Example("b", "q", "1000", None, "gsm8k")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: grade(ex, r), ["so it is $\\boxed{1000}$", "the answer is 999."]))
    assert results == [True, False]


def test_grading_off_the_main_thread_agrees_with_the_main_thread(math500, gsm8k):
    cases = [(e, f"The answer is $\\boxed{{{e.gold}}}$") for e in math500[:12]]
    cases += [(e, "So $x = \\boxed{\\dfrac{9}{19}}$ or $\\boxed{(5, \\infty)}$.") for e in math500[12:20]]
    cases += [(e, f"so the answer is {int(e.gold) + k}.") for k, e in enumerate(gsm8k[:8])]
    cases += [(math500[0], ""), (gsm8k[0], "\\boxed{")]
    here = [(grade(e, r), answer_key(e, r)) for e, r in cases]
    with ThreadPoolExecutor(3) as pool:
        there = list(pool.map(lambda c: (grade(*c), answer_key(*c)), cases))
    assert there == here
    assert {g for g, _ in here} == {True, False} and None in {k for _, k in here}  # the cases exercise both outcomes


def test_pathological_response_is_bounded_on_any_thread():
    """Off the main thread math-verify's SIGALRM timeout cannot run (math-verify #50, #55): a thread stuck in sympy
    would hang for good (and starve the main thread of the GIL), so this runs in a process of its own with a limit."""
    script = (
        "import time, threading\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from rsd_generation.benchmarks import datasets\n"
        "datasets.GRADE_TIMEOUT_S = 1\n"
        "ex = datasets.Example('b', 'q', '18', None, 'gsm8k')\n"
        "bad = '\\\\boxed{10^{10^{10^{10}}}}'\n"
        "def timed(f):\n"
        "    t = time.perf_counter()\n"
        "    return f(), round(time.perf_counter() - t, 1)\n"
        "main = timed(lambda: (datasets.grade(ex, bad), datasets.answer_key(ex, bad)))\n"
        "with ThreadPoolExecutor(1) as pool:\n"
        "    thread = pool.submit(timed, lambda: (datasets.grade(ex, bad), datasets.answer_key(ex, bad))).result()\n"
        "print(main, thread)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    main, thread = done.stdout.split(") (")
    assert main.startswith("((False, '10**(10**(10**10))'), ") and thread.startswith("(False, '10**(10**(10**10))'), ")
    assert float(thread.rstrip(")\n").rsplit(" ", 1)[1]) < 30  # the child starts, then 1 s per parse or comparison


def test_pathological_response_times_out_on_the_main_thread(monkeypatch):
    monkeypatch.setattr(datasets, "GRADE_TIMEOUT_S", 1)
    t = time.perf_counter()
    assert not grade(Example("b", "q", "18", None, "gsm8k"), "\\boxed{10^{10^{10^{10}}}}")  # hangs without a timeout
    assert time.perf_counter() - t < 10


def test_a_grading_process_that_overruns_is_killed_and_restarted(monkeypatch):
    never_answers = "import sys, time\nprint('ready', flush=True)\nfor line in sys.stdin:\n    time.sleep(600)\n"
    child = datasets._GradingProcess(never_answers)
    monkeypatch.setattr(datasets, "GRADE_DEADLINE_S", 1)
    try:
        with pytest.warns(UserWarning, match="no answer within 1 s .*graded as wrong: 'the answer is 7'"):
            assert child.ask("grade", "7", "the answer is 7") is None
        assert child.proc is None  # killed
        with pytest.warns(UserWarning, match="no answer within 1 s"):
            assert child.ask("key", None, "7") is None  # a new process, killed again
    finally:
        child.stop()


def test_grade_rejects_an_unknown_dataset():
    with pytest.raises(ValueError, match="'aime'"):
        grade(Example("a", "q", "1", None, "aime"), "1")


# --- prompt ---

QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_qwen_math_prompt_with_chat_template():
    tok = build_tokenizer()
    tok.chat_template = QWEN_LIKE_TEMPLATE
    assert qwen_math_prompt(tok, "What is 1+1?") == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."


def test_qwen_math_prompt_without_chat_template_is_plain_text():
    tok = build_tokenizer()
    tok.chat_template = None
    assert qwen_math_prompt(tok, "What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
    )

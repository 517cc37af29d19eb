"""Evaluation sets of the benchmark (toy, MATH500, GSM8K), the Qwen2.5-Math prompt, and answer grading.

MATH500 and GSM8K are read from JSON lines on disk (`DATA_DIR/<name>/test.jsonl`; see `benchmarks/data/README.md`),
never fetched from a hub. Final answers are graded with math-verify (`parse` + `verify`), the toy task with its own
exact checker.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

try:
    from math_verify import parse, verify
except ImportError as e:  # an extra: the generation mode does not need it
    raise ImportError(f"rsd-bench grades answers with math-verify: pip install 'rsd-generation[bench]' ({e})") from e

from .toy import task

# a copy of ../shared/data ships in benchmarks/data (public test sets, 1.2 MB), so tests and CI need nothing outside
DATA_DIR = Path(os.environ.get("RSD_DATA_DIR") or Path(__file__).resolve().parent / "data")
JSONL_DATASETS = ("math500", "gsm8k")
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
GRADE_TIMEOUT_S = 5  # math-verify's limit per parse and per comparison (SIGALRM-based: it runs on a main thread only)
GRADE_DEADLINE_S = 60  # off the main thread: the grading process is killed when one answer takes longer than this
_FIELDS = {"math500": ("unique_id", "problem", "answer", "level"), "gsm8k": ("idx", "question", "answer")}


@dataclass(frozen=True)
class Example:
    """One evaluation problem.

    Args:
        id (`str`): math500 `unique_id`, gsm8k `str(idx)`, toy `f"toy-{seed}-{i}"`.
        question (`str`): the problem text (what the policies are prompted with and the PRM sees as the problem).
        gold (`str`): the gold final answer (LaTeX for math500, a plain number for gsm8k and toy).
        level (`int | None`): difficulty 1-5 (math500, toy); None for gsm8k.
        dataset (`str`): "toy", "math500" or "gsm8k".
    """

    id: str
    question: str
    gold: str
    level: int | None
    dataset: str


def dataset_path(name: str, data_dir: str | Path | None = None) -> Path:
    """The default file of a jsonl dataset: `<data_dir or DATA_DIR>/<name>/test.jsonl`."""
    if name not in JSONL_DATASETS:
        raise ValueError(f"dataset name must be one of {JSONL_DATASETS}, got {name!r}")
    return Path(data_dir if data_dir is not None else DATA_DIR) / name / "test.jsonl"


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K `answer` field: the text after "#### ", thousands commas removed."""
    _, sep, gold = answer.rpartition("####")
    if not sep or not gold.strip():
        raise ValueError(f"GSM8K answer has no final '#### <number>' line: {answer[-80:]!r}")
    return gold.strip().replace(",", "")


def _example(name: str, row: dict) -> Example:
    """The Example of one parsed jsonl row of dataset `name`."""
    if name == "math500":
        return Example(str(row["unique_id"]), row["problem"], row["answer"].strip(), int(row["level"]), name)
    return Example(str(row["idx"]), row["question"], gsm8k_gold(row["answer"]), None, name)


def load_jsonl_dataset(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Read MATH500 or GSM8K from JSON lines.

    Args:
        name (`str`): "math500" or "gsm8k".
        path (`str | Path`, *optional*): the jsonl file; default `DATA_DIR/<name>/test.jsonl` (`DATA_DIR` is
            `benchmarks/data` in this repository, or the `RSD_DATA_DIR` environment variable).
        limit (`int`, *optional*): keep only the first `limit` examples (file order).

    Returns:
        `list[Example]` in file order.

    Raises:
        FileNotFoundError: the file is missing (the message names the path and how to point at the data).
        ValueError: a bad `name` or `limit`, or a malformed line (the message names the file and line number).
    """
    if name not in JSONL_DATASETS:
        raise ValueError(f"dataset name must be one of {JSONL_DATASETS}, got {name!r}")
    file = dataset_path(name) if path is None else Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")
    if not file.is_file():
        raise FileNotFoundError(
            f"{name} test set not found at {file}; point at the data with --data-dir DIR (a folder holding "
            f"{name}/test.jsonl) or the RSD_DATA_DIR environment variable, or pass the file itself"
        )
    examples: list[Example] = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            examples.append(_parse_line(name, file, lineno, line))
    return examples


def _parse_line(name: str, file: Path, lineno: int, line: str) -> Example:
    """One jsonl line as an Example; ValueError naming the file, line number and problem otherwise."""
    where = f"{file}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in _FIELDS[name] if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} of a {name} row (needs {list(_FIELDS[name])})")
    try:
        return _example(name, row)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: bad {name} row: {e}") from e


def load_toy_dataset(seed: int, n: int, levels: tuple[int, ...] = task.LEVELS) -> list[Example]:
    """`n` toy arithmetic problems cycling through `levels`, reproducible from `seed` (see `benchmarks.toy.task`)."""
    if not levels:
        raise ValueError(f"levels must name at least one of {task.LEVELS}, got {levels!r}")
    return [
        Example(f"toy-{seed}-{i}", p.question, str(p.answer), p.level, "toy")
        for i, p in enumerate(task.problems(seed, n, levels))
    ]


def qwen_math_prompt(tokenizer, question: str) -> str:
    """The Qwen2.5-Math chain-of-thought prompt for `question`.

    With a chat template: system `SYSTEM_PROMPT`, the question as the user turn, and the assistant turn opened
    (`add_generation_prompt=True`). A tokenizer without a chat template (a base model's) gets the plain text
    `f"{question}\\n{SYSTEM_PROMPT}\\n\\n"` instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return f"{question}\n{SYSTEM_PROMPT}\n\n"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# math-verify bounds its work with SIGALRM, which only a main thread can use (math-verify issues #50 and #55), and a
# thread cannot be stopped from outside (sympy stuck in a long integer loop even holds the GIL). So calls from other
# threads are graded by a child Python process that runs math-verify in its own main thread, timeouts on, and is
# killed (then started again) when one answer still takes longer than GRADE_DEADLINE_S. What it runs mirrors
# `grade` and `answer_key` below (a test checks that both paths agree).
_CHILD_CODE = """
import json, sys
from math_verify import parse, verify

answers = sys.stdout
sys.stdout = sys.stderr  # whatever math-verify prints stays off the answer channel
answers.write("ready\\n")
answers.flush()
for line in sys.stdin:
    op, gold, response, timeout = json.loads(line)
    target = parse(response, parsing_timeout=timeout)
    if op == "grade":
        out = bool(target) and verify(parse("$" + gold + "$", parsing_timeout=timeout), target, timeout_seconds=timeout)
    else:
        out = str(target[0]) if target else None
    answers.write(json.dumps(out) + "\\n")
    answers.flush()
"""


class _GradingProcess:
    """The child process that grades for threads other than the main one: one request at a time, started on first
    use, killed and restarted when an answer overruns `GRADE_DEADLINE_S`."""

    def __init__(self, code: str = _CHILD_CODE):
        self.code = code
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def ask(self, op: str, gold: str | None, response: str):
        """`op` "grade" (a bool) or "key" (math-verify's first parsed value as text, or None) for `response`; None
        when the answer took longer than `GRADE_DEADLINE_S` (a warning says so) or the process died."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write((json.dumps([op, gold, response, GRADE_TIMEOUT_S]) + "\n").encode())
                self.proc.stdin.flush()
            except BrokenPipeError:
                line = None
            else:
                line = self._read_line(GRADE_DEADLINE_S)
            if line is None:
                self._stop_locked()
                warnings.warn(
                    f"math-verify gave no answer within {GRADE_DEADLINE_S} s (the grading process was stopped); "
                    f"graded as wrong: {response[:80]!r}",
                    stacklevel=3,
                )
                return None
            return json.loads(line)

    def stop(self) -> None:
        """Kill the process, if any (the next request starts a new one)."""
        with self._lock:
            self._stop_locked()

    def _start(self) -> None:
        self._stop_locked()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )  # a session of its own: a Ctrl-C meant for the benchmark does not print the child's traceback
        if self._read_line(120) != b"ready\n":
            self._stop_locked()
            raise RuntimeError(f"the math-verify grading process did not start ({sys.executable} -c ...)")

    def _read_line(self, timeout: float) -> bytes | None:
        """One line from the process, or None if none comes within `timeout` seconds (or it ended)."""
        fd, line = self.proc.stdout.fileno(), b""
        end = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            line += chunk
        return line

    def _stop_locked(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None


_child = _GradingProcess()


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """The gold answer parsed by math-verify, wrapped in `$...$` so that it is read as LaTeX (main thread only)."""
    return parse(f"${gold}$", parsing_timeout=GRADE_TIMEOUT_S)


def grade(example: Example, response: str) -> bool:
    """Whether `response` states the example's gold answer; False (never an exception) for unparsable text.

    Toy: the last step "The answer is N." must give the expression's value. MATH500 / GSM8K: math-verify,
    `verify(parse(gold), parse(response))` (gold first; the response's answer is extracted by math-verify's default
    rules: `\\boxed{}` first, else the last LaTeX or plain expression). Each parse and comparison is limited to
    `GRADE_TIMEOUT_S` seconds, so a pathological response (e.g. `\\boxed{10^{10^{10^{10}}}}`) grades False in bounded
    time. From any thread: off the main thread, where math-verify's timeout cannot run, a child process grades
    (see `_GradingProcess`).
    """
    if example.dataset == "toy":
        return task.final_answer(response) == int(example.gold)
    if example.dataset not in JSONL_DATASETS:
        raise ValueError(f"example.dataset must be 'toy' or one of {JSONL_DATASETS}, got {example.dataset!r}")
    if not _on_main_thread():
        return bool(_child.ask("grade", example.gold, response))
    target = parse(response, parsing_timeout=GRADE_TIMEOUT_S)
    return bool(target) and verify(_parse_gold(example.gold), target, timeout_seconds=GRADE_TIMEOUT_S)


def answer_key(example: Example, response: str) -> str | None:
    """The final answer majority voting counts: toy, the stated number; MATH500 / GSM8K, math-verify's first parsed
    value as text (equivalent forms with different text count apart)."""
    if example.dataset == "toy":
        n = task.final_answer(response)
        return None if n is None else str(n)
    if not _on_main_thread():
        return _child.ask("key", None, response)
    parsed = parse(response, parsing_timeout=GRADE_TIMEOUT_S)
    return str(parsed[0]) if parsed else None

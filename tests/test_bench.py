"""The benchmark CLI: FLOPs accounting on hand-computed cases, summaries, resume after an interruption, bad input."""

import fcntl
import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("math_verify", reason="needs the [bench] extra (math-verify, which rsd-bench grades with)")
from rsd_generation.benchmarks import cli, methods
from rsd_generation.benchmarks import io as bench_io
from rsd_generation.benchmarks.io import RecordStore
from rsd_generation.benchmarks.methods import costs, plain_positions, split
from rsd_generation.benchmarks.report import markdown, summarize
from rsd_generation.benchmarks.toy.tokenizer import build_toy_tokenizer

from rsd_generation.testing import make_lm, save_value_head_prm

QUICK = ["--num-problems", "4", "--batch-size", "2", "--max-new-tokens", "60", "--no-plots"]


def test_plain_generation_cost_by_hand():
    # prompt of 10 tokens, two samples of 5 and 3 new tokens: 10 + 4 + 2 positions; 8 generated tokens
    assert plain_positions(10, [5, 3]) == 16
    assert plain_positions(7, [0]) == 7
    c = costs({"draft": 100, "reward": 1000}, {"draft": 16, "reward": 12}, {"draft": 8, "reward": 2})
    assert c == {
        "flops": {"draft": 2 * 100 * 16, "reward": 2 * 1000 * 12},
        "decode_flops": {"draft": 2 * 100 * 8, "reward": 2 * 1000 * 2},
    }


def _rec(setting, id_, level, correct, flops, decode, **kw):
    method = setting.split("|")[0]
    return {"setting": setting, "method": method, "id": id_, "level": level, "correct": correct, "flops": flops,
            "decode_flops": decode, "wall_s": 0.5, "new_tokens": 10, **kw}  # fmt: skip


def test_summary_ratios_levels_and_rsd_shares_by_hand():
    records = [
        _rec("target|target", "a", 1, True, {"target": 1000}, {"target": 400}),
        _rec("target|target", "b", 2, True, {"target": 3000}, {"target": 600}),
        _rec("rsd|x", "a", 1, True, {"draft": 100, "target": 0, "reward": 100}, {"draft": 40, "reward": 10},
             draft_steps=4, accepted_steps=4, draft_only=True),
        _rec("rsd|x", "b", 2, False, {"draft": 300, "target": 1300, "reward": 200}, {"draft": 60, "target": 300},
             draft_steps=6, accepted_steps=3, draft_only=False),
    ]  # fmt: skip
    target, r = summarize(records, ["target|target", "rsd|x"])
    assert target["flops_vs_target"] == 1.0 and target["acceptance_rate"] is None
    assert r["accuracy"] == 0.5 and r["accuracy_per_level"] == {"1": 1.0, "2": 0.0}
    assert r["flops"] == pytest.approx((200 + 1800) / 2)  # mean per question, all models
    assert r["flops_vs_target"] == pytest.approx(2000 / 4000)
    assert r["decode_flops_vs_target"] == pytest.approx(410 / 1000)
    assert r["flops_per_model"] == {"draft": 200, "target": 650, "reward": 150}
    assert r["acceptance_rate"] == pytest.approx(7 / 10)
    assert r["draft_only_share"] == 0.5 and r["draft_only_share_per_level"] == {"1": 1.0, "2": 0.0}
    assert r["wall_s"] == 1.0 and r["tokens_per_s"] == 20
    table = markdown([target, r])
    assert "| rsd | x | 2 | 50.0 | 0.41 | 0.50 | 0.70 | 0.50 |" in table


def test_split_keeps_separators_and_drops_empty_steps():
    assert split("1+1=2\n\n2*3=6\n\nThe answer is 6.", "\n\n") == ["1+1=2\n\n", "2*3=6\n\n", "The answer is 6."]
    assert split("a\n\n\n\nb\n\n", "\n\n") == ["a\n\n", "b\n\n"]
    assert split("", "\n\n") == []


def test_record_store_refuses_to_overwrite_without_resume_or_force(tmp_path):
    path = tmp_path / "records.jsonl"
    RecordStore(path).add([{"setting": "s", "id": "1"}])
    with pytest.raises(SystemExit, match="--resume"):
        RecordStore(path)
    assert RecordStore(path, resume=True).done == {("s", "1")}
    RecordStore(path, force=True)
    assert not path.exists()


def _line(setting, id_, **kw):
    return json.dumps({"setting": setting, "id": id_, **kw}) + "\n"


def test_resume_sets_bad_lines_aside_and_keeps_every_valid_record(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_io.time, "strftime", lambda fmt: "T")
    path = tmp_path / "records.jsonl"
    good = [_line("s", "1"), _line("s", "2", x=2), _line("t", "1"), _line("s", "3")]
    bad = [
        '{"setting": "s", "id": "9", "resp\n',  # a corrupted line in the middle
        "[1, 2]\n",  # not an object
        _line("s", None),  # no string id
        json.dumps({"id": "4"}) + "\n",  # no setting
        _line("s", "1", x="again"),  # a repeated key: the first is kept
    ]
    torn = '{"setting": "s", "id": "5", "response": "The ans'  # a crash mid-write
    body = good[0] + bad[0] + good[1] + bad[1] + bad[2] + "\n" + bad[3] + good[2] + bad[4]
    path.write_bytes(body.encode() + b"\xff\xfe\n" + good[3].encode() + torn.encode())  # and undecodable bytes
    with pytest.warns(UserWarning, match=r"set aside 7 bad line\(s\) in .*records\.jsonl\.bad-T .*kept 4 valid") as w:
        store = RecordStore(path, resume=True)
    assert str(tmp_path / "records.jsonl.bad-T") in str(w[0].message)
    assert store.done == {("s", "1"), ("s", "2"), ("t", "1"), ("s", "3")}
    assert [r.get("x") for r in store.records] == [None, 2, None, None]
    assert path.read_text() == "".join(good)  # every valid line kept, in order, and nothing else
    aside = (tmp_path / "records.jsonl.bad-T").read_bytes().splitlines()
    assert len(aside) == 7 and aside[-1] == torn.encode() and aside[0] == bad[0].rstrip("\n").encode()
    assert b"\xff\xfe" in aside and _line("s", "1", x="again").rstrip("\n").encode() in aside
    store.add([{"setting": "s", "id": "5"}])  # the torn question runs again and lands on a line of its own
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["1", "2", "1", "3", "5"]
    # a second bad load never overwrites the first set-aside file
    with open(path, "a") as f:
        f.write("garbage\n" + _line("s", "6"))
    with pytest.warns(UserWarning, match=r"set aside 1 bad line\(s\) in .*records\.jsonl\.bad-T-1 "):
        assert ("s", "6") in RecordStore(path, resume=True).done
    assert len((tmp_path / "records.jsonl.bad-T").read_bytes().splitlines()) == 7
    assert (tmp_path / "records.jsonl.bad-T-1").read_text() == "garbage\n"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["records.jsonl", "records.jsonl.bad-T", "records.jsonl.bad-T-1"]


def test_resume_after_a_torn_last_line_sets_it_aside(tmp_path, recwarn):
    path = tmp_path / "records.jsonl"
    RecordStore(path).add([{"setting": "s", "id": "1"}, {"setting": "s", "id": "2"}])
    with open(path, "a") as f:
        f.write('{"setting": "s", "id": "3", "resp')
    resumed = RecordStore(path, resume=True)
    assert resumed.done == {("s", "1"), ("s", "2")}
    (aside,) = tmp_path.glob("records.jsonl.bad-*")
    assert aside.read_text() == '{"setting": "s", "id": "3", "resp\n'
    assert "set aside 1 bad line(s)" in str(recwarn.pop(UserWarning).message)
    clean = path.read_bytes()
    assert RecordStore(path, resume=True).done == resumed.done  # a clean file is left as it is, no warning
    assert path.read_bytes() == clean and len(list(tmp_path.glob("records.jsonl.bad-*"))) == 1


@pytest.mark.parametrize("how", [["--schedule", "3"], ["--batch-size", "2", "--queue", "3"]], ids=["schedule", "queue"])
def test_rsd_records_do_not_depend_on_the_schedule_or_a_queue(tmp_path, how):
    records = {}
    for name, extra in (("plain", []), ("other", how)):
        out = tmp_path / name
        cli.main([*QUICK, "--num-problems", "6", "--batch-size", "6", "--methods", "rsd", *extra,
                  "--output", str(out), "--no-plots"])  # fmt: skip
        lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        records[name] = sorted((r["setting"], r["id"], r["response"], r["correct"]) for r in lines)
    assert records["plain"] == records["other"] and len(records["plain"]) == 12  # 6 problems, two PRMs


def test_budget_rows_keep_the_target_share_of_steps_within_their_budget(tmp_path):
    out = tmp_path / "budget"
    cli.main([*QUICK, "--num-problems", "20", "--batch-size", "10", "--methods", "rsd", "--rsd-prms", "small",
              "--budgets", "0.1", "0.4", "--output", str(out), "--no-plots"])  # fmt: skip
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    for gamma in (0.1, 0.4):
        for batch in (0, 1):  # the budget holds per generate call: here per batch of 10 problems
            rows = [r for r in records if r["setting"] == f"rsd|budget γ={gamma} prm=small"]
            rows = sorted(rows, key=lambda r: int(r["id"].rsplit("-", 1)[1]))[10 * batch : 10 * batch + 10]
            decisions = [a for r in rows for _, a in r["step_rewards"]]
            assert len(rows) == 10 and len(decisions) >= 20
            assert sum(not a for a in decisions) <= gamma * len(decisions)


def test_sd_is_batched_and_gives_the_targets_responses(tmp_path):
    out = tmp_path / "sd"
    cli.main([*QUICK, "--num-problems", "6", "--batch-size", "3", "--methods", "target", "sd", "--output", str(out)])
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    by = {(r["method"], r["id"]): r for r in records}
    ids = sorted({r["id"] for r in records})
    assert len(ids) == 6
    for i in ids:
        target, sd = by["target", i], by["sd", i]
        assert sd["response"] == target["response"]  # greedy speculative decoding is lossless
        assert sd["decode_flops"]["target"] < target["decode_flops"]["target"]  # fewer target forwards than tokens
        assert sd["decode_flops"]["draft"] > 0


def test_cli_runs_every_method_on_the_toy_models(tmp_path):
    out = tmp_path / "all"
    args = [*QUICK, "--num-problems", "2", "--methods", *cli.ALL_METHODS, "--n", "2", "--beams", "2",
            "--beam-expand", "2", "--output", str(out)]  # fmt: skip
    rows = cli.main(args)
    by = {r["setting"]: r for r in rows}
    expected = {"target", "draft", "sd", "binary δ=0.7 prm=small", "binary δ=0.7 prm=large", "merged draft* δ=0.7"}
    expected |= {"merged target* δ=0.7", "maj@2", "bon@2 prm=large", "pbon@2 prm=large", "beam2x2 prm=large"}
    assert set(by) == expected
    assert all(r["n"] == 2 for r in rows)
    assert by["target"]["flops_vs_target"] == 1.0
    assert by["draft"]["flops_vs_target"] < 0.2  # the draft has a tenth of the target's parameters
    for name in ("bon@2 prm=large", "beam2x2 prm=large", "binary δ=0.7 prm=large"):
        assert by[name]["flops_per_model"]["reward"] > 0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * len(expected)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["setting"] for r in summary["rows"]] == [r["setting"] for r in rows]
    assert (out / "table.md").read_text() == markdown(rows)


def test_resume_after_an_interrupted_run_loses_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*QUICK, "--methods", "target", "rsd", "--output", str(out)]
    calls = {"n": 0}
    real = methods.run_rsd

    def crash_on_second_batch(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(cli.METHODS, "rsd", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    before = (out / "records.jsonl").read_text().splitlines()
    assert len(before) == 4 + 2  # target on 4 questions, then the first RSD batch (2 questions) before the crash
    monkeypatch.setitem(cli.METHODS, "rsd", real)
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(args)  # neither --resume nor --force: refused, nothing touched
    assert (out / "records.jsonl").read_text().splitlines() == before
    with pytest.raises(SystemExit, match="differ"):
        cli.main([*args, "--resume", "--seed", "1"])
    ran = []
    monkeypatch.setitem(cli.METHODS, "rsd", lambda m, s, b: ran.append(len(b.prompts)) or real(m, s, b))
    rows = cli.main([*args, "--resume"])
    after = (out / "records.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # kept as written
    keys = [(json.loads(x)["setting"], json.loads(x)["id"]) for x in after]
    assert len(keys) == len(set(keys)) == 4 * 3  # target + RSD with two PRMs, each on 4 questions
    assert sum(ran) == 4 * 2 - 2  # only the questions not finished before the crash
    assert all(r["n"] == 4 for r in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--levels", "0", "6"], "--levels must be within 1-5, got [0, 6]"),
        (["--rsd-prms", "huge"], "--rsd-prms names unknown reward models ['huge']"),
        (["--n", "4", "0"], "--n values must be at least 1, got [4, 0]"),
        (["--beams", "0"], "--beams values must be at least 1, got [0]"),
        (["--num-problems", "0"], "--num-problems must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--max-step-tokens", "-5"], "--max-step-tokens must be at least 1, got -5"),
        (["--max-step-tokens", "0"], "--max-step-tokens must be at least 1, got 0"),
        (["--deltas", "0.7", "nan"], "--deltas must be finite numbers, got [nan]"),
        (["--deltas", "0.5", "inf"], "--deltas must be finite numbers, got [inf]"),
        (["--deltas=-inf"], "--deltas must be finite numbers, got [-inf]"),
        (["--temperature", "0"], "--temperature must be positive and finite, got 0.0"),
        (["--temperature", "-1"], "--temperature must be positive and finite, got -1.0"),
        (["--temperature", "nan"], "--temperature must be positive and finite, got nan"),
        (["--temperature", "inf"], "--temperature must be positive and finite, got inf"),
        (["--prm", "a={tmp}", "b=x/y", "a=org/other"], "--prm names 'a' twice ({tmp} and org/other)"),
        (["--prm", "={tmp}"], "--prm ={tmp}: the NAME before '=' is empty"),
        (["--output", "{tmp}/a-file"], "--output {tmp}/a-file is a file; it must name a folder"),
        (["--draft", "./no-such-model"], "--draft ./no-such-model does not exist"),
        (["--target", "../no-such-model"], "--target ../no-such-model does not exist"),
        (["--target", "{tmp}/missing"], "--target {tmp}/missing does not exist"),
        (["--draft", "~/no-such-model-rsd"], "--draft ~/no-such-model-rsd does not exist"),
        (["--draft", "models/qwen/no-such"], "--draft models/qwen/no-such does not exist"),
        (["--prm", "p=./nowhere"], "--prm p=./nowhere does not exist"),
        (["--prm", "{tmp}/gone"], "--prm gone={tmp}/gone does not exist"),
        (["--merged-draft", "{tmp}/gone"], "--merged-draft {tmp}/gone does not exist"),
        (["--target", "{tmp}/a-file"], "--target {tmp}/a-file is a file, not a model folder"),
        (["--data-dir", "{tmp}/gone"], "--data-dir {tmp}/gone is not a folder"),
        (["--schedule", "lazy"], "--schedule: rsd_schedule must be one of ('eager', 'throughput') or an int >= 1"),
        (["--schedule", "0"], "got 0"),
        (["--budgets", "0.2", "1.5"], "--budgets must be shares of steps in [0, 1], got [1.5]"),
        (
            [
                "--backend",
                "vllm",
                "--methods",
                "rsd",
                "--draft-url",
                "http://a",
                "--target-url",
                "http://b",
                "--budgets",
                "0.3",
            ],
            "--backend vllm runs RSD at fixed thresholds; --budgets [0.3] is in-process only",
        ),
    ],
)
def test_bad_options_are_refused_naming_the_value(argv, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        cli.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_without_the_bench_extra_plots_are_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--preset", "quick"])
    assert e.value.code == 2 and "pip install 'rsd-generation[bench]', or pass --no-plots" in capsys.readouterr().err
    assert cli.parse_args(["--preset", "quick", "--no-plots"]).no_plots


def test_resume_without_run_json_is_refused_and_nothing_is_touched(tmp_path, capsys):
    (tmp_path / "records.jsonl").write_text('{"setting": "target", "id": "0"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["--output", str(tmp_path), "--resume", "--methods", "target", "--num-problems", "1", "--no-plots"])
    assert "run.json (the options they were made with) is missing" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rsd-bench.lock", "records.jsonl"]
    assert (tmp_path / "records.jsonl").read_text() == '{"setting": "target", "id": "0"}\n'


def test_repeated_prm_flags_add_up(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = cli.parse_args(["--prm", f"x={a}", "--prm", f"y={b}"])
    assert args.prm == {"x": str(a), "y": str(b)}
    assert sorted(cli.parse_args([]).prm) == ["large", "small"]


def test_defaults_fill_in_only_what_is_not_given(tmp_path):
    args = cli.parse_args(["--max-new-tokens", "1", "--max-step-tokens", "1", "--target", "Qwen/Qwen2.5-Math-7B"])
    assert (args.max_new_tokens, args.max_step_tokens, args.num_problems) == (1, 1, 100)
    assert args.target == "Qwen/Qwen2.5-Math-7B"  # a hub id is left to the hub
    args = cli.parse_args(["--dataset", "gsm8k", "--output", str(tmp_path)])
    assert (args.max_new_tokens, args.max_step_tokens, args.num_problems) == (2048, 512, None)
    args = cli.parse_args(["--report-only", "--target", "./models-since-deleted", "--output", str(tmp_path)])
    assert args.target == "./models-since-deleted"  # --report-only loads no model


def test_real_dataset_path_runs_on_tiny_checkpoints(tmp_path):
    """GSM8K through the real-data path (chat-less prompt fallback, math-verify grading) on tiny random models."""
    tok = build_toy_tokenizer()  # byte-level: any question text, and the PRM's "\n" step token
    for name, seed, hidden in (("draft", 2, 32), ("target", 1, 64)):
        make_lm("qwen2", len(tok), seed=seed, hidden_size=hidden).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    save_value_head_prm(tmp_path / "prm", tok, seed=5)
    rows = cli.main(
        ["--dataset", "gsm8k", "--num-problems", "2", "--draft", str(tmp_path / "draft"), "--target",
         str(tmp_path / "target"), "--prm", f"p={tmp_path / 'prm'}", "--methods", "target", "rsd", "--max-new-tokens",
         "12", "--max-step-tokens", "4", "--output", str(tmp_path / "out"), "--no-plots"]
    )  # fmt: skip
    assert [r["setting"] for r in rows] == ["target", "binary δ=0.7 prm=p"]
    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert {r["id"] for r in recs} == {"0", "1"} and all(r["dataset"] == "gsm8k" for r in recs)
    assert all(r["correct"] is False for r in recs)  # random models answer nothing


def test_report_only_rebuilds_the_summary_from_concatenated_records(tmp_path):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    cli.main([*QUICK, "--num-problems", "2", "--methods", "target", "--output", str(a)])
    cli.main([*QUICK, "--num-problems", "2", "--methods", "draft", "--output", str(b)])
    merged.mkdir()
    (merged / "records.jsonl").write_text((a / "records.jsonl").read_text() + (b / "records.jsonl").read_text())
    rows = cli.main(["--report-only", "--methods", "target", "draft", "--output", str(merged), "--no-plots"])
    assert [r["setting"] for r in rows] == ["target", "draft"]
    assert rows[1]["flops_vs_target"] < 0.2  # the ratio spans records from both runs
    assert json.loads((merged / "summary.json").read_text())["rows"] == rows


def _records_file(out, *records) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("mode", [["--report-only"], ["--methods", "target"]])
def test_a_second_run_on_a_locked_output_is_refused_at_once(tmp_path, monkeypatch, mode):
    out = tmp_path / "out"
    _records_file(out, _rec("target|target", "a", 1, True, {"target": 1}, {"target": 1}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(cli, "load_models", lambda args: pytest.fail("a refused run loaded models"))
    monkeypatch.setattr(sys, "argv", ["rsd-bench", *QUICK, *mode, "--output", str(out)])
    with open(out / bench_io.LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        with pytest.raises(SystemExit) as e:
            cli.entry()
    assert e.value.code == f"error: {out} is in use by another rsd-bench run: it holds the lock {held.name}; " + (
        "wait for it to finish or choose another --output"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != bench_io.LOCK_NAME} == before
    rows = cli.main(["--report-only", "--methods", "target", "--output", str(out), "--no-plots"])  # released: runs
    assert [r["n"] for r in rows] == [1] and (out / bench_io.LOCK_NAME).exists()


def test_refused_run_exits_non_zero_without_a_traceback(tmp_path):
    out = tmp_path / "out"
    _records_file(out, _rec("target|target", "a", 1, True, {"target": 1}, {"target": 1}))
    with open(out / bench_io.LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cmd = [sys.executable, "-m", "rsd_generation.benchmarks", "--report-only", "--output", str(out), "--no-plots"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"error: {out} is in use by another rsd-bench run" in done.stderr and "Traceback" not in done.stderr


def test_the_output_lock_is_held_while_the_summaries_are_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _records_file(out, _rec("target|target", "a", 1, True, {"target": 1}, {"target": 1}))
    held = []
    real = cli._write_summary

    def try_the_lock(*a):
        with open(out / bench_io.LOCK_NAME) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
        return real(*a)

    monkeypatch.setattr(cli, "_write_summary", try_the_lock)
    cli.main(["--report-only", "--methods", "target", "--output", str(out), "--no-plots"])
    assert held == [True]


def test_summary_counts_a_duplicated_record_once():
    a = _rec("target|target", "a", 1, True, {"target": 1000}, {"target": 400})
    b = _rec("target|target", "b", 2, False, {"target": 3000}, {"target": 600})
    again = {**a, "correct": False}  # e.g. two runs on one output folder, or records concatenated twice
    with pytest.warns(UserWarning, match="^2 duplicate record"):
        (row,) = summarize([a, b, again, b])
    assert row["n"] == 2 and row["accuracy"] == 0.5 and row["flops"] == 2000 and row["wall_s"] == 1.0


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of target-only on one question: (its output folder, its options less --output)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = [*QUICK, "--num-problems", "1", "--methods", "target"]
    cli.main([*args, "--output", str(out)])
    return out, args


@pytest.mark.parametrize(
    "change, lines",
    [
        (["--temperature", "0.5"], ["--temperature: was 0.7, now 0.5"]),
        (["--do-sample"], ["--do-sample: was False, now True"]),
        (["--dtype", "bfloat16"], ["--dtype (as resolved: torch_dtype): was 'float32', now 'bfloat16'"]),
        (["--batch-size", "1", "--seed", "3"], ["--batch-size: was 2, now 1", "--seed: was 0, now 3"]),
    ],
)
def test_resume_refuses_every_option_that_changes_records(finished_run, tmp_path, change, lines):
    out = shutil.copytree(finished_run[0], tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        cli.main([*finished_run[1], "--output", str(out), "--resume", *change])
    message = str(e.value.code)
    assert f"differ from the run in {out / 'run.json'}" in message
    assert [x.strip() for x in message.splitlines()[1:-1]] == lines  # each differing option, old and new, no other
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_resume_may_add_settings_and_spell_the_same_dtype_differently(finished_run, tmp_path, monkeypatch):
    out = shutil.copytree(finished_run[0], tmp_path / "run")
    ran = []
    wrapped = {k: lambda m, s, b, f=f: ran.append(s.key) or f(m, s, b) for k, f in cli.METHODS.items()}
    monkeypatch.setattr(cli, "METHODS", wrapped)
    argv = [*finished_run[1], "--output", str(out), "--resume", "--methods", "target", "draft", "--dtype", "float32"]
    rows = cli.main(argv)  # --dtype auto was float32 on this CPU: the same run
    assert [r["setting"] for r in rows] == ["target", "draft"] and ran == ["draft|draft"]


def test_the_cli_shows_no_loading_bars_or_transformers_notices_and_restores_them(tmp_path, capfd):
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    seen = {}
    real = cli.load_models

    def load_and_notice(args):
        hf_logging.get_logger("transformers.generation").warning("a notice of transformers' own")
        seen["hub bars"] = not hub.are_progress_bars_disabled()
        return real(args)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli, "load_models", load_and_notice)
            cli.main([*QUICK, "--num-problems", "1", "--methods", "target", "--output", str(tmp_path / "out")])
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "a notice of transformers' own" not in err
        assert seen == {"hub bars": True}  # downloads of real checkpoints still show progress
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
        assert not hub.are_progress_bars_disabled()
        hub.disable_progress_bars()
        cli.main(["--report-only", "--methods", "target", "--output", str(tmp_path / "out"), "--no-plots"])
        assert hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()  # each restored as it was
    finally:
        hf_logging.enable_progress_bar()


def test_a_result_names_the_command_that_reproduces_it(monkeypatch):
    """Arguments given to `main` (even none) are the command's, not the process's (pytest's, here)."""
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    assert bench_io.command_line("speed", []) == "python -m rsd_generation.benchmarks.speed"
    assert bench_io.command_line("speed", ["--tiny"]) == "python -m rsd_generation.benchmarks.speed --tiny"
    assert bench_io.command_line("schedule_sim", None) == "python -m rsd_generation.benchmarks.schedule_sim -q tests"

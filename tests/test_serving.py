"""The servers' HTTP client (`rsd_generation.serving.request_json`) against a local stub: transient failures are
retried with backoff, final ones are not, and the error that ends a request names the URL."""

import functools
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import NEEDS_BENCH
from rsd_generation.benchmarks.toy import MODELS as TOY

import rsd_generation as rsd
from rsd_generation.serving import request_json


class _Stub(BaseHTTPRequestHandler):
    """Answers the statuses in `self.server.script` in turn, then 200 with a JSON body."""

    def do_POST(self):
        self.server.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        status = self.server.script.pop(0) if self.server.script else 200
        body = json.dumps({"ok": True}).encode() if status == 200 else b"busy"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.calls, server.script = 0, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1/completions"


def test_transient_failures_are_retried(stub):
    stub.script = [503, 429]
    assert request_json(_url(stub), {"x": 1}, timeout=10, backoff=0.01) == {"ok": True}
    assert stub.calls == 3


def test_a_final_failure_is_not_retried_and_names_the_url(stub):
    stub.script = [400]
    with pytest.raises(RuntimeError, match=f"{_url(stub)} answered 400: busy"):
        request_json(_url(stub), {"x": 1}, timeout=10, backoff=0.01)
    assert stub.calls == 1


def test_retries_end_with_an_error_naming_the_url(stub):
    stub.script = [503] * 5
    with pytest.raises(RuntimeError, match="answered 503"):
        request_json(_url(stub), {"x": 1}, timeout=10, retries=2, backoff=0.01)
    assert stub.calls == 3


def test_a_server_that_is_gone_is_named():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=rf"http://127.0.0.1:{port}/health did not answer \(2 attempts\)"):
        request_json(f"http://127.0.0.1:{port}/health", None, timeout=5, retries=1, backoff=0.01)


# -- rsd-bench --backend vllm against stub servers ----------------------------------------------------------------
class _Policy(BaseHTTPRequestHandler):
    """A stand-in for a vLLM policy server on toy problems: two steps "1+1=2\\n\\n", then "The answer is 2." and EOS.
    After `server.die_after` completions it answers 500 (a server gone bad)."""

    def _send(self, status: int, body: dict | None):
        raw = json.dumps(body).encode() if body is not None else b"gone"
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/metrics":  # Prometheus text, as vLLM's: a counter per label set
            raw = f'# HELP x\nvllm:prompt_tokens_total{{engine="0"}} {10.0 * self.server.calls}\n'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            return self.wfile.write(raw)
        self._send(200, {"version": "stub"} if self.path == "/version" else {"data": [{"id": "stub"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls += 1
        if self.server.die_after is not None and self.server.calls > self.server.die_after:
            return self._send(500, None)
        tok = self.server.tok
        if self.path == "/pooling":  # a reward per token: high after an even number of input tokens
            n = len(body["input"])
            return self._send(200, {"data": [{"data": [[0.9 if n % 2 == 0 else 0.3]] * n}]})
        done = tok.decode(body["prompt"]).count("\n\n") - 1  # steps already in the context
        rest = ["1+1=2\n\n"] * max(2 - done, 0) + ["The answer is 2."]
        text = rest[0] if body.get("stop") else "".join(rest)  # a step, or (no stop string) the whole response
        ids = tok.encode(text, add_special_tokens=False)
        ids = ids if text.endswith("\n\n") else [*ids, tok.eos_token_id]
        return self._send(200, {"choices": [{"token_ids": ids[: body["max_tokens"]]}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def served(monkeypatch):
    """Two stub servers: the policies (draft and target) and the PRM; fast retries."""
    from transformers import AutoTokenizer

    from rsd_generation import serving

    monkeypatch.setattr(serving, "request_json", functools.partial(serving.request_json, retries=1, backoff=0.01))
    tok = AutoTokenizer.from_pretrained(TOY / "target")
    servers = []
    for _ in range(2):
        s = ThreadingHTTPServer(("127.0.0.1", 0), _Policy)
        s.calls, s.die_after, s.tok = 0, None, tok
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def _bench_args(policy, prm, out) -> list[str]:

    url = f"http://127.0.0.1:{policy.server_address[1]}"
    return ["--backend", "vllm", "--draft-url", url, "--target-url", url, "--prm", f"large={TOY / 'prm-large'}",
            "--prm-url", f"large=http://127.0.0.1:{prm.server_address[1]}", "--methods", "target", "rsd",
            "--num-problems", "6", "--concurrency", "2", "--no-plots", "--output", str(out)]  # fmt: skip


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@NEEDS_BENCH
def test_rsd_bench_over_servers_writes_the_records_of_each_method(served, tmp_path):
    from rsd_generation.benchmarks import cli

    policy, prm = served
    cli.main(_bench_args(policy, prm, tmp_path / "out"))
    recs = _records(tmp_path / "out")
    assert sorted(r["setting"] for r in recs) == ["rsd|binary δ=0.7 prm=large"] * 6 + ["target|target"] * 6
    for r in recs:
        assert r["response"] == "1+1=2\n\n1+1=2\n\nThe answer is 2.", r
        assert r["wall_s"] >= 0 and r["decode_flops"] and r["flops"]
        if r["method"] == "rsd":  # the stub's rewards: 0.9 or 0.3 by the input's length; δ = 0.7 decides
            assert r["draft_steps"] == 3 and len(r["step_rewards"]) == 3
            assert [a for _, a in r["step_rewards"]] == [w >= 0.7 for w, _ in r["step_rewards"]]
            assert r["accepted_steps"] == sum(a for _, a in r["step_rewards"])
            n_prm = rsd.load_reward_format(TOY / "prm-large").num_parameters
            assert r["decode_flops"]["reward"] == 2 * n_prm * 3  # one PRM call per draft step
            assert r["decode_flops"]["target"] > 0 if r["accepted_steps"] < 3 else "target" not in r["decode_flops"]


@NEEDS_BENCH
def test_a_server_failing_mid_run_keeps_the_finished_questions_and_resume_runs_the_rest(served, tmp_path):
    from rsd_generation.benchmarks import cli

    policy, prm = served
    args = _bench_args(policy, prm, tmp_path / "out")
    policy.die_after = 10  # the target-only setting finishes (6 requests), RSD fails partway
    url = f"http://127.0.0.1:{policy.server_address[1]}/v1/completions"
    with pytest.raises(RuntimeError, match=f"{url} answered 500"):
        cli.main(args)
    kept = _records(tmp_path / "out")
    assert len({r["setting"] for r in kept if r["method"] == "target"}) == 1 and 6 <= len(kept) < 12
    policy.die_after, policy.calls = None, 0
    cli.main([*args, "--resume"])
    recs = _records(tmp_path / "out")
    assert sorted((r["setting"], r["id"]) for r in recs) == sorted({(r["setting"], r["id"]) for r in recs})
    assert len(recs) == 12 and recs[: len(kept)] == kept  # nothing finished was run again or lost
    resumed = recs[len(kept) :]
    assert resumed and all(r["method"] == "rsd" for r in resumed)
    # the requests of the unfinished questions and no others: a draft step each, and a target step per rejection
    assert policy.calls == sum(2 * r["draft_steps"] - r["accepted_steps"] for r in resumed)


@NEEDS_BENCH
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "sd"], "--backend vllm runs the methods target, draft, rsd; not sd"),
        (["--do-sample"], "decodes greedily"),
        (["--prm-url", "small=http://x"], "RSD runs with reward models"),
        (["--draft-url", "localhost:8000"], "--draft-url must be an http(s) URL, got 'localhost:8000'"),
    ],
)
def test_rsd_bench_refuses_bad_server_options_naming_them(extra, message, capsys):
    from rsd_generation.benchmarks import cli

    base = ["--backend", "vllm", "--target-url", "http://t", "--draft-url", "http://d", "--prm-url", "large=http://p"]
    if "--prm-url" in extra:
        base = base[:-2]
    if "--draft-url" in extra:
        base = base[:3] + base[5:]
    with pytest.raises(SystemExit):
        cli.parse_args([*base, *extra, "--no-plots"])
    assert message in capsys.readouterr().err


@NEEDS_BENCH
def test_server_urls_need_the_vllm_backend(capsys):
    from rsd_generation.benchmarks import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--target-url", "http://t", "--no-plots"])
    assert "--target-url name servers for --backend vllm; this run's backend is transformers" in capsys.readouterr().err


@NEEDS_BENCH
def test_the_served_speed_script_compares_the_two_loops(served, tmp_path):
    """`benchmarks.served_speed` runs the asynchronous client and the lockstep loop on the same servers: the same
    tokens and decisions, problems/s of each, and each server's counters over each run."""
    from rsd_generation.benchmarks import served_speed

    policy, prm = served
    url, prm_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in (policy, prm))
    urls = tmp_path / "urls.json"
    urls.write_text(json.dumps({"draft": url, "target": url, "prm": prm_url}))
    out = tmp_path / "speed.json"
    args = ["--urls", str(urls), "--target", str(TOY / "target"), "--prm", str(TOY / "prm-large"), "--num-problems",
            "5", "--output", str(out)]  # fmt: skip
    result = served_speed.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["same_tokens"] and result["same_decisions"]
    for run in result["runs"].values():
        drafted = 5 * 3  # the stub's 3 steps per problem, each drafted, a target step per rejection
        assert run["problems_per_s"] > 0 and run["steps"] == drafted + round(drafted * (1 - run["acceptance_rate"]))
        counts = run["server_counts"]  # the stub counts 10 prompt tokens per request
        assert counts["draft+target"]["prompt_tokens_total"] == 10 * run["steps"]
        assert counts["prm"]["prompt_tokens_total"] == 10 * drafted
    with pytest.raises(SystemExit, match="exists"):
        served_speed.main(args)

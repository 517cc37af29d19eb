"""`rsd-serve`: start the draft, target and PRM vLLM servers for RSD over servers, and stop them together.

Each distinct model gets one OpenAI-compatible vLLM server (a model named for two roles is served once), on the
GPUs and with the tensor parallelism given per role, bound to `--host`. A server is ready once it answered
`/health` and one real request (a one-token completion, or a pooling call for the PRM): a vLLM server can pass
`/health` and still die on its first request. Then the URLs are printed and written to `--urls-file` (for
`rsd_generation.serving.Servers`), and the launcher waits; Ctrl-C or SIGTERM stops every server it started, and so
does one server dying (the launcher then exits 1 naming it).

    rsd-serve --draft Qwen/Qwen2.5-Math-1.5B-Instruct --target Qwen/Qwen2.5-Math-72B-Instruct \\
        --prm Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B --gpus draft=4 target=0,1,2,3 prm=4 --tensor-parallel target=4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .serving import request_json

ROLES = ("draft", "target", "prm")


def _per_role(values: list[str] | None, flag: str) -> dict[str, str]:
    """`ROLE=VALUE` pairs, each role known."""
    out = {}
    for v in values or []:
        role, sep, value = v.partition("=")
        if not sep or role not in ROLES or not value:
            raise SystemExit(f"error: {flag} takes ROLE=VALUE with ROLE one of {ROLES}, got {v!r}")
        out[role] = value
    return out


def _ready(url: str, role: str, timeout: float) -> None:
    """One real request: a one-token completion, or a pooling call for the PRM."""
    model = request_json(url + "/v1/models", None, timeout)["data"][0]["id"]
    if role == "prm":
        request_json(url + "/pooling", {"model": model, "input": [1, 2, 3], "task": "token_classify"}, timeout)
    else:
        request_json(url + "/v1/completions", {"model": model, "prompt": [1, 2, 3], "max_tokens": 1}, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rsd-serve", description=__doc__.split("\n\n")[0])
    for role in ROLES:
        ap.add_argument(f"--{role}", required=True, help=f"the {role}'s checkpoint (path or hub id)")
    ap.add_argument("--python", default=sys.executable, help="the python of vLLM's environment (default: this one)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001, help="the first server's port; the next ones follow")
    ap.add_argument("--gpus", nargs="*", help="ROLE=IDS (CUDA_VISIBLE_DEVICES of that role's server)")
    ap.add_argument("--tensor-parallel", nargs="*", help="ROLE=N (vLLM's --tensor-parallel-size)")
    ap.add_argument("--vllm-args", default="", help="more arguments for every server, as one string")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a server may take to be ready")
    ap.add_argument("--log-dir", default="rsd-serve-logs", help="one log file per server")
    ap.add_argument("--urls-file", default=None, help="write {role: url} here once every server is ready")
    args = ap.parse_args(argv)
    gpus, tp = _per_role(args.gpus, "--gpus"), _per_role(args.tensor_parallel, "--tensor-parallel")
    models = {role: getattr(args, role) for role in ROLES}
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)

    servers: dict[str, tuple[str, subprocess.Popen, Path]] = {}  # model -> (url, process, log)
    url_of: dict[str, str] = {}
    try:
        for k, (role, model) in enumerate((r, m) for r, m in models.items() if m not in servers):
            port = args.port + k
            cmd = [args.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", args.host,
                   "--port", str(port), *(["--tensor-parallel-size", tp[role]] if role in tp else []),
                   *args.vllm_args.split()]  # fmt: skip
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[role]} if role in gpus else {})}
            log = logs / f"{role}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            servers[model] = (f"http://{args.host}:{port}", proc, log)
        for role, model in models.items():
            url_of[role] = servers[model][0]
        _wait_ready(servers, models, args.timeout)
        for role in ROLES:
            print(f"{role}: {url_of[role]} ({models[role]})", flush=True)
        if args.urls_file:
            Path(args.urls_file).write_text(json.dumps(url_of, indent=2) + "\n")
        print("ready", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:  # until interrupted, or a server dies
            for model, (_, proc, log) in servers.items():
                if proc.poll() is not None:
                    print(f"error: the server of {model} exited with {proc.returncode}; log: {log}", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for _, proc, _ in servers.values():
            stop_server(proc)


def _wait_ready(servers: dict, models: dict[str, str], timeout: float) -> None:
    """Wait for every server's `/health` and first real request; a RuntimeError names a server that died or did
    not get ready in `timeout` seconds."""
    deadline = time.time() + timeout
    for role, model in models.items():
        url, proc, log = servers[model]
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server of {model} ({role}) exited with {proc.returncode}; log: {log}")
            try:
                request_json(url + "/health", None, 5, retries=0)  # polled: no retries of its own
                break
            except RuntimeError:
                if time.time() > deadline:
                    raise RuntimeError(
                        f"the server of {model} ({role}) was not up in {timeout} s; log: {log}"
                    ) from None
                time.sleep(1)
        try:
            _ready(url, role, timeout)
        except RuntimeError as e:
            raise RuntimeError(f"the server of {model} ({role}) failed its first request: {e}; log: {log}") from e


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server and its children (its process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def entry() -> None:
    """Console script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

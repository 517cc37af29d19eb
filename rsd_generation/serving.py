"""RSD over OpenAI-compatible vLLM servers: the draft, the target and the PRM each a server.

Each problem runs its own asynchronous step loop, so no problem waits for another and the servers batch whatever
is in flight. The draft server writes a step from the context's token ids (stopping at the step separator), the PRM
server scores it through its pooling endpoint (a Skywork-layout PRM through this package's vLLM plugin), ω(r)
decides as in process (`weighting`), and the target server writes a rejected step instead. Token ids travel both
ways: the context is never re-tokenised; the PRM reads the steps in its own format, as in process. The PRM input is
sent whole at every step; the server's prefix cache keeps that from costing a re-computation.

Greedy decoding only, for now. Standard library HTTP (one thread per request in flight), no extra dependency.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .mixin import check_int
from .stats import Step
from .weighting import Weighting, accept, get_weighting, needs_draw


@dataclass
class Servers:
    """Base URLs (e.g. `http://127.0.0.1:8000`) of the three servers, and their served model names (read from
    `/v1/models` when not given). One server may serve both policies."""

    draft: str
    target: str
    reward: str
    names: dict[str, str] = field(default_factory=dict)
    timeout: float = 600.0  # seconds per request


TRANSIENT = (429, 500, 502, 503, 504)  # HTTP statuses worth a retry (busy or restarting); others are final


def request_json(url: str, body: dict | None, timeout: float, retries: int = 3, backoff: float = 0.5) -> dict:
    """One JSON request (POST with a body, else GET). Transient failures (no answer, a timeout, HTTP 429 or 5xx) are
    retried `retries` times, waiting `backoff` seconds, then twice as long each time; the error that ends it names
    the URL."""
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
            return json.loads(raw) if raw else {}  # /health answers with an empty body
        except urllib.error.HTTPError as e:
            if e.code not in TRANSIENT or attempt == retries:
                raise RuntimeError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if attempt == retries:
                raise RuntimeError(f"{url} did not answer ({attempt + 1} attempts): {e}") from e
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


async def _call(url: str, body: dict | None, timeout: float) -> dict:
    """`request_json` in a worker thread."""
    return await asyncio.to_thread(request_json, url, body, timeout)


async def _name(servers: Servers, role: str) -> str:
    """The model name a server serves (its first), cached in `servers.names`."""
    if role not in servers.names:
        url = getattr(servers, role)
        servers.names[role] = (await _call(url + "/v1/models", None, servers.timeout))["data"][0]["id"]
    return servers.names[role]


async def write_step(servers: Servers, role: str, context: list[int], max_tokens: int, separator: str) -> list[int]:
    """The token ids of one greedy step the `role` server writes after `context`, ending at the separator (which
    stays in the step), at EOS or after `max_tokens`."""
    body = {
        "model": await _name(servers, role),
        "prompt": context,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stop": [separator],
        "include_stop_str_in_output": True,
        "return_token_ids": True,
    }
    out = await _call(getattr(servers, role) + "/v1/completions", body, servers.timeout)
    return list(out["choices"][0]["token_ids"])


async def write_response(servers: Servers, role: str, prompt: list[int], max_tokens: int) -> list[int]:
    """The token ids of a whole greedy response the `role` server writes after `prompt` (to EOS or `max_tokens`):
    the target-only and draft-only baselines."""
    body = {"model": await _name(servers, role), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True}  # fmt: skip
    out = await _call(getattr(servers, role) + "/v1/completions", body, servers.timeout)
    return list(out["choices"][0]["token_ids"])


async def score(servers: Servers, ids: list[int], kind: str = "value_head") -> float:
    """The PRM server's reward at the last of `ids` (the step token of the newest step): a value-head PRM's one
    output (the plugin's sigmoid), a Qwen PRM's probability of its positive class (vLLM's softmax over two)."""
    body = {"model": await _name(servers, "reward"), "input": ids, "task": "token_classify"}
    per_token = (await _call(servers.reward + "/pooling", body, servers.timeout))["data"][0]["data"]
    return float(per_token[-1][1 if kind == "qwen_prm" else 0])


async def solve(
    servers: Servers,
    prompt: list[int],
    problem: str,
    tokenizer,
    reward_format,
    omega: Weighting,
    *,
    separator: str = "\n\n",
    max_new_tokens: int = 1024,
    max_step_tokens: int = 512,
    eos: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[Step]]:
    """RSD for one problem over the servers: the new token ids and every step (as `rsd_stats["steps"]` has them).

    Args:
        prompt (`list[int]`): the policies' prompt ids.
        problem (`str`): the problem text the PRM sees.
        tokenizer: the policies' tokenizer (step texts are decoded from the ids, as in process).
        reward_format: the PRM's input format: `prefix_ids(problem)` and `step_ids(step)` (a `RewardModel`).
        omega (`Weighting`): ω, from `get_weighting`; `generator` draws u when ω leaves the decision to chance.
    """
    out: list[int] = []
    steps: list[Step] = []
    prm_ids = reward_format.prefix_ids(problem)
    while True:
        budget = min(max_step_tokens, max_new_tokens - len(out))
        y_hat = await write_step(servers, "draft", prompt + out, budget, separator)  # 1. draft step
        text = tokenizer.decode(y_hat, skip_special_tokens=True)
        r = await score(servers, prm_ids + reward_format.step_ids(text), reward_format.kind)  # 2. reward
        w = omega(torch.tensor([r]))  # 3. acceptance
        u = torch.rand(1, generator=generator) if needs_draw(w) else None
        kept = bool(accept(w, u)[0])
        steps.append(Step(text, len(y_hat), "draft", r, kept))
        y = y_hat
        if not kept:  # 4. the target writes the step instead
            y = await write_step(servers, "target", prompt + out, budget, separator)
            text = tokenizer.decode(y, skip_special_tokens=True)
            steps.append(Step(text, len(y), "target", None, True))
        out += y  # 5. commit
        prm_ids += reward_format.step_ids(text)
        if not y or y[-1] in eos or len(out) >= max_new_tokens:
            return out, steps


def generate_over_servers(
    servers: Servers,
    prompts: Sequence[list[int]],
    problems: Sequence[str],
    tokenizer,
    reward_format,
    *,
    threshold: float = 0.7,
    weighting: str = "binary",
    concurrency: int = 64,
    seed: int | None = None,
    on_result: Callable[[int, tuple[list[int], list[Step]]], None] | None = None,
    **kwargs,
) -> list[tuple[list[int], list[Step]]]:
    """RSD for every prompt over the servers, at most `concurrency` problems in flight, each on its own; results in
    prompt order. `on_result(i, result)` is called as each problem finishes (to save it: a later failure loses
    nothing finished). `kwargs` go to `solve` (`separator`, `max_new_tokens`, `max_step_tokens`, `eos`)."""
    if len(prompts) != len(problems):
        raise ValueError(f"one problem per prompt: got {len(problems)} problems for {len(prompts)} prompts")
    omega = get_weighting(weighting, threshold)

    def one(i: int):
        g = torch.Generator().manual_seed(seed + i) if seed is not None else None  # a stream per problem
        return solve(servers, list(prompts[i]), problems[i], tokenizer, reward_format, omega, generator=g, **kwargs)

    return run_all(one, len(prompts), concurrency, on_result)


def alone_over_servers(
    servers: Servers,
    role: str,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    concurrency: int = 64,
    on_result: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """One greedy response per prompt from the `role` server alone (`"draft"` or `"target"`), as
    `generate_over_servers` runs them: the new token ids, in prompt order."""
    if role not in ("draft", "target"):
        raise ValueError(f"role must be 'draft' or 'target', got {role!r}")
    return run_all(
        lambda i: write_response(servers, role, list(prompts[i]), max_new_tokens), len(prompts), concurrency, on_result
    )


def run_all(job: Callable[[int], Awaitable], n: int, concurrency: int, on_result: Callable | None = None) -> list:
    """`job(i)` for i < n, at most `concurrency` at a time; the results in order, each also handed to
    `on_result(i, result)` as it comes. The first failure ends the run (jobs in flight are cancelled)."""
    check_int("concurrency", concurrency, 1)

    async def run() -> list:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with gate:
                result = await job(i)
            if on_result is not None:
                on_result(i, result)
            return result

        return await asyncio.gather(*(one(i) for i in range(n)))

    return run_threaded(run(), concurrency)


def run_threaded(main: Coroutine, workers: int):
    """`asyncio.run(main)` with `workers` threads for the blocking HTTP requests: the default pool's
    min(32, CPUs + 4) would cap the requests in flight (6 on a 2-core machine)."""

    async def wrapped():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=workers))
        return await main

    return asyncio.run(wrapped())

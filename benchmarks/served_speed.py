"""Problems per second of RSD over vLLM servers: the asynchronous client (`rsd_generation.serving`, each problem its
own step loop) against a lockstep loop in the shape of the paper's reference (`main_online.py`: every unfinished
problem writes one draft step, then every step is scored, then the target rewrites the rejected ones, and the next
round waits for all), on the same servers and problems, greedy, binary ω. Also the positions each server processed
in each run, read from its `/metrics` (prompt tokens, of them prefix-cache hits, generated tokens), and whether the
two loops gave the same tokens and decisions.

Start the servers first (`rsd-serve ... --urls-file urls.json`), then:

    python -m rsd_generation.benchmarks.served_speed --urls urls.json --target <path> --prm <path>
        [--num-problems 50] [--output benchmarks/results/served-speed-<machine>.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import urllib.request

import torch
from transformers import AutoTokenizer

import rsd_generation as rsd
from rsd_generation.serving import Servers, request_json, run_all, run_threaded, score, solve, write_step
from rsd_generation.stats import Step
from rsd_generation.weighting import accept, get_weighting

from .io import command_line, refuse_overwrite, write_json_atomic
from .toy.task import SEPARATOR, problems

COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_hits_total", "prefix_cache_queries_total")


def server_counts(url: str) -> dict[str, float]:
    """The server's token counters from its Prometheus `/metrics` (summed over label sets)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split()[0].removeprefix("vllm:")
        if name in out:
            out[name] += float(line.rsplit(None, 1)[1])
    return out


async def lockstep(servers: Servers, prompts, texts, tok, fmt, omega, max_new: int, max_step: int, eos) -> list:
    """RSD in the reference's shape (see the module docstring): [(new ids, steps)] in prompt order."""
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    steps: list[list[Step]] = [[] for _ in range(n)]
    prm_ids = [fmt.prefix_ids(t) for t in texts]
    active = list(range(n))
    while active:
        budget = {i: min(max_step, max_new - len(out[i])) for i in active}
        drafts = await asyncio.gather(
            *(write_step(servers, "draft", prompts[i] + out[i], budget[i], SEPARATOR) for i in active)
        )
        step_texts = [tok.decode(y, skip_special_tokens=True) for y in drafts]
        rewards = await asyncio.gather(
            *(score(servers, prm_ids[i] + fmt.step_ids(t), fmt.kind) for i, t in zip(active, step_texts, strict=True))
        )
        kept = accept(omega(torch.tensor(rewards)), None).tolist()
        redo = [i for i, k in zip(active, kept, strict=True) if not k]
        rewrites = dict(zip(redo, await asyncio.gather(
            *(write_step(servers, "target", prompts[i] + out[i], budget[i], SEPARATOR) for i in redo)
        ), strict=True))  # fmt: skip
        for i, y, t, r, k in zip(active, drafts, step_texts, rewards, kept, strict=True):
            steps[i].append(Step(t, len(y), "draft", r, bool(k)))
            if not k:
                y = rewrites[i]
                t = tok.decode(y, skip_special_tokens=True)
                steps[i].append(Step(t, len(y), "target", None, True))
            out[i] += y
            prm_ids[i] += fmt.step_ids(t)
        active = [i for i in active if out[i] and out[i][-1] not in eos and len(out[i]) < max_new]
    return list(zip(out, steps, strict=True))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", required=True, help="rsd-serve's --urls-file (draft, target, prm URLs)")
    ap.add_argument("--target", required=True, help="the policies' checkpoint (its tokenizer)")
    ap.add_argument("--prm", required=True, help="the PRM's checkpoint (its input format)")
    ap.add_argument("--num-problems", type=int, default=50)
    ap.add_argument("--seed", type=int, default=11, help="toy problems' seed")
    ap.add_argument("--delta", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--max-step-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=64, help="problems in flight in the asynchronous client")
    ap.add_argument("--output", default=f"benchmarks/results/served-speed-{platform.machine()}.json")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    with open(args.urls) as f:
        urls = json.load(f)
    servers = Servers(draft=urls["draft"], target=urls["target"], reward=urls["prm"])
    tok = AutoTokenizer.from_pretrained(args.target)
    fmt = rsd.load_reward_format(args.prm)
    omega = get_weighting("binary", args.delta)
    texts = [p.prompt for p in problems(args.seed, args.num_problems)]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    eos = [tok.eos_token_id]
    kw = dict(max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens, eos=eos)
    loops = {
        "async": lambda: run_all(
            lambda i: solve(servers, prompts[i], texts[i], tok, fmt, omega, separator=SEPARATOR, **kw),
            len(prompts), args.concurrency,
        ),
        "lockstep": lambda: run_threaded(
            lockstep(servers, prompts, texts, tok, fmt, omega, args.max_new_tokens, args.max_step_tokens, eos),
            len(prompts),
        ),
    }  # fmt: skip
    distinct = dict.fromkeys(urls.values())
    loops["async"]()  # warm-up: the servers' first requests, and a prefix cache holding the problems as a run would
    result: dict = {"device": f"{platform.processor() or platform.machine()} (servers and client on it)", "runs": {}}
    outputs = {}
    for name, loop in loops.items():  # each run starts from the warm-up's cache state, in turn
        before = {u: server_counts(u) for u in distinct}
        t = time.perf_counter()
        outputs[name] = loop()
        seconds = time.perf_counter() - t
        after = {u: server_counts(u) for u in distinct}
        steps = [s for _, row in outputs[name] for s in row]
        result["runs"][name] = {
            "seconds": seconds,
            "problems_per_s": len(prompts) / seconds,
            "steps": len(steps),
            "acceptance_rate": sum(s.accepted for s in steps if s.source == "draft")
            / max(1, sum(s.source == "draft" for s in steps)),
            "server_counts": {  # by the roles a server serves
                "+".join(r for r, v in urls.items() if v == u): {k: after[u][k] - before[u][k] for k in COUNTERS}
                for u in distinct
            },
        }
        print(name, json.dumps(result["runs"][name]), flush=True)
    a, b = outputs["async"], outputs["lockstep"]
    result["same_tokens"] = [x[0] for x in a] == [x[0] for x in b]
    result["same_decisions"] = [[s.accepted for s in x[1]] for x in a] == [[s.accepted for s in x[1]] for x in b]
    result["async_over_lockstep"] = (
        result["runs"]["async"]["problems_per_s"] / result["runs"]["lockstep"]["problems_per_s"]
    )
    result.update(
        problems=len(prompts), delta=args.delta, concurrency=args.concurrency, urls=urls,
        versions={"torch": torch.__version__, "vllm": request_json(urls["prm"] + "/version", None, 30).get("version")},
        command=command_line("served_speed", argv),
    )  # fmt: skip
    write_json_atomic(args.output, result)
    print(f"async / lockstep: {result['async_over_lockstep']:.2f}x; wrote {args.output}")
    return result


if __name__ == "__main__":
    main()

"""rsd-bench over vLLM servers (`--backend vllm`): target only, draft only and RSD through
`rsd_generation.serving`, every problem on its own, at most `--concurrency` in flight.

The client loads no weights: the tokenizer, the policies' parameter counts (each model built on the meta device from
its config) and the PRMs' input formats (`rsd.load_reward_format`) come from the same `--draft`, `--target` and
`--prm` paths the servers serve. Records are those of the in-process methods (`benchmarks.methods`): the response,
FLOPs in both accountings and RSD's step counts. Positions are counted as a server whose prefix cache holds every
earlier request's context processes them (`served_positions`). Greedy only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import rsd_generation as rsd
from rsd_generation.serving import Servers, alone_over_servers, run_all, solve
from rsd_generation.stats import Step
from rsd_generation.weighting import get_weighting

from .methods import Models, Setting, _eos, costs, n_params, plain_positions, seed_for
from .toy.task import SEPARATOR

SERVED_METHODS = ("target", "draft", "rsd")


def meta_model(path: str):
    """A causal LM built on the meta device from its config: its parameter count and generation config, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def load_served_models(args) -> Models:
    """What the served methods need from the checkpoints (no weights), and the servers by role in `Models.servers`:
    `"draft"` and `"target"` URLs, and a `Servers` per PRM name."""
    tok = AutoTokenizer.from_pretrained(args.target)
    prms = {name: rsd.load_reward_format(path) for name, path in args.prm.items()}
    servers = {
        name: Servers(draft=args.draft_url, target=args.target_url, reward=args.prm_url.get(name, "")) for name in prms
    }
    policies = Servers(draft=args.draft_url, target=args.target_url, reward="")
    return Models(
        tokenizer=tok, draft=meta_model(args.draft), target=meta_model(args.target), prms=prms, separator=SEPARATOR,
        max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens, servers={"policies": policies,
        **servers},
    )  # fmt: skip


def served_positions(prompt_len: int, prm_prefix_len: int, steps: Sequence[Step], prm_len: Callable[[str], int]):
    """Positions each server processes for one problem when its prefix cache holds every earlier request's context:
    the context it has not seen, then what it writes (a discarded draft step too); the PRM reads each draft step
    after the committed ones (`prm_len(step)` tokens each). A model that never runs processes none."""
    pos = {"draft": 0, "target": 0, "reward": 0}
    ctx = {"policy": prompt_len, "reward": prm_prefix_len}  # committed context, in each tokenizer's tokens
    seen = {"draft": 0, "target": 0, "reward": 0}  # of it, what each server has processed
    for s in steps:
        n, m = s.n_tokens, prm_len(s.text)
        if s.source == "draft":
            pos["draft"] += ctx["policy"] - seen["draft"] + n
            pos["reward"] += ctx["reward"] - seen["reward"] + m
            seen["draft"], seen["reward"] = ctx["policy"], ctx["reward"]
            if s.accepted:
                ctx["policy"] += n
                ctx["reward"] += m
                seen["draft"], seen["reward"] = ctx["policy"], ctx["reward"]
        else:
            pos["target"] += ctx["policy"] - seen["target"] + n
            ctx["policy"] += n
            ctx["reward"] += m
            seen["target"] = ctx["policy"]
    return pos


def run_served(
    models: Models,
    setting: Setting,
    prompts: Sequence[str],
    problems: Sequence[str],
    ids: Sequence[str],
    base_seed: int,
    concurrency: int,
    on_record: Callable[[int, dict, float], None],
) -> None:
    """One setting over the servers for every prompt; `on_record(i, result, wall_s)` as each problem finishes, with
    the time since the previous one finished (so a setting's `wall_s` add up to its wall-clock)."""
    tok = models.tokenizer
    eos = sorted(_eos(models.target, tok))
    encoded = [tok.encode(p, add_special_tokens=False) for p in prompts]
    last = [time.perf_counter()]

    def done(i: int, result: dict) -> None:
        now = time.perf_counter()
        on_record(i, result, now - last[0])
        last[0] = now

    if setting.method in ("target", "draft"):
        role = setting.method
        model = models.target if role == "target" else models.draft

        def plain(i: int, new: list[int]) -> None:
            c = costs({role: model.num_parameters()}, {role: plain_positions(len(encoded[i]), [len(new)])},
                      {role: len(new)})  # fmt: skip
            done(i, {"response": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new), **c})

        alone_over_servers(models.servers["policies"], role, encoded, models.max_new_tokens, concurrency=concurrency,
                           on_result=plain)  # fmt: skip
        return
    p = setting.params
    prm, servers = models.prms[p["prm"]], models.servers[p["prm"]]
    omega = get_weighting(p.get("weighting", "binary"), p["delta"], **(p.get("weighting_kwargs") or {}))
    counts = n_params(models, prm)

    async def one(i: int) -> dict:
        g = torch.Generator().manual_seed(seed_for(setting, ids[i], base_seed))  # a stream per problem
        new, steps = await solve(
            servers, encoded[i], problems[i], tok, prm, omega, separator=models.separator,
            max_new_tokens=models.max_new_tokens, max_step_tokens=models.max_step_tokens, eos=eos, generator=g,
        )  # fmt: skip
        drafted = [s for s in steps if s.source == "draft"]
        generated = {
            "draft": sum(s.n_tokens for s in drafted),
            "target": sum(s.n_tokens for s in steps if s.source == "target"),
            "reward": len(drafted),  # one PRM call per draft step
        }
        positions = served_positions(len(encoded[i]), len(prm.prefix_ids(problems[i])), steps,
                                     lambda text: len(prm.step_ids(text)))  # fmt: skip
        return {
            "response": "".join(s.text for s in steps if s.accepted),
            "new_tokens": len(new),
            **costs(counts, positions, generated),
            "draft_steps": len(drafted),
            "accepted_steps": sum(s.accepted for s in drafted),
            "draft_only": all(s.source == "draft" for s in steps),
            "step_rewards": [(s.reward, s.accepted) for s in drafted],
        }

    run_all(one, len(prompts), concurrency, done)

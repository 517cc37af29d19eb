"""What each `rsd_schedule` policy can win at a batch size, by simulation against the GPU's measured tick costs.

Rows draw seeded acceptance coins (probability p per drafted step); the project's own `Scheduler` picks each
tick's model from the numbers of waiting and drafting rows; a draft tick costs `step_tokens` draft forwards and a
PRM step, a target tick `step_tokens` target forwards, whatever the number of rows in it (at batch 16 on an H200 a
forward over 3 rows costs what it costs over 16: weight reads). With `--prompts` above the batch size, finished
rows hand their slots to the next prompt (`rsd_max_batch_size`). The target alone costs `steps` target ticks per
batch. A model, not a measurement: it shows how far scheduling alone can go, and how cheap a draft token must be
for RSD to win at a batch size.

    python -m rsd_generation.benchmarks.schedule_sim --speed benchmarks/results/speed-h200-b16-graphs-kernels.json
        [--prompts 64] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from rsd_generation.schedule import Scheduler

from .io import command_line, refuse_overwrite, write_json_atomic


def simulate(policy, batch: int, prompts: int, steps: int, p: float, draft_tick: float, target_tick: float,
             seed: int) -> dict:  # fmt: skip
    """Seconds and ticks for `prompts` rows of `steps` steps each through `batch` slots under `policy`."""
    rng = random.Random(seed)
    sched = Scheduler(policy)
    sched.seconds, sched.accepted = {"draft": draft_tick, "target": target_tick}, p  # "throughput" reads these
    done, waiting, queued = [0] * min(batch, prompts), [False] * min(batch, prompts), prompts - min(batch, prompts)
    seconds = 0.0
    while True:
        live = [i for i in range(len(done)) if done[i] < steps]
        if not live:
            break
        n_wait = sum(waiting[i] for i in live)
        if sched.run_target(n_wait, len(live) - n_wait):
            for i in live:
                if waiting[i]:
                    done[i], waiting[i] = done[i] + 1, False
            seconds += target_tick
            sched.ticks["target"] += 1
        else:
            for i in live:
                if not waiting[i]:
                    if rng.random() < p:
                        done[i] += 1
                    else:
                        waiting[i] = True
            seconds += draft_tick
            sched.ticks["draft"] += 1
        for i in range(len(done)):  # a finished row's slot takes the next prompt
            if done[i] >= steps and queued:
                done[i], waiting[i], queued = 0, False, queued - 1
    return {"seconds": seconds, "ticks": dict(sched.ticks)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", required=True, help="a benchmarks.speed result: per-forward times of its first row")
    ap.add_argument("--mode", default=None, help="the decoding path's row to read (default: the first)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts through the slots (default: one batch)")
    ap.add_argument("--steps", type=int, default=8, help="steps per prompt")
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--acceptance", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--policies", nargs="+", default=["eager", "throughput", "2", "4", "8"])
    ap.add_argument("--draft-over-target", type=float, nargs="*", default=[0.35, 0.25, 0.15],
                    help="also simulate drafts this fraction of the target's cost per forward")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=50, help="coin draws averaged")
    ap.add_argument("--output", default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    if args.output:
        refuse_overwrite(args.output, args.force)
    source = json.loads(Path(args.speed).read_text())
    row = source["rows"][0]
    mode = row["modes"][args.mode or next(iter(row["modes"]))]
    B, prompts = row["batch_size"], args.prompts or row["batch_size"]
    if prompts < 1 or args.steps < 1 or not all(0 <= p <= 1 for p in args.acceptance):
        ap.error(f"--prompts and --steps must be >= 1 and --acceptance in [0, 1]; got {prompts}, {args.steps}, "
                 f"{args.acceptance}")  # fmt: skip
    ms, prm = mode["ms_per_forward"], mode["ms_per_prm_step"]
    target_tick = args.step_tokens * ms["target"] / 1e3
    alone = args.steps * target_tick * -(-prompts // B)
    policies = [int(p) if p.isdigit() else p for p in args.policies]
    result: dict = {"source": args.speed, "device": source.get("device"), "batch_size": B, "prompts": prompts,
                    "steps": args.steps, "step_tokens": args.step_tokens, "ms_per_forward": ms,
                    "ms_per_prm_step": prm, "target_alone_seconds": alone, "rows": []}  # fmt: skip
    for ratio in [ms["draft"] / ms["target"], *args.draft_over_target]:
        draft_tick = args.step_tokens * ms["target"] * ratio / 1e3 + prm / 1e3
        for p in args.acceptance:
            for policy in policies:
                runs = [
                    simulate(policy, B, prompts, args.steps, p, draft_tick, target_tick, s) for s in range(args.seeds)
                ]
                seconds = statistics.mean(r["seconds"] for r in runs)
                result["rows"].append({
                    "draft_over_target": ratio, "acceptance": p, "policy": policy, "seconds": seconds,
                    "speedup_vs_target_alone": alone / seconds,
                    "ticks": {m: statistics.mean(r["ticks"][m] for r in runs) for m in ("draft", "target")},
                })  # fmt: skip
                print(f"draft/target {ratio:.2f}, p = {p}, {policy!s:>10}: {seconds:.3f} s, "
                      f"{alone / seconds:.2f}x the target alone", flush=True)  # fmt: skip
    result["command"] = command_line("schedule_sim", argv)
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()

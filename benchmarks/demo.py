"""Demo: RSD against target-only and draft-only decoding on tiny models, with the limit behaviours checked.

The models are small random Qwen2 models written to disk and loaded back through `from_pretrained` and
`rsd.load_reward_model` (the loading path real checkpoints take). Random models solve nothing: the demo shows
the mechanics (acceptance, what each model processes, FLOPs against target-only, closeness to the target's
output) and checks that δ = 0 reproduces the draft and δ above every reward reproduces the target, token for token.

    python -m rsd_generation.benchmarks.demo [--output out/demo] [--device cpu|cuda] [--force]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

import rsd_generation as rsd
from rsd_generation.testing import build_tokenizer, make_lm, save_value_head_prm

from .io import command_line, refuse_overwrite, write_json_atomic
from .methods import plain_positions, trim


def toy_prompts(n: int, seed: int) -> list[str]:
    """Arithmetic prompts such as "12+7*3=" (seeded)."""
    rng = random.Random(seed)
    return [
        "".join(f"{rng.randint(1, 99)}{rng.choice('+-*')}" for _ in range(rng.randint(1, 3))) + f"{rng.randint(1, 9)}="
        for _ in range(n)
    ]


def build_models(root: Path, tok) -> tuple[Path, Path, Path]:
    """Write a draft (hidden 32), a target (hidden 128, 4 layers) and a value-head PRM to `root`."""
    draft, target, prm = root / "draft", root / "target", root / "prm"
    make_lm("qwen2", len(tok), seed=2).save_pretrained(draft)
    make_lm("qwen2", len(tok), seed=1, hidden_size=128, intermediate_size=256, num_hidden_layers=4).save_pretrained(
        target
    )
    save_value_head_prm(prm, tok, seed=5)
    for p in (draft, target):
        tok.save_pretrained(p)
    return draft, target, prm


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="out/demo", help="directory for models/ and results.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--step-tokens", type=int, default=6, help="rsd_max_step_tokens (random models rarely end steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing results.json")
    args = ap.parse_args(argv)
    out = Path(args.output)
    refuse_overwrite(out / "results.json", args.force)

    tok = build_tokenizer()
    draft_path, target_path, prm_path = build_models(out / "models", tok)
    target = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(target_path).to(args.device).eval())
    draft = AutoModelForCausalLM.from_pretrained(draft_path).to(args.device).eval()
    prm = rsd.load_reward_model(prm_path, tokenizer=tok, device_map=args.device)

    prompts = toy_prompts(args.num_prompts, args.seed)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    P = enc["input_ids"].shape[1]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    def timed(fn, repeats: int = 5):
        """Warm up once, then time `repeats` runs (device synchronised); returns the result and the median."""
        res = fn()
        times = []
        for _ in range(repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            res = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        spreads.append(max(times) - min(times))
        return res, statistics.median(times)

    spreads: list[float] = []
    target_out, t_target = timed(lambda: target.generate(**enc, **gen))
    draft_out, t_draft = timed(lambda: draft.generate(**enc, **gen))
    n_target = target.num_parameters()
    prompt_lens = enc["attention_mask"].sum(1).tolist()
    new_tokens = [trim(ids, {tok.eos_token_id}) for ids in target_out[:, P:].tolist()]
    positions = sum(plain_positions(p, [len(x)]) for p, x in zip(prompt_lens, new_tokens, strict=True))
    target_flops = 2 * n_target * positions

    def run_rsd(delta: float):
        return target.generate(
            **enc, **gen, tokenizer=tok, assistant_model=draft, reward_model=prm, rsd_threshold=delta,
            rsd_max_step_tokens=args.step_tokens, return_dict_in_generate=True,
        )  # fmt: skip

    rewards = sorted(s["reward"] for row in run_rsd(0.0).rsd_stats["steps"] for s in row)
    quantile = {q: rewards[int(q * (len(rewards) - 1))] for q in (0.2, 0.5, 0.8)}
    settings = [("δ=0 (all accepted)", 0.0)] + [(f"δ=q{int(q * 100)} of rewards", d) for q, d in quantile.items()]
    settings.append(("δ=1.5 (all rejected)", 1.5))

    rows = [
        {"method": "target only", "time_s": t_target, "flops": target_flops, "flops_vs_target": 1.0},
        {"method": "draft only", "time_s": t_draft, "match_draft": True},
    ]
    for name, delta in settings:
        res, t = timed(lambda d=delta: run_rsd(d))
        st = res.rsd_stats
        same = res.sequences[:, P:] == target_out[:, P:]
        rows.append(
            {
                "method": f"RSD {name}",
                "delta": delta,
                "time_s": t,
                "acceptance_rate": st["acceptance_rate"],
                "forward_tokens": st["forward_tokens"],
                "flops": sum(st["flops"].values()),
                "flops_vs_target": sum(st["flops"].values()) / target_flops,
                "target_flops_vs_target": st["flops"]["target"] / target_flops,
                "tokens_equal_to_target": float(same.float().mean()),
                "match_target": bool(torch.equal(res.sequences, target_out)),
                "match_draft": bool(torch.equal(res.sequences, draft_out)),
            }
        )

    print(f"{'method':28} {'accept':>7} {'FLOPs/target':>12} {'target FLOPs':>12} {'=target tok':>11} {'time s':>7}")
    nan = float("nan")
    for r in rows:
        cols = ("acceptance_rate", "flops_vs_target", "target_flops_vs_target", "tokens_equal_to_target")
        a, f, tf, eq = (r.get(c, nan) for c in cols)
        print(f"{r['method']:28} {a:7.2f} {f:12.2f} {tf:12.2f} {eq:11.2f} {r['time_s']:7.3f}")
    limits = {
        "delta_0_equals_draft": rows[2]["match_draft"],
        "delta_above_rewards_equals_target": rows[-1]["match_target"],
    }
    print("limit behaviours:", limits, f"(time: median of 5 runs; largest max-min spread {max(spreads):.3f} s)")
    result = {
        "rows": rows,
        "limits": limits,
        "reward_quantiles": quantile,
        "median_reward": statistics.median(rewards),
        "timing": "median of 5 runs after a warm-up, device synchronised",
        "max_time_spread_s": max(spreads),
        "prompts": prompts,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": command_line("demo", argv),
    }
    write_json_atomic(out / "results.json", result)
    print(f"wrote {out / 'results.json'}")
    if not all(limits.values()):
        raise SystemExit("error: a limit behaviour does not hold")
    return result


if __name__ == "__main__":
    main()

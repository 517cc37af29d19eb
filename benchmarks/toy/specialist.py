"""Paper Table B.1 analogue: a slice where the draft beats the target, and what RSD and SD do there.

The slice: sums and differences only, 4-6 operations, operands 100-999 (the toy target was trained on operands up to
199 and solves few of these). A specialist draft is the toy draft fine-tuned on a mix of the slice and the usual
levels. Speculative decoding keeps the target's output, so it keeps the target's accuracy on the slice; RSD keeps
the draft's steps the PRM accepts, so it can do better than the target there, if the PRM rewards the right steps.

    python -m rsd_generation.benchmarks.toy.specialist [--output benchmarks/results/toy-specialist-cpu.json]
        [--steps 600] [--problems 200] [--device cpu] [--force]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import rsd_generation as rsd

from ..io import refuse_overwrite, write_json_atomic
from . import MODELS as TOY
from .task import SEPARATOR, Problem, is_correct, problems
from .train import any_level, solve, train_policy

SLICE_OPS = (4, 6)  # operations per problem
SLICE_OPERANDS = (100, 999)


def slice_problem(rng: random.Random) -> Problem:
    """A problem of the slice: 4-6 sums and differences of operands 100-999 (marked level 5, the hardest)."""
    n = rng.randint(*SLICE_OPS)
    return Problem(
        tuple(rng.randint(*SLICE_OPERANDS) for _ in range(n + 1)), tuple(rng.choice("+-") for _ in range(n)), 5
    )


def mixed(share: float):
    """A problem maker: the slice with probability `share`, else any level."""
    return lambda rng: slice_problem(rng) if rng.random() < share else any_level(rng)


@torch.no_grad()
def decode(target, tok, probs: list[Problem], batch: int = 100, **kw) -> tuple[list[str], list[float]]:
    """Greedy `target.generate` (RSD or speculative decoding per `kw`) on `probs`: the responses and, for RSD, each
    row's share of steps the target wrote."""
    texts, shares = [], []
    for k in range(0, len(probs), batch):
        chunk = probs[k : k + batch]
        enc = tok([p.question + SEPARATOR for p in chunk], return_tensors="pt", padding=True)
        if "reward_model" in kw:
            out = target.generate(**enc, reward_prompts=[p.question for p in chunk], tokenizer=tok, do_sample=False,
                                  max_new_tokens=160, return_dict_in_generate=True, **kw)  # fmt: skip
            shares += [sum(s["source"] == "target" for s in row) / max(1, len(row)) for row in out.rsd_stats["steps"]]
            seqs = out.sequences
        else:
            seqs = rsd.speculative_generate(target, kw["assistant_model"], **enc, do_sample=False, max_new_tokens=160)
        texts += tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts, shares


def _acc(probs: list[Problem], texts: list[str]) -> float:
    return sum(is_correct(p, t) for p, t in zip(probs, texts, strict=True)) / len(probs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/toy-specialist-cpu.json")
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps of the specialist draft")
    ap.add_argument("--share", type=float, default=0.5, help="share of slice problems in its fine-tuning batches")
    ap.add_argument("--problems", type=int, default=200, help="evaluation problems, on the slice and off it")
    ap.add_argument("--threshold", type=float, default=0.7, help="RSD's δ")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(TOY / "target", padding_side="left")
    draft = AutoModelForCausalLM.from_pretrained(TOY / "draft", dtype=torch.float32)
    target = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(TOY / "target", dtype=torch.float32).eval())
    specialist = copy.deepcopy(draft)
    curve = train_policy(specialist, tok, args.steps, 128, 1e-3, args.seed + 21, args.device, mixed(args.share))
    specialist.eval()
    rng = random.Random(args.seed + 22)
    on = [slice_problem(rng) for _ in range(args.problems)]
    off = problems(10**6 + 7 + args.seed, args.problems)  # held out, levels 1-5
    result: dict = {"accuracy": {}, "target_step_share": {}}
    for name, probs in (("slice", on), ("levels 1-5", off)):
        acc = {k: _acc(probs, solve(m, tok, probs, args.device)) for k, m in
               (("draft", draft), ("specialist", specialist), ("target", target))}  # fmt: skip
        texts, _ = decode(target, tok, probs, assistant_model=specialist)
        acc["sd (specialist drafts)"] = _acc(probs, texts)
        for prm_name in ("prm-small", "prm-large"):
            prm = rsd.load_reward_model(TOY / prm_name, dtype=torch.float32)
            key = f"rsd δ={args.threshold} {prm_name} (specialist drafts)"
            texts, shares = decode(target, tok, probs, assistant_model=specialist, reward_model=prm,
                                   rsd_threshold=args.threshold)  # fmt: skip
            acc[key] = _acc(probs, texts)
            result["target_step_share"].setdefault(name, {})[key] = sum(shares) / len(shares)
        result["accuracy"][name] = acc
        print(name, acc, result["target_step_share"][name], flush=True)
    result |= {
        "slice": f"sums and differences only, {SLICE_OPS[0]}-{SLICE_OPS[1]} operations, operands "
        f"{SLICE_OPERANDS[0]}-{SLICE_OPERANDS[1]}",
        "problems": args.problems,
        "fine_tuning": {"steps": args.steps, "share_of_slice": args.share, "loss": curve},
        "seconds": time.time() - t0,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(
            ["python -m rsd_generation.benchmarks.toy.specialist", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()

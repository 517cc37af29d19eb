"""How many forwards RSD∘SD saves the target on the shipped toy models (CPU), and that the output is unchanged.

    python -m rsd_generation.benchmarks.speculative_calls [--num-problems 48] [--delta 0.7] [--gammas 0 2 4 8]
        [--output benchmarks/results/speculative-calls-toy-cpu.json] [--force]

RSD (small PRM, binary δ, greedy) on toy problems in one batch, once per γ (`rsd_speculative`; 0: the target writes
rejected steps alone), and batched speculative decoding against the target alone. Counts model forwards, not time:
the toy models are too small for CPU or GPU timing to mean much.
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import rsd_generation as rsd

from .io import command_line, refuse_overwrite, write_json_atomic
from .toy import MODELS, task

TOY = MODELS


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="speculative_calls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-problems", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--delta", type=float, default=0.7)
    ap.add_argument("--gammas", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--output", default="benchmarks/results/speculative-calls-toy-cpu.json")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    tok = AutoTokenizer.from_pretrained(TOY / "target", padding_side="left")
    target = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(TOY / "target").eval())
    draft = AutoModelForCausalLM.from_pretrained(TOY / "draft").eval()
    prm = rsd.load_reward_model(TOY / "prm-small")
    prompts = [p.prompt.strip() + task.SEPARATOR for p in task.problems(args.seed, args.num_problems)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(tokenizer=tok, assistant_model=draft, reward_model=prm, rsd_threshold=args.delta, rsd_max_step_tokens=48,
              max_new_tokens=160, do_sample=False, return_dict_in_generate=True, reward_prompts=prompts)  # fmt: skip
    rows, reference = [], None
    for gamma in args.gammas:
        out = target.generate(**enc, rsd_speculative=gamma, **kw)
        reference = out.sequences if reference is None else reference
        st = out.rsd_stats
        rows.append({"method": "rsd", "gamma": gamma, "forward_calls": st["forward_calls"],
                     "forward_tokens": st["forward_tokens"], "acceptance_rate": st["acceptance_rate"],
                     "same_output_as_first": bool(torch.equal(out.sequences, reference))})  # fmt: skip
        print(rows[-1], flush=True)
    alone = target.generate(**enc, max_new_tokens=160, do_sample=False)
    new_tokens = int((alone[:, enc["input_ids"].shape[1] :] != tok.pad_token_id).sum())
    for gamma in [g for g in args.gammas if g > 0]:
        out = rsd.speculative_generate(
            target, draft, **enc, gamma=gamma, max_new_tokens=160, return_dict_in_generate=True
        )
        rows.append({"method": "sd", "gamma": gamma, "forward_calls": out.rsd_stats["forward_calls"],
                     "target_alone_forward_calls": alone.shape[1] - enc["input_ids"].shape[1],
                     "same_output_as_target_generate": bool(torch.equal(out.sequences, alone))})  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        "device": f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "num_problems": args.num_problems, "delta": args.delta, "target_new_tokens": new_tokens, "rows": rows,
        "command": command_line("speculative_calls", argv),
    }  # fmt: skip
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()

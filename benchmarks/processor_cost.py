"""What logits processors cost per token on the RSD path, when a batch's rows have committed different numbers of
tokens (processors then run once per distinct length, so each row sees the ids `generate` would give it).

    python -m rsd_generation.benchmarks.processor_cost [--batch-size 16] [--tokens 64] [--mode graphs]
        [--output benchmarks/results/processor-cost-<gpu>.json] [--force]

One model (the 1.5B Qwen2.5-Math shapes, random bf16 weights) decodes `--tokens` tokens for every row with
`decode_step`, three ways: no processors; a repetition penalty of 1.05 (Qwen2.5 instruct's default) with every row
at the same committed length (one call per token); the same penalty with every row at its own length (one call per
row per token). Reports the median ms per token of each, after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList

from rsd_generation.decoding import RowIds, Sampling, StepRules, decode_step, step_separator
from rsd_generation.fast import MODES, row_cache

from .io import command_line, refuse_overwrite, write_json_atomic
from .speed import QWEN_1_5B, random_model, word_tokenizer


def ms_per_token(model, tok, B: int, n: int, mode: str, processors: list, lengths: list[int], repeats: int) -> float:
    """Median ms per token of `n`-token steps for `B` rows whose committed lengths are `lengths`."""
    prompts = torch.randint(30, 1000, (B, 128), generator=torch.Generator().manual_seed(0))
    ctx = RowIds(prompts, 0)
    ctx.out = [[5] * k for k in lengths]
    s = Sampling(
        LogitsProcessorList(processors), False, None, QWEN_1_5B["vocab_size"], torch.empty(0, dtype=torch.long), 0
    )
    rules = StepRules(step_separator(tok, "\n\n"), n, StoppingCriteriaList())
    rows, budget = torch.ones(B, dtype=torch.bool), torch.full((B,), 10**6)
    cache = row_cache(model, "cost", B, 0, mode, 128 + (repeats + 2) * n + max(lengths) + 64)
    cache.pending = prompts.tolist()
    decode_step(cache, ctx, rows, budget, s, rules)  # prefill, capture, warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        decode_step(cache, ctx, rows, budget, s, rules)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="processor_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=MODES[1:], default="graphs")
    ap.add_argument("--output", default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: processor_cost measures GPU time and needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    output = args.output or f"benchmarks/results/processor-cost-{gpu.split()[-1].lower()}.json"
    refuse_overwrite(output, args.force)
    tok = word_tokenizer(QWEN_1_5B["vocab_size"])
    model = random_model(QWEN_1_5B, 1, "cuda", torch.bfloat16)
    B, n = args.batch_size, args.tokens
    penalty = [RepetitionPenaltyLogitsProcessor(1.05)]
    result = {
        "device": gpu,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "batch_size": B,
        "tokens": n,
        "mode": args.mode,
        "shapes": "qwen2.5-1.5b (random, bf16)",
        "ms_per_token_no_processors": ms_per_token(model, tok, B, n, args.mode, [], [0] * B, args.repeats),
        "ms_per_token_penalty_one_length": ms_per_token(model, tok, B, n, args.mode, penalty, [0] * B, args.repeats),
        "ms_per_token_penalty_all_lengths_differ": ms_per_token(
            model, tok, B, n, args.mode, penalty, list(range(B)), args.repeats
        ),
        "command": command_line("processor_cost", argv),
    }
    print({k: v for k, v in result.items() if k.startswith("ms_")}, flush=True)
    write_json_atomic(output, result)
    return result


if __name__ == "__main__":
    main()

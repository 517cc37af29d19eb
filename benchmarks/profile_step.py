"""Where the time of one decode step goes: the RSD decode path against `generate`, on a GPU, with torch.profiler.

Random bf16 weights of Qwen2.5-Math-1.5B's shapes, batch 1, 128-token prompt, 64 one-token forwards each.

    python -m rsd_generation.benchmarks.profile_step [--tokens 64] [--shapes 1.5b|7b] [--mode off|static|graphs|compile]
        [--no-generate] [--no-attention-kernel] [--output FILE]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessorList, StoppingCriteriaList

from rsd_generation import kernels
from rsd_generation.decoding import RowIds, Sampling, StepRules, decode_step, step_separator
from rsd_generation.fast import MODES, row_cache

from .io import command_line, write_json_atomic
from .speed import QWEN_1_5B, QWEN_7B, random_model, word_tokenizer


def top_ops(events, n: int, key: str) -> list[dict]:
    """The `n` events (of `prof.key_averages()`) with the largest `key` total (CPU or CUDA), in ms."""
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "total_ms": getattr(e, key) / 1e3} for e in rows]


def kernel_events(prof) -> list:
    """The GPU kernels of a profile (an operator's device time repeats its kernels': summing both counts twice)."""
    return [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--shapes", choices=["1.5b", "7b"], default="1.5b")
    ap.add_argument("--mode", choices=MODES[1:], default="off", help="decoding path (rsd_fast_path value)")
    ap.add_argument("--no-generate", action="store_true", help="profile the RSD decode path only")
    ap.add_argument("--no-attention-kernel", action="store_true", help="SDPA instead of kernels.decode_attention")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    kernels.ATTENTION = not args.no_attention_kernel
    shapes = QWEN_1_5B if args.shapes == "1.5b" else QWEN_7B
    tok = word_tokenizer(QWEN_1_5B["vocab_size"])
    model = random_model(shapes, 1, "cuda", torch.bfloat16)
    prompts = torch.randint(1, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    n = args.tokens
    s = Sampling(LogitsProcessorList(), False, None, QWEN_1_5B["vocab_size"], torch.empty(0, dtype=torch.long), 0)
    rules = StepRules(step_separator(tok, "\n\n"), n, StoppingCriteriaList())
    rows, budget = torch.ones(1, dtype=torch.bool), torch.full((1,), 10**6)

    def ours():
        cache = row_cache(model, "profile", 1, 0, args.mode, 128 + 2 * n + 64)
        cache.pending = prompts.tolist()
        decode_step(cache, RowIds(prompts, 0), rows, budget, s, rules)  # prefill + n tokens
        torch.cuda.synchronize()
        return cache

    enc = {"input_ids": prompts.cuda(), "attention_mask": torch.ones_like(prompts).cuda()}

    def hf():
        model.generate(**enc, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False)
        torch.cuda.synchronize()

    result: dict = {"device": torch.cuda.get_device_name(), "shapes": args.shapes, "tokens": n, "mode": args.mode}
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name, fn in (("rsd_decode_path", ours), ("generate_eager", hf))[: 1 if args.no_generate else 2]:
        fn()  # warm-up
        t = time.perf_counter()
        fn()
        result[f"{name}_ms_per_token"] = (time.perf_counter() - t) / n * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        events = prof.key_averages()
        result[f"{name}_aten_ops_per_token"] = sum(e.count for e in events if e.key.startswith("aten::")) / n
        kernels_run = kernel_events(prof)
        result[f"{name}_cuda_kernel_ms_per_token"] = sum(e.self_device_time_total for e in kernels_run) / 1e3 / n
        result[f"{name}_top_cpu"] = top_ops(events, 15, "self_cpu_time_total")
        result[f"{name}_top_cuda"] = top_ops(kernels_run, 25, "self_device_time_total")
        print(f"== {name}: {result[f'{name}_ms_per_token']:.2f} ms/token wall, "
              f"{result[f'{name}_cuda_kernel_ms_per_token']:.2f} ms/token in kernels, "
              f"{result[f'{name}_aten_ops_per_token']:.0f} aten ops/token", flush=True)  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25), flush=True)
    result["command"] = command_line("profile_step", argv)
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()

"""Where the host time of a batched RSD run goes: what each run pays once (graph captures, Triton compilations),
a cProfile of a steady run, the device synchronisations by source line, and the GPU's kernels over a steady run
(their total against the wall time: the share the GPU was busy).

Random bf16 models of Qwen2.5-Math's shapes (as `benchmarks.speed`), RSD through `generate` on the `graphs` path
with the seeded constant weighting p = 0.8, 256 new tokens in 32-token steps:

    python -m rsd_generation.benchmarks.host_profile --batch-size 16 --runs 5 --output FILE

Each run also records each model's forward calls, tokens, padded positions and positions in forwards wider than
one token (`--catch-up`: the runs' `rsd_catch_up`; default `"auto"`, along on the graphs path, lazy on the static
one). `--tiny` runs tiny shapes on the CPU (static path, 8-token prompts, no synchronisation count), to check the
script itself or to count those positions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import time
import warnings

import torch
import transformers
from torch import nn
from torch.profiler import ProfilerActivity, profile

import rsd_generation as rsd
from rsd_generation.decoding import CATCH_UP, catch_up_mode

from .io import command_line, refuse_overwrite, write_json_atomic
from .profile_step import kernel_events, top_ops
from .speed import QWEN_1_5B, QWEN_7B, TINY, chunk_positions, random_model, total_capture_seconds, word_tokenizer


@contextlib.contextmanager
def counting_triton_compilations(counts: collections.Counter):
    """Count Triton's kernel compilations by kernel name in `counts` (a private hook of Triton's JIT: where it
    is missing, nothing is counted)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    original = getattr(JITFunction, "_do_compile", None)
    if original is None:
        yield
        return

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    JITFunction._do_compile = counted
    try:
        yield
    finally:
        JITFunction._do_compile = original


def syncs_by_line(fn) -> dict[str, int]:
    """Run `fn` with torch's synchronisation debug mode on: how often each source line made the host wait."""
    where: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename.split('/')[-1]}:{w.lineno}"] += 1
    return dict(where.most_common())


def device_kernels(fn, n: int) -> dict:
    """Run `fn` under torch.profiler: wall seconds, seconds of GPU kernels (graph replays included) and their share
    of the wall time (the rest the GPU idles, waiting on the host), and the `n` kernels first by time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    kernels_run = kernel_events(prof)
    kernel = sum(e.self_device_time_total for e in kernels_run) / 1e6
    top = top_ops(kernels_run, n, "self_device_time_total")
    return {"wall_s": wall, "kernel_s": kernel, "busy_share": kernel / wall, "top_kernels": top}


def profile_top(prof: cProfile.Profile, key: str, n: int) -> list[dict]:
    """The `n` functions first by `key` ("tottime" or "cumulative")."""
    stats = pstats.Stats(prof)
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:n]:
        calls, _, tottime, cumtime, _ = stats.stats[func]
        rows.append({"function": f"{func[0].split('/')[-1]}:{func[1]}({func[2]})", "calls": calls,
                     "tottime_s": tottime, "cumtime_s": cumtime})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5, help="timed runs before the profiled one (the first captures)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--top", type=int, default=30, help="functions listed per cProfile ordering")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, for checking the script itself")
    ap.add_argument("--catch-up", choices=list(CATCH_UP), default="auto", help="rsd_catch_up of the runs")
    ap.add_argument("--output", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    for name in ("batch_size", "runs", "new_tokens", "top"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("error: benchmarks.host_profile needs a CUDA GPU (only --tiny runs on the CPU)")
    refuse_overwrite(args.output, args.force)
    device, mode = ("cuda", "graphs") if cuda else ("cpu", "static")
    small, big = dict(QWEN_1_5B), dict(QWEN_7B)
    if args.tiny:
        small, big = {**small, **TINY}, {**big, **TINY, "hidden_size": 128}
    tok = word_tokenizer(small["vocab_size"])
    draft = random_model(small, 1, device, torch.bfloat16)
    target = random_model(big, 2, device, torch.bfloat16)
    head = nn.Linear(small["hidden_size"], 1).to(device, torch.bfloat16)
    prm = rsd.ValueHeadPRM(random_model(small, 3, device, torch.bfloat16).model, head, tok, step_token="b")
    prompts = torch.randint(1, 1000, (args.batch_size, 128 if cuda else 8), generator=torch.Generator().manual_seed(0))
    enc = {"input_ids": prompts.to(device), "attention_mask": torch.ones_like(prompts).to(device)}

    def run():
        out = target.generate(
            **enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, tokenizer=tok,
            assistant_model=draft, reward_model=prm, rsd_threshold=0.8, rsd_max_step_tokens=32,
            return_dict_in_generate=True, rsd_fast_path=mode, rsd_max_batch_size=args.batch_size,
            rsd_generator=torch.Generator().manual_seed(16), rsd_weighting="constant", rsd_weighting_kwargs={"p": 0.8},
            rsd_catch_up=args.catch_up,
        )  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        return out

    runs = []
    for i in range(args.runs):  # what each run pays once: graph captures, Triton compilations
        compiles: collections.Counter = collections.Counter()
        before, t0 = total_capture_seconds(), time.perf_counter()
        with counting_triton_compilations(compiles):
            out = run()
        seconds, capture = time.perf_counter() - t0, total_capture_seconds() - before
        st = out.rsd_stats
        runs.append({"seconds": seconds, "capture_seconds": capture, "triton_compilations": dict(compiles),
                     "forward_calls": st["forward_calls"], "forward_tokens": st["forward_tokens"],
                     "padded_tokens": st["padded_tokens"],
                     "chunk_positions": chunk_positions({"draft": draft, "target": target})})  # fmt: skip
        print(f"run {i}: {runs[-1]}", flush=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": command_line("host_profile", argv),
        "batch_size": args.batch_size,
        "catch_up": catch_up_mode(args.catch_up, mode),
        "path": mode,
        "runs": runs,
        "profiled_run_seconds": time.perf_counter() - t0,
        "by_own_time": profile_top(prof, "tottime", args.top),
        "by_cumulative_time": profile_top(prof, "cumulative", args.top),
        "syncs_by_line": syncs_by_line(run) if cuda else None,
        "device_kernels": device_kernels(run, args.top) if cuda else None,
    }
    write_json_atomic(args.output, result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
